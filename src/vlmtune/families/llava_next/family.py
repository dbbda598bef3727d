"""LLaVA-NeXT (`LlavaNextForConditionalGeneration`): LLaVA-1.5's modules plus `model.image_newline`, a
bare `nn.Parameter` appended after each row of an anyres image grid, counted as projector.

PEFT's `modules_to_save` wraps modules only, and the one module holding `image_newline` is the whole
`model`; so `projector: full` trains `model.multi_modal_projector` and leaves `image_newline` frozen at its
base value (the support table says so). Adapters from other tools that carry a trained `image_newline`
are not tested yet (its parent module for PEFT would be the whole `model`).

On disk: the LLaVA hub layout, `image_newline` at the top level.
"""

from __future__ import annotations

import dataclasses

from ..base import Family
from ..llava import FAMILY as LLAVA

FAMILY: Family = dataclasses.replace(
    LLAVA,
    name="llava_next",
    model_types=("llava_next",),
    architecture="LlavaNextForConditionalGeneration",
    foreign_formats=(),
    packed_positions="",
    packing_unsupported="its anyres pixel_values are padded to the most patches per batch, which do not concatenate across samples",
    bare_parameters=("model.image_newline",),
)
