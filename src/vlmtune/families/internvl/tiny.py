"""A tiny InternVL: Qwen2 text model, InternViT at 56 px (4 tokens per image after pixel shuffle)."""

from __future__ import annotations

from typing import Any

from ..tiny_kit import CHATML_ROLES, CHATML_TOKENS, TINY_SIZES, TinySpec, chatml

SPECIAL_TOKENS = (*CHATML_TOKENS, "<img>", "</img>", "<IMG_CONTEXT>", "<video>")
NAMED_TOKENS = {
    "start_image_token": "<img>",
    "end_image_token": "</img>",
    "context_image_token": "<IMG_CONTEXT>",
    "video_token": "<video>",
}
CHAT_TEMPLATE = chatml("<IMG_CONTEXT>\n", "<video>\n")
IMAGE_SIZE = 56
TOKENS_PER_IMAGE = 4  # (56 / 14)^2 patches x downsample_ratio^2


def tiny_config(size: str, tokens: dict[str, int], vocab_size: int) -> dict[str, Any]:
    hidden, inter, layers, heads, kv, width, depth, vheads = TINY_SIZES[size]
    return {
        "model_type": "internvl",
        "text_config": {
            "model_type": "qwen2",
            "hidden_size": hidden,
            "intermediate_size": inter,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": kv,
            "vocab_size": vocab_size,
            "max_position_embeddings": 4096,
            "tie_word_embeddings": False,
            "bos_token_id": tokens["<|endoftext|>"],
            "eos_token_id": tokens["<|im_end|>"],
            "pad_token_id": tokens["<|endoftext|>"],
        },
        "vision_config": {
            "hidden_size": width,
            "intermediate_size": 2 * width,
            "num_hidden_layers": depth,
            "num_attention_heads": vheads,
            "image_size": [IMAGE_SIZE, IMAGE_SIZE],
            "patch_size": [14, 14],
        },
        "image_token_id": tokens["<IMG_CONTEXT>"],
        "image_seq_length": TOKENS_PER_IMAGE,
        "downsample_ratio": 0.5,
        "tie_word_embeddings": False,
    }


def tiny_processor(tokenizer: Any, chat_template: str) -> Any:
    from transformers import GotOcr2ImageProcessor, InternVLProcessor, InternVLVideoProcessor

    side = {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    return InternVLProcessor(
        image_processor=GotOcr2ImageProcessor(size=side, crop_to_patches=False),
        tokenizer=tokenizer,
        video_processor=InternVLVideoProcessor(size=side),
        image_seq_length=TOKENS_PER_IMAGE,
        chat_template=chat_template,
    )


TINY = TinySpec(
    config=tiny_config,
    processor=tiny_processor,
    special_tokens=SPECIAL_TOKENS,
    chat_template=CHAT_TEMPLATE,
    token_roles=CHATML_ROLES,
    named_tokens=NAMED_TOKENS,
)
