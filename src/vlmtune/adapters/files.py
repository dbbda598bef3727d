"""What an adapter folder holds, read but not yet placed on a base: `adapter_config.json`, the manifest, and
the tensor files (the weights, plus a foreign format's extra files), told apart by their names and a
foreign tool's `config.json`, never by the folder name. `reader` places what is read here on a base."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import families
from ..families import Family, ForeignFormat
from ..io import TensorRecord, check_loader_files, read_json, read_tensors
from .layout import AdapterError
from .manifest import Manifest, read_manifest

ADAPTER_CONFIG = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")


def find_weights(folder: Path) -> Path:
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    raise AdapterError(
        f"{folder} has no adapter weights ({' or '.join(WEIGHT_FILES)}); an intermediate checkpoint of some "
        "tools stores them elsewhere: pass the folder that holds adapter_model.*."
    )


def read_config(folder: Path) -> dict[str, Any]:
    path = folder / ADAPTER_CONFIG
    if not path.is_file():
        raise AdapterError(f"{folder} has no {ADAPTER_CONFIG}; is it an adapter folder?")
    return read_json(path, fix="restore the adapter_config.json saved with the weights")


@dataclass
class AdapterFiles:
    """What an adapter folder holds, read but not yet placed on any base."""

    folder: Path
    format: str  # 'peft' or the foreign format's name
    config: dict[str, Any]  # adapter_config.json
    manifest: Manifest | None
    files: list[Path]  # the tensor files read
    tensors: dict[str, TensorRecord]  # every tensor by its key in the files
    foreign_config: dict[str, Any]  # a foreign tool's config.json beside the adapter ({} otherwise)
    # The foreign format the folder is written in and the family that declares it (None: PEFT standard).
    foreign: ForeignFormat | None = None
    foreign_family: Family | None = None


def read_files(path: str | Path) -> AdapterFiles:
    """Read an adapter folder's config, manifest and tensors. A folder in a foreign format a family
    declares (told apart by its extra files or its config.json markers, never by the folder name) has its
    extra tensor files (e.g. LLaVA's `non_lora_trainables.bin`) read beside the LoRA weights."""
    folder = Path(path)
    if not folder.is_dir():
        raise AdapterError(f"adapter folder {folder} does not exist.")
    config = read_config(folder)
    # its processor/tokenizer configs are loaded later by predict and copied by merge: parse them now
    check_loader_files(folder)
    foreign_config, found = _foreign(folder)
    owner, fmt = found if found else (None, None)
    weights, *extras = files = tensor_files(folder, fmt)
    tensors = dict(read_tensors(weights))
    for extra in extras:
        for key, t in read_tensors(extra).items():
            if key in tensors:
                raise AdapterError(f"{folder}: {key} is in both {weights.name} and {extra.name}.")
            tensors[key] = t
    return AdapterFiles(
        folder,
        fmt.format if fmt else "peft",
        config,
        read_manifest(folder),
        files,
        tensors,
        foreign_config if fmt else {},
        fmt,
        owner,
    )


def _foreign(folder: Path) -> tuple[dict[str, Any], tuple[Family, ForeignFormat] | None]:
    foreign_path = folder / "config.json"
    foreign_config = read_json(foreign_path) if foreign_path.is_file() else {}
    return foreign_config, families.foreign_format(folder, foreign_config)


def tensor_files(folder: Path, fmt: ForeignFormat | None) -> list[Path]:
    """The tensor files an adapter folder is read from: its weights, then its foreign format's extra files."""
    extras = [folder / name for name in (fmt.extra_files if fmt else ())]
    return [find_weights(folder), *(f for f in extras if f.is_file())]


def refuse_pickled(folder: str | Path, what: str) -> None:
    """The servers' rule: never unpickle, not even with `weights_only`. `what` names the folder for the
    message (the flag that gave it, or the path relative to --adapter-dir)."""
    _, found = _foreign(Path(folder))
    pickled = [f.name for f in tensor_files(Path(folder), found[1] if found else None) if f.suffix == ".bin"]
    if pickled:
        raise AdapterError(
            f"{what} holds pickled weights ({', '.join(pickled)}), which a server never loads; re-save "
            "them as safetensors (PEFT's save_pretrained writes adapter_model.safetensors) and pass that folder."
        )
