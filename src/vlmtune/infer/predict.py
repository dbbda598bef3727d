"""`vlmtune predict`: run a dataset through one or many un-merged adapters, write predictions as JSONL,
and report accuracy against references, throughput and peak memory."""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import VlmtuneError
from . import metrics
from .data import PromptRow, read_prompts
from .engine import Engine, load
from .types import BASE, Generation, GenerationSettings, Request


@dataclass
class AdapterScore:
    rows: int
    with_reference: int
    exact_match: float | None
    token_f1: float | None


@dataclass
class PredictSummary:
    out: Path
    rows: int  # prediction rows written (data rows x adapters they ran under)
    seconds: float  # generation wall time (model loading excluded)
    samples_per_s: float
    generated_tokens: int
    tokens_per_s: float
    peak_rss_bytes: int
    peak_cuda_bytes: int | None
    scores: dict[str, AdapterScore] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["out"] = str(self.out)
        return data

    def render(self) -> str:
        lines = [
            f"wrote {self.rows} predictions to {self.out}",
            f"throughput: {self.samples_per_s:.2f} samples/s, {self.tokens_per_s:.1f} generated tokens/s "
            f"({self.generated_tokens} tokens in {self.seconds:.1f} s)",
            f"peak memory: {self.peak_rss_bytes / 2**20:.0f} MiB resident"
            + (f", {self.peak_cuda_bytes / 2**20:.0f} MiB CUDA" if self.peak_cuda_bytes is not None else ""),
        ]
        for name, score in self.scores.items():
            if score.exact_match is None:
                lines.append(f"{name}: {score.rows} rows, no reference answers")
            else:
                lines.append(
                    f"{name}: exact match {score.exact_match:.3f}, token F1 {score.token_f1:.3f} "
                    f"({score.with_reference} of {score.rows} rows have a reference)"
                )
        return "\n".join(lines)


def predict(
    model: str | Path,
    adapters: Mapping[str, str | Path] | Sequence[str | Path] | None,
    data: str | Path,
    out: str | Path,
    *,
    batch_size: int = 8,
    settings: GenerationSettings | None = None,
    dtype: str = "auto",
    device: str | None = None,
    quantization: str | None = None,
    progress: bool = True,
) -> PredictSummary:
    """Load `model` with `adapters` un-merged and predict every row of `data` into `out` (JSONL).

    A row's `adapter` field picks its adapter; without it, every row runs under every adapter (or the
    base when there are none). The data is read and checked before the model is loaded.
    """
    if batch_size < 1:
        raise VlmtuneError(f"--batch-size must be at least 1 (got {batch_size}).")
    rows = read_prompts(data)
    engine = load(model, adapters, dtype=dtype, device=device, quantization=quantization)
    return run_predictions(engine, rows, out, batch_size=batch_size, settings=settings, progress=progress)


def jobs_for(engine: Engine, rows: Sequence[PromptRow]) -> list[tuple[PromptRow, str]]:
    """(row, adapter) pairs in output order; unknown adapter names fail before any generation."""
    names = list(engine.adapters)
    jobs: list[tuple[PromptRow, str]] = []
    unknown: list[str] = []
    for row in rows:
        if row.adapter is not None:
            try:
                jobs.append((row, engine.check_adapter(row.adapter)))
            except VlmtuneError:
                unknown.append(f"row {row.id}: {row.adapter!r}")
        elif len(names) > 1:
            jobs.extend((row, name) for name in names)
        else:
            jobs.append((row, names[0] if names else BASE))
    if unknown:
        raise VlmtuneError(
            f"{len(unknown)} row(s) name an adapter that is not loaded ({'; '.join(unknown[:5])}); loaded: "
            f"{', '.join(names) or 'none'} (and {BASE} for the base). Pass them with --adapter NAME=DIR."
        )
    return jobs


def run_predictions(
    engine: Engine,
    rows: Sequence[PromptRow],
    out: str | Path,
    *,
    batch_size: int = 8,
    settings: GenerationSettings | None = None,
    progress: bool = True,
) -> PredictSummary:
    """Predict `rows` with a loaded engine; the output appears only when complete (written beside, renamed)."""
    import torch
    from tqdm import tqdm

    out = Path(out)
    jobs = jobs_for(engine, rows)
    requests = [Request(row.messages, list(row.images), adapter) for row, adapter in jobs]
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    bar = tqdm(total=len(requests), desc="predict", unit="sample", disable=not progress, file=sys.stderr)
    start = time.perf_counter()
    try:
        results = engine.generate(requests, settings, batch_size=batch_size, progress=bar.update)
    finally:
        bar.close()
    seconds = time.perf_counter() - start
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        for (row, _), result in zip(jobs, results, strict=True):
            f.write(json.dumps(output_row(row, result), ensure_ascii=False) + "\n")
    os.replace(tmp, out)
    tokens = sum(r.generated_tokens for r in results)
    return PredictSummary(
        out=out,
        rows=len(results),
        seconds=seconds,
        samples_per_s=len(results) / seconds if seconds else 0.0,
        generated_tokens=tokens,
        tokens_per_s=tokens / seconds if seconds else 0.0,
        peak_rss_bytes=peak_rss_bytes(),
        peak_cuda_bytes=torch.cuda.max_memory_allocated() if cuda else None,
        scores=score(jobs, results),
    )


def peak_rss_bytes() -> int:
    """The process's peak resident memory (ru_maxrss is in KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def output_row(row: PromptRow, result: Generation) -> dict[str, Any]:
    record: dict[str, Any] = {
        "id": row.id,
        "adapter": result.adapter,
        "prompt": row.prompt,
        "prediction": result.text,
    }
    if row.reference is not None:
        record["reference"] = row.reference
    record["finish_reason"] = result.finish_reason
    record["generated_tokens"] = result.generated_tokens
    return record


def score(jobs: Sequence[tuple[PromptRow, str]], results: Sequence[Generation]) -> dict[str, AdapterScore]:
    by_adapter: dict[str, list[tuple[str, str | None]]] = {}
    for (row, adapter), result in zip(jobs, results, strict=True):
        by_adapter.setdefault(adapter, []).append((result.text, row.reference))
    scores = {}
    for adapter, pairs in by_adapter.items():
        refs = [(p, r) for p, r in pairs if r is not None]
        scores[adapter] = AdapterScore(
            rows=len(pairs),
            with_reference=len(refs),
            exact_match=sum(metrics.exact_match(p, r) for p, r in refs) / len(refs) if refs else None,
            token_f1=sum(metrics.token_f1(p, r) for p, r in refs) / len(refs) if refs else None,
        )
    return scores
