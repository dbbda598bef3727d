"""vlmtune: train, run un-merged, merge and inspect LoRA adapters of vision-language models."""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Verbs of the Python API, imported on first use so `import vlmtune` does not import torch.
# `vlmtune.train` is the training package, and it is callable: `vlmtune.train(config)`; likewise
# `vlmtune.merge(base, adapters, out)` (the merge package, numpy only).
_LAZY = {"train": ".train", "merge": ".merge"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return importlib.import_module(_LAZY[name], __name__)
    raise AttributeError(f"module 'vlmtune' has no attribute {name!r}")


def load(base: Any, adapters: Any = None, **kwargs: Any) -> Any:
    """Load a base model once with adapters attached un-merged: `vlmtune.load(base, adapters={"a": dir})`.

    Returns a `vlmtune.infer.Engine` (`generate`, `chat`, `logits`, `add_adapter`, ...); keyword arguments
    as `vlmtune.infer.load` (dtype, device, quantization, mixed_batches, default_adapter).
    """
    from .infer import load as load_engine

    return load_engine(base, adapters, **kwargs)
