"""SmolVLM (`SmolVLMForConditionalGeneration`): Idefics3's architecture (`model.vision_model`,
`model.connector`, `model.text_model`) under its own model type, processor and video support."""

from __future__ import annotations

import dataclasses

from ..base import Family
from ..idefics3 import FAMILY as IDEFICS3

FAMILY: Family = dataclasses.replace(
    IDEFICS3, name="smolvlm", model_types=("smolvlm",), architecture="SmolVLMForConditionalGeneration"
)
