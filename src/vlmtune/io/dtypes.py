"""The one dtype table: every spelling of a tensor dtype (safetensors code, numpy storage, torch name,
command-line names) and its size, plus the bf16 codec.

numpy has no bfloat16, so BF16 is held as uint16 bits: widening is exact (a bf16 is the top half of an
fp32) and narrowing rounds to nearest even, as torch's `.to(torch.bfloat16)` does. Nothing here imports
torch: torch dtypes are named by attribute (`torch_dtype` turns a name into one, importing torch then).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import VlmtuneError


@dataclass(frozen=True)
class DType:
    """One tensor dtype in every spelling vlmtune meets."""

    code: str  # safetensors spelling, the canonical one inside vlmtune: 'BF16'
    itemsize: int  # bytes per element
    storage: Any  # numpy dtype of the raw bytes (bf16: uint16); None: numpy cannot hold it
    torch: str  # torch attribute name: 'bfloat16' (torch.bfloat16)
    precision_bits: int = 0  # significand bits incl. the implicit one (floats only; 0: not a float)
    min_exponent: int = 0  # smallest normal exponent (floats only), below which the ulp stops shrinking

    @property
    def is_float(self) -> bool:
        return self.precision_bits > 0


TABLE: dict[str, DType] = {
    d.code: d
    for d in (
        DType("F64", 8, np.float64, "float64", 53, -1022),
        DType("F32", 4, np.float32, "float32", 24, -126),
        DType("F16", 2, np.float16, "float16", 11, -14),
        DType("BF16", 2, np.uint16, "bfloat16", 8, -126),
        DType("I64", 8, np.int64, "int64"),
        DType("I32", 4, np.int32, "int32"),
        DType("I16", 2, np.int16, "int16"),
        DType("I8", 1, np.int8, "int8"),
        DType("U64", 8, np.uint64, "uint64"),
        DType("U32", 4, np.uint32, "uint32"),
        DType("U16", 2, np.uint16, "uint16"),
        DType("U8", 1, np.uint8, "uint8"),
        DType("BOOL", 1, np.bool_, "bool"),
        # fp8 bases (quantized checkpoints): known sizes so their headers read; no numpy codec
        DType("F8_E4M3", 1, None, "float8_e4m3fn"),
        DType("F8_E5M2", 1, None, "float8_e5m2"),
        DType("F8_E8M0", 1, None, "float8_e8m0fnu"),
    )
}
# Floating dtypes from the least to the most precise (the merge's --verify compares in the least).
FLOATS = tuple(sorted((d.code for d in TABLE.values() if d.is_float), key=lambda c: TABLE[c].precision_bits))
# What a user may write for an output/compute dtype (--dtype, dtype=): name -> code; 'auto' -> None.
NAMES: dict[str, str | None] = {
    "auto": None,
    "bf16": "BF16",
    "bfloat16": "BF16",
    "fp16": "F16",
    "float16": "F16",
    "half": "F16",
    "fp32": "F32",
    "float32": "F32",
    "float": "F32",
}
BY_TORCH = {d.torch: d.code for d in TABLE.values()}


class DTypeError(VlmtuneError, ValueError):
    """A dtype name that is not one of the choices."""


def get(code: str) -> DType:
    """The table entry of a safetensors dtype code; a one-line error for anything else."""
    try:
        return TABLE[code]
    except (KeyError, TypeError):
        raise DTypeError(f"dtype {code!r} is not one vlmtune knows ({', '.join(TABLE)}).") from None


def itemsize(code: str) -> int:
    return get(code).itemsize


def is_float(code: str) -> bool:
    d = TABLE.get(code)
    return d is not None and d.is_float


def parse_name(name: str | None, option: str = "--dtype") -> str | None:
    """A user's dtype name ('bf16', 'float16', 'torch.float32', 'auto'...) as a code; None for auto."""
    key = str(name or "auto").lower().removeprefix("torch.")
    if key not in NAMES:
        raise DTypeError(f"{option} {name!r} is not one of auto, bf16, fp16, fp32.")
    return NAMES[key]


def torch_name(code: str) -> str:
    """'BF16' -> 'bfloat16': how config.json (`dtype`) and torch spell it."""
    return get(code).torch


def torch_dtype(name: str | None) -> Any:
    """A user's dtype name as a torch dtype, or the string 'auto' (what `from_pretrained(dtype=)` takes)."""
    code = parse_name(name, option="dtype")
    if code is None:
        return "auto"
    import torch

    return getattr(torch, torch_name(code))


def from_torch(dtype: Any) -> str | None:
    """torch.bfloat16 -> 'BF16'; None when the table has no entry for it."""
    return BY_TORCH.get(str(dtype).removeprefix("torch."))


# ---- bf16 codec (the only place bf16 bits are made or read) ------------------------------------------


def bf16_widen(raw: np.ndarray, out: np.ndarray) -> None:
    """bf16 bits (uint16) into the float32 array `out` (same element count): exact."""
    bits = out.reshape(-1).view(np.uint32)
    np.copyto(bits, raw.reshape(-1).view(np.uint16), casting="unsafe")
    np.left_shift(bits, 16, out=bits)


def bf16_round(
    x: np.ndarray, out: np.ndarray | None = None, tmp: np.ndarray | None = None, finite: bool = False
) -> np.ndarray:
    """float32 `x` as bf16 bits (uint16), rounded to nearest even, NaN kept NaN.

    `out` (uint16) and `tmp` (uint32) of x's size are reused when given (the merge passes scratch
    buffers, so a block is rounded without allocating). `finite=True` promises no NaN/Inf, which skips
    the NaN pass."""
    flat = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    bits = flat.view(np.uint32)
    tmp = np.empty(flat.size, np.uint32) if tmp is None else tmp
    out = np.empty(flat.size, np.uint16) if out is None else out
    # add 0x7FFF plus the lowest kept bit; the high half is then the rounded bf16
    np.right_shift(bits, 16, out=tmp)
    np.bitwise_and(tmp, 1, out=tmp)
    np.add(tmp, 0x7FFF, out=tmp)
    np.add(tmp, bits, out=tmp)
    np.copyto(out, tmp.view(np.uint16)[1::2])  # little-endian: the high half of each uint32
    if not finite:
        nan = np.isnan(flat)
        if nan.any():  # keep NaN a NaN (the add above may carry it into Inf)
            out[nan] = ((bits[nan] >> 16) | 0x40).astype(np.uint16)
    return out


def to_float32(raw: np.ndarray, code: str, out: np.ndarray) -> None:
    """Widen raw bytes of a floating `code` into the float32 array `out` (same element count)."""
    flat = out.reshape(-1)
    if code == "BF16":
        bf16_widen(raw, flat)
    elif code == "F32":
        np.copyto(flat, raw.reshape(-1).view(np.float32))
    else:
        np.copyto(flat, raw.reshape(-1).view(get(code).storage), casting="unsafe")


def round_trip(values: np.ndarray, code: str) -> np.ndarray:
    """float64 values rounded to a floating `code` and back (round to nearest even), for ulp compares."""
    if code == "BF16":
        bits = bf16_round(values.astype(np.float32)).astype(np.uint32) << 16
        return bits.view(np.float32).astype(np.float64).reshape(values.shape)
    return values.astype(get(code).storage).astype(np.float64)
