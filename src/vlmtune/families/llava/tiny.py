"""A tiny LLaVA-1.5: Llama text model, CLIP vision tower at 56-px images, the llava-1.5-hf template."""

from __future__ import annotations

from typing import Any

from ..tiny_kit import TEXT_CONTENT, TINY_SIZES, TinySpec, content_with_images

SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>", "<image>")
TOKEN_ROLES = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}

# The llava-1.5-hf conversation format (USER:/ASSISTANT:), assistant turns inside `{% generation %}`.
CHAT_TEMPLATE = (
    "<s>"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}\n"
    f"{{% elif message['role'] == 'user' %}}USER: {content_with_images('<image>' + chr(10))}{{{{ '\\n' }}}}"
    "{% else %}ASSISTANT:\n{% generation %}"
    f"{TEXT_CONTENT}</s>{{% endgeneration %}}{{{{ '\\n' }}}}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:\n{% endif %}"
)

SIZES = TINY_SIZES
IMAGE_SIZE = 56
PATCH_SIZE = 14


def text_config(size: str, tokens: dict[str, int], vocab_size: int) -> dict[str, Any]:
    hidden, inter, layers, heads, kv, *_ = SIZES[size]
    return {
        "model_type": "llama",
        "hidden_size": hidden,
        "intermediate_size": inter,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "vocab_size": vocab_size,
        "max_position_embeddings": 4096,
        "bos_token_id": tokens["<s>"],
        "eos_token_id": tokens["</s>"],
        "pad_token_id": tokens["<pad>"],
    }


def clip_config(size: str, image_size: int = IMAGE_SIZE) -> dict[str, Any]:
    *_, width, depth, vheads = SIZES[size]
    return {
        "model_type": "clip_vision_model",
        "hidden_size": width,
        "intermediate_size": 2 * width,
        "num_hidden_layers": depth,
        "num_attention_heads": vheads,
        "image_size": image_size,
        "patch_size": PATCH_SIZE,
        "projection_dim": width,
    }


def tiny_config(size: str, tokens: dict[str, int], vocab_size: int) -> dict[str, Any]:
    return {
        "model_type": "llava",
        "text_config": text_config(size, tokens, vocab_size),
        "vision_config": clip_config(size),
        "image_token_id": tokens["<image>"],
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
        "projector_hidden_act": "gelu",
        "tie_word_embeddings": False,
    }


def tiny_processor(tokenizer: Any, chat_template: str) -> Any:
    from transformers import LlavaImageProcessor, LlavaProcessor

    side = {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    return LlavaProcessor(
        image_processor=LlavaImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size=side),
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=chat_template,
    )


TINY = TinySpec(
    config=tiny_config,
    processor=tiny_processor,
    special_tokens=SPECIAL_TOKENS,
    chat_template=CHAT_TEMPLATE,
    token_roles=TOKEN_ROLES,
)
