"""What the scheduler needs from the engine, in one place so the seam is visible: its lock, encoding,
per-row routing (kept open across the decode steps of an unchanged batch by `Router`), and which
adapters' rows may share a decode forward."""

from __future__ import annotations

import contextlib
from collections.abc import Hashable
from typing import Any

import torch

from ..infer.types import BASE


def engine_lock(engine: Any) -> Any:
    return engine.lock


def engine_encode(engine: Any, prepared: Any) -> Any:
    """Model inputs of one prepared request, on the model's device."""
    return engine.encode([prepared])


def route(engine: Any, adapters: list[str]) -> Any:
    """The engine's per-row adapter routing for one forward."""
    return engine.route(adapters)


def row_mismatch(engine: Any) -> type[BaseException]:
    from ..infer.routing import RowMismatch

    return RowMismatch


def model_device(engine: Any) -> Any:
    return engine.base_model.device


def decode_class(engine: Any, adapter: str) -> Hashable:
    """Which adapters' rows may share a decode forward. Decode steps run the language model only, so
    adapters that change the vision tower or projector mix there; DoRA rows cannot (PEFT's per-row path
    ignores DoRA's magnitude), nor can anything when the engine was loaded with mixed batches off."""
    if adapter == BASE:
        return "mix" if engine.mixed_batches else ("solo", BASE)
    info = engine.adapters[adapter]
    if info.use_dora or not engine.mixed_batches:
        return ("solo", adapter)
    return "mix"


class Router:
    """Keeps one routing block of the engine open across the decode steps of an unchanged batch, so the
    per-row LoRA stacks are built once per batch composition rather than once per step; it holds the
    engine's lock while open and lets go at least every `max_steps` steps (other callers get a turn)."""

    def __init__(self, engine: Any, max_steps: int = 32) -> None:
        self.engine = engine
        self.max_steps = max_steps
        self.key: tuple[str, ...] | None = None
        self.stack: contextlib.ExitStack | None = None
        self.steps = 0

    def enter(self, adapters: list[str]) -> None:
        key = tuple(adapters)
        if self.stack is not None and self.key == key and self.steps < self.max_steps:
            self.steps += 1
            return
        self.close()
        stack = contextlib.ExitStack()
        stack.enter_context(engine_lock(self.engine))
        stack.enter_context(torch.inference_mode())
        stack.enter_context(route(self.engine, adapters))
        self.stack, self.key, self.steps = stack, key, 1

    def close(self, exc: BaseException | None = None) -> None:
        """Leave the block (passing `exc` into it, so the routing sees a failed forward as one)."""
        stack, self.stack, self.key = self.stack, None, None
        if stack is not None:
            if exc is None:
                stack.close()
            else:
                stack.__exit__(type(exc), exc, exc.__traceback__)
