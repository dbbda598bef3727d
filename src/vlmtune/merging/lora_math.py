"""The merge math, in numpy, on blocks of rows: output encoding, LoRA/DoRA steps, and a float64 reference.

Why numpy and blocks: `import torch` alone costs ~0.6 GB of resident memory and seconds of start-up, and
whole-tensor numpy expressions allocate (and page-fault) several temporaries the size of the tensor. A
block of a few hundred KB stays in the CPU cache through every pass (widen bf16, B@A, scale, add, DoRA
norm, round), which measured ~5x faster than whole-tensor passes here and keeps memory flat.

PEFT is the reference (`peft/tuners/lora/layer.py`, `variants.py`, `dora.py`); the order of operations
follows it so fp32 results agree to ~1 ulp of fp32:

- Linear: delta = (B @ A) * scaling, transposed when `fan_in_fan_out` (weight stored as (in, out)).
- Embedding: delta = (B @ A).T * scaling with A = lora_embedding_A (r, vocab), B = lora_embedding_B (dim, r).
- Conv: delta = (B.view(out, r) @ A.view(r, -1)).view(weight.shape) * scaling (B has a 1x1 kernel).
- DoRA: V = W + delta; W' = (magnitude / ||V||) * V, the norm over each output unit of the layer: rows of
  (out, in) for Linear/Conv, columns of the stored tensor for Embedding and `fan_in_fan_out` Linear.
- lora_bias: bias' = bias + lora_B.bias * scaling.

Dtype codecs (bf16 as uint16 bits included) come from the one dtype table, `vlmtune.io.dtypes`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from ..adapters.reader import LoraModule
from ..io import dtypes

# About 1 MB of fp32 per block: small enough to stay in L2 through every pass, big enough that the Python
# overhead per block is noise.
BLOCK_ELEMENTS = 256 * 1024


@contextlib.contextmanager
def single_threaded_blas() -> Iterator[None]:
    """One BLAS thread while merging. The products here are thin (K = rank) and per block; OpenBLAS's
    spinning worker threads gain little on them and collapse when the cores are shared: measured 13 s of
    CPU instead of 1.5 s for a 1.4 GB merge on a loaded 2-core machine. Scoped (threadpoolctl), so a Python
    caller's numpy keeps its own setting afterwards."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # optional: without it the merge is correct, only slower on busy machines
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield


class Workspace:
    """Grow-only scratch buffers reused across blocks and tensors (no per-block allocation)."""

    def __init__(self) -> None:
        self._buffers: dict[str, np.ndarray] = {}

    def get(self, name: str, count: int, dtype: type) -> np.ndarray:
        """A 1-D array of at least `count` items (contents undefined), as a view of exactly `count`."""
        buf = self._buffers.get(name)
        need = count * np.dtype(dtype).itemsize
        if buf is None or buf.nbytes < need:
            buf = np.empty(max(need, 1), dtype=np.uint8)
            self._buffers[name] = buf
        return buf[:need].view(dtype)


def encode(x: np.ndarray, dtype: str, ws: Workspace, finite: bool = False) -> np.ndarray:
    """float32 `x` as raw bytes of `dtype` (a uint8 view valid until the next call using `ws`).
    `finite=True` promises no NaN/Inf (checked by the caller), which skips the NaN pass for bf16."""
    flat = x.reshape(-1)
    if dtype == "F32":
        return flat.view(np.uint8)
    if dtype == "BF16":
        out = ws.get("encoded", flat.size, np.uint16)
        dtypes.bf16_round(flat, out=out, tmp=ws.get("round", flat.size, np.uint32), finite=finite)
        return out.view(np.uint8)
    out = ws.get("encoded", flat.size, dtypes.get(dtype).storage)
    with np.errstate(over="ignore"):  # overflow to inf is caught by the finiteness check
        np.copyto(out, flat, casting="unsafe")
    return out.view(np.uint8)


def is_rowwise(m: LoraModule) -> bool:
    """Whether the stored weight's rows are the layer's output units (PEFT's Conv and Embedding layers
    ignore `fan_in_fan_out`; an Embedding's stored rows are tokens)."""
    return m.kind == "conv" or (m.kind == "linear" and not m.fan_in_fan_out)


