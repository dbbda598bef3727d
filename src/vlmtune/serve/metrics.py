"""Prometheus metrics of one server (its own registry, so two apps in one process never mix counts)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "vlmtune_requests",
            "Chat-completion requests answered, by adapter and status",
            ["adapter", "status"],
            registry=r,
        )
        self.choices = Counter(
            "vlmtune_choices",
            "Choices finished, by adapter and finish reason",
            ["adapter", "finish_reason"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            "vlmtune_prompt_tokens", "Prompt tokens prefilled", ["adapter"], registry=r
        )
        self.generated_tokens = Counter(
            "vlmtune_generated_tokens", "Tokens generated", ["adapter"], registry=r
        )
        self.cancelled_rows = Counter(
            "vlmtune_cancelled_rows", "Rows dropped because the client left", registry=r
        )
        self.decode_steps = Counter("vlmtune_decode_steps", "Decode forwards run", registry=r)
        self.queue_depth = Gauge("vlmtune_queue_depth", "Requests waiting for a free row", registry=r)
        self.active_rows = Gauge("vlmtune_active_rows", "Rows decoding now", registry=r)
        self.occupancy = Histogram(
            "vlmtune_batch_occupancy",
            "Fraction of --max-batch-size rows used per decode forward",
            buckets=(0.125, 0.25, 0.5, 0.75, 1.0),
            registry=r,
        )
        self.latency = Histogram(
            "vlmtune_request_seconds", "Time from arrival to the last token", ["adapter"], registry=r
        )

    # Called by the scheduler thread.
    def prompt(self, adapter: str, tokens: int) -> None:
        self.prompt_tokens.labels(adapter).inc(tokens)

    def tokens(self, adapter: str, count: int) -> None:
        self.generated_tokens.labels(adapter).inc(count)

    def step(self, rows: int, capacity: int) -> None:
        self.decode_steps.inc()
        self.occupancy.observe(rows / capacity)

    def finished(self, adapter: str, reason: str) -> None:
        self.choices.labels(adapter, reason).inc()

    def cancelled(self, rows: int) -> None:
        self.cancelled_rows.inc(rows)

    def queue(self, waiting: int, active: int) -> None:
        self.queue_depth.set(waiting)
        self.active_rows.set(active)

    # Called by the routes.
    def answered(self, adapter: str, status: int, seconds: float | None = None) -> None:
        self.requests.labels(adapter, str(status)).inc()
        if seconds is not None:
            self.latency.labels(adapter).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
