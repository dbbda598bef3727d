"""A tiny Gemma 3: 2 layers (sliding + full attention), SigLIP at 56 px, 4 soft tokens per image."""

from __future__ import annotations

from typing import Any

from ..tiny_kit import TEXT_CONTENT, TINY_SIZES, TinySpec, content_with_images

SPECIAL_TOKENS = (
    "<pad>",
    "<eos>",
    "<bos>",
    "<unk>",
    "<start_of_turn>",
    "<end_of_turn>",
    "<start_of_image>",
    "<end_of_image>",
    "<image_soft_token>",
)
TOKEN_ROLES = {"bos_token": "<bos>", "eos_token": "<end_of_turn>", "pad_token": "<pad>", "unk_token": "<unk>"}
NAMED_TOKENS = {
    "boi_token": "<start_of_image>",
    "eoi_token": "<end_of_image>",
    "image_token": "<image_soft_token>",
}

# Gemma's turn format (the assistant is `model`), assistant turns inside `{% generation %}`.
CHAT_TEMPLATE = (
    "<bos>"
    "{% for message in messages %}"
    "<start_of_turn>{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{% if message['role'] == 'assistant' %}{% generation %}"
    f"{TEXT_CONTENT}<end_of_turn>{{% endgeneration %}}{{{{ '\\n' }}}}"
    "{% else %}"
    f"{content_with_images('<start_of_image>')}<end_of_turn>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)

IMAGE_SIZE = 56
TOKENS_PER_IMAGE = 4  # (56 / 14)^2 patches, pooled 2x2


def tiny_config(size: str, tokens: dict[str, int], vocab_size: int) -> dict[str, Any]:
    hidden, inter, layers, heads, kv, width, depth, vheads = TINY_SIZES[size]
    return {
        "model_type": "gemma3",
        "text_config": {
            "hidden_size": hidden,
            "intermediate_size": inter,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": kv,
            "head_dim": hidden // heads,
            "query_pre_attn_scalar": hidden // heads,
            "vocab_size": vocab_size,
            "max_position_embeddings": 4096,
            "sliding_window": 64,
            "layer_types": (["sliding_attention"] * (layers - 1) + ["full_attention"]),
            "tie_word_embeddings": False,
            "bos_token_id": tokens["<bos>"],
            "eos_token_id": tokens["<end_of_turn>"],
            "pad_token_id": tokens["<pad>"],
        },
        "vision_config": {
            "hidden_size": width,
            "intermediate_size": 2 * width,
            "num_hidden_layers": depth,
            "num_attention_heads": vheads,
            "image_size": IMAGE_SIZE,
            "patch_size": 14,
            "vision_use_head": False,
        },
        "mm_tokens_per_image": TOKENS_PER_IMAGE,
        "boi_token_index": tokens["<start_of_image>"],
        "eoi_token_index": tokens["<end_of_image>"],
        "image_token_index": tokens["<image_soft_token>"],
        "tie_word_embeddings": False,
    }


def tiny_processor(tokenizer: Any, chat_template: str) -> Any:
    from transformers import Gemma3ImageProcessor, Gemma3Processor

    return Gemma3Processor(
        image_processor=Gemma3ImageProcessor(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}),
        tokenizer=tokenizer,
        chat_template=chat_template,
        image_seq_length=TOKENS_PER_IMAGE,
    )


def open_projector(model: Any) -> None:
    """Gemma 3 initialises `mm_input_projection_weight` at 0, which shuts images out until training moves it
    (the released checkpoints have it trained). Give it random values so a tiny model's output depends on
    its image."""
    import torch

    weight = model.model.multi_modal_projector.mm_input_projection_weight
    with torch.no_grad():
        weight.normal_(0.0, weight.shape[0] ** -0.5, generator=torch.Generator().manual_seed(0))


TINY = TinySpec(
    config=tiny_config,
    processor=tiny_processor,
    special_tokens=SPECIAL_TOKENS,
    chat_template=CHAT_TEMPLATE,
    token_roles=TOKEN_ROLES,
    named_tokens=NAMED_TOKENS,
    post_init=open_projector,
)
