"""LLaVA-1.5 (HF `LlavaForConditionalGeneration`): CLIP `model.vision_tower`, a two-Linear
`model.multi_modal_projector`, a Llama `model.language_model`.

On disk (hub layout): `language_model.model.*`, `language_model.lm_head.*`, `vision_tower.*` (pre-5.x
checkpoints nest CLIP as `vision_tower.vision_model.*`; 5.x flattens it), `multi_modal_projector.*`.
Original LLaVA training outputs (haotian-liu/LLaVA) use a third layout, mapped by `llava_original`.
"""

from __future__ import annotations

from typing import Any

from .base import TEXT_CONTENT, TINY_SIZES, Family, content_with_images

# transformers/conversion_mapping.py, "llava" + "LlavaModel" + "CLIPVisionModel".
DISK_TO_RUNTIME = (
    (r"^language_model\.lm_head\.", "lm_head."),
    (r"^language_model\.model\.", "model.language_model."),
    (r"^vision_tower\.vision_model\.", "model.vision_tower."),
    (r"^vision_tower\.", "model.vision_tower."),
    (r"^multi_modal_projector\.", "model.multi_modal_projector."),
    (r"^image_newline$", "model.image_newline"),
)

# haotian-liu/LLaVA module paths (after PEFT's `base_model.model.` prefix) -> HF runtime names; the table of
# transformers' convert_llava_weights_to_hf.py. `mm_projector.0/.2` exist for `mlp2x_gelu`; a `linear`
# projector is a bare `mm_projector`.
LLAVA_ORIGINAL = (
    (r"^model\.mm_projector\.0\.", "model.multi_modal_projector.linear_1."),
    (r"^model\.mm_projector\.2\.", "model.multi_modal_projector.linear_2."),
    (r"^model\.vision_tower\.vision_tower\.vision_model\.", "model.vision_tower."),
    (r"^model\.image_newline$", "model.image_newline"),
    (r"^model\.(?!language_model\.|vision_tower\.|multi_modal_projector\.)", "model.language_model."),
)

# LLaVA `mm_projector_type` -> the projector Linear layers it implies in HF Llava.
PROJECTOR_LAYERS = {
    "linear": ("model.multi_modal_projector.linear_1",),
    "mlp2x_gelu": ("model.multi_modal_projector.linear_1", "model.multi_modal_projector.linear_2"),
}


def check_llava_original(
    foreign: dict[str, Any], base_config: dict[str, Any], base_params: Any, folder: Any
) -> None:
    """Refuse a LLaVA training output whose projector or vision-layer choice differs from the HF base."""
    from ..errors import VlmtuneError

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


SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>", "<image>")

# The llava-1.5-hf conversation format (USER:/ASSISTANT:), assistant turns inside `{% generation %}`.
CHAT_TEMPLATE = (
    "<s>"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n"
    f"{{% elif message['role'] == 'user' %}}USER: {content_with_images('<image>' + chr(10))}{{{{ '\\n' }}}}"
    "{% else %}ASSISTANT:\n{% generation %}"
    f"{TEXT_CONTENT}</s>{{% endgeneration %}}{{{{ '\\n' }}}}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:\n{% endif %}"
)

SIZES = TINY_SIZES
IMAGE_SIZE = 56
PATCH_SIZE = 14


def tiny_config(size: str, tokens: dict[str, int], vocab_size: int) -> dict[str, Any]:
    hidden, inter, layers, heads, kv, width, depth, vheads = SIZES[size]
    return {
        "model_type": "llava",
        "text_config": {
            "model_type": "llama",
            "hidden_size": hidden,
            "intermediate_size": inter,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": kv,
            "vocab_size": vocab_size,
            "max_position_embeddings": 4096,
            "bos_token_id": tokens["<s>"],
            "eos_token_id": tokens["</s>"],
            "pad_token_id": tokens["<pad>"],
        },
        "vision_config": {
            "model_type": "clip_vision_model",
            "hidden_size": width,
            "intermediate_size": 2 * width,
            "num_hidden_layers": depth,
            "num_attention_heads": vheads,
            "image_size": IMAGE_SIZE,
            "patch_size": PATCH_SIZE,
            "projection_dim": width,
        },
        "image_token_id": tokens["<image>"],
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
        "projector_hidden_act": "gelu",
        "tie_word_embeddings": False,
    }


def tiny_processor(tokenizer: Any, chat_template: str) -> Any:
    from transformers import LlavaImageProcessor, LlavaProcessor

    side = {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    return LlavaProcessor(
        image_processor=LlavaImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size=side),
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=chat_template,
    )


FAMILY = Family(
    name="llava",
    model_types=("llava",),
    architecture="LlavaForConditionalGeneration",
    role_prefixes=(
        ("projector", "model.multi_modal_projector"),
        ("projector", "model.image_newline"),
        ("vision", "model.vision_tower"),
        ("embeddings", "model.language_model.embed_tokens"),
        ("language", "model.language_model"),
        ("lm_head", "lm_head"),
    ),
    lora_target_patterns={
        "language": (
            r"model\.language_model\.layers\.\d+\.(?:self_attn\.(?:q_proj|k_proj|v_proj|o_proj)"
            r"|mlp\.(?:gate_proj|up_proj|down_proj))"
        ),
        "vision": r"model\.vision_tower\.encoder\.layers\.\d+\.(?:self_attn\.(?:q_proj|k_proj|v_proj|out_proj)|mlp\.(?:fc1|fc2))",
        "projector": r"model\.multi_modal_projector\.linear_(?:1|2)",
    },
    disk_to_runtime=DISK_TO_RUNTIME,
    foreign_layouts={"llava_original": LLAVA_ORIGINAL},
    foreign_checks={"llava_original": check_llava_original},
    tiny_config=tiny_config,
    tiny_processor=tiny_processor,
    special_tokens=SPECIAL_TOKENS,
    token_roles={"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"},
    chat_template=CHAT_TEMPLATE,
    packed_positions="1d",
)
