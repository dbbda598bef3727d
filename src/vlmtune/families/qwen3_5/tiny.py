"""A tiny Qwen3.5: 4 language layers (3 Gated DeltaNet, 1 full attention), Qwen3-VL's vision side."""

from __future__ import annotations

import dataclasses
from typing import Any

from ..qwen2_vl import tiny as qwen2_vl
from ..qwen3_vl import tiny as qwen3_vl
from ..tiny_kit import TINY_SIZES, TinySpec


def tiny_config(size: str, tokens: dict[str, int], vocab_size: int) -> dict[str, Any]:
    hidden, _, layers, heads, kv, *_ = TINY_SIZES[size]
    text = qwen3_vl.text_config(size, tokens, vocab_size)
    head_dim = hidden // heads
    text.update(
        num_hidden_layers=2 * layers,
        layer_types=(["linear_attention"] * 3 + ["full_attention"]) * (layers // 2),
        linear_key_head_dim=head_dim // 2,
        linear_value_head_dim=head_dim // 2,
        linear_num_key_heads=kv,
        linear_num_value_heads=heads,
    )
    # Half the head is rotary (partial_rotary_factor); the mrope sections split that half.
    text["rope_parameters"].update(
        partial_rotary_factor=0.5, mrope_section=qwen2_vl.mrope_section(hidden // 2, heads)
    )
    return {
        "model_type": "qwen3_5",
        "text_config": text,
        "vision_config": qwen3_vl.vision_config(size),
        **qwen2_vl.special_ids(tokens),
        "tie_word_embeddings": False,
    }


TINY: TinySpec = dataclasses.replace(
    qwen2_vl.TINY,
    config=tiny_config,
    processor=qwen2_vl.processor_builder("Qwen3VLProcessor", video_class="Qwen3VLVideoProcessor"),
)
