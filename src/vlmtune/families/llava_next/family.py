"""LLaVA-NeXT (`LlavaNextForConditionalGeneration`): LLaVA-1.5's modules plus `model.image_newline`, a
bare `nn.Parameter` appended after each row of an anyres image grid, counted as projector.

PEFT's `modules_to_save` wraps modules only, and the one module holding `image_newline` is the whole
`model`; so it is declared in `bare_parameters`: `projector: full` trains `model.multi_modal_projector` as
`modules_to_save` and `image_newline` beside it, stored under PEFT's key `base_model.model.model.image_newline`
(plain `PeftModel.from_pretrained` loads it into the parameter). Adapters carrying it (under that key or the
hub layout's `image_newline`) never wrap `model`: un-merged inference swaps each adapter's value in for its own
forwards (its rows run apart from other adapters'), and the merge writes it to `image_newline`.

On disk: the LLaVA hub layout, `image_newline` at the top level.
"""

from __future__ import annotations

import dataclasses

from ..base import Family, roles
from ..llava import FAMILY as LLAVA

FAMILY: Family = dataclasses.replace(
    LLAVA,
    name="llava_next",
    model_types=("llava_next",),
    architecture="LlavaNextForConditionalGeneration",
    foreign_formats=(),
    packed_positions="",
    packing_unsupported="its anyres pixel_values are padded to the most patches per batch, which do not concatenate across samples",
    role_prefixes=roles(
        projector=("model.multi_modal_projector", "model.image_newline"),
        vision="model.vision_tower",
        language="model.language_model",
    ),
    bare_parameters=("model.image_newline",),
)
