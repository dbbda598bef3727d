"""Helpers for the inference and adapter tests: trained (non-zero) adapters made with PEFT directly, legacy
and LLaVA-format rewrites of them, and reference logits from plain transformers + PEFT.

Nothing here uses vlmtune's adapter or inference code, so the references stay independent of it.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

PEFT_PREFIX = "base_model.model."

# The language-model projections, written independently of vlmtune's family tables.
LM_REGEX = (
    r"model\.(?:language_model|text_model)\.layers\.\d+\.(?:self_attn|cross_attn)\.(?:q_proj|k_proj|v_proj|o_proj)"
    r"|model\.(?:language_model|text_model)\.layers\.\d+\.mlp\.(?:gate_proj|up_proj|down_proj)"
)
# A vision-tower LoRA per family (module paths as transformers 5 names them at runtime).
VISION_REGEX = {
    "qwen2_vl": r"model\.visual\.blocks\.\d+\.attn\.(?:qkv|proj)",
    "qwen2_5_vl": r"model\.visual\.blocks\.\d+\.attn\.(?:qkv|proj)",
    "llava": r"model\.vision_tower\.encoder\.layers\.\d+\.self_attn\.(?:q_proj|v_proj)",
    "mllama": r"model\.vision_model\.transformer\.layers\.\d+\.self_attn\.(?:q_proj|v_proj)",
    "qwen3_vl": r"model\.visual\.blocks\.\d+\.attn\.(?:qkv|proj)",
    "qwen3_5": r"model\.visual\.blocks\.\d+\.attn\.(?:qkv|proj)",
    "glm4v": r"model\.visual\.blocks\.\d+\.attn\.(?:qkv|proj)",
    "gemma3": r"model\.vision_tower\.encoder\.layers\.\d+\.self_attn\.(?:q_proj|v_proj)",
    "llava_next": r"model\.vision_tower\.encoder\.layers\.\d+\.self_attn\.(?:q_proj|v_proj)",
    "llava_onevision": r"model\.vision_tower\.encoder\.layers\.\d+\.self_attn\.(?:q_proj|v_proj)",
    "internvl": r"model\.vision_tower\.encoder\.layer\.\d+\.attention\.(?:q_proj|v_proj)",
    "idefics3": r"model\.vision_model\.encoder\.layers\.\d+\.self_attn\.(?:q_proj|v_proj)",
    "smolvlm": r"model\.vision_model\.encoder\.layers\.\d+\.self_attn\.(?:q_proj|v_proj)",
}
PROJECTOR = {
    "qwen2_vl": "model.visual.merger",
    "qwen2_5_vl": "model.visual.merger",
    "llava": "model.multi_modal_projector",
    "mllama": "model.multi_modal_projector",
    "qwen3_vl": "model.visual.merger",
    "qwen3_5": "model.visual.merger",
    "glm4v": "model.visual.merger",
    "gemma3": "model.multi_modal_projector",
    "internvl": "model.multi_modal_projector",
    "llava_next": "model.multi_modal_projector",
    "llava_onevision": "model.multi_modal_projector",
    "idefics3": "model.connector",
    "smolvlm": "model.connector",
}
# Adapter keys as transformers < 4.52 wrote them (after PEFT's prefix), runtime prefix -> legacy prefix.
LEGACY = {
    "qwen2_vl": (("model.language_model.", "model."), ("model.visual.", "visual.")),
    "qwen2_5_vl": (("model.language_model.", "model."), ("model.visual.", "visual.")),
    "llava": (
        ("model.language_model.", "language_model.model."),
        ("lm_head.", "language_model.lm_head."),
        ("model.vision_tower.", "vision_tower.vision_model."),
        ("model.multi_modal_projector.", "multi_modal_projector."),
    ),
    "mllama": (
        ("model.language_model.", "language_model.model."),
        ("lm_head.", "language_model.lm_head."),
        ("model.vision_model.", "vision_model."),
        ("model.multi_modal_projector.", "multi_modal_projector."),
    ),
}
# LlavaModel-based families wrote their adapters as LLaVA did before 4.52.
LEGACY.update(dict.fromkeys(("gemma3", "internvl", "llava_next", "llava_onevision"), LEGACY["llava"]))


def image(seed: int = 0, size: int = 56) -> Any:
    from PIL import Image

    pixels = np.random.RandomState(seed).randint(0, 256, (size, size, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def base_model(base: Path, dtype: Any = torch.float32) -> Any:
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(base, dtype=dtype)
    return model.eval()


def make_adapter(
    base: Path,
    out: Path,
    *,
    seed: int = 0,
    target_modules: Any = LM_REGEX,
    r: int = 4,
    alpha: float = 8,
    modules_to_save: list[str] | None = None,
    **lora_kwargs: Any,
) -> Path:
    """Save a PEFT adapter with random (non-zero) LoRA factors, perturbed modules_to_save copies and DoRA
    magnitudes, so every tensor in it changes the model's output."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = base_model(base)
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=target_modules,
        modules_to_save=modules_to_save,
        init_lora_weights=False,
        **lora_kwargs,
    )
    peft = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft.named_parameters():
            if ".modules_to_save." in name:
                param.add_(torch.randn_like(param) * 0.05)
            elif "lora_magnitude_vector" in name:
                param.mul_(1 + 0.2 * torch.randn_like(param))
            elif "lora_B" in name and name.endswith(".bias"):
                param.add_(torch.randn_like(param) * 0.05)
            elif "lora_B" in name or "lora_embedding_B" in name:
                param.mul_(0.5)
    peft.save_pretrained(out)
    return out


