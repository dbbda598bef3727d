"""A tiny Qwen2-VL: ChatML template, Qwen2VL image/video processors at 56-px images."""

from __future__ import annotations

from typing import Any

from ..tiny_kit import TINY_SIZES, TinySpec, chatml

SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

CHAT_TEMPLATE = chatml(
    "<|vision_start|><|image_pad|><|vision_end|>", "<|vision_start|><|video_pad|><|vision_end|>"
)

SIZES = TINY_SIZES
TOKEN_ROLES = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}


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


def processor_builder(
    processor_class: str,
    image_class: str = "Qwen2VLImageProcessor",
    video_class: str = "Qwen2VLVideoProcessor",
    patch_size: int = 14,
) -> Any:
    """A tiny-processor builder for the Qwen processors (Qwen2-VL and Qwen2.5-VL share the image and
    video processors; each has its own processor class)."""

    def build(tokenizer: Any, chat_template: str) -> Any:
        import transformers

        # Small images keep tiny models fast: 56x56 is 4x4 patches -> 4 tokens after the 2x2 merge.
        side = patch_size * 2
        opts = {
            "min_pixels": side * side,
            "max_pixels": (4 * side) ** 2,
            "patch_size": patch_size,
            "merge_size": 2,
        }
        return getattr(transformers, processor_class)(
            image_processor=getattr(transformers, image_class)(**opts, temporal_patch_size=2),
            video_processor=getattr(transformers, video_class)(**opts, temporal_patch_size=2),
            tokenizer=tokenizer,
            chat_template=chat_template,
        )

    return build


TINY = TinySpec(
    config=tiny_config,
    processor=processor_builder("Qwen2VLProcessor"),
    special_tokens=SPECIAL_TOKENS,
    chat_template=CHAT_TEMPLATE,
    token_roles=TOKEN_ROLES,
)
