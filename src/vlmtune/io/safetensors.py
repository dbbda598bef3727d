"""The one safetensors reader: a validated header becomes an index of tensor records, each read whole or
by rows with `read(rows=...)`.

Our own reader rather than `safetensors.safe_open`: `safe_open` memory-maps the file, and every page a
merge touches then counts towards its resident memory; reading by byte range (`preadv` into a buffer) keeps
peak memory at the size of the block in hand and needs neither torch nor transformers (the merge imports
neither). It also checks what `safe_open` would only find later, or not at all, so a damaged file is one
line naming it, never a `MemoryError` or a reshape error: the 8-byte header length against the file size,
a JSON object, known dtypes, byte ranges inside the file, not overlapping, each as long as dtype x shape.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import VlmtuneError
from . import dtypes
from .errors import DamagedFileError

MAX_HEADER = 100 * 1024 * 1024  # what the safetensors library itself accepts
METADATA = "__metadata__"
FIX = "the file is damaged or incomplete: copy or download it again"


@dataclass(frozen=True)
class TensorRecord:
    """One tensor of a file: its name, dtype (safetensors code), shape, and where its bytes are.

    `start`/`end` are absolute byte offsets in `file`. A record of a pickled legacy file holds its bytes
    in `blob` instead (then `start` is 0 and the offsets index the blob)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    start: int
    end: int
    blob: bytes | None = field(default=None, repr=False, compare=False)

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def rows(self) -> int:
        """Rows for block-wise reading: the first dimension (a scalar is one row)."""
        return self.shape[0] if self.shape else 1

    @property
    def row_bytes(self) -> int:
        return math.prod(self.shape[1:]) * dtypes.itemsize(self.dtype)

    def as_bytes(self) -> TensorRecord:
        """The same bytes seen as a 1-D uint8 tensor (so `read(rows=...)` reads byte ranges)."""
        return dataclasses.replace(self, dtype="U8", shape=(self.nbytes,))

    def _span(self, rows: tuple[int, int] | None) -> tuple[int, int]:
        if rows is None:
            return self.start, self.end
        r0, r1 = rows
        if not 0 <= r0 <= r1 <= self.rows:
            raise IndexError(f"rows {r0}:{r1} of {self.name} (it has {self.rows})")
        return self.start + r0 * self.row_bytes, self.start + r1 * self.row_bytes

    def read_into(self, buf: np.ndarray, rows: tuple[int, int] | None = None, fd: int | None = None) -> None:
        """Fill `buf` (any contiguous array of exactly the span's size) with the bytes of `rows` (all when
        None). `fd`: an open descriptor of `file` to reuse (the merge keeps one per file)."""
        lo, hi = self._span(rows)
        view = memoryview(buf).cast("B")
        if len(view) != hi - lo:
            raise ValueError(f"{self.name}: buffer of {len(view)} bytes for a span of {hi - lo}")
        if self.blob is not None:
            view[:] = memoryview(self.blob)[lo:hi]
            return
        own = fd is None
        fd = os.open(self.file, os.O_RDONLY) if fd is None else fd
        try:
            done = 0
            while done < len(view):
                n = os.preadv(fd, [view[done:]], lo + done)
                if n <= 0:
                    raise DamagedFileError(
                        f"{self.file} ended at byte {lo + done} while reading {self.name}, which its header "
                        f"places up to byte {hi}; {FIX}."
                    )
                done += n
        finally:
            if own:
                os.close(fd)

    def read(self, rows: tuple[int, int] | None = None) -> bytes:
        """The raw bytes of the tensor, or of rows r0:r1 of it."""
        lo, hi = self._span(rows)
        buf = bytearray(hi - lo)
        self.read_into(np.frombuffer(buf, np.uint8), rows)
        return bytes(buf)

    def numpy(self, float32: bool = True) -> np.ndarray:
        """The tensor as a numpy array; floating tensors widened to float32 when `float32` (bf16 stays
        uint16 bits otherwise)."""
        d = dtypes.get(self.dtype)
        if d.storage is None:
            raise VlmtuneError(
                f"{self.file}: tensor {self.name!r} is {self.dtype}, which vlmtune cannot read."
            )
        raw = np.frombuffer(self.read(), dtype=d.storage).reshape(self.shape)
        if float32 and d.is_float:
            out = np.empty(self.shape, np.float32)
            dtypes.to_float32(raw, self.dtype, out)
            return out
        return raw

    def torch(self) -> Any:
        """The tensor as a torch tensor of its own dtype (bf16 included); imports torch."""
        import torch

        dtype = getattr(torch, dtypes.torch_name(self.dtype))
        if not self.nbytes:
            return torch.empty(self.shape, dtype=dtype)
        buf = bytearray(self.nbytes)  # read once into memory torch then owns (writable, no second copy)
        self.read_into(np.frombuffer(buf, np.uint8))
        return torch.frombuffer(buf, dtype=dtype).reshape(self.shape)