def rewrite_keys(src: Path, out: Path, rename: Any, *, to_bin: bool = False) -> Path:
    """Copy an adapter folder with every tensor key passed through `rename(key) -> key`."""
    shutil.copytree(src, out)
    tensors = load_file(src / "adapter_model.safetensors")
    renamed = {rename(k): v for k, v in tensors.items()}
    (out / "adapter_model.safetensors").unlink()
    if to_bin:
        torch.save(renamed, out / "adapter_model.bin")
    else:
        save_file(renamed, out / "adapter_model.safetensors")
    return out


def legacy_key(family: str, key: str) -> str:
    body = key[len(PEFT_PREFIX) :]
    for new, old in LEGACY[family]:
        if body.startswith(new):
            return PEFT_PREFIX + old + body[len(new) :]
    return key


def to_llava_format(
    src: Path, out: Path, *, adapter_suffix: str = ".bin", projector_type: str = "mlp2x_gelu"
) -> Path:
    """An original-LLaVA training output made from a PEFT adapter on an HF Llava base (LM LoRA plus a
    modules_to_save projector): LoRA keys under `model.layers`, the projector in non_lora_trainables.bin
    as `model.mm_projector.0/.2`, and LLaVA's config.json."""
    out.mkdir(parents=True)
    tensors = load_file(src / "adapter_model.safetensors")
    lora, trainables = {}, {}
    for key, value in tensors.items():
        body = key[len(PEFT_PREFIX) :]
        match = re.match(r"model\.multi_modal_projector\.linear_(1|2)\.(weight|bias)$", body)
        if match:
            index = {"1": "0", "2": "2"}[match.group(1)]
            trainables[f"base_model.model.model.mm_projector.{index}.{match.group(2)}"] = value
        else:
            assert body.startswith("model.language_model."), body
            lora[PEFT_PREFIX + "model." + body[len("model.language_model.") :]] = value
    if adapter_suffix == ".bin":
        torch.save(lora, out / "adapter_model.bin")
    else:
        save_file(lora, out / "adapter_model.safetensors")
    torch.save(trainables, out / "non_lora_trainables.bin")
    config = json.loads((src / "adapter_config.json").read_text())
    config.update(
        base_model_name_or_path="lmsys/vicuna-7b-v1.5",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        modules_to_save=None,
        task_type="CAUSAL_LM",
    )
    (out / "adapter_config.json").write_text(json.dumps(config))
    (out / "config.json").write_text(
        json.dumps(
            {
                "architectures": ["LlavaLlamaForCausalLM"],
                "model_type": "llava_llama",
                "mm_projector_type": projector_type,
                "mm_vision_select_layer": -2,
                "mm_vision_tower": "openai/clip-vit-large-patch14-336",
                "mm_hidden_size": 32,
            }
        )
    )
    return out


def encode(base: Path, messages: list[dict[str, Any]], images: list[Any]) -> Any:
    """Model inputs the plain transformers way: the base's processor and chat template."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(base)
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return processor(text=[text], images=[images] if images else None, return_tensors="pt")


def peft_logits(
    base: Path,
    adapter: Path | None,
    messages: list[dict[str, Any]],
    images: list[Any],
    dtype: Any = torch.float32,
) -> torch.Tensor:
    """Reference logits: `PeftModel.from_pretrained` on a fresh base (or the base alone)."""
    from peft import PeftModel

    model = base_model(base, dtype)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter).eval()
    with torch.inference_mode():
        inputs = encode(base, messages, images).to(dtype)
        return model(**inputs).logits[0].float()


IMAGE_PROMPT = [
    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the shape?"}]}
]
TEXT_PROMPT = [{"role": "user", "content": [{"type": "text", "text": "Describe a red circle."}]}]
