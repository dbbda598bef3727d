"""Un-merged inference: one base, many LoRA adapters, switched per request (`vlmtune predict`, `chat`)."""

from __future__ import annotations

from .engine import Engine, load
from .routing import RowMismatch
from .types import BASE, AdapterInfo, Generation, GenerationSettings, InferenceError, Prepared, Request

__all__ = [
    "BASE",
    "AdapterInfo",
    "Engine",
    "Generation",
    "GenerationSettings",
    "InferenceError",
    "Prepared",
    "Request",
    "RowMismatch",
    "load",
]
