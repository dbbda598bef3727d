"""The FastAPI app: OpenAI routes over the scheduler, adapter management, health and metrics."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from ..errors import VlmtuneError
from ..infer.types import BASE
from . import messages as msg
from .auth import BearerAuth
from .errors import ApiError, BodyLimit, error_body, send_error
from .metrics import CONTENT_TYPE, Metrics
from .registry import Describer, base_entry, check_name, resolve_adapter_path, resolve_model
from .sampling import Sampling
from .scheduler import Job, Scheduler, job_for
from .schemas import AdapterLoad, ChatRequest
from .seam import engine_encode
from .settings import ServeSettings


class EncodedCache:
    """Processor outputs by (adapter content hash, processor, prompt text, image hashes): the same request
    under a reloaded adapter of the same name is never served from the old entry."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.items: collections.OrderedDict[tuple, Any] = collections.OrderedDict()
        self.lock = threading.Lock()

    def get(self, key: tuple, make: Any) -> Any:
        with self.lock:
            if key in self.items:
                self.items.move_to_end(key)
                return self.items[key]
        value = make()
        with self.lock:
            self.items[key] = value
            while len(self.items) > self.size:
                self.items.popitem(last=False)
        return value


def create_app(engine: Any, settings: ServeSettings) -> FastAPI:
    metrics = Metrics()
    scheduler = Scheduler(engine, settings.max_batch_size, settings.max_queue, metrics)
    describer = Describer(engine.folder)
    cache = EncodedCache(settings.encoded_cache)
    started = int(time.time())
    base_id = str(engine.base)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        scheduler.start()
        yield
        await asyncio.to_thread(scheduler.stop)

    app = FastAPI(title="vlmtune serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.scheduler, app.state.settings, app.state.metrics = (
        engine,
        scheduler,
        settings,
        metrics,
    )

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(VlmtuneError)
    async def user_error(request: Request, exc: VlmtuneError) -> JSONResponse:
        return JSONResponse(error_body(400, str(exc)), status_code=400)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        loc = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        text = (
            f"{loc}: {first.get('msg', 'invalid value')}" if loc else first.get("msg", "invalid request body")
        )
        return JSONResponse(error_body(400, text, param=loc or None), status_code=400)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return JSONResponse(error_body(exc.status_code, str(exc.detail)), status_code=exc.status_code)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {
            "status": "ok" if scheduler.thread.is_alive() or scheduler.thread.ident is None else "stopped",
            "adapters": len(engine.adapters),
        }

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    def model_list() -> list[dict[str, Any]]:
        return [base_entry(base_id, started)] + [
            describer.entry(i, base_id) for i in engine.adapters.values()
        ]

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": await asyncio.to_thread(model_list)}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict[str, Any]:
        name = resolve_model(model_id, base_id, engine.adapters)
        if name == BASE:
            return base_entry(base_id, started)
        return await asyncio.to_thread(describer.entry, engine.adapters[name], base_id)

    @app.get("/v1/adapters")
    async def adapters() -> dict[str, Any]:
        return {"object": "list", "data": (await asyncio.to_thread(model_list))[1:]}

    @app.post("/v1/adapters")
    async def load_adapter(body: AdapterLoad) -> dict[str, Any]:
        check_name(body.name)
        folder = resolve_adapter_path(body.path, settings)
        if body.name in engine.adapters:
            raise ApiError(409, f"an adapter called {body.name!r} is loaded; DELETE it first.", param="name")
        future = scheduler.call(lambda: engine.add_adapter(body.name, folder))
        info = await asyncio.wrap_future(future)
        return await asyncio.to_thread(describer.entry, info, base_id)

    @app.delete("/v1/adapters/{name}")
    async def unload_adapter(name: str) -> dict[str, Any]:
        if name not in engine.adapters:
            raise ApiError(
                404, f"no adapter called {name!r} is loaded.", param="name", code="model_not_found"
            )

        def remove() -> None:
            busy = scheduler.busy_with(name)
            if busy:
                raise ApiError(409, f"{busy} request(s) are running under {name!r}; retry when they finish.")
            engine.remove_adapter(name)

        await asyncio.wrap_future(scheduler.call(remove))
        return {"id": name, "object": "model", "deleted": True}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request) -> Response:
        refused = body.refused()
        if refused:
            raise ApiError(400, refused[1], param=refused[0])
        adapter = resolve_model(body.model, base_id, engine.adapters)
        limit = min(settings.max_n, settings.max_batch_size)
        if body.n > limit:
            raise ApiError(400, f"n is at most {limit} on this server.", param="n")
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        job = await asyncio.to_thread(
            build_job, body, adapter, lambda e: loop.call_soon_threadsafe(events.put_nowait, e)
        )
        fingerprint = "fp_" + (msg_hash(engine, adapter) or "base")[:12]
        arrived = time.monotonic()
        scheduler.submit(job)
        first = await next_event(events, request, job)
        if first is None:
            return Response(status_code=499)
        if first["type"] == "error":
            metrics.answered(adapter, first["status"])
            return JSONResponse(error_body(first["status"], first["message"]), status_code=first["status"])
        cid = msg.completion_id()
        if body.stream:
            include = bool(body.stream_options and body.stream_options.include_usage)
            stream = sse(first, events, request, job, cid, body.model, fingerprint, include, arrived)
            return StreamingResponse(stream, media_type="text/event-stream")
        done: dict[int, dict[str, Any]] = {}
        logprobs: dict[int, list[Any]] = collections.defaultdict(list)
        event: dict[str, Any] | None = first
        while True:
            assert event is not None
            if event["type"] == "error":
                metrics.answered(adapter, event["status"])
                return JSONResponse(
                    error_body(event["status"], event["message"]), status_code=event["status"]
                )
            logprobs[event["choice"]] += event.get("logprobs") or []
            if event["type"] == "done":
                done[event["choice"]] = {**event, "all_logprobs": logprobs[event["choice"]]}
                if len(done) == job.n:
                    break
            event = await next_event(events, request, job)
            if event is None:
                return Response(status_code=499)
        metrics.answered(adapter, 200, time.monotonic() - arrived)
        choices = [done[i] for i in range(job.n)]
        return JSONResponse(
            msg.completion(cid, body.model, choices, job.prompt_tokens, fingerprint, body.logprobs)
        )

    def build_job(body: ChatRequest, adapter: str, sink: Any) -> Job:
        """Everything that can fail about a request, checked before it takes a row (runs in a worker thread)."""
        max_tokens = msg.max_tokens(body, settings)
        stop = msg.stops(body)
        req, digests = msg.to_request(body, adapter, settings)

        def encode(prepared: Any) -> Any:
            key = (msg_hash(engine, prepared.adapter), prepared.processor, prepared.text, tuple(digests))
            return cache.get(key, lambda: engine_encode(engine, prepared))

        sampling = Sampling(
            body.temperature or 0.0, body.top_p or 1.0, body.seed, body.logprobs, body.top_logprobs or 0
        )
        job = job_for(
            engine,
            req,
            max_tokens=max_tokens,
            n=body.n,
            stop=stop,
            sampling=sampling,
            sink=sink,
            encode=encode,
        )
        if job.prompt_tokens > settings.max_prompt_tokens:
            raise ApiError(
                400,
                f"the prompt is {job.prompt_tokens} tokens, over the server's limit of {settings.max_prompt_tokens} "
                "(--max-prompt-tokens).",
                param="messages",
                code="context_length_exceeded",
            )
        return job

    async def sse(
        first: dict[str, Any],
        events: asyncio.Queue,
        request: Request,
        job: Job,
        cid: str,
        model: str,
        fingerprint: str,
        include_usage: bool,
        arrived: float,
    ) -> AsyncIterator[str]:
        def data(body: dict[str, Any]) -> str:
            return f"data: {json.dumps(body)}\n\n"

        def frame(choices: list[dict[str, Any]]) -> str:
            return data(msg.chunk(cid, model, fingerprint, choices, include_usage=include_usage))

        completion = 0
        finished = 0
        try:
            for i in range(job.n):
                yield frame([msg.chunk_choice(i, {"role": "assistant", "content": ""})])
            event: dict[str, Any] | None = first
            while event is not None:
                if event["type"] == "error":
                    yield data(error_body(event["status"], event["message"]))
                    break
                lp = event.get("logprobs") if job.sampling.logprobs else None
                if event["type"] == "delta":
                    yield frame([msg.chunk_choice(event["choice"], {"content": event["text"]}, logprobs=lp)])
                else:
                    if lp:
                        yield frame([msg.chunk_choice(event["choice"], {"content": ""}, logprobs=lp)])
                    yield frame([msg.chunk_choice(event["choice"], {}, event["finish_reason"])])
                    completion += event["completion_tokens"]
                    finished += 1
                    if finished == job.n:
                        break
                event = await next_event(events, request, job)
            if finished == job.n:
                if include_usage:
                    usage_body = msg.usage(job.prompt_tokens, completion)
                    yield data(
                        msg.chunk(cid, model, fingerprint, [], include_usage=True, usage_body=usage_body)
                    )
                metrics.answered(job.adapter, 200, time.monotonic() - arrived)
                yield "data: [DONE]\n\n"
        finally:
            if finished < job.n:
                job.cancelled.set()  # the client left (or an error): free its rows at the next step

    async def reject(send: Any) -> None:
        await send_error(
            send, 401, "a valid API key is required: send Authorization: Bearer KEY.", "invalid_api_key"
        )

    if settings.api_key:
        app.add_middleware(BearerAuth, key=settings.api_key, reject=reject, open_paths=("/health",))
    app.add_middleware(BodyLimit, limit=settings.max_body_bytes)
    return app


def msg_hash(engine: Any, adapter: str) -> str:
    if adapter == BASE:
        return "base:" + str(engine.fingerprint)
    return engine.adapters[adapter].sha256


async def next_event(events: asyncio.Queue, request: Request, job: Job) -> dict[str, Any] | None:
    """The next scheduler event, or None once the client has gone (its rows are then cancelled)."""
    while True:
        try:
            return await asyncio.wait_for(events.get(), timeout=0.5)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                job.cancelled.set()
                return None
