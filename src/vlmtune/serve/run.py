"""`vlmtune serve`: load the engine, check the bind rule, run uvicorn (or print the vLLM hand-off)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .settings import ServeSettings


def serve(
    model: str,
    adapters: Mapping[str, Path],
    settings: ServeSettings,
    *,
    dtype: str = "auto",
    device: str | None = None,
    quantization: str | None = None,
    log_level: str = "info",
) -> None:
    """Check the bind rule first (before loading anything), then load and serve until interrupted."""
    import uvicorn

    from ..infer import load
    from .app import create_app

    settings.check_bind()
    engine = load(model, dict(adapters), dtype=dtype, device=device, quantization=quantization)
    app = create_app(engine, settings)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=log_level, access_log=False)


def print_vllm(model: str, adapters: Mapping[str, Path]) -> str:
    """The equivalent `vllm serve` line for the adapters vLLM can serve as they are; why not for the rest."""
    from .registry import vllm_command

    return vllm_command(model, dict(adapters))


def describe(settings: ServeSettings) -> dict[str, Any]:
    return {"host": settings.host, "port": settings.port, "auth": bool(settings.api_key)}
