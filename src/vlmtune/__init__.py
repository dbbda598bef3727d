"""vlmtune: train, run un-merged, merge and inspect LoRA adapters of vision-language models.

The Python API mirrors the verbs as plain functions: `vlmtune.train(config)`, `vlmtune.merge(base,
adapters, out)`, `vlmtune.load(base, adapters=...)`. Each imports its implementation (`vlmtune.training`,
`vlmtune.merging`, `vlmtune.infer`) on first call, so `import vlmtune` does not import torch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .config import TrainConfig
    from .infer import Engine
    from .merging import MergeResult

__version__ = "0.1.0"
__all__ = ["load", "merge", "train"]


def train(
    config: TrainConfig | str | Path | dict[str, Any],
    overrides: Sequence[str] = (),
    callbacks: Sequence[Any] = (),
) -> Path:
    """Train a LoRA adapter from a config (TrainConfig, YAML path or dict) plus `key=value` overrides;
    returns the run dir, whose `adapter/` is the result. See `vlmtune.training.run`."""
    from .training import run

    return run(config, overrides, callbacks)


def merge(
    base: str | Path, adapters: str | Path | Sequence[str | Path], out: str | Path, **options: Any
) -> MergeResult:
    """Merge adapter(s) into `base`, streaming, into the standalone folder `out`; options (dtype,
    max_shard_size, verify, overwrite, progress) as `vlmtune.merging.merge`."""
    from .merging import merge as run_merge

    return run_merge(base, adapters, out, **options)


def load(
    base: str | Path,
    adapters: Mapping[str, str | Path] | Sequence[str | Path] | None = None,
    *,
    dtype: str | Any = "auto",
    device: str | None = None,
    quantization: str | None = None,
    mixed_batches: bool = True,
    default_adapter: str | None = None,
) -> Engine:
    """Load a base model once with adapters attached un-merged: `vlmtune.load(base, adapters={"a": dir})`.
    Returns the `vlmtune.infer.Engine`; the arguments are those of `vlmtune.infer.load`."""
    from .infer import load as load_engine

    return load_engine(
        base,
        adapters,
        dtype=dtype,
        device=device,
        quantization=quantization,
        mixed_batches=mixed_batches,
        default_adapter=default_adapter,
    )
