"""A tiny LLaVA-OneVision: Qwen2 text model with ChatML, SigLIP at 56 px, anyres grids, video."""

from __future__ import annotations

from typing import Any

from ..tiny_kit import CHATML_ROLES, CHATML_TOKENS, TINY_SIZES, TinySpec, chatml

SPECIAL_TOKENS = (*CHATML_TOKENS, "<image>", "<video>")
CHAT_TEMPLATE = chatml("<image>\n", "<video>\n")
SIDE = 56
GRID = [[SIDE, SIDE], [SIDE, 2 * SIDE], [2 * SIDE, SIDE], [2 * SIDE, 2 * SIDE]]


def tiny_config(size: str, tokens: dict[str, int], vocab_size: int) -> dict[str, Any]:
    hidden, inter, layers, heads, kv, width, depth, vheads = TINY_SIZES[size]
    return {
        "model_type": "llava_onevision",
        "text_config": {
            "model_type": "qwen2",
            "hidden_size": hidden,
            "intermediate_size": inter,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": kv,
            "vocab_size": vocab_size,
            "max_position_embeddings": 4096,
            "bos_token_id": tokens["<|endoftext|>"],
            "eos_token_id": tokens["<|im_end|>"],
            "pad_token_id": tokens["<|endoftext|>"],
        },
        "vision_config": {
            "model_type": "siglip_vision_model",
            "hidden_size": width,
            "intermediate_size": 2 * width,
            "num_hidden_layers": depth,
            "num_attention_heads": vheads,
            "image_size": SIDE,
            "patch_size": 14,
            "vision_use_head": False,
        },
        "image_token_index": tokens["<image>"],
        "video_token_index": tokens["<video>"],
        "image_grid_pinpoints": GRID,
        "vision_feature_select_strategy": "full",
        "vision_feature_layer": -1,
        "tie_word_embeddings": False,
    }


def tiny_processor(tokenizer: Any, chat_template: str) -> Any:
    from transformers import (
        LlavaOnevisionImageProcessor,
        LlavaOnevisionProcessor,
        LlavaOnevisionVideoProcessor,
    )

    side = {"height": SIDE, "width": SIDE}
    return LlavaOnevisionProcessor(
        image_processor=LlavaOnevisionImageProcessor(size=side, image_grid_pinpoints=GRID),
        tokenizer=tokenizer,
        video_processor=LlavaOnevisionVideoProcessor(size=side),
        num_image_tokens=(SIDE // 14) ** 2,
        vision_feature_select_strategy="full",
        chat_template=chat_template,
    )


TINY = TinySpec(
    config=tiny_config,
    processor=tiny_processor,
    special_tokens=SPECIAL_TOKENS,
    chat_template=CHAT_TEMPLATE,
    token_roles=CHATML_ROLES,
)