def damaged(file: Path, what: str) -> DamagedFileError:
    return DamagedFileError(f"{file} is not a valid safetensors file: {what}; {FIX}.")


def read_header(file: str | Path) -> tuple[dict[str, Any], int]:
    """The JSON header of a safetensors file (checked to be an object that fits the file) and the
    offset where its data starts."""
    file = Path(file)
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            prefix = f.read(8)
            if len(prefix) != 8:
                raise damaged(file, f"{size} bytes, shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", prefix)
            if n > MAX_HEADER or 8 + n > size:
                raise damaged(
                    file, f"its header length says {n} bytes but the file holds {size - 8} after it"
                )
            raw = f.read(n)
    except OSError as exc:
        raise DamagedFileError(f"{file} cannot be read ({exc.strerror or exc}).") from None
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        raise damaged(file, f"its header is not JSON ({str(exc).splitlines()[0]})") from None
    if not isinstance(header, dict):
        raise damaged(file, f"its header is a JSON {type(header).__name__}, not an object")
    return header, 8 + n


def record_of(file: Path, name: str, meta: Any, data_start: int, size: int) -> TensorRecord:
    """One header entry, checked: known dtype, a shape of non-negative ints, offsets inside the file
    spanning exactly dtype size x number of elements."""
    where = f"tensor {name!r}"
    if not isinstance(meta, dict):
        raise damaged(file, f"{where} is described by a {type(meta).__name__}, not an object")
    dtype, shape, offsets = meta.get("dtype"), meta.get("shape"), meta.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in dtypes.TABLE:
        raise damaged(file, f"{where} has dtype {dtype!r}, not one of {', '.join(dtypes.TABLE)}")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise damaged(file, f"{where} has shape {shape!r}, not a list of non-negative integers")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(type(o) is int for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise damaged(file, f"{where} has data_offsets {offsets!r}, not [begin, end] with 0 <= begin <= end")
    begin, end = offsets
    if data_start + end > size:
        raise damaged(
            file, f"{where} ends at byte {data_start + end} but the file has {size} bytes (truncated?)"
        )
    want = math.prod(shape) * dtypes.itemsize(dtype)
    if end - begin != want:
        raise damaged(
            file,
            f"{where} is {dtype} {tuple(shape)} ({want} bytes) but its data_offsets span {end - begin} bytes",
        )
    return TensorRecord(name, dtype, tuple(shape), file, data_start + begin, data_start + end)


def read_file(file: str | Path) -> dict[str, TensorRecord]:
    """Every tensor of a safetensors file by name, in data order, after checking the whole header."""
    file = Path(file)
    header, data_start = read_header(file)
    size = file.stat().st_size
    meta = header.pop(METADATA, None)
    if meta is not None and not isinstance(meta, dict):
        raise damaged(file, f"its {METADATA} is a {type(meta).__name__}, not an object")
    records = sorted(
        (record_of(file, name, m, data_start, size) for name, m in header.items()),
        key=lambda r: (r.start, r.end),
    )
    filled = [r for r in records if r.nbytes]  # an empty tensor occupies no bytes
    for prev, cur in itertools.pairwise(filled):
        if cur.start < prev.end:
            raise damaged(file, f"the bytes of {prev.name!r} and {cur.name!r} overlap")
    return {r.name: r for r in records}
