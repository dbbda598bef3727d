"""InternVL (transformers-native `InternVLForConditionalGeneration`): InternViT `model.vision_tower`
(`encoder.layer.N.attention.{q,k,v}_proj` — the language model's leaf names — and `projection_layer`),
`model.multi_modal_projector` (layer norm + `linear_1/2`), a Qwen2 `model.language_model`.

On disk: the LLaVA hub layout (`language_model.model.*`, `vision_tower.*`, `multi_modal_projector.*`).
The language preset is anchored to `model.language_model.layers`, so the tower's q/k/v are never hit.
"""

from __future__ import annotations

from ..base import Family, decoder_targets, roles
from ..llava.family import KEYS

FAMILY = Family(
    name="internvl",
    model_types=("internvl",),
    architecture="InternVLForConditionalGeneration",
    block_lists=("model.language_model.layers", "model.vision_tower.encoder.layer"),
    role_prefixes=roles(
        projector="model.multi_modal_projector", vision="model.vision_tower", language="model.language_model"
    ),
    lora_target_patterns={
        "language": decoder_targets("model.language_model.layers"),
        "vision": (
            r"model\.vision_tower\.encoder\.layer\.\d+\."
            r"(?:attention\.(?:q_proj|k_proj|v_proj|projection_layer)|mlp\.(?:fc1|fc2))"
        ),
        "projector": r"model\.multi_modal_projector\.linear_(?:1|2)",
    },
    keys=KEYS,
    packed_positions="1d",
)
