"""`vlmtune serve`: an OpenAI-compatible server for one base and many adapters, with continuous batching.

`create_app(engine, settings)` builds the FastAPI app (for embedding and tests); `serve(...)` loads an
engine and runs it under uvicorn. `settings`, `auth` and `errors` hold what every vlmtune server shares
(bind rule, bearer check, body cap, OpenAI error shape); they import no torch.
"""

from __future__ import annotations

from typing import Any

from .settings import ServeSettings

__all__ = ["ServeSettings", "create_app", "serve"]


def create_app(engine: Any, settings: ServeSettings | None = None) -> Any:
    """The FastAPI app serving `engine` (a `vlmtune.infer.Engine`) under `settings`."""
    from .app import create_app as build

    return build(engine, settings or ServeSettings())


def serve(*args: Any, **kwargs: Any) -> None:
    """Load a base with adapters and serve it (what `vlmtune serve` runs); see `vlmtune.serve.run.serve`."""
    from .run import serve as run

    run(*args, **kwargs)
