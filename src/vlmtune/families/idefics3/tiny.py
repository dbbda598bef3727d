"""A tiny Idefics3: Llama text model, SigLIP at 56 px, 4 tokens per image tile (scale factor 2)."""

from __future__ import annotations

from typing import Any

from ..tiny_kit import TEXT_CONTENT, TINY_SIZES, TinySpec, content_with_images

SPECIAL_TOKENS = (
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<end_of_utterance>",
    "<fake_token_around_image>",
    "<image>",
    "<global-img>",
    "<pad>",
)
TOKEN_ROLES = {"bos_token": "<|begin_of_text|>", "eos_token": "<end_of_utterance>", "pad_token": "<pad>"}

# The Idefics3 conversation format (User:/Assistant:), assistant turns inside `{% generation %}`.
CHAT_TEMPLATE = (
    "<|begin_of_text|>"
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}Assistant:{% generation %}"
    f"{TEXT_CONTENT}<end_of_utterance>{{% endgeneration %}}{{{{ '\\n' }}}}"
    "{% else %}{{ message['role'] | capitalize }}:"
    f"{content_with_images('<image>')}<end_of_utterance>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)

IMAGE_SIZE = 56
TOKENS_PER_TILE = 4  # (56 / 14)^2 patches / scale_factor^2


def tiny_config(model_type: str):
    def build(size: str, tokens: dict[str, int], vocab_size: int) -> dict[str, Any]:
        hidden, inter, layers, heads, kv, width, depth, vheads = TINY_SIZES[size]
        return {
            "model_type": model_type,
            "text_config": {
                "model_type": "llama",
                "hidden_size": hidden,
                "intermediate_size": inter,
                "num_hidden_layers": layers,
                "num_attention_heads": heads,
                "num_key_value_heads": kv,
                "vocab_size": vocab_size,
                "max_position_embeddings": 4096,
                "bos_token_id": tokens["<|begin_of_text|>"],
                "eos_token_id": tokens["<end_of_utterance>"],
                "pad_token_id": tokens["<pad>"],
            },
            "vision_config": {
                "hidden_size": width,
                "intermediate_size": 2 * width,
                "num_hidden_layers": depth,
                "num_attention_heads": vheads,
                "image_size": IMAGE_SIZE,
                "patch_size": 14,
            },
            "image_token_id": tokens["<image>"],
            "scale_factor": 2,
            "tie_word_embeddings": False,
        }

    return build


def tiny_processor(tokenizer: Any, chat_template: str) -> Any:
    from transformers import Idefics3ImageProcessor, Idefics3Processor

    return Idefics3Processor(
        image_processor=Idefics3ImageProcessor(
            size={"longest_edge": 2 * IMAGE_SIZE}, max_image_size={"longest_edge": IMAGE_SIZE}
        ),
        tokenizer=tokenizer,
        image_seq_len=TOKENS_PER_TILE,
        chat_template=chat_template,
    )


TINY = TinySpec(
    config=tiny_config("idefics3"),
    processor=tiny_processor,
    special_tokens=SPECIAL_TOKENS,
    chat_template=CHAT_TEMPLATE,
    token_roles=TOKEN_ROLES,
)
