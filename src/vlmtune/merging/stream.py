"""Compute each output tensor block by block and stream it into its shard.

Per tensor: untouched tensors of an unchanged dtype are copied byte for byte (kernel copy); everything
else is read in blocks of rows, widened to float32, run through its steps in adapter order (replace,
LoRA/DoRA, LoRA bias), narrowed to the output dtype and appended to the shard. Memory stays at a few
blocks, except for DoRA on an embedding or `fan_in_fan_out` layer, whose column norms need the whole
tensor (then the bound is that tensor in fp32).

Blocks are independent, so they are computed on a small thread pool (numpy and BLAS release the GIL)
and handed to the writer thread in order; the output is byte-identical whatever the number of threads.
"""

from __future__ import annotations

import math
import os
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ..io import TensorRecord, dtypes
from . import lora_math
from .lora_math import Factors, Workspace
from .plan import MergeError, OutTensor, Plan
from .writer import ShardWriter, Sink, write_index


class Files:
    """Open read-only descriptors of the base and adapter files, one per file for the whole merge."""

    def __init__(self) -> None:
        self._fds: dict[Path, int] = {}
        self._lock = threading.Lock()

    def fd(self, path: Path) -> int:
        with self._lock:
            if path not in self._fds:
                self._fds[path] = os.open(path, os.O_RDONLY)
            return self._fds[path]

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


class RowSource:
    """Rows of a stored tensor (a base or adapter `TensorRecord`) as float32, read by byte range."""

    def __init__(self, files: Files, record: TensorRecord) -> None:
        self.files, self.record, self.dtype = files, record, record.dtype
        self.rows = record.rows
        self.cols = math.prod(record.shape[1:]) if len(record.shape) > 1 else 1

    def read_f32(self, r0: int, r1: int, out: np.ndarray, ws: Workspace) -> None:
        """Rows r0:r1 as float32 into `out` ((r1-r0, cols))."""
        fd = None if self.record.blob is not None else self.files.fd(self.record.file)
        if self.dtype == "F32":  # read straight into the compute buffer
            self.record.read_into(out.reshape(-1), (r0, r1), fd)
            return
        raw = ws.get("raw", (r1 - r0) * self.record.row_bytes, np.uint8)
        self.record.read_into(raw, (r0, r1), fd)
        dtypes.to_float32(raw.view(dtypes.get(self.dtype).storage), self.dtype, out)


def check_finite(t: OutTensor, after: np.ndarray, before: RowSource, r0: int, r1: int, ws: Workspace) -> None:
    """Merged values must be finite wherever the base was (NaN/Inf: a broken adapter or fp16 overflow)."""
    base = np.empty_like(after)
    before.read_f32(r0, r1, base, ws)
    if (np.isfinite(base) & ~np.isfinite(after)).any():
        raise MergeError(
            f"merging into {t.name} gives NaN/Inf values (rows {r0}-{r1}): the adapter holds non-finite or huge "
            f"values, or they overflow {t.dtype}. Nothing was written; try --dtype bf16 or fp32."
        )


