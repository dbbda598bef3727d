"""Qwen3.5 (natively multimodal): Qwen3-VL's vision side (`model.visual`, `merger`, no DeepStack) and a
hybrid language model: most layers are Gated DeltaNet linear attention (`linear_attn.in_proj_qkv`,
`in_proj_z`, `in_proj_b`, `in_proj_a`, `out_proj`), every fourth is `self_attn`. Stored on disk under the
runtime names.

The language preset covers every Linear of both layer kinds and the MLPs. It leaves out the DeltaNet's
causal `conv1d` and its `A_log` / `dt_bias` parameters (not Linear layers: LoRA cannot target them).
"""

from __future__ import annotations

from ..base import ATTENTION_LEAVES, MLP_LEAVES, Family, decoder_targets, roles

LINEAR_ATTENTION_LEAVES = ("in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a", "out_proj")

FAMILY = Family(
    name="qwen3_5",
    model_types=("qwen3_5",),
    architecture="Qwen3_5ForConditionalGeneration",
    block_lists=("model.language_model.layers", "model.visual.blocks"),
    role_prefixes=roles(
        projector="model.visual.merger", vision="model.visual", language="model.language_model"
    ),
    lora_target_patterns={
        "language": decoder_targets(
            "model.language_model.layers",
            (("self_attn", ATTENTION_LEAVES), ("linear_attn", LINEAR_ATTENTION_LEAVES), ("mlp", MLP_LEAVES)),
        ),
        "vision": r"model\.visual\.blocks\.\d+\.(?:attn\.(?:qkv|proj)|mlp\.(?:linear_fc1|linear_fc2))",
        "projector": r"model\.visual\.merger\.(?:linear_fc1|linear_fc2)",
    },
    image_limit_keys=("min_pixels", "max_pixels"),
    token_aligned_keys=("mm_token_type_ids",),
    packing_unsupported=(
        "its Gated DeltaNet linear-attention layers carry state across a packed row: they need per-sample "
        "seq_idx/cu_seqlens resets, which position ids alone do not give"
    ),
    serve_unsupported="its Gated DeltaNet layers keep linear-attention state the continuous-batching scheduler cannot batch",
)
