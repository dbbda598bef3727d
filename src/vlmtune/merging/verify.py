"""`--verify`: run base + adapter(s) un-merged (PEFT) and the merged folder (plain transformers) on probe
inputs, a text prompt and an image prompt through the exported processor, and compare the logits.

This is the one part of the merge that imports torch, transformers and PEFT; it runs only when asked.
Both models run in float32 (one at a time, to bound memory), so the only expected difference is the
rounding of the merged weights to the output dtype; the tolerance is relative to the logit scale and set
per dtype. With several adapters, all but the last are merged by PEFT's own `merge_and_unload` and the
last runs un-merged on top: the same "in order" meaning the merge has.
"""

from __future__ import annotations

import gc
import time
from pathlib import Path
from typing import Any

from ..adapters.peft_bridge import load_weights, lora_config
from ..adapters.reader import Adapter
from ..conversation import IMAGE_PLACEHOLDER, from_request, open_image
from .plan import MergeError

# max |merged - reference| allowed, relative to max(1, max |reference logit|), per output dtype.
TOLERANCE = {"F32": 1e-4, "F64": 1e-6, "F16": 1e-2, "BF16": 3e-2}
PROMPT = "Describe the picture in one sentence."


def probe_image() -> Any:
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:96, 0:96]
    rgb = np.stack([(x * 5) % 256, (y * 3) % 256, ((x + y) * 7) % 256], axis=-1).astype(np.uint8)
    return Image.fromarray(rgb)


def probes(processor: Any) -> dict[str, dict[str, Any]]:
    """Model inputs for a text-only and an image prompt, built the way a user's chat would be."""
    image = probe_image()
    out = {}
    for name, chat in (
        ("text", from_request(PROMPT)),
        ("image", from_request(f"{IMAGE_PLACEHOLDER}{PROMPT}", [image])),
    ):
        images = [open_image(src) for src in chat.images]
        try:
            inputs = processor.apply_chat_template(
                chat.to_template(),
                add_generation_prompt=True,
                tokenize=True,
                return_dict=True,
                return_tensors="pt",
                processor_kwargs={"images": images} if images else {},
            )
        except (ValueError, TypeError) as exc:  # no chat template: the processor's own image token
            token = getattr(processor, "image_token", None)
            if images and token is None:
                raise MergeError(
                    f"cannot build an image probe: no chat template and no image token ({exc})."
                ) from exc
            text = f"{token} {PROMPT}" if images else PROMPT
            inputs = processor(text=[text], return_tensors="pt", **({"images": images} if images else {}))
        out[name] = dict(inputs)
    return out


def attach(model: Any, adapter: Adapter) -> Any:
    """base + adapter as a PEFT model, from vlmtune's placed tensors (so legacy and LLaVA layouts load
    the same as runtime ones); fails on any tensor PEFT does not take. Bare parameters go into the base,
    as PEFT's own loader puts them (this model runs this adapter only)."""
    from peft import get_peft_model

    peft_model = get_peft_model(model, lora_config(adapter)[0])
    load_weights(peft_model, adapter, "default", bare=True)
    return peft_model.eval()


def logits(model: Any, inputs: dict[str, dict[str, Any]], device: str) -> dict[str, Any]:
    import torch

    out = {}
    with torch.no_grad():
        for name, batch in inputs.items():
            moved = {k: (v.to(device) if hasattr(v, "to") else v) for k, v in batch.items()}
            if "pixel_values" in moved:
                moved["pixel_values"] = moved["pixel_values"].to(torch.float32)
            out[name] = model(**moved).logits.float().cpu()
    return out


def verify(base: Path, adapters: list[Adapter], merged: Path, dtype: str) -> dict[str, Any]:
    """Compare the merged folder with base + adapters un-merged; return the figures (never raises for a
    mismatch: the caller decides)."""
    t0 = time.perf_counter()
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    device = "cuda" if torch.cuda.is_available() else "cpu"
    processor = AutoProcessor.from_pretrained(merged)
    inputs = probes(processor)

    model = AutoModelForImageTextToText.from_pretrained(base, dtype=torch.float32).to(device).eval()
    base_logits = logits(model, inputs, device)
    for i, adapter in enumerate(adapters):
        model = attach(model, adapter)
        if i < len(adapters) - 1:
            model = model.merge_and_unload()
    reference = logits(model, inputs, device)
    del model
    gc.collect()

    merged_model = AutoModelForImageTextToText.from_pretrained(merged, dtype=torch.float32).to(device).eval()
    got = logits(merged_model, inputs, device)
    del merged_model
    gc.collect()

    per_probe = {}
    worst, scale, effect = 0.0, 0.0, 0.0
    for name in inputs:
        diff = float((got[name] - reference[name]).abs().max())
        per_probe[name] = {
            "max_abs_diff": diff,
            "adapter_effect": float((reference[name] - base_logits[name]).abs().max()),
            "tokens": int(reference[name].shape[1]),
        }
        worst = max(worst, diff)
        scale = max(scale, float(reference[name].abs().max()))
        effect = max(effect, per_probe[name]["adapter_effect"])
    tolerance = TOLERANCE.get(dtype, 3e-2) * max(1.0, scale)
    return {
        "run": True,
        "passed": worst <= tolerance,
        "max_abs_logit_diff": worst,
        "tolerance": tolerance,
        "adapter_effect": effect,
        "discriminating": effect > tolerance,
        "probes": per_probe,
        "reference": "PEFT un-merged" + (" (earlier adapters merged by PEFT)" if len(adapters) > 1 else ""),
        "compute_dtype": "float32",
        "device": device,
        "seconds": round(time.perf_counter() - t0, 2),
    }
