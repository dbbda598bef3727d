"""Streaming safetensors output: the header is computed up front, then the data is written tensor by
tensor, block by block, so no shard (or tensor) is ever held in memory.

A safetensors file is `u64 header length | JSON header | data`, and the header holds only names, dtypes,
shapes and byte ranges, all known before any tensor is computed. Untouched tensors are copied with
`os.copy_file_range` (a kernel-side copy: no user-space buffer, reflinked on file systems that can), and
with bounded `readinto` chunks where that call is not available.
"""

from __future__ import annotations

import json
import os
import queue
import struct
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..checkpoint import SAFETENSORS_INDEX, SAFETENSORS_SINGLE
from ..errors import VlmtuneError

COPY_CHUNK = 8 * 1024 * 1024
UNITS = {
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}


def parse_size(size: str | int) -> int:
    """'5GB' -> 5_000_000_000, '200KiB' -> 204800, as transformers' `max_shard_size` reads them."""
    if isinstance(size, int):
        value = size
    else:
        text = str(size).strip().upper().replace(" ", "")
        number = text.rstrip("KMGTIB")
        unit = text[len(number) :] or "B"
        try:
            value = int(float(number) * UNITS[unit])
        except (KeyError, ValueError):
            raise VlmtuneError(
                f"max shard size {size!r} is not a size; write e.g. 5GB, 500MB or 2GiB."
            ) from None
    if value <= 0:
        raise VlmtuneError(f"max shard size {size!r} must be positive.")
    return value


@dataclass(frozen=True)
class Entry:
    """One tensor of an output shard, in data order."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int


def shard_names(count: int) -> list[str]:
    """transformers' naming: one file is model.safetensors, more are model-0000i-of-0000n.safetensors."""
    if count == 1:
        return [SAFETENSORS_SINGLE]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def split_shards(entries: Sequence[Entry], max_bytes: int) -> list[list[Entry]]:
    """Greedy in order, as transformers shards: start a new file when the next tensor would overflow it
    (a tensor larger than the limit gets a file of its own)."""
    shards: list[list[Entry]] = [[]]
    size = 0
    for e in entries:
        if shards[-1] and size + e.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += e.nbytes
    return shards


def build_header(entries: Sequence[Entry], metadata: dict[str, str] | None = None) -> bytes:
    """The length prefix + JSON header, padded with spaces so the data starts 8-byte aligned."""
    header: dict[str, object] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for e in entries:
        header[e.name] = {
            "dtype": e.dtype,
            "shape": list(e.shape),
            "data_offsets": [offset, offset + e.nbytes],
        }
        offset += e.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(len(raw) + 8) % 8)
    return struct.pack("<Q", len(raw)) + raw


class ShardWriter:
    """Writes one safetensors file front to back; refuses to close unless every byte was written."""

    def __init__(self, path: Path, entries: Sequence[Entry]) -> None:
        self.path = path
        self.entries = list(entries)
        self.expected = sum(e.nbytes for e in self.entries)
        self.written = 0
        self._file = open(path, "wb", buffering=0)  # noqa: SIM115 - closed in close()/abort()
        self._fd = self._file.fileno()
        self._write_all(build_header(self.entries))
        self._data_start = os.lseek(self._fd, 0, os.SEEK_CUR)

    def _write_all(self, data: memoryview | bytes) -> None:
        view = memoryview(data).cast("B")
        while view:
            n = os.write(self._fd, view)
            view = view[n:]

    def write(self, data: memoryview | bytes) -> None:
        n = memoryview(data).nbytes
        if self.written + n > self.expected:
            raise RuntimeError(f"{self.path.name}: more data than the header announced")
        self._write_all(data)
        self.written += n

    def copy_from(self, src_fd: int, offset: int, length: int) -> None:
        """Append `length` bytes of another file, from `offset`, without holding them in memory."""
        if self.written + length > self.expected:
            raise RuntimeError(f"{self.path.name}: more data than the header announced")
        done = 0
        if hasattr(os, "copy_file_range"):
            try:
                while done < length:
                    n = os.copy_file_range(src_fd, self._fd, length - done, offset + done)
                    if n == 0:
                        break
                    done += n
            except OSError:
                # not supported here (old kernel, cross-device on some systems): fall back to plain reads;
                # the output position moved by what was copied so far.
                os.lseek(self._fd, self._data_start + self.written + done, os.SEEK_SET)
        if done < length:
            buf = bytearray(min(COPY_CHUNK, length - done))
            view = memoryview(buf)
            while done < length:
                want = min(len(buf), length - done)
                got = os.preadv(src_fd, [view[:want]], offset + done)
                if got <= 0:
                    raise VlmtuneError(f"source file ended early while copying into {self.path.name}")
                self._write_all(view[:got])
                done += got
        self.written += length

    def abort(self) -> None:
        """Close without checks (the caller is failing and the temp folder goes away)."""
        if not self._file.closed:
            self._file.close()

    def close(self) -> None:
        """Check the byte count, then fsync, so a renamed output folder never holds half a file."""
        try:
            if self.written != self.expected:
                raise RuntimeError(
                    f"{self.path.name}: wrote {self.written} bytes of tensor data, header says {self.expected}"
                )
            os.fsync(self._fd)
        finally:
            if not self._file.closed:
                self._file.close()


