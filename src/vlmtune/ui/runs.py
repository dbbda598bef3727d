"""Run dirs as the dashboard shows them: found under the `--runs` folders and read from their files on every
request (the run dir layout and its states live in `vlmtune.training.rundir`), so a run started from the
command line appears, and nothing is lost when the browser or the dashboard goes away."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..training import rundir

# metrics.jsonl keys that are not curves.
NOT_SERIES = ("step", "epoch", "tokens")
SCAN_DEPTH = 3
TAIL_BYTES = 64 * 1024


@dataclass(frozen=True)
class Run:
    id: str  # '<root label>' or '<root label>/<path below it>': what URLs name the run by
    path: Path
    root: Path


def is_run_dir(path: Path) -> bool:
    return (path / rundir.CONFIG).is_file() and any(
        (path / name).exists() for name in (rundir.METRICS, rundir.CHECKPOINTS, rundir.ADAPTER, rundir.STATUS)
    )


def root_labels(roots: Sequence[Path]) -> list[str]:
    labels: list[str] = []
    for root in roots:
        label = root.resolve().name or "runs"
        while label in labels:
            label += "_"
        labels.append(label)
    return labels


def discover(roots: Sequence[Path]) -> dict[str, Run]:
    """Every run dir in or below each root (up to SCAN_DEPTH levels; hidden folders and a run's own
    checkpoints skipped), by id."""
    found: dict[str, Run] = {}
    for label, root in zip(root_labels(roots), roots, strict=True):
        root = root.resolve()
        stack = [(root, 0)]
        while stack:
            folder, depth = stack.pop()
            if is_run_dir(folder):
                rel = folder.relative_to(root).as_posix()
                run_id = label if rel == "." else f"{label}/{rel}"
                found[run_id] = Run(run_id, folder, root)
                continue
            if depth >= SCAN_DEPTH:
                continue
            try:
                children = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
            except OSError:
                continue
            stack.extend((child, depth + 1) for child in reversed(children) if not child.is_symlink())
    return dict(sorted(found.items()))


# -- metrics.jsonl ------------------------------------------------------------------------------------------
def read_from(path: Path, offset: int = 0) -> tuple[list[dict[str, Any]], int, bool]:
    """(rows, next offset, reset) of the complete lines after byte `offset`. A file that shrank or changed
    under the offset (a resumed run rewrites it) is read from the start with reset=True. Unlike
    `callbacks.read_metrics` this never sees a half-written last line: it stops at the last newline."""
    try:
        size = path.stat().st_size
    except OSError:
        return [], 0, offset > 0
    reset = False
    with open(path, "rb") as f:
        if offset > size or (offset > 0 and _byte_before(f, offset) != b"\n"):
            offset, reset = 0, True
        f.seek(offset)
        data = f.read(size - offset)
    end = data.rfind(b"\n") + 1
    rows = []
    for line in data[:end].splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows, offset + end, reset


def _byte_before(f: Any, offset: int) -> bytes:
    f.seek(offset - 1)
    return f.read(1)


def last_rows(path: Path) -> list[dict[str, Any]]:
    """The rows in the last TAIL_BYTES of the file (what a summary needs, without reading 10k steps)."""
    try:
        size = path.stat().st_size
    except OSError:
        return []
    start = max(0, size - TAIL_BYTES)
    with open(path, "rb") as f:
        f.seek(start)
        data = f.read()
    lines = data.splitlines()[1:] if start else data.splitlines()
    rows = []
    for line in lines:
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return [r for r in rows if isinstance(r, dict)]


def series(rows: Sequence[dict[str, Any]]) -> dict[str, list[list[float]]]:
    """{key: [[step, value], ...]} for every numeric metric."""
    out: dict[str, list[list[float]]] = {}
    for row in rows:
        step = row.get("step")
        if not isinstance(step, int | float):
            continue
        for key, value in row.items():
            if key in NOT_SERIES or isinstance(value, bool) or not isinstance(value, int | float):
                continue
            if math.isfinite(value):
                out.setdefault(key, []).append([step, value])
    return out


def downsample(points: list[list[float]], max_points: int) -> list[list[float]]:
    """At most ~max_points points that keep each bucket's first, min and max (spikes stay visible)."""
    if len(points) <= max_points or max_points < 4:
        return points
    buckets = max_points // 3
    size = len(points) / buckets
    out: list[list[float]] = []
    for b in range(buckets):
        chunk = points[int(b * size) : int((b + 1) * size)]
        if not chunk:
            continue
        keep = {0: chunk[0]}
        low = min(range(len(chunk)), key=lambda i: chunk[i][1])
        high = max(range(len(chunk)), key=lambda i: chunk[i][1])
        keep[low], keep[high] = chunk[low], chunk[high]
        out.extend(keep[i] for i in sorted(keep))
    if out[-1] is not points[-1]:
        out.append(points[-1])
    return out


