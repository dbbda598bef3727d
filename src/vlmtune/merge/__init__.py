"""The streaming merge: LoRA adapters into a standalone model folder, tensor by tensor, with numpy only.

`vlmtune.merge` is this package and is also callable, so both spellings work whatever was imported
first: `vlmtune.merge(base, adapters, out)` and `from vlmtune.merge import merge`. (A plain function of
the same name in `vlmtune/__init__.py` would be replaced by the package object as soon as anything
imports `vlmtune.merge.*`; a callable module cannot be shadowed that way. `vlmtune.train` does the same.)

Importing this package imports numpy and vlmtune's header readers only; torch, transformers and PEFT are
imported by `--verify` alone.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .core import MergeResult, merge
from .plan import MergeError

__all__ = ["MergeError", "MergeResult", "merge"]


class _CallableModule(types.ModuleType):
    def __call__(
        self,
        base: str | Path,
        adapters: str | Path | Sequence[str | Path],
        out: str | Path,
        **kwargs: Any,
    ) -> MergeResult:
        return merge(base, adapters, out, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