def write_index(folder: Path, shards: Sequence[Sequence[Entry]], names: Sequence[str]) -> None:
    weight_map = {e.name: name for shard, name in zip(shards, names, strict=True) for e in shard}
    total_size = sum(e.nbytes for shard in shards for e in shard)
    total_params = 0
    for shard in shards:
        for e in shard:
            n = 1
            for d in e.shape:
                n *= d
            total_params += n
    index = {
        "metadata": {"total_size": total_size, "total_parameters": total_params},
        "weight_map": weight_map,
    }
    (folder / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")


class Sink:
    """A background thread that does the writing (copies, block writes, fsync) while the blocks after
    are computed: `os.write`, `copy_file_range` and `fsync` release the GIL, so I/O and numpy overlap.
    Encoded blocks live in a pool of reusable buffers; the queue holds at most `depth` jobs, so memory is
    bounded by a few blocks."""

    def __init__(self, depth: int = 4) -> None:
        self._jobs: queue.Queue = queue.Queue(maxsize=depth)
        self._free: queue.Queue = queue.Queue()
        self._error: BaseException | None = None
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="vlmtune-merge-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            if self._error is not None or self._stop:
                if job[0] == "write":
                    self._free.put(job[2])
                continue
            try:
                kind, writer, *args = job
                if kind == "write":
                    buf, n = args
                    writer.write(memoryview(buf)[:n])
                    self._free.put(buf)
                elif kind == "copy":
                    writer.copy_from(*args)
                elif kind == "close":
                    writer.close()
            except BaseException as exc:
                self._error = exc

    def _put(self, job: tuple) -> None:
        if self._error is not None:
            raise self._error
        self._jobs.put(job)

    def acquire(self, n: int) -> bytearray:
        """A buffer of at least n bytes from the pool (a new one when all are in flight)."""
        try:
            buf = self._free.get_nowait()
        except queue.Empty:
            buf = bytearray(n)
        if len(buf) < n:
            buf = bytearray(n)
        return buf

    def write_owned(self, writer: ShardWriter, buf: bytearray, n: int) -> None:
        """Queue the first n bytes of a buffer from `acquire` (returned to the pool once written)."""
        self._put(("write", writer, buf, n))

    def copy(self, writer: ShardWriter, src_fd: int, offset: int, length: int) -> None:
        self._put(("copy", writer, src_fd, offset, length))

    def close(self, writer: ShardWriter) -> None:
        self._put(("close", writer))

    def finish(self) -> None:
        """Wait for every queued job; re-raise the first I/O error."""
        self._jobs.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error

    def abort(self) -> None:
        """Drop what is queued and stop (the caller is failing; the temp folder goes away)."""
        self._stop = True
        self._jobs.put(None)
        self._thread.join()
