"""Helpers for the dashboard tests: a real uvicorn server on a free loopback port, an HTTP client that
does what the page does (CSRF header from the cookie), and tiny training runs."""

from __future__ import annotations

import contextlib
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from vlmtune import families
from vlmtune import train as train_run
from vlmtune.demo import write_split
from vlmtune.ui import UiSettings, create_app

FAMILY = "qwen2_vl"


@contextlib.contextmanager
def serve(settings: UiSettings, engine: Any = None) -> Iterator[str]:
    """Run the dashboard on 127.0.0.1 (port chosen by the OS) in a thread; yields its base URL."""
    import uvicorn

    app = create_app(settings, engine)
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the dashboard did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


class Page:
    """An HTTP client that behaves like the page: keeps cookies and sends the CSRF header on POST."""

    def __init__(self, base: str, token: str | None = None, bearer: bool = False) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token and bearer else {}
        self.http = httpx.Client(base_url=base, headers=headers, timeout=120)
        self.http.get("/")  # sets the CSRF cookie, as loading the page does

    def get(self, path: str, **kwargs: Any) -> httpx.Response:
        return self.http.get(path, **kwargs)

    def post(self, path: str, json: Any = None, csrf: bool = True, **kwargs: Any) -> httpx.Response:
        headers = dict(kwargs.pop("headers", {}))
        if csrf:
            headers["X-CSRF-Token"] = self.http.cookies.get("vlmtune_csrf", "")
        return self.http.post(path, json=json, headers=headers, **kwargs)

    def login(self, token: str) -> httpx.Response:
        return self.post("/api/login", {"token": token})


def train_config(base: Path, data: Path, out: Path, steps: int = 6, **extra: Any) -> dict[str, Any]:
    limits = bool(families.get(FAMILY).image_limit_keys)
    return {
        "model": str(base),
        "output_dir": str(out),
        "data": {"train": str(data)},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "projector": "full",
        "lr": 1e-2,
        "max_steps": steps,
        "batch_size": 4,
        "save_steps": 3,
        "logging_steps": 1,
        "precision": "fp32",
        "image_limits": {"min_pixels": 28 * 28 * 4, "max_pixels": 56 * 56} if limits else {},
        **extra,
    }


def tiny_run(base: Path, root: Path, name: str = "shapes", steps: int = 6, callbacks: Any = ()) -> Path:
    """A finished run dir `root/name` (adapter/, checkpoints step-3 and step-6, metrics.jsonl)."""
    data = write_split(root / "data", "train", 16, seed=0)
    return train_run(train_config(base, data, root / name, steps), callbacks=callbacks)


def copy_run(run_dir: Path, out: Path, keep_adapter: bool = True, keep_checkpoints: bool = True) -> Path:
    shutil.copytree(run_dir, out)
    if not keep_adapter:
        shutil.rmtree(out / "adapter")
    if not keep_checkpoints:
        shutil.rmtree(out / "checkpoints")
    return out
