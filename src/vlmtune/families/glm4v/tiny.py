"""A tiny GLM-4.1V: GLM-4 text model (fused gate_up_proj), 2 vision blocks, 56-px images."""

from __future__ import annotations

from typing import Any

from ..qwen2_vl.tiny import mrope_section
from ..tiny_kit import TEXT_CONTENT, TINY_SIZES, TinySpec, content_with_images

SPECIAL_TOKENS = (
    "<|endoftext|>",
    "[gMASK]",
    "<sop>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|begin_of_image|>",
    "<|end_of_image|>",
    "<|image|>",
    "<|begin_of_video|>",
    "<|end_of_video|>",
    "<|video|>",
)
TOKEN_ROLES = {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}

# GLM-4's role-tag format, assistant turns inside `{% generation %}`.
CHAT_TEMPLATE = (
    "[gMASK]<sop>"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}<|assistant|>\n{% generation %}"
    f"{TEXT_CONTENT}<|endoftext|>{{% endgeneration %}}"
    "{% else %}<|{{ message['role'] }}|>\n"
    f"{content_with_images('<|begin_of_image|><|image|><|end_of_image|>', '<|begin_of_video|><|video|><|end_of_video|>')}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def tiny_config(size: str, tokens: dict[str, int], vocab_size: int) -> dict[str, Any]:
    hidden, inter, layers, heads, kv, width, depth, vheads = TINY_SIZES[size]
    return {
        "model_type": "glm4v",
        "text_config": {
            "hidden_size": hidden,
            "intermediate_size": inter,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": kv,
            "vocab_size": vocab_size,
            "max_position_embeddings": 4096,
            # Measured: at the default 0.02 the tiny model's loss fell 0.497 in the training test's 6 steps
            # (the other families fall more); a wider init learns faster (FIELD_NOTES §6).
            "initializer_range": 0.05,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 10000.0,
                "partial_rotary_factor": 0.5,
                "mrope_section": mrope_section(hidden // 2, heads),
            },
            "bos_token_id": tokens["[gMASK]"],
            "eos_token_id": tokens["<|endoftext|>"],
            "pad_token_id": tokens["<|endoftext|>"],
        },
        "vision_config": {
            "depth": depth,
            "hidden_size": width,
            "intermediate_size": 2 * width,
            "num_heads": vheads,
            "out_hidden_size": hidden,
            "intermediate_size_merger": 2 * hidden,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "image_size": 56,
        },
        "image_token_id": tokens["<|image|>"],
        "video_token_id": tokens["<|video|>"],
        "image_start_token_id": tokens["<|begin_of_image|>"],
        "image_end_token_id": tokens["<|end_of_image|>"],
        "video_start_token_id": tokens["<|begin_of_video|>"],
        "video_end_token_id": tokens["<|end_of_video|>"],
        "tie_word_embeddings": False,
    }


def tiny_processor(tokenizer: Any, chat_template: str) -> Any:
    from transformers import Glm4vImageProcessor, Glm4vProcessor, Glm4vVideoProcessor

    opts = {"patch_size": 14, "merge_size": 2, "temporal_patch_size": 2}
    size = {"shortest_edge": 28 * 28, "longest_edge": 112 * 112}
    return Glm4vProcessor(
        image_processor=Glm4vImageProcessor(size=size, **opts),
        tokenizer=tokenizer,
        video_processor=Glm4vVideoProcessor(size=size, **opts),
        chat_template=chat_template,
    )


TINY = TinySpec(
    config=tiny_config,
    processor=tiny_processor,
    special_tokens=SPECIAL_TOKENS,
    chat_template=CHAT_TEMPLATE,
    token_roles=TOKEN_ROLES,
)
