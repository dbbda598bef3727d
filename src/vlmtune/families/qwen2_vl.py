"""Qwen2-VL: `model.visual` (blocks + `merger` projector) and `model.language_model` (Qwen2).

On disk (hub layout, transformers' `Qwen2VLForConditionalGeneration` conversion): `visual.*`,
`model.layers.*` / `model.embed_tokens` / `model.norm`, `lm_head.*`.
"""

from __future__ import annotations

from typing import Any

from .base import TEXT_CONTENT, TINY_SIZES, Family, content_with_images

LANGUAGE_TARGETS = (
    r"model\.language_model\.layers\.\d+\.(?:self_attn\.(?:q_proj|k_proj|v_proj|o_proj)"
    r"|mlp\.(?:gate_proj|up_proj|down_proj))"
)

ROLE_PREFIXES = (
    ("projector", "model.visual.merger"),
    ("vision", "model.visual"),
    ("embeddings", "model.language_model.embed_tokens"),
    ("language", "model.language_model"),
    ("lm_head", "lm_head"),
)

# transformers/conversion_mapping.py, "Qwen2VLForConditionalGeneration" (same for Qwen2.5-VL).
DISK_TO_RUNTIME = (
    (r"^visual\.", "model.visual."),
    (r"^model\.(?!language_model\.|visual\.)", "model.language_model."),
)

SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# Qwen's ChatML template, with `{% generation %}` around what the assistant says (and its <|im_end|>),
# so `return_assistant_tokens_mask=True` marks exactly the supervised tokens.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['role'] == 'assistant' %}{% generation %}"
    f"{TEXT_CONTENT}<|im_end|>{{% endgeneration %}}{{{{ '\\n' }}}}"
    "{% else %}"
    f"{content_with_images('<|vision_start|><|image_pad|><|vision_end|>', '<|vision_start|><|video_pad|><|vision_end|>')}"
    "<|im_end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

SIZES = TINY_SIZES


def mrope_section(hidden: int, heads: int) -> list[int]:
    """Split half the head dim over (temporal, height, width) as Qwen does (16/24/24 of 64)."""
    half = hidden // heads // 2
    t = half // 4
    h = (half - t) // 2
    return [t, h, half - t - h]


def text_config(size: str, tokens: dict[str, int], vocab_size: int) -> dict[str, Any]:
    hidden, inter, layers, heads, kv, *_ = SIZES[size]
    return {
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "vocab_size": vocab_size,
        "max_position_embeddings": 4096,
        "rope_scaling": {"type": "mrope", "mrope_section": mrope_section(hidden, heads)},
        "bos_token_id": tokens["<|endoftext|>"],
        "eos_token_id": tokens["<|im_end|>"],
        "pad_token_id": tokens["<|endoftext|>"],
    }


def special_ids(tokens: dict[str, int]) -> dict[str, int]:
    return {
        "image_token_id": tokens["<|image_pad|>"],
        "video_token_id": tokens["<|video_pad|>"],
        "vision_start_token_id": tokens["<|vision_start|>"],
        "vision_end_token_id": tokens["<|vision_end|>"],
    }


def tiny_config(size: str, tokens: dict[str, int], vocab_size: int) -> dict[str, Any]:
    hidden, _, _, _, _, width, depth, vheads = SIZES[size]
    return {
        "model_type": "qwen2_vl",
        "text_config": text_config(size, tokens, vocab_size),
        "vision_config": {
            "depth": depth,
            "embed_dim": width,
            "hidden_size": hidden,
            "num_heads": vheads,
            "mlp_ratio": 2,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        **special_ids(tokens),
        "tie_word_embeddings": False,
    }


def processor_builder(processor_class: str) -> Any:
    """A tiny-processor builder for the Qwen processors (Qwen2-VL and Qwen2.5-VL share the image and
    video processors; each has its own processor class)."""

    def build(tokenizer: Any, chat_template: str) -> Any:
        import transformers

        # Small images keep tiny models fast: 56x56 is 4x4 patches -> 4 tokens after the 2x2 merge.
        opts = {"min_pixels": 28 * 28, "max_pixels": 112 * 112, "patch_size": 14, "merge_size": 2}
        return getattr(transformers, processor_class)(
            image_processor=transformers.Qwen2VLImageProcessor(**opts, temporal_patch_size=2),
            video_processor=transformers.Qwen2VLVideoProcessor(**opts, temporal_patch_size=2),
            tokenizer=tokenizer,
            chat_template=chat_template,
        )

    return build


FAMILY = Family(
    name="qwen2_vl",
    model_types=("qwen2_vl",),
    architecture="Qwen2VLForConditionalGeneration",
    role_prefixes=ROLE_PREFIXES,
    lora_target_patterns={
        "language": LANGUAGE_TARGETS,
        "vision": r"model\.visual\.blocks\.\d+\.(?:attn\.(?:qkv|proj)|mlp\.(?:fc1|fc2))",
        "projector": r"model\.visual\.merger\.mlp\.(?:0|2)",
    },
    disk_to_runtime=DISK_TO_RUNTIME,
    image_limit_keys=("min_pixels", "max_pixels"),
    tiny_config=tiny_config,
    tiny_processor=processor_builder("Qwen2VLProcessor"),
    special_tokens=SPECIAL_TOKENS,
    token_roles={"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
    chat_template=CHAT_TEMPLATE,
    packed_positions="rope_index",
    rope_index_model="Qwen2VLModel",
)
