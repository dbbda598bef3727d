"""Continuous batching over the engine: an iteration-level loop in one thread.

Between two decode steps the loop runs queued adapter loads/unloads, drops rows whose client went away,
and admits waiting requests while there are free rows: each is prefilled alone (so its prompt is never
padded) under its own adapter, its n choices share that prefill, and its rows join the running batch.
Then every row decodes one token in one forward per cohort (rows whose state can be merged and whose
adapters can share a forward: the engine's per-row routing; DoRA rows decode apart). A short request
arriving while long ones generate starts at the next step; a finished row leaves at once.

It is a scheduler over the engine, not a second engine: requests are checked and rendered by
`engine.prepare`, encoded by the engine's processor, and every forward runs under the engine's routing.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from ..infer.types import GenerationSettings
from . import cohort as cohorts
from .errors import ApiError
from .sampling import Sampling, choose, logprob_entry
from .seam import Router, decode_class, engine_encode, engine_lock, model_device, route, row_mismatch


@dataclass
class Job:
    """One chat-completion request, checked and encoded, waiting for rows."""

    adapter: str
    encoded: Any
    prompt_tokens: int
    tokenizer: Any
    stop_ids: set[int]
    max_tokens: int
    n: int = 1
    stop: list[str] = field(default_factory=list)
    sampling: Sampling = field(default_factory=Sampling)
    sink: Callable[[dict[str, Any]], None] = lambda event: None
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.monotonic)


@dataclass
class Row:
    """One choice of a job while it decodes."""

    job: Job
    choice: int
    generator: torch.Generator | None
    tokens: list[int] = field(default_factory=list)  # kept tokens (no end-of-turn token)
    generated: int = 0
    emitted: str = ""
    pending_logprobs: list[dict[str, Any]] = field(default_factory=list)
    finish: str | None = None
    text: str = ""

    @property
    def last(self) -> int:
        return self.tokens[-1]


class Scheduler:
    """Owns the model while serving: every forward happens in its thread, under the engine's lock."""

    def __init__(self, engine: Any, max_batch_size: int, max_queue: int, metrics: Any = None) -> None:
        self.engine = engine
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.metrics = metrics
        self.waiting: collections.deque[Job] = collections.deque()
        self.cohorts: list[cohorts.Cohort] = []
        self.commands: collections.deque[tuple[Callable[[], Any], Future]] = collections.deque()
        self.wake = threading.Condition()
        self.stopping = False
        self.steps = 0
        self.peak_rows = 0  # most rows, and most distinct adapters, seen in one decode forward
        self.peak_adapters = 0
        self.router = Router(engine)
        self.thread = threading.Thread(target=self._loop, name="vlmtune-scheduler", daemon=True)

    # -- outside the loop ---------------------------------------------------------------------------------
    def start(self) -> None:
        """Start the loop thread (once). The app's lifespan starts it; `submit` and `call` do too, because a
        mounted app (`vlmtune ui` mounts this one) gets no lifespan events."""
        with self.wake:
            if not self.thread.is_alive() and not self.stopping and self.thread.ident is None:
                self.thread.start()

    def stop(self) -> None:
        with self.wake:
            self.stopping = True
            self.wake.notify_all()
        self.thread.join(timeout=30)

    def submit(self, job: Job) -> None:
        """Queue a job, or raise a 429 when the queue is full."""
        self.start()
        with self.wake:
            if len(self.waiting) >= self.max_queue:
                raise ApiError(
                    429,
                    f"the server is busy: {len(self.waiting)} requests are waiting (--max-queue); retry later.",
                    code="queue_full",
                )
            self.waiting.append(job)
            self._gauge()
            self.wake.notify_all()

    def call(self, fn: Callable[[], Any]) -> Future:
        """Run `fn` in the loop thread between two steps (adapter loads and unloads)."""
        future: Future = Future()
        self.start()
        with self.wake:
            self.commands.append((fn, future))
            self.wake.notify_all()
        return future

    @property
    def active_rows(self) -> int:
        return sum(len(c.rows) for c in self.cohorts)

    def busy_with(self, adapter: str) -> int:
        """Requests in flight or waiting under `adapter`."""
        jobs = {id(row.job) for c in self.cohorts for row in c.rows if row.job.adapter == adapter}
        return len(jobs) + sum(1 for job in list(self.waiting) if job.adapter == adapter)

    # -- the loop -------------------------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self.wake:
                while not (self.stopping or self.commands or self.waiting or self.cohorts):
                    self.wake.wait(timeout=1.0)
                if self.stopping:
                    break
            try:
                self._iterate()
            except Exception as exc:  # a bug must not leave clients hanging: fail what is in flight
                self._fail_all(f"internal error in the scheduler ({type(exc).__name__}: {exc})")
        self.router.close()
        self._fail_all("the server is shutting down.")

    def _iterate(self) -> None:
        if self.commands:
            self.router.close()
        while self.commands:
            fn, future = self.commands.popleft()
            try:
                future.set_result(fn())
            except BaseException as exc:
                future.set_exception(exc)
        self._drop_cancelled()
        self._admit()
        if self.cohorts:
            self._step()
        if not self.cohorts or self.waiting:
            self.router.close()
        self._gauge()

    def _admit(self) -> None:
        while True:
            with self.wake:
                if not self.waiting or self.active_rows + self.waiting[0].n > self.max_batch_size:
                    return
                job = self.waiting.popleft()
            if job.cancelled.is_set():
                continue
            try:
                self._prefill(job)
            except ApiError as exc:
                job.sink({"type": "error", "status": exc.status, "message": exc.message})
            except Exception as exc:
                job.sink({"type": "error", "status": 500, "message": f"{type(exc).__name__}: {exc}"})

    def _prefill(self, job: Job) -> None:
        engine = self.engine
        rows = [Row(job, i, job.sampling.generator(i)) for i in range(job.n)]
        model = engine.base_model
        self.router.close()
        with engine_lock(engine), torch.inference_mode(), route(engine, [job.adapter]):
            logits, group = cohorts.prefill(model, job.encoded, [rows[0]], decode_class(engine, job.adapter))
        group.repeat(job.n)
        group.rows = rows
        if self.metrics is not None:
            self.metrics.prompt(job.adapter, job.prompt_tokens)
        self._advance(group, logits.repeat(job.n, 1) if job.n > 1 else logits)
        if group.rows:
            self._place(group)

    def _place(self, group: cohorts.Cohort) -> None:
        signature = group.signature()
        for existing in self.cohorts:
            if existing.signature() == signature:
                existing.merge(group)
                return
        self.cohorts.append(group)

    def _step(self) -> None:
        engine = self.engine
        for group in list(self.cohorts):
            tokens = torch.tensor([row.last for row in group.rows], device=model_device(engine))
            adapters = [row.job.adapter for row in group.rows]
            try:
                self.router.enter(adapters)
                logits = cohorts.decode(engine.base_model, group, tokens)
            except row_mismatch(engine) as exc:
                self.router.close(exc)
                self._split(group)  # a layer saw inputs that are not one per row: one adapter per forward
                continue
            except BaseException as exc:
                self.router.close(exc)
                raise
            if len(self.cohorts) > 1:
                self.router.close()
            self.steps += 1
            self.peak_rows = max(self.peak_rows, len(adapters))
            self.peak_adapters = max(self.peak_adapters, len(set(adapters)))
            if self.metrics is not None:
                self.metrics.step(len(group.rows), self.max_batch_size)
            self._advance(group, logits)
        self.cohorts = [c for c in self.cohorts if c.rows]

    def _split(self, group: cohorts.Cohort) -> None:
        self.cohorts.remove(group)
        by_adapter: dict[str, list[int]] = {}
        for i, row in enumerate(group.rows):
            by_adapter.setdefault(row.job.adapter, []).append(i)
        if len(by_adapter) == 1:
            raise RuntimeError("a single-adapter batch cannot be split further")
        import copy

        for adapter, indices in by_adapter.items():
            part = copy.copy(group)
            part.cache = copy.deepcopy(group.cache)
            part.kwargs = dict(group.kwargs)
            part.keep(indices)
            part.mix = ("solo", adapter)
            self.cohorts.append(part)

    def _advance(self, group: cohorts.Cohort, logits: torch.Tensor) -> None:
        """Choose each row's next token from `logits` (one row each), emit text, retire finished rows."""
        keep = []
        greedy = torch.argmax(logits, dim=-1).tolist()  # one device sync for all greedy rows
        for i, row in enumerate(group.rows):
            if row.job.cancelled.is_set():
                continue
            job = row.job
            token = greedy[i] if row.generator is None else choose(logits[i], job.sampling, row.generator)
            row.generated += 1
            if token in job.stop_ids:
                row.finish = "stop"
            else:
                if job.sampling.logprobs:
                    row.pending_logprobs.append(
                        logprob_entry(logits[i], token, job.sampling.top_logprobs, job.tokenizer)
                    )
                row.tokens.append(token)
                if row.generated >= job.max_tokens:
                    row.finish = "length"
            self._emit(row)
            if row.finish is None:
                keep.append(i)
        if self.metrics is not None:
            for row in group.rows:
                self.metrics.tokens(row.job.adapter, 1)
        group.keep(keep)

    def _emit(self, row: Row) -> None:
        job = row.job
        text = job.tokenizer.decode(row.tokens, skip_special_tokens=True).strip()
        if job.stop:
            hits = [i for i in (text.find(s) for s in job.stop) if i >= 0]
            if hits:
                text = text[: min(hits)].rstrip()
                row.finish = "stop"
        if row.finish is not None:
            safe = text
        else:
            hold = max((len(s) - 1 for s in job.stop), default=0)
            safe = text[: len(text) - hold] if hold else text
            if safe.endswith("\ufffd"):  # an incomplete character: wait for its other bytes
                safe = safe.rstrip("\ufffd")
        if safe.startswith(row.emitted) and (len(safe) > len(row.emitted) or row.finish is not None):
            delta = safe[len(row.emitted) :]
            row.emitted = safe
            if delta or row.pending_logprobs:
                job.sink(
                    {"type": "delta", "choice": row.choice, "text": delta, "logprobs": row.pending_logprobs}
                )
                row.pending_logprobs = []
        if row.finish is not None:
            row.text = text
            job.sink(
                {
                    "type": "done",
                    "choice": row.choice,
                    "text": text,
                    "finish_reason": row.finish,
                    "completion_tokens": row.generated,
                    "logprobs": row.pending_logprobs,
                }
            )
            if self.metrics is not None:
                self.metrics.finished(job.adapter, row.finish)

    def _drop_cancelled(self) -> None:
        for group in self.cohorts:
            keep = [i for i, row in enumerate(group.rows) if not row.job.cancelled.is_set()]
            if len(keep) != len(group.rows):
                group.keep(keep)
                if self.metrics is not None:
                    self.metrics.cancelled(len(group.rows) - len(keep))
        self.cohorts = [c for c in self.cohorts if c.rows]

    def _fail_all(self, message: str) -> None:
        with self.wake:
            jobs = list(self.waiting)
            self.waiting.clear()
        jobs += list({id(r.job): r.job for c in self.cohorts for r in c.rows}.values())
        self.cohorts = []
        for job in jobs:
            job.sink({"type": "error", "status": 500, "message": message})

    def _gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.queue(len(self.waiting), self.active_rows)


def job_for(
    engine: Any,
    request: Any,
    *,
    max_tokens: int,
    n: int = 1,
    stop: list[str] | None = None,
    sampling: Sampling | None = None,
    sink: Callable[[dict[str, Any]], None] = lambda event: None,
    encode: Callable[[Any], Any] | None = None,
) -> Job:
    """A job for an engine `Request`: checked and rendered by the engine, encoded by its processor
    (`encode(prepared)` may serve it from a cache), with the engine's end-of-turn tokens."""
    prepared = engine.prepare(request)[0]
    encoded = encode(prepared) if encode is not None else engine_encode(engine, prepared)
    eos = engine.generation_config(GenerationSettings()).eos_token_id
    return Job(
        adapter=prepared.adapter,
        encoded=encoded,
        prompt_tokens=int(encoded["attention_mask"].sum()),
        tokenizer=engine.processor_for(prepared.adapter).tokenizer,
        stop_ids=set(eos if isinstance(eos, list) else [eos]),
        max_tokens=max_tokens,
        n=n,
        stop=list(stop or []),
        sampling=sampling or Sampling(),
        sink=sink,
    )
