"""A tiny Qwen3-VL: Qwen2-VL's tokens and ChatML template, one DeepStack merger, 56-px images."""

from __future__ import annotations

import dataclasses
from typing import Any

from ..qwen2_vl import tiny as qwen2_vl
from ..tiny_kit import TINY_SIZES, TinySpec


def text_config(
    size: str, tokens: dict[str, int], vocab_size: int, interleaved: bool = True
) -> dict[str, Any]:
    hidden, _, _, heads, *_ = TINY_SIZES[size]
    text = qwen2_vl.text_config(size, tokens, vocab_size)
    del text["rope_scaling"]
    text["head_dim"] = hidden // heads
    text["rope_parameters"] = {
        "rope_type": "default",
        "rope_theta": 10000.0,
        "mrope_section": qwen2_vl.mrope_section(hidden, heads),
        "mrope_interleaved": interleaved,
    }
    return text


def vision_config(size: str) -> dict[str, Any]:
    hidden, *_, width, depth, vheads = TINY_SIZES[size]
    return {
        "depth": depth,
        "hidden_size": width,
        "intermediate_size": 2 * width,
        "num_heads": vheads,
        "out_hidden_size": hidden,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "num_position_embeddings": 16,
    }


def tiny_config(size: str, tokens: dict[str, int], vocab_size: int) -> dict[str, Any]:
    return {
        "model_type": "qwen3_vl",
        "text_config": text_config(size, tokens, vocab_size),
        "vision_config": {**vision_config(size), "deepstack_visual_indexes": [0]},
        **qwen2_vl.special_ids(tokens),
        "tie_word_embeddings": False,
    }


TINY: TinySpec = dataclasses.replace(
    qwen2_vl.TINY,
    config=tiny_config,
    processor=qwen2_vl.processor_builder("Qwen3VLProcessor", video_class="Qwen3VLVideoProcessor"),
)
