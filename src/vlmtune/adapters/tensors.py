"""Lazy tensors read from safetensors (or, for legacy folders, pickled .bin) files.

Our own reader rather than `safetensors.safe_open`: `safe_open` memory-maps the file, and every page a
merge touches then counts towards its resident memory. Reading each tensor with `readinto` keeps peak
memory at the size of the tensor in hand and needs neither torch nor transformers (the merge imports
neither). torch is imported only to turn a tensor into a torch tensor, or to unpickle a legacy `.bin`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..checkpoint import CheckpointError, read_header
from ..errors import VlmtuneError

# safetensors dtype -> (numpy dtype of the raw storage, bytes per element). BF16 has no numpy dtype: it is
# held as uint16 and widened to float32 exactly (bf16 is the top half of an fp32).
STORAGE = {
    "F64": (np.float64, 8),
    "F32": (np.float32, 4),
    "F16": (np.float16, 2),
    "BF16": (np.uint16, 2),
    "I64": (np.int64, 8),
    "I32": (np.int32, 4),
    "I16": (np.int16, 2),
    "I8": (np.int8, 1),
    "U8": (np.uint8, 1),
    "BOOL": (np.bool_, 1),
}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


@dataclass(frozen=True)
class LazyTensor:
    """A tensor that is read only when asked for: its file, key, dtype (safetensors spelling) and shape."""

    key: str
    dtype: str
    shape: tuple[int, ...]
    source: Path
    read: Callable[[], bytes]
    # Absolute byte offset of the data in `source` when it is a safetensors file (None for pickled .bin), so
    # a consumer can read part of a big tensor (the merge reads rows in blocks) instead of all of it.
    offset: int | None = None

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        return self.numel * STORAGE[self.dtype][1] if self.dtype in STORAGE else 0


def read_range(file: Path, start: int, end: int) -> bytes:
    buf = bytearray(end - start)
    with open(file, "rb") as f:
        f.seek(start)
        got = f.readinto(buf)
    if got != len(buf):
        raise CheckpointError(f"{file} is truncated: expected {len(buf)} bytes at offset {start}, got {got}.")
    return bytes(buf)


def read_safetensors(file: str | Path) -> dict[str, LazyTensor]:
    file = Path(file)
    header, data_start = read_header(file)
    out = {}
    for key, meta in header.items():
        if key == "__metadata__":
            continue
        begin, end = meta["data_offsets"]
        start, stop = data_start + begin, data_start + end
        out[key] = LazyTensor(
            key,
            meta["dtype"],
            tuple(meta["shape"]),
            file,
            lambda s=start, e=stop: read_range(file, s, e),
            offset=start,
        )
    return out


TORCH_TO_ST = {
    "torch.float64": "F64",
    "torch.float32": "F32",
    "torch.float16": "F16",
    "torch.bfloat16": "BF16",
    "torch.int64": "I64",
    "torch.int32": "I32",
    "torch.int16": "I16",
    "torch.int8": "I8",
    "torch.uint8": "U8",
    "torch.bool": "BOOL",
}


def read_pickled(file: str | Path) -> dict[str, LazyTensor]:
    """A legacy pickled state dict, loaded with `weights_only=True` (no code runs from the file)."""
    import torch

    file = Path(file)
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise VlmtuneError(
            f"{file} could not be read as a plain tensor dict with weights_only=True ({exc}); "
            "vlmtune never unpickles arbitrary objects. Re-save it as safetensors."
        ) from exc
    if not isinstance(state, dict):
        raise VlmtuneError(f"{file} does not hold a dict of tensors.")
    out = {}
    for key, t in state.items():
        if not isinstance(t, torch.Tensor):
            raise VlmtuneError(f"{file}: entry {key!r} is a {type(t).__name__}, not a tensor.")
        dtype = TORCH_TO_ST.get(str(t.dtype))
        if dtype is None:
            raise VlmtuneError(f"{file}: tensor {key!r} has unsupported dtype {t.dtype}.")
        t = t.detach().contiguous()
        out[key] = LazyTensor(
            key, dtype, tuple(t.shape), file, lambda t=t: t.view(torch.uint8).numpy().tobytes()
        )
    return out


def read_tensor_file(file: str | Path) -> dict[str, LazyTensor]:
    file = Path(file)
    return read_pickled(file) if file.suffix == ".bin" else read_safetensors(file)


def bf16_to_f32(raw: np.ndarray) -> np.ndarray:
    return (raw.astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """fp32 -> bf16 bits (uint16), round to nearest even, NaN kept NaN: what torch's `.to(bfloat16)` does."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((bits + (0x7FFF + ((bits >> 16) & 1))) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        rounded[nan] = ((bits[nan] >> 16) | 0x40).astype(np.uint16)
    return rounded


def to_numpy(t: LazyTensor, float32: bool = True) -> np.ndarray:
    """The tensor as a numpy array; floating tensors widened to float32 when `float32`."""
    if t.dtype not in STORAGE:
        raise VlmtuneError(f"{t.source}: tensor {t.key!r} has dtype {t.dtype}, which vlmtune cannot read.")
    storage, _ = STORAGE[t.dtype]
    arr = np.frombuffer(t.read(), dtype=storage).reshape(t.shape)
    if t.dtype == "BF16":
        return bf16_to_f32(arr) if float32 else arr
    if float32 and t.dtype in FLOAT_DTYPES:
        return arr.astype(np.float32)
    return arr


def to_torch(t: LazyTensor) -> Any:
    """The tensor as a torch tensor of its own dtype (bf16 included)."""
    import torch

    st_to_torch = {v: getattr(torch, k.split(".")[1]) for k, v in TORCH_TO_ST.items()}
    raw = t.read()
    if not raw:
        return torch.empty(t.shape, dtype=st_to_torch[t.dtype])
    return torch.frombuffer(bytearray(raw), dtype=st_to_torch[t.dtype]).reshape(t.shape)
