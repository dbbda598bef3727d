"""A tiny SmolVLM: Idefics3's tiny model and template, with SmolVLM's processor (image splitting, video)."""

from __future__ import annotations

import dataclasses
from typing import Any

from ..idefics3 import tiny as idefics3
from ..tiny_kit import TinySpec


def tiny_processor(tokenizer: Any, chat_template: str) -> Any:
    from transformers import SmolVLMImageProcessor, SmolVLMProcessor, SmolVLMVideoProcessor

    side = idefics3.IMAGE_SIZE
    return SmolVLMProcessor(
        image_processor=SmolVLMImageProcessor(
            size={"longest_edge": 2 * side}, max_image_size={"longest_edge": side}
        ),
        tokenizer=tokenizer,
        video_processor=SmolVLMVideoProcessor(
            size={"longest_edge": side}, max_image_size={"longest_edge": side}
        ),
        image_seq_len=idefics3.TOKENS_PER_TILE,
        chat_template=chat_template,
    )


TINY: TinySpec = dataclasses.replace(
    idefics3.TINY, config=idefics3.tiny_config("smolvlm"), processor=tiny_processor
)
