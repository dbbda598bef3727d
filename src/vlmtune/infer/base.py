"""Loading the base model once: folder and family, dtype, device placement, bitsandbytes quantization.

`open_base` is cheap (config and family only), so adapters can be checked against the base's safetensors
headers before `load_model` spends time and memory on the weights.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import checkpoint, families
from ..errors import VlmtuneError
from ..io import dtypes
from . import quant


@dataclass(frozen=True)
class BaseSpec:
    """A base model folder before its weights are loaded."""

    name: str  # as the user gave it (a folder or a hub id)
    folder: Path  # the local folder
    config: dict[str, Any]  # its config.json
    family: families.Family


def resolve_dtype(dtype: str | torch.dtype) -> Any:
    """A torch dtype (or 'auto', the checkpoint's) from a name such as 'bf16'."""
    if isinstance(dtype, torch.dtype):
        return dtype
    return dtypes.torch_dtype(dtype)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def open_base(base: str | Path) -> BaseSpec:
    """Find the base's folder (downloading a hub id on first use) and its family; no weights are read."""
    folder = checkpoint.resolve(base)
    config = checkpoint.read_config(folder)
    return BaseSpec(str(base), folder, config, families.detect(config))


def load_model(
    spec: BaseSpec,
    *,
    dtype: str | torch.dtype = "auto",
    device: str | None = None,
    quantization: str | None = None,
) -> tuple[Any, Any]:
    """(model in eval mode with gradients off, processor). `device` is 'cpu', 'cuda', 'cuda:N' or 'auto'
    (spread over the GPUs; default: CUDA when present); `quantization` is None, '4bit' or '8bit'."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    device = device or default_device()
    torch_dtype = resolve_dtype(dtype)
    kwargs: dict[str, Any] = {"dtype": torch_dtype}
    if quantization:
        quant.check_platform(quantization)
        compute = torch_dtype
        if device == "cpu":
            compute = torch.float32 if compute == "auto" else compute
        elif compute in ("auto", torch.float32):
            compute = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        kwargs["quantization_config"] = quant.bnb_config(quantization, spec.family, compute)
        kwargs["dtype"] = compute
    if device != "auto" and not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise VlmtuneError(f"unknown device {device!r}; choose cpu, cuda, cuda:N or auto.")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise VlmtuneError(f"--device {device}: this machine has no CUDA GPU; use --device cpu.")
    if device == "auto":
        kwargs["device_map"] = "auto"
    elif device != "cpu":
        kwargs["device_map"] = {"": device}
    model = AutoModelForImageTextToText.from_pretrained(spec.folder, **kwargs)
    model.eval()
    model.requires_grad_(False)
    return model, AutoProcessor.from_pretrained(spec.folder)
