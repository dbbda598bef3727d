"""`vlmtune serve`: load the engine, check the bind rule, run uvicorn (or print the vLLM hand-off)."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator, Mapping
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

    from ..adapters.files import refuse_pickled
    from ..infer import load
    from .app import create_app

    settings.check_bind()
    for name, path in adapters.items():
        refuse_pickled(path, f"--adapter {name}={path}")
    engine = load(model, dict(adapters), dtype=dtype, device=device, quantization=quantization)
    app = create_app(engine, settings)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=log_level, access_log=False)


def print_vllm(model: str, adapters: Mapping[str, Path]) -> str:
    """The equivalent `vllm serve` line for the adapters vLLM can serve as they are; why not for the rest."""
    from .registry import vllm_command

    return vllm_command(model, dict(adapters))


@contextlib.contextmanager
def background(app: Any, settings: ServeSettings, *, timeout: float = 60) -> Iterator[str]:
    """Run `app` under uvicorn in a thread (tests, benchmarks, notebooks); yields its base URL. Port 0
    picks a free port. The bind rule is checked as for `vlmtune serve`."""
    import socket

    import uvicorn

    settings.check_bind()
    port = settings.port
    if port == 0:
        with socket.socket() as s:
            s.bind((settings.host, 0))
            port = s.getsockname()[1]
    config = uvicorn.Config(app, host=settings.host, port=port, log_level="warning", access_log=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="vlmtune-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError(f"the server on {settings.host}:{port} did not start")
        time.sleep(0.02)
    try:
        yield f"http://{settings.host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=timeout)
