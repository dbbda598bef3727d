"""vlmtune: train, run, merge and serve LoRA adapters of vision-language models."""

from __future__ import annotations

__version__ = "0.1.0"
