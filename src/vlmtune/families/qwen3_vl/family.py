"""Qwen3-VL: `model.visual` (blocks with a `linear_fc1/2` MLP, the `merger` and the DeepStack mergers
`deepstack_merger_list.K`, which feed vision features into early language layers) and
`model.language_model` (Qwen3). Stored on disk under the runtime names.

DeepStack mergers count as projector, as vLLM's connector mapping does, so an adapter trained with
projector LoRA serves under vLLM's tower/connector flag unchanged.
"""

from __future__ import annotations

from ..base import Family, decoder_targets, roles

FAMILY = Family(
    name="qwen3_vl",
    model_types=("qwen3_vl",),
    architecture="Qwen3VLForConditionalGeneration",
    block_lists=("model.language_model.layers", "model.visual.blocks"),
    role_prefixes=roles(
        projector=("model.visual.merger", "model.visual.deepstack_merger_list"),
        vision="model.visual",
        language="model.language_model",
    ),
    lora_target_patterns={
        "language": decoder_targets("model.language_model.layers"),
        "vision": r"model\.visual\.blocks\.\d+\.(?:attn\.(?:qkv|proj)|mlp\.(?:linear_fc1|linear_fc2))",
        "projector": r"model\.visual\.(?:merger|deepstack_merger_list\.\d+)\.(?:linear_fc1|linear_fc2)",
    },
    image_limit_keys=("min_pixels", "max_pixels"),
    token_aligned_keys=("mm_token_type_ids",),
    packed_positions="rope_index",
    rope_index_model="Qwen3VLModel",
)
