"""LLaVA-1.5 (HF `LlavaForConditionalGeneration`): CLIP `model.vision_tower`, a two-Linear
`model.multi_modal_projector`, a Llama `model.language_model`.

On disk (hub layout): `language_model.model.*`, `language_model.lm_head.*`, `vision_tower.*` (pre-5.x
checkpoints nest CLIP as `vision_tower.vision_model.*`; 5.x flattens it), `multi_modal_projector.*`.
Original LLaVA training outputs (haotian-liu/LLaVA) use a third layout, read by `original.FORMAT`.
"""

from __future__ import annotations

from ..base import Family, KeyTable, Rename, decoder_targets, roles
from . import original

# transformers/conversion_mapping.py, "llava" + "LlavaModel" + "CLIPVisionModel" (the table every
# LlavaModel-based family shares: Gemma 3, InternVL, LLaVA-NeXT, LLaVA-OneVision).
KEYS = KeyTable(
    (
        Rename("language_model.lm_head", "lm_head"),
        Rename("language_model.model", "model.language_model"),
        Rename("vision_tower.vision_model", "model.vision_tower"),
        Rename("vision_tower", "model.vision_tower"),
        Rename("multi_modal_projector", "model.multi_modal_projector"),
        Rename("image_newline", "model.image_newline"),
    )
)

# CLIP's encoder layers (LLaVA-NeXT and OneVision reuse the table).
CLIP_TARGETS = r"model\.vision_tower\.encoder\.layers\.\d+\.(?:self_attn\.(?:q_proj|k_proj|v_proj|out_proj)|mlp\.(?:fc1|fc2))"

FAMILY = Family(
    name="llava",
    model_types=("llava",),
    architecture="LlavaForConditionalGeneration",
    block_lists=("model.language_model.layers", "model.vision_tower.encoder.layers"),
    role_prefixes=roles(
        projector="model.multi_modal_projector",
        vision="model.vision_tower",
        language="model.language_model",
    ),
    lora_target_patterns={
        "language": decoder_targets("model.language_model.layers"),
        "vision": CLIP_TARGETS,
        "projector": r"model\.multi_modal_projector\.linear_(?:1|2)",
    },
    keys=KEYS,
    foreign_formats=(original.FORMAT,),
    packed_positions="1d",
)
