"""Original LLaVA training outputs (haotian-liu/LLaVA): PEFT LoRA weights under `model.layers…`, the
projector in a pickled `non_lora_trainables.bin` (`model.mm_projector.0/.2`, `image_newline` for 1.6),
and a `config.json` with `mm_*` fields. FIELD_NOTES §3."""

from __future__ import annotations

from typing import Any

from ...errors import VlmtuneError
from ..base import ForeignFormat, KeyTable, Rename

TRAINABLES = "non_lora_trainables.bin"

# haotian-liu/LLaVA module paths (after PEFT's `base_model.model.` prefix) -> HF runtime names; the table of
# transformers' convert_llava_weights_to_hf.py. `mm_projector.0/.2` exist for `mlp2x_gelu`; a `linear`
# projector is a bare `mm_projector`.
KEYS = KeyTable(
    (
        Rename("model.mm_projector.0", "model.multi_modal_projector.linear_1"),
        Rename("model.mm_projector.2", "model.multi_modal_projector.linear_2"),
        Rename("model.vision_tower.vision_tower.vision_model", "model.vision_tower"),
        Rename("model.image_newline", "model.image_newline"),
        Rename(
            "model",
            "model.language_model",
            unless=("model.language_model", "model.vision_tower", "model.multi_modal_projector"),
        ),
    )
)

# LLaVA `mm_projector_type` -> the projector Linear layers it implies in HF Llava.
PROJECTOR_LAYERS = {
    "linear": ("model.multi_modal_projector.linear_1",),
    "mlp2x_gelu": ("model.multi_modal_projector.linear_1", "model.multi_modal_projector.linear_2"),
}


def check(foreign: dict[str, Any], base_config: dict[str, Any], base_params: Any, folder: Any) -> None:
    """Refuse a LLaVA training output whose projector or vision-layer choice differs from the HF base."""
    kind = foreign.get("mm_projector_type")
    if kind is not None:
        if kind not in PROJECTOR_LAYERS:
            raise VlmtuneError(
                f"{folder}/config.json: mm_projector_type {kind!r} has no HF Llava equivalent "
                f"(known: {', '.join(PROJECTOR_LAYERS)})."
            )
        base_layers = tuple(
            n[: -len(".weight")]
            for n in base_params
            if n.startswith("model.multi_modal_projector.") and n.endswith(".weight")
        )
        if sorted(base_layers) != sorted(PROJECTOR_LAYERS[kind]):
            base_kind = next(
                (k for k, v in PROJECTOR_LAYERS.items() if sorted(v) == sorted(base_layers)), "unknown"
            )
            raise VlmtuneError(
                f"{folder}/config.json: the adapter's projector is {kind!r} but the base's is {base_kind!r} "
                f"({len(base_layers)} Linear layer(s)); use a base built with a {kind!r} projector."
            )
    layer = foreign.get("mm_vision_select_layer")
    base_layer = base_config.get("vision_feature_layer")
    if layer is not None and base_layer is not None and layer != base_layer:
        raise VlmtuneError(
            f"{folder}/config.json: mm_vision_select_layer is {layer} but the base uses vision_feature_layer "
            f"{base_layer}; the projector was trained on other features. Use a base with vision_feature_layer={layer}."
        )


FORMAT = ForeignFormat(
    format="llava",
    layout="llava_original",
    what="a LLaVA training output (non_lora_trainables.bin / mm_* config)",
    keys=KEYS,
    extra_files=(TRAINABLES,),
    config_markers=("mm_projector_type",),
    check=check,
    vllm_problem=(
        "it is a LLaVA training output (non_lora_trainables.bin); vLLM reads PEFT adapter folders only. "
        "Merge it into the HF Llava base with `vlmtune merge` and serve the merged model."
    ),
)
