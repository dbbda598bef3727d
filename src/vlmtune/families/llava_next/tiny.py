"""A tiny LLaVA-NeXT: tiny LLaVA's text model, CLIP tower and template; anyres grids of 56-px tiles."""

from __future__ import annotations

import dataclasses
from typing import Any

from ..llava import tiny as llava
from ..tiny_kit import TinySpec

SIDE = llava.IMAGE_SIZE
GRID = [[SIDE, SIDE], [SIDE, 2 * SIDE], [2 * SIDE, SIDE]]


def tiny_config(size: str, tokens: dict[str, int], vocab_size: int) -> dict[str, Any]:
    raw = llava.tiny_config(size, tokens, vocab_size)
    raw.update(model_type="llava_next", image_grid_pinpoints=GRID, image_seq_length=(SIDE // 14) ** 2)
    raw["image_token_index"] = raw.pop("image_token_id")
    return raw


def tiny_processor(tokenizer: Any, chat_template: str) -> Any:
    from transformers import LlavaNextImageProcessor, LlavaNextProcessor

    return LlavaNextProcessor(
        image_processor=LlavaNextImageProcessor(
            size={"shortest_edge": SIDE},
            crop_size={"height": SIDE, "width": SIDE},
            image_grid_pinpoints=GRID,
        ),
        tokenizer=tokenizer,
        patch_size=llava.PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=chat_template,
    )


TINY: TinySpec = dataclasses.replace(llava.TINY, config=tiny_config, processor=tiny_processor)