def metrics(run: Run, offset: int = 0, max_points: int = 2000) -> dict[str, Any]:
    rows, next_offset, reset = read_from(run.path / rundir.METRICS, offset)
    curves = series(rows)
    total = {k: len(v) for k, v in curves.items()}
    return {
        "offset": next_offset,
        "reset": reset or offset == 0,
        "rows": len(rows),
        "points": total,
        "series": {k: downsample(v, max_points) for k, v in curves.items()},
    }


# -- summaries ----------------------------------------------------------------------------------------------
def read_config(run: Run) -> dict[str, Any]:
    try:
        config = yaml.safe_load((run.path / rundir.CONFIG).read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return config if isinstance(config, dict) else {}


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def summary(run: Run) -> dict[str, Any]:
    """What the runs list shows: state, step of max, ETA, tokens/s, latest losses."""
    state = rundir.run_state(run.path)
    status = rundir.read_status(run.path)
    config = read_config(run)
    rows = last_rows(run.path / rundir.METRICS)
    last = {}
    for row in rows:  # the latest value of each key
        last.update({k: v for k, v in row.items() if v is not None})
    step = last.get("step", 0)
    max_steps = status.get("max_steps") or config.get("max_steps")
    metrics_file = run.path / rundir.METRICS
    updated = metrics_file.stat().st_mtime if metrics_file.is_file() else None
    eta = None
    started, first = status.get("started"), status.get("start_step", 0) or 0
    if state == "running" and max_steps and started and updated and step > first:
        per_step = (updated - started) / (step - first)
        eta = max(0.0, per_step * (max_steps - step) - (time.time() - updated))
    return {
        "id": run.id,
        "state": state,
        "model": config.get("model"),
        "step": step,
        "max_steps": max_steps,
        "eta_s": round(eta, 1) if eta is not None else None,
        "tokens_per_second": last.get("tokens_per_second"),
        "loss": last.get("loss"),
        "eval_loss": last.get("eval_loss"),
        "updated": updated,
        "error": status.get("error") if state != "finished" else None,
    }


def checkpoints(run: Run) -> list[dict[str, Any]]:
    folder = run.path / rundir.CHECKPOINTS
    complete = {path.name for _, path in rundir.complete_checkpoints(run.path)}
    out = []
    if folder.is_dir():
        for path in sorted(folder.iterdir(), key=lambda p: (len(p.name), p.name)):
            if not path.is_dir():
                continue
            files = [p for p in path.rglob("*") if p.is_file()]
            out.append(
                {
                    "name": path.name,
                    "complete": path.name in complete,
                    "missing": [] if path.name in complete else rundir.checkpoint_missing(path),
                    "files": len(files),
                    "bytes": sum(p.stat().st_size for p in files),
                }
            )
    return out


def details(run: Run) -> dict[str, Any]:
    """The run page: summary, resolved config, data report, checkpoints, final adapter."""
    config_path = run.path / rundir.CONFIG
    adapter = run.path / rundir.ADAPTER
    return {
        **summary(run),
        "path": str(run.path),
        "config": read_config(run),
        "config_text": config_path.read_text() if config_path.is_file() else "",
        "data": read_json(run.path / rundir.DATA),
        "status": rundir.read_status(run.path),
        "checkpoints": checkpoints(run),
        "adapter": adapter.is_dir(),
        "has_plot": (run.path / rundir.PLOT).is_file(),
    }


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for key, item in value.items():
            out.update(flatten(item, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): value}


def compare(runs: Sequence[Run], max_points: int = 1000) -> dict[str, Any]:
    """Curves of several runs (to overlay) and the config keys whose values differ between them."""
    configs = [flatten(read_config(r)) for r in runs]
    keys = sorted({k for c in configs for k in c})
    missing = object()
    differ = [k for k in keys if len({json.dumps(c.get(k, missing), default=str) for c in configs}) > 1]
    return {
        "runs": [r.id for r in runs],
        "config_diff": {k: [c.get(k) for c in configs] for k in differ if k != "output_dir"},
        "series": {r.id: metrics(r, 0, max_points)["series"] for r in runs},
    }
