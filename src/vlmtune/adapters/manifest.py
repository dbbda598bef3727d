"""`vlmtune.json`, both schemas: the manifest beside every adapter (`Manifest`, format
`vlmtune-adapter/1`) and the one in every merged folder (`MergedManifest`, format `vlmtune-merged/1`).

The adapter manifest records what a PEFT folder cannot: which base the adapter was made for (path or id
plus a fingerprint), the architecture, library versions, the key layout of the adapter tensors, the
resolved targets and the fully trained modules. Readers treat a missing manifest as "foreign adapter" and
work from `adapter_config.json` alone. The merged manifest records what went into a merged model and how
it was checked. Both are read through `io.read_json`, so a damaged file is a one-line error naming it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from ..io import DamagedFileError, read_json

MANIFEST = "vlmtune.json"
FORMAT = "vlmtune-adapter/1"
MERGED_FORMAT = "vlmtune-merged/1"
# Adapter tensors are stored under transformers >= 4.52 runtime module paths (`model.language_model...`).
RUNTIME_LAYOUT = "runtime"
FIX = "restore it from the original folder, or delete it to treat the folder as a foreign one"


def library_versions() -> dict[str, str]:
    out = {}
    for name in ("vlmtune", "transformers", "peft", "torch", "safetensors"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[name] = metadata.version(name)
    return out


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def build(cls: type, data: Any, path: Path, where: str = "") -> Any:
    """`cls(**data)` for a manifest dataclass, or a one-line `DamagedFileError` naming the file and field."""
    label = f"{where}: " if where else ""
    if not isinstance(data, dict):
        raise DamagedFileError(f"{path}: {label}expected an object, found a {type(data).__name__}; {FIX}.")
    names = {f.name for f in dataclasses.fields(cls)}
    required = [
        f.name
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    missing = [n for n in required if n not in data]
    unknown = sorted(set(data) - names)
    if missing or unknown:
        what = f"missing {missing}" if missing else f"unknown fields {unknown}"
        raise DamagedFileError(f"{path}: {label}{what}; {FIX}.")
    return cls(**data)


@dataclass
class BaseInfo:
    name_or_path: str
    fingerprint: str
    architecture: str
    model_type: str
    family: str


@dataclass
class Manifest:
    """The adapter manifest (`vlmtune-adapter/1`)."""

    base: BaseInfo
    key_layout: str = RUNTIME_LAYOUT
    # The resolved LoRA target modules (runtime names) and the regex they came from.
    target_regex: str = ""
    target_modules: list[str] = field(default_factory=list)
    # Modules trained in full and stored as PEFT `modules_to_save` (runtime names).
    full_modules: list[str] = field(default_factory=list)
    # Bare parameters trained in full (runtime names; no module PEFT could wrap, e.g. LLaVA-NeXT's
    # `model.image_newline`), stored under PEFT's key `base_model.model.<name>`.
    full_parameters: list[str] = field(default_factory=list)
    # LoRA module count per role (vision/projector/language/...).
    targets_by_role: dict[str, int] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=library_versions)
    format: str = FORMAT
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=False) + "\n"

    def write(self, folder: str | Path) -> Path:
        path = Path(folder) / MANIFEST
        path.write_text(self.to_json())
        return path

    @classmethod
    def from_dict(cls, data: dict[str, Any], path: Path = Path(MANIFEST)) -> Manifest:
        """Fields this version does not know are kept in `extra` (a newer vlmtune may add some)."""
        data = dict(data)
        if data.get("format", FORMAT) != FORMAT:
            raise DamagedFileError(
                f"{path} is a {data.get('format')!r} manifest, not an adapter's ({FORMAT}); "
                "pass an adapter folder."
            )
        base = build(BaseInfo, data.pop("base", None), path, "base")
        known = {f for f in cls.__dataclass_fields__ if f != "base"}
        extra = {k: data.pop(k) for k in list(data) if k not in known}
        manifest = build(cls, {"base": base, **data}, path)
        manifest.extra.update(extra)
        return manifest


@dataclass(kw_only=True)
class MergedBase:
    name_or_path: str
    fingerprint: str
    architecture: str
    model_type: str | None
    family: str
    key_layout: str


@dataclass(kw_only=True)
class MergedAdapter:
    """One adapter that went into a merge, with the sha256 of its tensor files."""

    path: str
    format: str
    key_layouts: list[str]
    sha256: str
    made_for: str | None
    lora_modules: int
    full_tensors: int
    use_dora: bool
    use_rslora: bool


@dataclass(kw_only=True)
class MergedManifest:
    """The merged folder's manifest (`vlmtune-merged/1`): what went in, how, and how it was checked."""

    format: str = MERGED_FORMAT
    created: str = field(default_factory=now)
    base: MergedBase
    adapters: list[MergedAdapter]
    adapter_order: str = "each adapter merged into the result of the ones before it"
    dtype: str  # the torch name of --dtype, or 'auto'
    tensor_dtypes: list[str]
    untied_lm_head: bool
    tensors: dict[str, int]
    shards: list[str]
    max_shard_size: int
    files: dict[str, str]
    check: dict[str, Any]
    verification: dict[str, Any] = field(default_factory=lambda: {"run": False})
    warnings: list[str] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=library_versions)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def write(self, folder: str | Path) -> Path:
        path = Path(folder) / MANIFEST
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def from_dict(cls, data: dict[str, Any], path: Path = Path(MANIFEST)) -> MergedManifest:
        data = dict(data)
        if data.get("format") != MERGED_FORMAT:
            raise DamagedFileError(f"{path} is a {data.get('format')!r} manifest, not a merged folder's.")
        data["base"] = build(MergedBase, data.get("base"), path, "base")
        adapters = data.get("adapters")
        if not isinstance(adapters, list):
            raise DamagedFileError(f"{path}: adapters must be a list; {FIX}.")
        data["adapters"] = [build(MergedAdapter, a, path, f"adapters[{i}]") for i, a in enumerate(adapters)]
        return build(cls, data, path)


def made_for(adapter_config: Mapping[str, Any], manifest: Manifest | None) -> str | None:
    """The base an adapter says it was made for: its manifest's, else PEFT's `base_model_name_or_path`."""
    if manifest is not None:
        return manifest.base.name_or_path
    return adapter_config.get("base_model_name_or_path")


def read_manifest(folder: str | Path) -> Manifest | None:
    """The manifest of an adapter folder, or None when the folder was not written by vlmtune."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    return Manifest.from_dict(read_json(path, fix=FIX), path)


def read_merged_manifest(folder: str | Path) -> MergedManifest | None:
    """The manifest of a merged model folder, or None when it has none."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    return MergedManifest.from_dict(read_json(path, fix=FIX), path)
