"""Loading the base quantized (bitsandbytes 4-bit NF4 or 8-bit) under un-merged adapters.

bitsandbytes (0.50+) runs its 4-bit and 8-bit layers on CUDA GPUs and on CPU; where it is missing or cannot
load we say so in one sentence before loading anything, instead of letting transformers fail deep inside
`from_pretrained`. Training (QLoRA) uses the same configuration. Only the
language model is quantized: the vision tower, projector and lm_head stay in the compute dtype (they are a
small share of the weights, and LLaVA's own 4-bit path broke projector loading, LLaVA #433/#744).
"""

from __future__ import annotations

import importlib.util
from typing import Any

from ..errors import VlmtuneError
from ..families import Family

MODES = ("4bit", "8bit")


def check_platform(mode: str) -> None:
    """Raise a sentence the user can act on when `mode` cannot run here."""
    import torch

    if mode not in MODES:
        raise VlmtuneError(f"unknown quantization {mode!r}; choose {' or '.join(MODES)} (or leave it off).")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise VlmtuneError(
            f"quantization {mode} needs the bitsandbytes package, which is not installed; "
            "run `pip install bitsandbytes` and try again."
        )
    try:
        import bitsandbytes  # noqa: F401  (its import finds the native library for this platform)
    except Exception as exc:  # bitsandbytes raises several types when its native library cannot load
        raise VlmtuneError(
            f"quantization {mode}: bitsandbytes cannot run on this platform ({type(exc).__name__}: {exc}); "
            f"run without quantization{' or on a CUDA GPU' if not torch.cuda.is_available() else ''}."
        ) from None


def train_device(on_cpu: bool) -> str:
    """Where a quantized base is placed: the CPU, or this process's GPU (LOCAL_RANK under torchrun)."""
    import os

    return "cpu" if on_cpu else f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"


def skip_modules(family: Family) -> list[str]:
    """Runtime module prefixes kept unquantized: vision tower, projector, lm_head."""
    return [prefix for role, prefix in family.role_prefixes if role in ("vision", "projector", "lm_head")]


def bnb_config(mode: str, family: Family, compute_dtype: Any, quant_storage: Any = None) -> Any:
    """The transformers `BitsAndBytesConfig` for `mode` (checks the platform first). `quant_storage`: the
    dtype 4-bit weights are stored in (bitsandbytes' default uint8; FSDP needs a float dtype)."""
    check_platform(mode)
    from transformers import BitsAndBytesConfig

    if mode == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
            **({"bnb_4bit_quant_storage": quant_storage} if quant_storage is not None else {}),
            llm_int8_skip_modules=skip_modules(family),
        )
    return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip_modules(family))
