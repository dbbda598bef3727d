"""Reading model folders without loading a model: config, weight files, the tensor index, fingerprint.

Nothing here imports torch or transformers, so `inspect` and the merge stay light.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path
from typing import Any

from .errors import VlmtuneError
from .io import DamagedFileError, TensorRecord, check_loader_files, read_file, read_header, read_json

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
BIN_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json")

# Config fields that change with the writer, not with the model.
VOLATILE_CONFIG_KEYS = ("transformers_version", "_name_or_path", "dtype", "torch_dtype", "architectures")


class CheckpointError(VlmtuneError, ValueError):
    """A model folder lacks something a loader needs (a damaged file is an `io.DamagedFileError`)."""


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
    """A model folder's config.json, after checking that every loader config beside it parses (so a
    damaged processor or tokenizer config stops a verb here, not in a loader's traceback)."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{folder} has no config.json; is it a model folder?")
    config = read_json(path, fix="restore the model's config.json (download or copy the folder again)")
    check_loader_files(folder)
    return config


def weight_files(folder: str | Path) -> list[Path]:
    """The safetensors files of a model folder, in index order; a clear error for pickled-only folders."""
    folder = Path(folder)
    index = folder / SAFETENSORS_INDEX
    if index.is_file():
        weight_map = read_json(index, fix="restore the index (download or copy the folder again)").get(
            "weight_map"
        )
        if not isinstance(weight_map, dict) or not all(
            isinstance(v, str) and v == Path(v).name and v not in ("", ".", "..") for v in weight_map.values()
        ):
            raise DamagedFileError(
                f"{index}: weight_map must map tensor names to shard file names in the same folder; "
                "restore the index (download or copy the folder again)."
            )
        files = [folder / n for n in dict.fromkeys(weight_map.values())]
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


def tensor_index(folder: str | Path) -> dict[str, TensorRecord]:
    """Every tensor of a model folder by on-disk name, in file order then offset order; every header is
    validated (`io.safetensors`), so a damaged shard fails here, before anything is loaded or written."""
    out: dict[str, TensorRecord] = {}
    for file in weight_files(folder):
        for name, record in read_file(file).items():
            if name in out:
                raise CheckpointError(f"{name} appears in both {out[name].file.name} and {file.name}.")
            out[name] = record
    return out


def check_weights(folder: str | Path) -> None:
    """Validate every safetensors header of a folder before a loader (transformers) reads it, so a damaged
    shard or index is one line naming it; a folder without safetensors is left to the loader."""
    with contextlib.suppress(CheckpointError):
        tensor_index(folder)


def fingerprint(folder: str | Path) -> str:
    """A cheap identity of a base model: its config (minus writer noise), every tensor's name/dtype/shape,
    and samples of the weight bytes, so two random inits of one architecture differ. Reads < 1 MB."""
    folder = Path(folder)
    h = hashlib.sha256()
    config = {k: v for k, v in read_config(folder).items() if k not in VOLATILE_CONFIG_KEYS}
    h.update(json.dumps(config, sort_keys=True).encode())
    by_file: dict[Path, list[TensorRecord]] = {}
    for record in tensor_index(folder).values():
        by_file.setdefault(record.file, []).append(record)
    for file in weight_files(folder):
        records = sorted(by_file.get(file, []), key=lambda r: r.name)
        h.update(json.dumps({r.name: [r.dtype, list(r.shape)] for r in records}).encode())
        _, data_start = read_header(file)
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
