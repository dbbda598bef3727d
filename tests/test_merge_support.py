"""Helpers for the merge tests (no tests here): PEFT-made adapters, PEFT's own merge as the reference,
and loading merged folders with plain transformers.

Every adapter is created with PEFT itself (`get_peft_model` on a tiny base, then `save_pretrained`), with
all trainable tensors set to random non-trivial values so that a merge that drops or mis-scales any of
them changes the result.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vlmtune import checkpoint, families

FP32_TOL = 1e-6
LOGIT_TOL = 1e-4
PROBE_TEXT = "What is in the picture?"

# Per family: a module regex for layers that have a bias (for lora_bias), and the conv patch embedding.
BIASED = {
    "qwen2_vl": r"model\.language_model\.layers\.\d+\.self_attn\.(q_proj|v_proj)",
    "qwen2_5_vl": r"model\.language_model\.layers\.\d+\.self_attn\.(q_proj|v_proj)",
    "llava": r"model\.multi_modal_projector\.linear_(1|2)",
    "mllama": r"model\.multi_modal_projector",
    "qwen3_vl": r"model\.visual\.merger\.linear_fc(1|2)",
    "qwen3_5": r"model\.visual\.merger\.linear_fc(1|2)",
    "gemma3": r"model\.vision_tower\.encoder\.layers\.\d+\.self_attn\.(q_proj|v_proj)",
    "internvl": r"model\.multi_modal_projector\.linear_(1|2)",
    "idefics3": r"model\.vision_model\.encoder\.layers\.\d+\.self_attn\.(q_proj|v_proj)",
    "smolvlm": r"model\.vision_model\.encoder\.layers\.\d+\.self_attn\.(q_proj|v_proj)",
    "llava_next": r"model\.multi_modal_projector\.linear_(1|2)",
    "llava_onevision": r"model\.multi_modal_projector\.linear_(1|2)",
    "glm4v": r"model\.language_model\.layers\.\d+\.self_attn\.(q_proj|v_proj)",
}
CONV = {
    "qwen2_vl": "model.visual.patch_embed.proj",
    "qwen2_5_vl": "model.visual.patch_embed.proj",
    "llava": "model.vision_tower.embeddings.patch_embedding",
    "mllama": "model.vision_model.patch_embedding",
    "qwen3_vl": "model.visual.patch_embed.proj",
    "qwen3_5": "model.visual.patch_embed.proj",
    "gemma3": "model.vision_tower.embeddings.patch_embedding",
    "internvl": "model.vision_tower.embeddings.patch_embeddings.projection",
    "idefics3": "model.vision_model.embeddings.patch_embedding",
    "smolvlm": "model.vision_model.embeddings.patch_embedding",
    "llava_next": "model.vision_tower.embeddings.patch_embedding",
    "llava_onevision": "model.vision_tower.embeddings.patch_embedding",
    "glm4v": "model.visual.patch_embed.proj",
}


def family_of(folder: Path) -> families.Family:
    return families.detect(checkpoint.read_config(folder))


def projector(family: families.Family) -> str:
    return family.prefix_of("projector")


def load(folder: Path, dtype: torch.dtype = torch.float32) -> Any:
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(folder, dtype=dtype).eval()


def randomize(peft_model: Any, seed: int) -> None:
    """Give every trainable tensor a random, non-trivial value (PEFT's init would leave B = 0, DoRA
    magnitudes equal to the weight norms and modules_to_save equal to the base). DoRA magnitudes are
    re-derived from the new factors (PEFT's own init) and then perturbed, so the DoRA factors stay near 1
    as after real training, instead of the 100x a random init would give."""
    gen = torch.Generator().manual_seed(seed)

    def noise_like(p: torch.Tensor) -> torch.Tensor:
        return torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype)

    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if not p.requires_grad or "lora_magnitude_vector" in name:
                continue
            if "lora_" in name:
                p.copy_(0.05 * noise_like(p))
            else:  # modules_to_save copies
                p.add_(0.05 * noise_like(p))
        for module in peft_model.modules():
            variants = getattr(module, "lora_variant", {})
            if "default" in variants and "default" in getattr(module, "lora_magnitude_vector", {}):
                variants["default"].init(
                    module, adapter_name="default", config=peft_model.peft_config["default"]
                )
                magnitude = module.lora_magnitude_vector["default"].weight
                magnitude.mul_(1 + 0.2 * noise_like(magnitude))


def make_adapter(
    base: Path,
    out: Path,
    *,
    targets: str | list[str] | None = None,
    r: int = 4,
    alpha: float = 8,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    **lora_kwargs: Any,
) -> Path:
    """A PEFT adapter saved by PEFT's `save_pretrained` (LoRA on the language model by default)."""
    from peft import LoraConfig, get_peft_model

    family = family_of(base)
    model = load(base, dtype)
    config = LoraConfig(
        r=r,
        lora_alpha=alpha,
        target_modules=targets if targets is not None else family.default_target_regex,
        init_lora_weights=False,
        **lora_kwargs,
    )
    peft_model = get_peft_model(model, config)
    randomize(peft_model, seed)
    peft_model.save_pretrained(out)
    return out


def peft_merged(
    base: Path, adapters: Sequence[Path], dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """PEFT's own result: each adapter loaded with PeftModel.from_pretrained and merge_and_unload'ed, in
    order, runtime names -> tensors."""
    from peft import PeftModel

    model = load(base, dtype)
    for a in adapters:
        model = PeftModel.from_pretrained(model, a).merge_and_unload()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def merged_state(folder: Path) -> dict[str, torch.Tensor]:
    """The merged folder's tensors under runtime names (read with safetensors, not with vlmtune)."""
    from safetensors.torch import load_file

    family = family_of(folder)
    out: dict[str, torch.Tensor] = {}
    for f in checkpoint.weight_files(folder):
        for k, v in load_file(f).items():
            out[family.to_runtime(k)] = v
    return out


def max_ulps_bf16(a: torch.Tensor, b: torch.Tensor) -> int:
    """Largest distance in representable bf16 steps between two bf16 tensors."""
    ia = a.view(torch.int16).to(torch.int32)
    ib = b.view(torch.int16).to(torch.int32)
    # map sign-magnitude bit patterns onto a monotone integer line
    ia = torch.where(ia < 0, -(ia & 0x7FFF), ia)
    ib = torch.where(ib < 0, -(ib & 0x7FFF), ib)
    return int((ia - ib).abs().max()) if ia.numel() else 0


def assert_tensors_match(
    ours: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], names: Sequence[str] | None = None
) -> None:
    """fp32: max |diff| <= 1e-6; bf16: within one ulp; fp16: within one ulp."""
    names = list(names) if names is not None else list(ref)
    missing = [n for n in names if n not in ours]
    assert not missing, f"merged folder lacks {missing[:5]}"
    for n in names:
        a, b = ours[n], ref[n]
        assert a.shape == b.shape, (n, a.shape, b.shape)
        assert a.dtype == b.dtype, (n, a.dtype, b.dtype)
        if a.dtype == torch.bfloat16:
            assert max_ulps_bf16(a, b) <= 1, f"{n}: more than one bf16 ulp apart"
        elif a.dtype == torch.float16:
            assert max_ulps_bf16(a.view(torch.bfloat16), b.view(torch.bfloat16)) <= 1, n
        else:
            diff = float((a.double() - b.double()).abs().max()) if a.numel() else 0.0
            assert diff <= FP32_TOL, f"{n}: max diff {diff:.3g} > {FP32_TOL}"


def probe_image() -> Any:
    from PIL import Image

    y, x = np.mgrid[0:64, 0:64]
    rgb = np.stack([(x * 4) % 256, (y * 4) % 256, ((x + y) * 2) % 256], axis=-1).astype(np.uint8)
    return Image.fromarray(rgb)


def probe_inputs(folder: Path) -> list[dict[str, Any]]:
    """A text and an image prompt through the folder's own processor (AutoProcessor)."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(folder)
    out = []
    for content in (
        [{"type": "text", "text": PROBE_TEXT}],
        [{"type": "image", "image": probe_image()}, {"type": "text", "text": PROBE_TEXT}],
    ):
        msgs = [{"role": "user", "content": content}]
        out.append(
            dict(
                processor.apply_chat_template(
                    msgs, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
                )
            )
        )
    return out


def run_logits(model: Any, inputs: list[dict[str, Any]]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(**x).logits.float() for x in inputs]


def unmerged_model(base: Path, adapters: Sequence[Path], dtype: torch.dtype = torch.float32) -> Any:
    """base + adapters with PEFT, the last one un-merged (earlier ones merged by PEFT, in order)."""
    from peft import PeftModel

    model = load(base, dtype)
    for i, a in enumerate(adapters):
        model = PeftModel.from_pretrained(model, a)
        if i < len(adapters) - 1:
            model = model.merge_and_unload()
    return model.eval()


def assert_logits_match(
    merged: Path, reference_model: Any, tol: float = LOGIT_TOL, base: Path | None = None
) -> float:
    """The merged folder, loaded with plain AutoModelForImageTextToText (no missing/unexpected keys) and
    fed through its own AutoProcessor, gives the reference's logits. Returns the max difference."""
    from transformers import AutoModelForImageTextToText

    model, info = AutoModelForImageTextToText.from_pretrained(
        merged, dtype=torch.float32, output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    inputs = probe_inputs(merged)
    got = run_logits(model.eval(), inputs)
    want = run_logits(reference_model, inputs)
    worst = max(float((g - w).abs().max()) for g, w in zip(got, want, strict=True))
    scale = max(1.0, max(float(w.abs().max()) for w in want))
    print(f"logits: max diff {worst:.3g}, tolerance {tol * scale:.3g}")
    assert worst <= tol * scale, f"logits differ by {worst:.3g} (tolerance {tol * scale:.3g})"
    if base is not None:  # the adapter must matter, or the comparison proves nothing
        plain = run_logits(load(base), inputs)
        effect = max(float((p - w).abs().max()) for p, w in zip(plain, want, strict=True))
        assert effect > 10 * tol * scale, f"adapter effect {effect:.3g} too small for a meaningful test"
    return worst


def rewrite_adapter_keys(src: Path, dst: Path, rename: Any, *, as_bin: bool = False) -> Path:
    """Copy an adapter folder with every tensor key passed through `rename` (legacy / foreign layouts)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    state = load_file(src / "adapter_model.safetensors")
    renamed = {rename(k): v for k, v in state.items()}
    assert len(renamed) == len(state)
    (dst / "adapter_model.safetensors").unlink()
    if as_bin:
        torch.save(renamed, dst / "adapter_model.bin")
    else:
        save_file(renamed, dst / "adapter_model.safetensors")
    return dst


def disk_names(base: Path) -> dict[str, str]:
    """runtime name -> on-disk name of a base folder."""
    family = family_of(base)
    return family.runtime_index(checkpoint.tensor_index(base))


def to_bf16_base(src: Path, dst: Path) -> Path:
    """A bf16 copy of a tiny base, written by transformers in the hub layout (as bf16 checkpoints are)."""
    from transformers import AutoProcessor

    model = load(src, torch.bfloat16)
    model.save_pretrained(dst)
    AutoProcessor.from_pretrained(src).save_pretrained(dst)
    config = json.loads((dst / "config.json").read_text())
    assert config.get("dtype") == "bfloat16", config.get("dtype")
    return dst


def tree_checksums(folder: Path) -> dict[str, str]:
    import hashlib

    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }
