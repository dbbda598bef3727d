"""The cheap check that runs after every merge (no torch): re-read the written folder through its index
and compare it with an independent float64 recomputation on a few rows of every changed tensor.

It catches what users of other tools found too late (FIELD_NOTES §4.1): a shard that silently holds the
untuned weights, a tensor written under the wrong name or transposed, a wrong scaling, a missing tensor.
The tolerance is one unit in the last place of the output dtype plus fp32 rounding slack in proportion to
the magnitude of the terms summed, so a correct bf16 merge passes and a no-op or mis-scaled one fails.
"""

from __future__ import annotations

import math
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from .. import checkpoint
from ..io import TensorRecord, dtypes
from . import lora_math
from .lora_math import Reference, Workspace
from .plan import MergeError, OutTensor, Plan
from .stream import Files, RowSource

SAMPLE_ROWS = 4
BYTE_WINDOW = 4096
# fp32 arithmetic slack of the streaming merge, in units of 2**-24 times the summed magnitudes.
FP32_SLACK = 32.0


def sample_rows(name: str, rows: int) -> np.ndarray:
    h = zlib.crc32(name.encode())
    picks = {0, rows - 1, h % rows, (h // 7919) % rows}
    return np.array(sorted(picks)[:SAMPLE_ROWS], dtype=np.int64)


def read_rows64(src: RowSource, rows: np.ndarray, ws: Workspace) -> np.ndarray:
    out = np.empty((len(rows), src.cols), dtype=np.float32)
    for i, r in enumerate(rows):
        src.read_f32(int(r), int(r) + 1, out[i : i + 1], ws)
    return out.astype(np.float64)


def column_norms(start: RowSource, refs: list[Reference], k: int, ws: Workspace) -> np.ndarray:
    """||V_k|| per column, V_k = the tensor after steps < k plus delta_k, over all rows (float64)."""
    total = np.zeros(start.cols, dtype=np.float64)
    block = max(1, lora_math.BLOCK_ELEMENTS // max(start.cols, 1))
    for r0 in range(0, start.rows, block):
        rows = np.arange(r0, min(start.rows, r0 + block))
        buf = np.empty((len(rows), start.cols), dtype=np.float32)
        start.read_f32(int(rows[0]), int(rows[-1]) + 1, buf, ws)
        w = buf.astype(np.float64)
        mag = np.abs(w)
        for ref in refs[:k]:
            w, mag = ref.step(w, mag, rows)
        w = w + refs[k].delta(rows)[0]
        total += np.sum(w * w, axis=0)
    return np.sqrt(total)


def expected_rows(
    t: OutTensor, rows: np.ndarray, files: Files, ws: Workspace
) -> tuple[np.ndarray, np.ndarray]:
    """float64 values (and term magnitudes) the rows should hold, from base rows and adapter factors."""
    start = RowSource(files, t.source)
    steps = t.steps
    for i, s in enumerate(t.steps):
        if s.kind == "replace":
            assert s.tensor is not None
            start, steps = RowSource(files, s.tensor), t.steps[i + 1 :]
    w = read_rows64(start, rows, ws)
    mag = np.abs(w)
    refs: list[Reference] = []
    kinds: list[str] = []
    for s in steps:
        assert s.lora is not None
        refs.append(Reference(s.lora))
        kinds.append(s.kind)
    for k, (kind, ref) in enumerate(zip(kinds, refs, strict=True)):
        if kind == "bias":
            w, mag = ref.step_bias(w, mag, rows)
            continue
        if ref.mag_vec is not None and not ref.rowwise:
            lora_refs = [r for r, kd in zip(refs[:k], kinds[:k], strict=True) if kd == "lora"]
            ref.col_norm = column_norms(start, [*lora_refs, ref], len(lora_refs), ws)
        w, mag = ref.step(w, mag, rows)
    return w, mag


def compare(t: OutTensor, written: TensorRecord, files: Files, ws: Workspace) -> tuple[float, int]:
    """Largest error / tolerance over the sampled rows of one changed tensor, and the rows checked."""
    out_src = RowSource(files, written)
    rows = sample_rows(t.name, out_src.rows)
    got = read_rows64(out_src, rows, ws)
    want, mag = expected_rows(t, rows, files, ws)
    rounded = dtypes.round_trip(want, t.dtype)
    tol = lora_math.ulp(rounded, t.dtype) + FP32_SLACK * 2.0**-24 * mag
    finite = np.isfinite(rounded)
    if not np.array_equal(np.isfinite(got), finite):
        raise MergeError(f"check failed: {t.name} holds NaN/Inf where the recomputation does not.")
    ratio = np.abs(got[finite] - rounded[finite]) / tol[finite] if finite.any() else np.zeros(1)
    worst = float(ratio.max()) if ratio.size else 0.0
    if worst > 1.0:
        i = int(np.argmax(ratio))
        raise MergeError(
            f"check failed: {t.name} differs from its float64 recomputation by {worst:.1f}x the tolerance "
            f"(element {i} of rows {rows.tolist()}); this is a vlmtune bug or a disk error: nothing was written."
        )
    return worst, len(rows)


def same_bytes(a: TensorRecord, b: TensorRecord, files: Files) -> bool:
    """Whether two tensors of one size agree on three byte windows (start, middle, end)."""
    n = a.nbytes
    for start in {0, max(0, n // 2 - BYTE_WINDOW // 2), max(0, n - BYTE_WINDOW)}:
        size = min(BYTE_WINDOW, n - start)
        if size <= 0:
            continue
        x, y = np.empty(size, np.uint8), np.empty(size, np.uint8)
        for rec, buf in ((a, x), (b, y)):
            rec.as_bytes().read_into(buf, (start, start + size), files.fd(rec.file))
        if not np.array_equal(x, y):
            return False
    return True


def check_written(plan: Plan, folder: Path) -> dict[str, Any]:
    """Raise MergeError unless the folder holds exactly the planned tensors with the planned values."""
    written = checkpoint.tensor_index(folder)
    expected = [t.name for t in plan.tensors]
    if list(written) != expected:
        missing = sorted(set(expected) - set(written))
        extra = sorted(set(written) - set(expected))
        raise MergeError(
            f"check failed: the written folder's tensors differ from the plan (missing {missing[:5]}, "
            f"unexpected {extra[:5]}, or out of order)."
        )
    files, ws = Files(), Workspace()
    worst, rows_checked, changed = 0.0, 0, 0
    try:
        for t in plan.tensors:
            w = written[t.name]
            if w.dtype != t.dtype or w.shape != t.shape:
                raise MergeError(
                    f"check failed: {t.name} is {w.dtype} {w.shape}, planned {t.dtype} {t.shape}."
                )
            if t.is_copy:
                if not same_bytes(t.source, w, files):
                    raise MergeError(f"check failed: {t.name} is not a byte copy of the base tensor.")
                continue
            if math.prod(t.shape) == 0:
                continue
            ratio, n = compare(t, w, files, ws)
            worst, rows_checked, changed = max(worst, ratio), rows_checked + n, changed + 1
    finally:
        files.close()
    return {
        "passed": True,
        "tensors": len(plan.tensors),
        "changed_tensors_checked": changed,
        "rows_checked": rows_checked,
        "max_error_over_tolerance": round(worst, 4),
    }
