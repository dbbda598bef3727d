"""Adapters as the dashboard shows them: the engine's (from `--adapter`) and each run's final adapter, what
`vlmtune inspect` says about them, and side-by-side answers from one engine call."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import VlmtuneError
from ..training import rundir
from .runs import Run, read_config

DATA_URL_PREFIXES = ("data:image/png;base64,", "data:image/jpeg;base64,", "data:image/webp;base64,")


@dataclass(frozen=True)
class AdapterEntry:
    id: str  # 'engine/NAME' or 'run/RUN_ID'
    name: str
    path: Path
    base: str | None  # what it is inspected against and merged into
    source: str  # 'engine' | 'run'


def entries(engine: Any, model: str | None, runs: dict[str, Run]) -> dict[str, AdapterEntry]:
    found: dict[str, AdapterEntry] = {}
    if engine is not None:
        for name, info in engine.adapters.items():
            found[f"engine/{name}"] = AdapterEntry(f"engine/{name}", name, Path(info.path), model, "engine")
    for run in runs.values():
        folder = run.path / rundir.ADAPTER
        if rundir.run_state(run.path) == "finished":
            base = read_config(run).get("model")
            found[f"run/{run.id}"] = AdapterEntry(
                f"run/{run.id}", run.id, folder, str(base) if base else None, "run"
            )
    return found


def inspect(entry: AdapterEntry) -> dict[str, Any]:
    """`vlmtune inspect ADAPTER --base BASE` (the report of `adapters.inspect`, one address for it)."""
    from ..adapters.inspect import inspect_adapter

    report = inspect_adapter(entry.path, base=entry.base)
    return {"id": entry.id, "name": entry.name, "source": entry.source, "base": entry.base, "report": report}


def decode_image(data_url: str, max_bytes: int) -> bytes:
    """Image bytes from a data URL (png/jpeg/webp), checked to decode; never a path."""
    from ..data.images import image_problem

    prefix = next((p for p in DATA_URL_PREFIXES if data_url.startswith(p)), None)
    if prefix is None:
        raise VlmtuneError(
            "image must be a data URL of a PNG, JPEG or WebP image (data:image/png;base64,...)."
        )
    try:
        raw = base64.b64decode(data_url[len(prefix) :], validate=True)
    except (binascii.Error, ValueError):
        raise VlmtuneError("image: the data URL is not valid base64.") from None
    if len(raw) > max_bytes:
        raise VlmtuneError(f"image is {len(raw)} bytes; the limit is {max_bytes}.")
    problem = image_problem(raw)
    if problem is not None:
        raise VlmtuneError(f"image: {problem[1]}")
    return raw


def side_by_side(
    engine: Any,
    prompt: str,
    image: bytes | None,
    adapters: Sequence[str],
    max_new_tokens: int = 64,
) -> list[dict[str, Any]]:
    """The same image + prompt under each adapter (`__base__` for the base), in one `engine.generate` call:
    rows of different adapters share a forward wherever the engine can mix them (what `vlmtune predict`
    does with one data row and several adapters), greedy."""
    from ..infer import GenerationSettings, Request

    if engine is None:
        raise VlmtuneError(
            "no model is loaded: start the dashboard with --model BASE [--adapter NAME=DIR ...]."
        )
    if not adapters:
        raise VlmtuneError("choose at least one adapter (or __base__).")
    if not prompt.strip():
        raise VlmtuneError("the prompt is empty.")
    text = prompt
    if image is not None and "<image>" not in text:
        text = "<image>" + text
    images = [image] if image is not None else []
    requests = [Request(text, list(images), name) for name in adapters]
    results = engine.generate(
        requests, GenerationSettings(max_new_tokens=max_new_tokens), batch_size=len(requests)
    )
    return [
        {
            "adapter": name,
            "text": r.text,
            "prompt_tokens": r.prompt_tokens,
            "generated_tokens": r.generated_tokens,
            "finish_reason": r.finish_reason,
        }
        for name, r in zip(adapters, results, strict=True)
    ]