@dataclass
class Factors:
    """One LoRA module's tensors as float32, in the orientation the merge applies them to rows.

    `rowwise`: the stored weight's rows are output units (Linear, Conv): delta[rows] = B[rows] @ A.
    Otherwise (Embedding, `fan_in_fan_out` Linear) stored rows are inputs: delta[rows] = At[rows] @ Bt.
    """

    scaling: float
    rowwise: bool
    A: np.ndarray  # rowwise: (r, cols); else At: (rows, r)
    B: np.ndarray  # rowwise: (rows, r); else Bt: (r, cols)
    bias: np.ndarray | None
    magnitude: np.ndarray | None  # rowwise: per row; else per column

    @classmethod
    def load(cls, m: LoraModule) -> Factors:
        A = m.A.numpy().astype(np.float32, copy=False)
        B = m.B.numpy().astype(np.float32, copy=False)
        r = A.shape[0]
        rowwise = is_rowwise(m)
        if m.kind == "conv":
            A, B = A.reshape(r, -1), B.reshape(B.shape[0], r)
        if rowwise:
            A2, B2 = np.ascontiguousarray(A), np.ascontiguousarray(B)
        else:
            A2, B2 = np.ascontiguousarray(A.T), np.ascontiguousarray(B.T)
        bias = m.bias.numpy().astype(np.float32).reshape(-1) if m.bias is not None else None
        mag = m.magnitude.numpy().astype(np.float32).reshape(-1) if m.magnitude is not None else None
        return cls(float(m.scaling), rowwise, A2, B2, bias, mag)

    @property
    def needs_whole_tensor(self) -> bool:
        """DoRA normalises columns of the stored tensor here: every row must be in hand at once."""
        return self.magnitude is not None and not self.rowwise

    def apply(self, cur: np.ndarray, r0: int, r1: int, scratch: np.ndarray) -> None:
        """cur (rows r0:r1 of the weight, float32, (n, cols)) += delta[r0:r1]; then DoRA if any."""
        delta = scratch[: r1 - r0]
        if self.rowwise:
            np.matmul(self.B[r0:r1], self.A, out=delta)
        else:
            np.matmul(self.A[r0:r1], self.B, out=delta)
        delta *= np.float32(self.scaling)
        cur += delta
        if self.magnitude is None:
            return
        if self.rowwise:
            norm = np.sqrt(np.einsum("ij,ij->i", cur, cur, dtype=np.float64)).astype(np.float32)
            cur *= (self.magnitude[r0:r1] / norm)[:, None]
        else:  # whole tensor in hand (needs_whole_tensor)
            norm = np.sqrt(np.einsum("ij,ij->j", cur, cur, dtype=np.float64)).astype(np.float32)
            cur *= (self.magnitude / norm)[None, :]

    def apply_bias(self, cur: np.ndarray, r0: int, r1: int) -> None:
        assert self.bias is not None
        cur += (self.bias[r0:r1] * np.float32(self.scaling)).reshape(cur.shape)


# ---- float64 reference for the post-write check ------------------------------------------------------


def ulp(values: np.ndarray, dtype: str) -> np.ndarray:
    """The spacing of `dtype` numbers at |values| (float64), subnormal range included."""
    d = dtypes.get(dtype)
    mag = np.abs(values)
    _, exp = np.frexp(mag)  # mag = m * 2**exp, 0.5 <= m < 1
    exp = np.maximum(exp - 1, d.min_exponent)
    return np.ldexp(1.0, exp - (d.precision_bits - 1))


class Reference:
    """The same steps as `Factors`, in float64 and written independently, on a few rows at a time.

    `mag` tracks the size of the terms that were summed (|W| + |delta| ...) so the tolerance can allow for
    fp32 rounding in the streaming merge where terms cancel.
    """

    def __init__(self, m: LoraModule) -> None:
        self.m = m
        self.A = m.A.numpy().astype(np.float64)
        self.B = m.B.numpy().astype(np.float64)
        r = self.A.shape[0]
        if m.kind == "conv":
            self.A, self.B = self.A.reshape(r, -1), self.B.reshape(-1, r)
        self.s = float(m.scaling)
        self.rowwise = is_rowwise(m)
        self.mag_vec = m.magnitude.numpy().astype(np.float64).reshape(-1) if m.magnitude is not None else None
        self.bias = m.bias.numpy().astype(np.float64).reshape(-1) if m.bias is not None else None
        self.col_norm: np.ndarray | None = None  # set by the caller for column-wise DoRA

    def delta(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """delta rows and the sum of |terms| behind each element (the scale of fp32 rounding in B@A)."""
        if self.rowwise:
            b, a = self.B[rows], self.A
        else:  # Embedding / fan_in_fan_out: delta = (B @ A).T * s, so delta[i, j] = s * sum_k A[k, i] B[j, k]
            b, a = self.A[:, rows].T, self.B.T
        return self.s * (b @ a), abs(self.s) * (np.abs(b) @ np.abs(a))

    def step(self, w: np.ndarray, mag: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        d, d_mag = self.delta(rows)
        v = w + d
        mag = mag + d_mag
        if self.mag_vec is None:
            return v, mag
        if self.rowwise:
            factor = self.mag_vec[rows] / np.linalg.norm(v, axis=1)
            return v * factor[:, None], mag * np.abs(factor)[:, None]
        assert self.col_norm is not None, "column-wise DoRA needs the column norms"
        factor = self.mag_vec / self.col_norm
        return v * factor[None, :], mag * np.abs(factor)[None, :]

    def step_bias(self, b: np.ndarray, mag: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        assert self.bias is not None
        d = (self.s * self.bias[rows]).reshape(b.shape)
        return b + d, mag + np.abs(d)
