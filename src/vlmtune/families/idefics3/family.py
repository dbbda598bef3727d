"""Idefics3 (`Idefics3ForConditionalGeneration`): SigLIP `model.vision_model`, `model.connector`
(pixel shuffle + `modality_projection.proj`), a Llama **`model.text_model`**. The processor splits large
images into tiles plus a global view. Stored on disk under the runtime names. SmolVLM shares all of it.
"""

from __future__ import annotations

from ..base import Family, decoder_targets, roles

FAMILY = Family(
    name="idefics3",
    model_types=("idefics3",),
    architecture="Idefics3ForConditionalGeneration",
    block_lists=("model.text_model.layers", "model.vision_model.encoder.layers"),
    role_prefixes=roles(
        projector="model.connector", vision="model.vision_model", language="model.text_model"
    ),
    lora_target_patterns={
        "language": decoder_targets("model.text_model.layers"),
        "vision": (
            r"model\.vision_model\.encoder\.layers\.\d+\."
            r"(?:self_attn\.(?:q_proj|k_proj|v_proj|out_proj)|mlp\.(?:fc1|fc2))"
        ),
        "projector": r"model\.connector\.modality_projection\.proj",
    },
    packing_unsupported=(
        "its processor returns pixel tensors per row ([rows, images, ...], padded to the most images), "
        "which do not concatenate along dim 0 across samples"
    ),
)
