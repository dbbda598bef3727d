"""Qwen2-VL: `model.visual` (blocks + `merger` projector) and `model.language_model` (Qwen2).

On disk (hub layout, transformers' `Qwen2VLForConditionalGeneration` conversion): `visual.*`,
`model.layers.*` / `model.embed_tokens` / `model.norm`, `lm_head.*`.
"""

from __future__ import annotations

from ..base import Family, KeyTable, Rename, decoder_targets, roles

ROLE_PREFIXES = roles(projector="model.visual.merger", vision="model.visual", language="model.language_model")

# transformers/conversion_mapping.py, "Qwen2VLForConditionalGeneration" (same for Qwen2.5-VL).
KEYS = KeyTable(
    (
        Rename("visual", "model.visual"),
        Rename("model", "model.language_model", unless=("model.language_model", "model.visual")),
    )
)

FAMILY = Family(
    name="qwen2_vl",
    model_types=("qwen2_vl",),
    architecture="Qwen2VLForConditionalGeneration",
    block_lists=("model.language_model.layers", "model.visual.blocks"),
    role_prefixes=ROLE_PREFIXES,
    lora_target_patterns={
        "language": decoder_targets("model.language_model.layers"),
        "vision": r"model\.visual\.blocks\.\d+\.(?:attn\.(?:qkv|proj)|mlp\.(?:fc1|fc2))",
        "projector": r"model\.visual\.merger\.mlp\.(?:0|2)",
    },
    keys=KEYS,
    image_limit_keys=("min_pixels", "max_pixels"),
    token_aligned_keys=("mm_token_type_ids",),
    packed_positions="rope_index",
    rope_index_model="Qwen2VLModel",
)
