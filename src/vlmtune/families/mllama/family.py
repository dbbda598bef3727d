"""Llama-3.2-Vision (`MllamaForConditionalGeneration`): `model.vision_model` (local + global transformer),
one Linear `model.multi_modal_projector`, and `model.language_model` whose layers are self-attention or
cross-attention (`cross_attn.*`) decoder layers.

On disk (hub layout): `language_model.model.*`, `language_model.lm_head.*`, `vision_model.*`,
`multi_modal_projector.*`.
"""

from __future__ import annotations

from ..base import ATTENTION_LEAVES, MLP_LEAVES, Family, KeyTable, Rename, decoder_targets, roles

# transformers/conversion_mapping.py: "MllamaModel" -> "LlavaModel", plus the top-level renames.
KEYS = KeyTable(
    (
        Rename("language_model.lm_head", "lm_head"),
        Rename("language_model.model", "model.language_model"),
        Rename("vision_model", "model.vision_model"),
        Rename("multi_modal_projector", "model.multi_modal_projector"),
    )
)

FAMILY = Family(
    name="mllama",
    model_types=("mllama",),
    architecture="MllamaForConditionalGeneration",
    block_lists=(
        "model.language_model.layers",
        "model.vision_model.transformer.layers",
        "model.vision_model.global_transformer.layers",
    ),
    role_prefixes=roles(
        projector="model.multi_modal_projector", vision="model.vision_model", language="model.language_model"
    ),
    lora_target_patterns={
        "language": decoder_targets(
            "model.language_model.layers",
            (("self_attn", ATTENTION_LEAVES), ("cross_attn", ATTENTION_LEAVES), ("mlp", MLP_LEAVES)),
        ),
        "vision": (
            r"model\.vision_model\.(?:transformer|global_transformer)\.layers\.\d+\."
            r"(?:self_attn\.(?:q_proj|k_proj|v_proj|o_proj)|mlp\.(?:fc1|fc2))"
        ),
        "projector": r"model\.multi_modal_projector",
    },
    keys=KEYS,
    can_tie_embeddings=False,
    vllm_unsupported="vLLM no longer serves Llama-3.2-Vision (Mllama) models",
    token_aligned_keys=("cross_attention_mask",),
    mixed_image_batches=False,
    packing_unsupported=(
        "its cross-attention takes images per batch row ([rows, images, tiles]) with a mask its processor "
        "builds per row, and no per-sample cross-attention mask for packed rows exists or is verified"
    ),
)
