"""Reading model folders without loading a model: config, weight files, safetensors headers, fingerprint.

Nothing here imports torch or transformers, so `inspect` and the merge stay light.
"""

from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import VlmtuneError

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
BIN_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json")

# Config fields that change with the writer, not with the model.
VOLATILE_CONFIG_KEYS = ("transformers_version", "_name_or_path", "dtype", "torch_dtype", "architectures")


class CheckpointError(VlmtuneError, ValueError):
    """A model folder is missing something a loader needs, or holds something we cannot read."""


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: file, dtype string (safetensors spelling), shape, byte range in the file."""

    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset in `file`
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def resolve(model: str | Path, allow_patterns: list[str] | None = None) -> Path:
    """A local folder for `model`: the folder itself, or a hub snapshot (downloaded on first use)."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path} is a file; pass the model's folder.")
    looks_like_hub_id = str(model).count("/") == 1 and not str(model).startswith((".", "/", "~"))
    if not looks_like_hub_id:
        raise CheckpointError(f"{model} is neither a local folder nor a hub id (owner/name).")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(model), allow_patterns=allow_patterns))
    except Exception as exc:  # network, auth, missing repo: all end the same way for the user
        raise CheckpointError(
            f"could not fetch {model} from the Hugging Face hub ({type(exc).__name__}: {exc}); "
            "check the id and your connection, or pass a local folder."
        ) from exc


def read_config(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{folder} has no config.json; is it a model folder?")
    return json.loads(path.read_text())


def read_header(file: str | Path) -> tuple[dict[str, Any], int]:
    """The JSON header of a safetensors file and the offset where its data starts."""
    with open(file, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise CheckpointError(f"{file} is not a safetensors file (too short).")
        (size,) = struct.unpack("<Q", raw)
        if size > 100 * 1024 * 1024:
            raise CheckpointError(f"{file} is not a safetensors file (header of {size} bytes).")
        header = json.loads(f.read(size))
    return header, 8 + size


def weight_files(folder: str | Path) -> list[Path]:
    """The safetensors files of a model folder, in index order; a clear error for pickled-only folders."""
    folder = Path(folder)
    index = folder / SAFETENSORS_INDEX
    if index.is_file():
        names = dict.fromkeys(json.loads(index.read_text())["weight_map"].values())
        files = [folder / n for n in names]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{folder}: {SAFETENSORS_INDEX} lists missing shard(s) {missing}.")
        return files
    if (folder / SAFETENSORS_SINGLE).is_file():
        return [folder / SAFETENSORS_SINGLE]
    if any((folder / n).exists() for n in BIN_NAMES):
        raise CheckpointError(
            f"{folder} holds only pickled .bin weights; convert it to safetensors first "
            "(load it with transformers and save_pretrained it)."
        )
    raise CheckpointError(f"{folder} has no model.safetensors or {SAFETENSORS_INDEX}.")


def tensor_index(folder: str | Path) -> dict[str, TensorInfo]:
    """Every tensor of a model folder by on-disk name, in file order then offset order."""
    out: dict[str, TensorInfo] = {}
    for file in weight_files(folder):
        header, data_start = read_header(file)
        entries = [(k, v) for k, v in header.items() if k != "__metadata__"]
        entries.sort(key=lambda kv: kv[1]["data_offsets"][0])
        for name, meta in entries:
            if name in out:
                raise CheckpointError(f"{name} appears in both {out[name].file.name} and {file.name}.")
            begin, end = meta["data_offsets"]
            out[name] = TensorInfo(
                name, file, meta["dtype"], tuple(meta["shape"]), data_start + begin, data_start + end
            )
    return out


def fingerprint(folder: str | Path) -> str:
    """A cheap identity of a base model: its config (minus writer noise), every tensor's name/dtype/shape,
    and samples of the weight bytes, so two random inits of one architecture differ. Reads < 1 MB."""
    folder = Path(folder)
    h = hashlib.sha256()
    config = {k: v for k, v in read_config(folder).items() if k not in VOLATILE_CONFIG_KEYS}
    h.update(json.dumps(config, sort_keys=True).encode())
    for file in weight_files(folder):
        header, data_start = read_header(file)
        header.pop("__metadata__", None)
        h.update(json.dumps({k: [v["dtype"], v["shape"]] for k, v in sorted(header.items())}).encode())
        size = file.stat().st_size
        with open(file, "rb") as f:
            for offset in (
                data_start,
                max(data_start, (data_start + size) // 2),
                max(data_start, size - 65536),
            ):
                f.seek(offset)
                h.update(f.read(65536))
    return "sha256:" + h.hexdigest()[:32]
