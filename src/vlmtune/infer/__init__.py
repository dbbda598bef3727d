"""Un-merged inference: one base, many LoRA adapters, switched per request (`vlmtune predict`, `chat`)."""

from __future__ import annotations

from .engine import Engine, InferenceError, load
from .types import BASE, AdapterInfo, Generation, GenerationSettings, Request

__all__ = [
    "BASE",
    "AdapterInfo",
    "Engine",
    "Generation",
    "GenerationSettings",
    "InferenceError",
    "Request",
    "load",
]
