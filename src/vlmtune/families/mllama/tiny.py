"""A tiny Llama-3.2-Vision: one cross-attention layer, 2 tiles of 56 px, the Llama 3 header template."""

from __future__ import annotations

from typing import Any

from ..tiny_kit import TEXT_CONTENT, TINY_SIZES, TinySpec, content_with_images

SPECIAL_TOKENS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|image|>",
    "<|finetune_right_pad_id|>",
)
TOKEN_ROLES = {
    "bos_token": "<|begin_of_text|>",
    "eos_token": "<|eot_id|>",
    "pad_token": "<|finetune_right_pad_id|>",
}

# The Llama 3 header format, assistant turns inside `{% generation %}`.
CHAT_TEMPLATE = (
    "<|begin_of_text|>"
    "{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n"
    "{% if message['role'] == 'assistant' %}{% generation %}"
    f"{TEXT_CONTENT}<|eot_id|>{{% endgeneration %}}"
    "{% else %}"
    f"{content_with_images('<|image|>')}<|eot_id|>"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)

SIZES = TINY_SIZES
IMAGE_SIZE = 56
MAX_TILES = 2


def tiny_config(size: str, tokens: dict[str, int], vocab_size: int) -> dict[str, Any]:
    hidden, inter, layers, heads, kv, width, depth, vheads = SIZES[size]
    intermediate_layers = [0]
    return {
        "model_type": "mllama",
        "text_config": {
            "hidden_size": hidden,
            "intermediate_size": inter,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": kv,
            # Mllama's embedding table holds vocab_size + 8 rows; the tokenizer's last ids live there.
            "vocab_size": vocab_size,
            "cross_attention_layers": [layers - 1],
            "max_position_embeddings": 4096,
            "bos_token_id": tokens["<|begin_of_text|>"],
            "eos_token_id": tokens["<|eot_id|>"],
            "pad_token_id": tokens["<|finetune_right_pad_id|>"],
        },
        "vision_config": {
            "hidden_size": width,
            "intermediate_size": 2 * width,
            "num_hidden_layers": depth,
            "num_global_layers": 1,
            "attention_heads": vheads,
            "image_size": IMAGE_SIZE,
            "patch_size": 14,
            "max_num_tiles": MAX_TILES,
            "supported_aspect_ratios": [[1, 1], [1, 2], [2, 1]],
            "intermediate_layers_indices": intermediate_layers,
            "vision_output_dim": width * (len(intermediate_layers) + 1),
        },
        "image_token_index": tokens["<|image|>"],
        "tie_word_embeddings": False,
    }


def tiny_processor(tokenizer: Any, chat_template: str) -> Any:
    from transformers import MllamaImageProcessor, MllamaProcessor

    return MllamaProcessor(
        image_processor=MllamaImageProcessor(
            size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}, max_image_tiles=MAX_TILES
        ),
        tokenizer=tokenizer,
        chat_template=chat_template,
    )


def open_gates(model: Any) -> None:
    """Mllama initialises its tanh gates at 0, which shuts images out until training opens them (the released
    checkpoints have them open). Open them so a tiny model's output depends on its image."""
    import torch

    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("cross_attn_attn_gate", "cross_attn_mlp_gate", ".gate")):
                param.fill_(0.5)


TINY = TinySpec(
    config=tiny_config,
    processor=tiny_processor,
    special_tokens=SPECIAL_TOKENS,
    chat_template=CHAT_TEMPLATE,
    token_roles=TOKEN_ROLES,
    post_init=open_gates,
)
