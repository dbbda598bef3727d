"""Adapter dirs: target selection, reading (ours, PEFT's, other tools'), strict key placement, the rules
table (`RULES`: what each use accepts), the manifest, saving, and inspection. These are the public names;
the submodules hold the details.

Names resolve on first use, so importing one piece (say the numpy-only merge's) does not import the others.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .inspect import inspect_adapter
    from .layout import AdapterError
    from .manifest import BaseInfo, Manifest, MergedManifest, read_manifest
    from .reader import Adapter, read_adapter
    from .rules import RULES, AdapterRefusedError
    from .save import missing_files, save_adapter
    from .targets import TargetPlan, plan_targets

_WHERE = {
    "Adapter": "reader",
    "AdapterError": "layout",
    "read_adapter": "reader",
    "inspect_adapter": "inspect",
    "BaseInfo": "manifest",
    "Manifest": "manifest",
    "MergedManifest": "manifest",
    "read_manifest": "manifest",
    "RULES": "rules",
    "AdapterRefusedError": "rules",
    "save_adapter": "save",
    "missing_files": "save",
    "TargetPlan": "targets",
    "plan_targets": "targets",
}
__all__ = [
    "RULES",
    "Adapter",
    "AdapterError",
    "AdapterRefusedError",
    "BaseInfo",
    "Manifest",
    "MergedManifest",
    "TargetPlan",
    "inspect_adapter",
    "missing_files",
    "plan_targets",
    "read_adapter",
    "read_manifest",
    "save_adapter",
]


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
