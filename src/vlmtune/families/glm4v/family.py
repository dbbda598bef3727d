"""GLM-4.1V (`Glm4vForConditionalGeneration`): `model.visual` (blocks with a gated MLP, a conv
`downsample`, the `merger` projector) and a GLM-4 `model.language_model` whose MLP is a **fused
`gate_up_proj`**: `gate_proj` / `up_proj` exist only in the vision blocks and the merger, so the language
preset names the fused leaf. Stored on disk under the runtime names.
"""

from __future__ import annotations

from ..base import ATTENTION_LEAVES, Family, decoder_targets, roles

FAMILY = Family(
    name="glm4v",
    model_types=("glm4v",),
    architecture="Glm4vForConditionalGeneration",
    block_lists=("model.language_model.layers", "model.visual.blocks"),
    role_prefixes=roles(
        projector="model.visual.merger", vision="model.visual", language="model.language_model"
    ),
    lora_target_patterns={
        "language": decoder_targets(
            "model.language_model.layers",
            (("self_attn", ATTENTION_LEAVES), ("mlp", ("gate_up_proj", "down_proj"))),
        ),
        "vision": (
            r"model\.visual\.blocks\.\d+\.(?:attn\.(?:qkv|proj)|mlp\.(?:gate_proj|up_proj|down_proj))"
        ),
        "projector": r"model\.visual\.merger\.(?:proj|gate_proj|up_proj|down_proj)",
    },
    token_aligned_keys=("mm_token_type_ids",),
    packed_positions="rope_index",
    rope_index_model="Glm4vModel",
)
