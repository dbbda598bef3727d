"""A tiny Qwen2.5-VL: Qwen2-VL's tokenizer, template and image processor; its own vision config."""

from __future__ import annotations

import dataclasses
from typing import Any

from ..qwen2_vl import tiny as qwen2_vl
from ..tiny_kit import TinySpec


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


TINY: TinySpec = dataclasses.replace(
    qwen2_vl.TINY, config=tiny_config, processor=qwen2_vl.processor_builder("Qwen2_5_VLProcessor")
)
