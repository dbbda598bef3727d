"""Gemma 3 (`Gemma3ForConditionalGeneration`): SigLIP `model.vision_tower`, `model.multi_modal_projector`
(an RMS norm and a bare `nn.Parameter` `mm_input_projection_weight`, no Linear layer), and a Gemma 3
`model.language_model` with lm_head tied to the embeddings in the released checkpoints.

On disk: the LLaVA hub layout (`language_model.model.*`, `vision_tower.vision_model.*`,
`multi_modal_projector.*`).

The projector has no Linear layer, so `projector: lora` is refused with the advice to use `full`, which
trains the whole projector module as PEFT `modules_to_save` (the wrapper copies the module with its bare
parameter; the adapter stores `…multi_modal_projector.mm_input_projection_weight` as a full tensor, which
plain PEFT loads and the merge writes back). The processor returns `token_type_ids` (image tokens attend
bidirectionally), which training passes through and truncation cuts with the tokens.
"""

from __future__ import annotations

from ..base import Family, decoder_targets, roles
from ..llava.family import CLIP_TARGETS, KEYS

FAMILY = Family(
    name="gemma3",
    model_types=("gemma3",),
    architecture="Gemma3ForConditionalGeneration",
    block_lists=("model.language_model.layers", "model.vision_tower.encoder.layers"),
    role_prefixes=roles(
        projector="model.multi_modal_projector", vision="model.vision_tower", language="model.language_model"
    ),
    lora_target_patterns={
        "language": decoder_targets("model.language_model.layers"),
        "vision": CLIP_TARGETS,
    },
    keys=KEYS,
    packing_unsupported=(
        "with 1-D positions its packed per-sample losses differ from one-sample runs (its token_type_ids "
        "image-block mask is not rebuilt per sample on a packed row)"
    ),
    serve_unsupported=(
        "its sliding-window attention layers keep caches the continuous-batching scheduler cannot batch"
    ),
)
