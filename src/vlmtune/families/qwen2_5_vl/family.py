"""Qwen2.5-VL: as Qwen2-VL, but the vision blocks use a gated MLP (`gate_proj/up_proj/down_proj`, the
language model's leaf names) and windowed attention."""

from __future__ import annotations

import dataclasses

from ..base import Family
from ..qwen2_vl import FAMILY as QWEN2_VL

FAMILY: Family = dataclasses.replace(
    QWEN2_VL,
    name="qwen2_5_vl",
    model_types=("qwen2_5_vl",),
    architecture="Qwen2_5_VLForConditionalGeneration",
    lora_target_patterns={
        **QWEN2_VL.lora_target_patterns,
        "vision": r"model\.visual\.blocks\.\d+\.(?:attn\.(?:qkv|proj)|mlp\.(?:gate_proj|up_proj|down_proj))",
    },
    rope_index_model="Qwen2_5_VLModel",
)