class TensorJob:
    """One changed (or cast) output tensor: its starting rows, its steps as float32 factors, its blocks."""

    def __init__(self, t: OutTensor, files: Files) -> None:
        self.t = t
        self.base_rows = RowSource(files, t.source)
        # the chain starts from the last full replacement, if any (it overwrites what came before)
        self.start, steps = self.base_rows, t.steps
        for i, s in enumerate(t.steps):
            if s.kind == "replace":
                assert s.tensor is not None
                self.start, steps = RowSource(files, s.tensor), t.steps[i + 1 :]
        self.factors: list[tuple[str, Factors]] = []
        for s in steps:
            assert s.lora is not None
            self.factors.append((s.kind, Factors.load(s.lora)))
        rows, cols = self.start.rows, self.start.cols
        self.whole = any(f.needs_whole_tensor for kind, f in self.factors if kind == "lora")
        block = rows if self.whole else max(1, min(rows, lora_math.BLOCK_ELEMENTS // max(cols, 1)))
        self.blocks = [(r0, min(rows, r0 + block)) for r0 in range(0, rows, block)]

    def compute(self, r0: int, r1: int, ws: Workspace, sink: Sink) -> tuple[bytearray, int]:
        """Rows r0:r1 of the output tensor, encoded, in a buffer of the sink's pool."""
        t, cols = self.t, self.start.cols
        n = (r1 - r0) * cols
        big = self.whole and n > lora_math.BLOCK_ELEMENTS
        cur = (np.empty(n, np.float32) if big else ws.get("cur", n, np.float32)).reshape(r1 - r0, cols)
        self.start.read_f32(r0, r1, cur, ws)
        for kind, f in self.factors:
            if kind == "bias":
                f.apply_bias(cur, r0, r1)
            else:
                scratch = np.empty(n, np.float32) if big else ws.get("delta", n, np.float32)
                f.apply(cur, r0, r1, scratch.reshape(r1 - r0, cols))
        finite = bool(np.isfinite(cur).all())
        if not finite:
            check_finite(t, cur, self.base_rows, r0, r1, ws)
        data = lora_math.encode(cur, t.dtype, ws, finite=finite)
        if t.dtype == "F16":
            encoded = data.view(np.float16).reshape(cur.shape)
            if not np.isfinite(encoded).all() and (np.isfinite(cur) & ~np.isfinite(encoded)).any():
                raise MergeError(
                    f"{t.name} overflows float16 (values beyond ±65504); nothing was written. "
                    "Use --dtype bf16 or fp32."
                )
        buf = sink.acquire(data.nbytes)
        memoryview(buf)[: data.nbytes] = memoryview(data).cast("B")
        return buf, data.nbytes


def compute_threads() -> int:
    """Threads for block compute: the cores this process may use, at most 4 (I/O bound beyond)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(4, cores))


def write_shards(
    plan: Plan, folder: Path, progress: Callable[[str], None] | None = None, threads: int | None = None
) -> None:
    """Write every shard of the plan into `folder` (and the index when there are several)."""
    threads = threads or compute_threads()
    files = Files()
    sink = Sink(depth=2 * threads + 2)
    local = threading.local()

    def run(job: TensorJob, r0: int, r1: int) -> tuple[bytearray, int]:
        if not hasattr(local, "ws"):
            local.ws = Workspace()
        return job.compute(r0, r1, local.ws, sink)

    pool = ThreadPoolExecutor(threads, thread_name_prefix="vlmtune-merge") if threads > 1 else None
    pending: deque[tuple[ShardWriter, Future]] = deque()
    window = 2 * threads

    def hand_over(limit: int) -> None:
        while len(pending) > limit:
            writer, fut = pending.popleft()
            buf, n = fut.result()
            sink.write_owned(writer, buf, n)

    writers: list[ShardWriter] = []
    try:
        for tensors, name in zip(plan.shards, plan.shard_files, strict=True):
            writer = ShardWriter(folder / name, [t.entry for t in tensors])
            writers.append(writer)
            for t in tensors:
                if t.is_copy:
                    hand_over(0)  # keep the file order: earlier blocks go first
                    sink.copy(writer, files.fd(t.source.file), t.source.start, t.source.nbytes)
                    continue
                job = TensorJob(t, files)
                for r0, r1 in job.blocks:
                    if pool is None:
                        sink.write_owned(writer, *run(job, r0, r1))
                        continue
                    pending.append((writer, pool.submit(run, job, r0, r1)))
                    hand_over(window)
            hand_over(0)
            sink.close(writer)
            if progress:
                progress(name)
        sink.finish()
    except BaseException:
        for _, fut in pending:
            fut.cancel()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        sink.abort()
        for w in writers:
            w.abort()
        raise
    finally:
        if pool is not None:
            pool.shutdown(wait=True)
        files.close()
    if len(plan.shards) > 1:
        write_index(folder, [[t.entry for t in s] for s in plan.shards], plan.shard_files)
