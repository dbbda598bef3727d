"""What a family's `tiny.py` declares to build a `vlmtune tiny` checkpoint, and the pieces they share.

Kept apart from `Family`: nothing but `vlmtune.tiny` (and the tests' fixtures) needs to know how a tiny
random model of a family is made.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

# Sizes of `vlmtune tiny` checkpoints, shared by every family: (hidden, intermediate, layers, heads,
# kv heads, vision width, vision depth, vision heads).
TINY_SIZES = {
    "tiny": (64, 128, 2, 4, 2, 32, 2, 2),
    "small": (512, 1408, 6, 8, 4, 256, 4, 4),
}

# Chat-template pieces: a message's text (string content or its text parts), and its content with each
# image part replaced by the family's image marker.
TEXT_CONTENT = (
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{% endif %}"
)


def content_with_images(image_marker: str, video_marker: str | None = None) -> str:
    video = f"{{% elif part['type'] == 'video' or 'video' in part %}}{video_marker}" if video_marker else ""
    return (
        "{% if message['content'] is string %}{{ message['content'] }}"
        "{% else %}{% for part in message['content'] %}"
        f"{{% if part['type'] == 'image' or 'image' in part or 'image_url' in part %}}{image_marker}"
        f"{video}"
        "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
        "{% endfor %}{% endif %}"
    )


def chatml(
    image_marker: str, video_marker: str | None = None, system: str = "You are a helpful assistant."
) -> str:
    """The ChatML template (Qwen, InternVL, LLaVA-OneVision), with `{% generation %}` around what the
    assistant says (and its <|im_end|>), so `return_assistant_tokens_mask=True` marks exactly the
    supervised tokens."""
    return (
        "{% for message in messages %}"
        f"{{% if loop.first and message['role'] != 'system' %}}<|im_start|>system\n{system}<|im_end|>\n{{% endif %}}"
        "<|im_start|>{{ message['role'] }}\n"
        "{% if message['role'] == 'assistant' %}{% generation %}"
        f"{TEXT_CONTENT}<|im_end|>{{% endgeneration %}}{{{{ '\\n' }}}}"
        "{% else %}"
        f"{content_with_images(image_marker, video_marker)}"
        "<|im_end|>\n"
        "{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )


CHATML_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHATML_ROLES = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}


@dataclass(frozen=True)
class TinySpec:
    """How `vlmtune tiny` builds a random checkpoint of one family.

    `config(size, tokens, vocab_size)` returns the raw config dict (with `model_type` and a
    `text_config` that overrides update); `processor(tokenizer, chat_template)` the family's real
    processor; `post_init(model)` adjusts a fresh model where random init differs from a trained one.
    """

    config: Callable[[str, dict[str, int], int], dict[str, Any]]
    processor: Callable[[Any, str], Any]
    special_tokens: tuple[str, ...]
    chat_template: str
    # Tokenizer attribute -> special token, as the family's real tokenizer names them.
    token_roles: Mapping[str, str] = field(default_factory=dict)
    # Model-specific named tokens the processor reads off the tokenizer (e.g. `boi_token`), saved with it.
    named_tokens: Mapping[str, str] = field(default_factory=dict)
    post_init: Callable[[Any], None] | None = None
    # Where the text config lives in the raw config (overrides and tying go there).
    text_config_key: str = "text_config"
