"""`vlmtune.json`: the manifest written beside every adapter (and into every merged folder).

It records what a PEFT folder cannot: which base the adapter was made for (path or id plus a
fingerprint), the architecture, library versions, the key layout of the adapter tensors, the resolved
targets and the fully trained modules. Readers treat a missing manifest as "foreign adapter" and work
from `adapter_config.json` alone.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

MANIFEST = "vlmtune.json"
FORMAT = "vlmtune-adapter/1"
# Adapter tensors are stored under transformers >= 4.52 runtime module paths (`model.language_model...`).
RUNTIME_LAYOUT = "runtime"


def library_versions() -> dict[str, str]:
    out = {}
    for name in ("vlmtune", "transformers", "peft", "torch", "safetensors"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[name] = metadata.version(name)
    return out


@dataclass
class BaseInfo:
    name_or_path: str
    fingerprint: str
    architecture: str
    model_type: str
    family: str


@dataclass
class Manifest:
    base: BaseInfo
    key_layout: str = RUNTIME_LAYOUT
    # The resolved LoRA target modules (runtime names) and the regex they came from.
    target_regex: str = ""
    target_modules: list[str] = field(default_factory=list)
    # Modules trained in full and stored as PEFT `modules_to_save` (runtime names).
    full_modules: list[str] = field(default_factory=list)
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
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        data = dict(data)
        base = BaseInfo(**data.pop("base"))
        known = {f for f in cls.__dataclass_fields__ if f != "base"}
        extra = {k: data.pop(k) for k in list(data) if k not in known}
        manifest = cls(base=base, **data)
        manifest.extra.update(extra)
        return manifest


def read_manifest(folder: str | Path) -> Manifest | None:
    """The manifest of an adapter folder, or None when the folder was not written by vlmtune."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    return Manifest.from_dict(json.loads(path.read_text()))
