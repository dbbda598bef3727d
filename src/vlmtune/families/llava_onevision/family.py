"""LLaVA-OneVision (`LlavaOnevisionForConditionalGeneration`): SigLIP `model.vision_tower`, LLaVA's
two-Linear projector plus the bare `model.image_newline` parameter (trained with `projector: full` and read
apart from `modules_to_save`, as in LLaVA-NeXT; it also ends each video's features), and a Qwen2
`model.language_model`. Anyres image grids and video.

On disk: the LLaVA hub layout.
"""

from __future__ import annotations

import dataclasses

from ..base import Family
from ..llava_next import FAMILY as LLAVA_NEXT

FAMILY: Family = dataclasses.replace(
    LLAVA_NEXT,
    name="llava_onevision",
    model_types=("llava_onevision",),
    architecture="LlavaOnevisionForConditionalGeneration",
)
