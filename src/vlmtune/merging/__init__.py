"""The streaming merge: LoRA adapters into a standalone model folder, tensor by tensor, with numpy only.

`vlmtune.merge(base, adapters, out)` is the verb; this package is its implementation (`core.merge` is the
same function). Importing it imports numpy and vlmtune's header readers only; torch, transformers and
PEFT are imported by `--verify` alone.
"""

from __future__ import annotations

from .core import MergeResult, merge
from .plan import MergeError

__all__ = ["MergeError", "MergeResult", "merge"]
