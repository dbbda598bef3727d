"""Training: `run(config) -> run dir` (the verb `vlmtune.train`), `dry_run(config) -> TargetPlan`.

Importing this package stays light; torch loads when a run starts.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..adapters.targets import TargetPlan
    from ..config import TrainConfig

__all__ = ["dry_run", "run"]


def run(
    config: TrainConfig | str | Path | dict[str, Any],
    overrides: Sequence[str] = (),
    callbacks: Sequence[Any] = (),
) -> Path:
    """Train from a TrainConfig, a YAML path or a dict (+ `key=value` overrides); returns the run dir.
    `callbacks` are extra `transformers.TrainerCallback`s, called after vlmtune's own."""
    from .recipe import run as _run

    return _run(config, overrides, callbacks)


def dry_run(config: TrainConfig | str | Path | dict[str, Any], overrides: Sequence[str] = ()) -> TargetPlan:
    """The resolved trainable set (`TargetPlan`: LoRA and fully trained modules by role, with parameter
    counts) without loading weights; raises for settings that would do nothing."""
    from .recipe import dry_run as _dry_run

    return _dry_run(config, overrides)
