"""`vlmtune ui`: the dashboard's FastAPI app. Every route reads the files (run dirs, adapter dirs, merged
folders) or calls a verb's Python function (inspect, the engine, merge); the app itself keeps only the
progress of merges still running. Security rules: `vlmtune.ui.security`."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles

from ..adapters.files import refuse_pickled
from ..errors import VlmtuneError
from ..infer.types import BASE
from ..serve.errors import BodyLimit
from . import adapters as adapters_mod
from . import runs as runs_mod
from . import security
from .jobs import JobBusy, MergeJobs

STATIC = Path(__file__).parent / "static"
POLL_S = 1.0  # how often the live-metrics stream looks at metrics.jsonl
FILES = {"loss.png": "image/png", "config.yaml": "text/plain", "data.json": "application/json"}


@dataclass
class UiSettings:
    """What `vlmtune ui` was started with. Only these folders (and the model and adapters named) are read;
    merges write only under `merge_dir`."""

    runs: list[Path] = field(default_factory=list)
    model: str | None = None
    adapters: dict[str, Path] = field(default_factory=dict)
    host: str = "127.0.0.1"
    port: int = 7860
    token: str | None = None
    merge_dir: Path | None = None
    max_body_bytes: int = 16 * 2**20

    def check(self) -> UiSettings:
        security.check_bind(self.host, self.token)
        for root in self.runs:
            if not Path(root).is_dir():
                raise VlmtuneError(f"--runs {root} is not a folder.")
        if self.adapters and not self.model:
            raise VlmtuneError("--adapter needs --model BASE (the base the adapters run on).")
        for name, path in self.adapters.items():
            refuse_pickled(path, f"--adapter {name}={path}")
        if self.merge_dir is not None and self.merge_dir.exists() and not self.merge_dir.is_dir():
            raise VlmtuneError(f"--merge-dir {self.merge_dir} is not a folder.")
        return self


def create_app(settings: UiSettings, engine: Any = None) -> Any:
    """The dashboard app over `settings`; `engine` (a loaded `vlmtune.infer.Engine`) enables the gallery."""
    settings.check()
    openai = openai_app(engine, settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if openai is None:
            yield
            return
        async with openai.router.lifespan_context(openai):  # the serve scheduler starts and stops with us
            yield

    app = FastAPI(title="vlmtune ui", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    # The body cap sits inside the guard: it then sees its own BodyTooLarge, not the guard's task group's.
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    guard = security.Guard(settings.token, settings.host, own=("/api/", "/static/"))
    app.middleware("http")(guard)
    jobs = MergeJobs(settings.merge_dir)
    app.state.settings, app.state.engine, app.state.jobs = settings, engine, jobs

    @app.exception_handler(VlmtuneError)
    async def user_error(request: Request, exc: VlmtuneError) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=409 if isinstance(exc, JobBusy) else 400)

    @app.exception_handler(PermissionError)
    async def forbidden(request: Request, exc: PermissionError) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=403)

    def all_runs() -> dict[str, runs_mod.Run]:
        return runs_mod.discover(settings.runs)

    def run_of(run_id: str) -> runs_mod.Run:
        if ".." in run_id.split("/") or run_id.startswith("/"):
            raise PermissionError(f"run id {run_id!r}: only runs under --runs are served")
        found = all_runs().get(run_id)
        if found is None:
            raise HTTPException(404, f"no run {run_id!r} under --runs")
        return found

    def adapter_of(adapter_id: str) -> adapters_mod.AdapterEntry:
        found = adapters_mod.entries(engine, settings.model, all_runs()).get(adapter_id)
        if found is None:
            raise HTTPException(404, f"no adapter {adapter_id!r}")
        return found

    async def body(request: Request) -> dict[str, Any]:
        try:
            data = json.loads(await request.body() or b"{}")
        except ValueError:
            raise HTTPException(400, "the body must be JSON") from None
        if not isinstance(data, dict):
            raise HTTPException(400, "the body must be a JSON object")
        return data

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse({"error": exc.detail}, status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        return JSONResponse({"error": problems}, status_code=400)

    # -- session ------------------------------------------------------------------------------------------
    @app.get("/api/session")
    async def session(request: Request) -> dict[str, Any]:
        return {
            "auth_required": bool(settings.token),
            "authenticated": guard.authenticated(request) is not None,
            "model": settings.model,
            "merge_dir": str(settings.merge_dir) if settings.merge_dir else None,
            "gallery": engine is not None,
            "openai": openai is not None,
        }

    @app.post("/api/login")
    async def login(request: Request) -> JSONResponse:
        data = await body(request)
        if not settings.token:
            return JSONResponse({"ok": True})
        if not security.equal(str(data.get("token", "")), settings.token):
            return JSONResponse({"error": "wrong token"}, status_code=401)
        response = JSONResponse({"ok": True})
        response.set_cookie(
            security.SESSION_COOKIE,
            security.session_value(settings.token),
            httponly=True,
            samesite="strict",
            secure=False,  # plain HTTP on loopback; put TLS in front for anything else
            path="/",
        )
        return response

    @app.post("/api/logout")
    async def logout() -> JSONResponse:
        response = JSONResponse({"ok": True})
        response.delete_cookie(security.SESSION_COOKIE, path="/")
        return response

    # -- runs ---------------------------------------------------------------------------------------------
    @app.get("/api/runs")
    def list_runs() -> dict[str, Any]:
        return {
            "roots": [str(r) for r in settings.runs],
            "runs": [runs_mod.summary(r) for r in all_runs().values()],
        }

    @app.get("/api/run")
    def run_details(id: str) -> dict[str, Any]:
        return runs_mod.details(run_of(id))

    @app.get("/api/run/metrics")
    def run_metrics(id: str, offset: int = 0, max_points: int = 2000) -> dict[str, Any]:
        return runs_mod.metrics(run_of(id), max(0, offset), max(10, min(max_points, 20000)))

    @app.get("/api/run/events")
    async def run_events(id: str, request: Request, offset: int = 0) -> StreamingResponse:
        """Server-sent events: a `metrics` event (as /api/run/metrics) whenever metrics.jsonl grows, and a
        `summary` event when the state changes; ends when the run stops running."""
        run = run_of(id)

        async def stream() -> Any:
            position, last_state = max(0, offset), None
            while not await request.is_disconnected():
                update = await asyncio.to_thread(runs_mod.metrics, run, position)
                if update["rows"] or (update["reset"] and position):
                    position = update["offset"]
                    yield f"event: metrics\ndata: {json.dumps(update)}\n\n"
                summary = await asyncio.to_thread(runs_mod.summary, run)
                if summary["state"] != last_state:
                    last_state = summary["state"]
                    yield f"event: summary\ndata: {json.dumps(summary)}\n\n"
                    if last_state != "running":
                        return
                await asyncio.sleep(POLL_S)

        return StreamingResponse(
            stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )

    @app.get("/api/run/file")
    def run_file(id: str, name: str) -> FileResponse:
        run = run_of(id)
        path = security.resolve_under([], name, root=run.path)
        if path.name not in FILES or not path.is_file():
            raise HTTPException(404, f"{name!r}: the dashboard serves {', '.join(FILES)} of a run")
        return FileResponse(path, media_type=FILES[path.name])

    @app.get("/api/compare")
    def compare(ids: str) -> dict[str, Any]:
        chosen = [run_of(i) for i in ids.split(",") if i]
        if len(chosen) < 2:
            raise HTTPException(400, "compare needs at least two run ids (ids=a,b)")
        return runs_mod.compare(chosen)

    @app.get("/api/run/data")
    def run_data(id: str, split: str = "train", start: int = 0, count: int = 4) -> dict[str, Any]:
        from .dataview import render_rows

        return render_rows(run_of(id), split, max(0, start), max(1, min(count, 16)))

    # -- adapters -----------------------------------------------------------------------------------------
    @app.get("/api/adapters")
    def list_adapters() -> dict[str, Any]:
        found = adapters_mod.entries(engine, settings.model, all_runs())
        return {
            "model": settings.model,
            "engine": [BASE, *engine.adapters] if engine is not None else [],
            "adapters": [
                {"id": e.id, "name": e.name, "path": str(e.path), "base": e.base, "source": e.source}
                for e in found.values()
            ],
        }

    @app.get("/api/adapter/inspect")
    def inspect_adapter(id: str) -> dict[str, Any]:
        return adapters_mod.inspect(adapter_of(id))

    @app.post("/api/generate")
    async def generate(request: Request) -> dict[str, Any]:
        data = await body(request)
        image = data.get("image")
        raw = adapters_mod.decode_image(image, settings.max_body_bytes) if image else None
        names = data.get("adapters") or []
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise HTTPException(400, "adapters must be a list of names")
        max_new = data.get("max_new_tokens", 64)
        if not isinstance(max_new, int) or not 1 <= max_new <= 512:
            raise HTTPException(400, "max_new_tokens must be an integer in 1..512")
        answers = await asyncio.to_thread(
            adapters_mod.side_by_side, engine, str(data.get("prompt", "")), raw, names, max_new
        )
        return {"answers": answers}

    # -- merges -------------------------------------------------------------------------------------------
    @app.get("/api/merges")
    def merges() -> dict[str, Any]:
        return jobs.to_dict()

    @app.post("/api/merge")
    async def start_merge(request: Request) -> dict[str, Any]:
        data = await body(request)
        entry = adapter_of(str(data.get("adapter", "")))
        if not entry.base:
            raise HTTPException(400, f"{entry.id} has no known base to merge into")
        job = jobs.start(
            entry.base, [entry.path], str(data.get("name", "")), verify=bool(data.get("verify", True))
        )
        return {"job": job.id, "out": job.out}

    @app.get("/api/merge")
    def merge_job(id: str) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(jobs.get(id))

    # -- the page -----------------------------------------------------------------------------------------
    @app.get("/")
    def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    if openai is not None:
        app.mount("/", openai)  # /v1/..., /health, /metrics: `vlmtune serve`'s routes, after the dashboard's
    return app


def openai_app(engine: Any, settings: UiSettings) -> Any:
    """`vlmtune serve`'s OpenAI-compatible app over the same engine (same process, its continuous-batching
    scheduler), keyed by the dashboard's token; None without an engine."""
    if engine is None:
        return None
    from ..serve import ServeSettings
    from ..serve import create_app as serve_app

    return serve_app(engine, ServeSettings(host=settings.host, port=settings.port, api_key=settings.token))


def run_ui(settings: UiSettings, *, device: str | None = None, dtype: str = "auto") -> None:
    """Load the engine (when `settings.model` is set), then serve the dashboard until interrupted."""
    import uvicorn

    settings.check()
    engine = None
    if settings.model:
        from ..infer import load

        engine = load(settings.model, settings.adapters, device=device, dtype=dtype)
    app = create_app(settings, engine)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    print(f"vlmtune ui on http://{settings.host}:{settings.port}/", flush=True)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="warning")
