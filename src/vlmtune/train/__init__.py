"""Training: `vlmtune.train.run(config) -> run dir`, `vlmtune.train.dry_run(config) -> TargetPlan`.

`vlmtune.train(config)` also works: this module is callable (the package `vlmtune.train` and the verb
`vlmtune.train(...)` share one name). Importing it stays light; torch loads when a run starts.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["dry_run", "run"]


def run(config: Any, overrides: Sequence[str] = (), callbacks: Sequence[Any] = ()) -> Path:
    """Train from a TrainConfig, a YAML path or a dict (+ `key=value` overrides); returns the run dir."""
    from .recipe import run as _run

    return _run(config, overrides, callbacks)


def dry_run(config: Any, overrides: Sequence[str] = ()) -> Any:
    """The resolved trainable set (`TargetPlan`: LoRA and fully trained modules by role, with parameter
    counts) without loading weights; raises for settings that would do nothing."""
    from .recipe import dry_run as _dry_run

    return _dry_run(config, overrides)


class _CallableModule(types.ModuleType):
    def __call__(self, config: Any, overrides: Sequence[str] = (), callbacks: Sequence[Any] = ()) -> Path:
        return run(config, overrides, callbacks)


sys.modules[__name__].__class__ = _CallableModule
