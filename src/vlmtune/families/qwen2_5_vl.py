"""Qwen2.5-VL: as Qwen2-VL, but the vision blocks use a gated MLP (`gate_proj/up_proj/down_proj`, the
language model's leaf names) and windowed attention."""

from __future__ import annotations

import dataclasses
from typing import Any

from . import qwen2_vl
from .base import Family


def tiny_config(size: str, tokens: dict[str, int], vocab_size: int) -> dict[str, Any]:
    hidden, _, _, _, _, width, depth, vheads = qwen2_vl.SIZES[size]
    return {
        "model_type": "qwen2_5_vl",
        "text_config": qwen2_vl.text_config(size, tokens, vocab_size),
        "vision_config": {
            "depth": depth,
            "hidden_size": width,
            "intermediate_size": 2 * width,
            "num_heads": vheads,
            "out_hidden_size": hidden,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 56,
            "fullatt_block_indexes": [depth - 1],
        },
        **qwen2_vl.special_ids(tokens),
        "tie_word_embeddings": False,
    }


FAMILY: Family = dataclasses.replace(
    qwen2_vl.FAMILY,
    name="qwen2_5_vl",
    model_types=("qwen2_5_vl",),
    architecture="Qwen2_5_VLForConditionalGeneration",
    lora_target_patterns={
        **qwen2_vl.FAMILY.lora_target_patterns,
        "vision": r"model\.visual\.blocks\.\d+\.(?:attn\.(?:qkv|proj)|mlp\.(?:gate_proj|up_proj|down_proj))",
    },
    tiny_config=tiny_config,
    tiny_processor=qwen2_vl.processor_builder("Qwen2_5_VLProcessor"),
    rope_index_model="Qwen2_5_VLModel",
)
