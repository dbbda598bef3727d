"""`vlmtune ui`: a local web dashboard over run dirs and adapter dirs (files are the truth), with side-by-side
answers from the engine and verified merges as background jobs. `create_app(UiSettings(...), engine)` for
embedding and tests; `run_ui(settings)` is what the command runs."""

from __future__ import annotations

from .app import UiSettings, create_app, run_ui

__all__ = ["UiSettings", "create_app", "run_ui"]
