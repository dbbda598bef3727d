"""The run dir: its layout, which checkpoints are complete, and what `resume` resolves to.

```
OUTPUT_DIR/
  config.yaml            the resolved config
  data.json              data check summary (rows, skipped, truncated)
  metrics.jsonl          one line per log / eval event
  loss.png               train and eval loss
  checkpoints/step-N/    complete adapter dir + trainer state (optimizer, scheduler, RNG)
  adapter/               the final adapter dir
  status.json            who trains it (pid, host, start, max_steps), how it ended
  train.lock             flock-ed by the training process while it trains (the kernel drops it on exit)
```
The Trainer writes `checkpoints/checkpoint-N/`; a callback completes it and renames it to `step-N` (one
atomic rename), so a `step-N` folder is complete by construction and a killed save leaves only a
`checkpoint-N` that resume ignores and removes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import yaml

from ..adapters.save import missing_files
from ..config import ConfigError

CONFIG = "config.yaml"
DATA = "data.json"
METRICS = "metrics.jsonl"
PLOT = "loss.png"
CHECKPOINTS = "checkpoints"
ADAPTER = "adapter"
STEP = re.compile(r"^step-(\d+)$")
TRAINER_STATE = "trainer_state.json"
STATUS = "status.json"
LOCK = "train.lock"
# A run without status.json (written before it existed) counts as running while metrics.jsonl is this fresh.
FRESH_METRICS_S = 120
# Keys a resumed run may change; any other difference means it is a different run.
RESUME_MAY_CHANGE = frozenset(
    {
        "resume",
        "output_dir",
        "max_steps",
        "epochs",
        "logging_steps",
        "save_steps",
        "save_total_limit",
        "eval_steps",
        "report_to",
    }
)


def step_dir(run_dir: Path, step: int) -> Path:
    return run_dir / CHECKPOINTS / f"step-{step}"


def checkpoint_missing(path: Path) -> list[str]:
    """What a checkpoint lacks to be resumed from (adapter files and trainer state)."""
    missing = missing_files(path)
    if not (path / TRAINER_STATE).is_file():
        missing.append(TRAINER_STATE)
    return missing


def complete_checkpoints(run_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete `step-N` checkpoint, oldest first."""
    folder = run_dir / CHECKPOINTS
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = STEP.match(path.name)
        if match and path.is_dir() and not checkpoint_missing(path):
            found.append((int(match.group(1)), path))
    return sorted(found)


def remove_partial(run_dir: Path) -> list[Path]:
    """Delete what a killed save left behind (`checkpoint-N` that never became `step-N`)."""
    folder = run_dir / CHECKPOINTS
    removed = []
    if folder.is_dir():
        for path in folder.iterdir():
            if path.is_dir() and not STEP.match(path.name):
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed


def rotate(run_dir: Path, keep: int | None) -> None:
    """Keep the newest `keep` complete checkpoints."""
    if not keep:
        return
    for _, path in complete_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


def resolve_resume(run_dir: Path, resume: str | bool, config: dict[str, Any]) -> Path | None:
    """The checkpoint to resume from, or None for a fresh run; errors for every unsafe case."""
    if resume is not False and resume != "auto":
        path = Path(str(resume))
        if not path.is_dir():
            raise ConfigError(
                f"resume: {path} is not a folder; give a checkpoints/step-N folder, auto or false."
            )
        missing = checkpoint_missing(path)
        if missing:
            raise ConfigError(f"resume: {path} is not a complete checkpoint (missing {', '.join(missing)}).")
        _check_same_run(path.parent.parent, config)  # the run the checkpoint came from
        return path
    if not run_dir.exists() or not any(run_dir.iterdir()):
        return None
    if resume is False:
        raise ConfigError(
            f"output_dir {run_dir} exists and is not empty; choose another output_dir, or set resume: auto to "
            "continue the run in it."
        )
    if not (run_dir / CONFIG).is_file():
        raise ConfigError(
            f"output_dir {run_dir} is not empty and is not a vlmtune run dir (no {CONFIG}); choose another."
        )
    if (run_dir / ADAPTER).is_dir():
        raise ConfigError(
            f"the run in {run_dir} has finished ({ADAPTER}/ exists); choose another output_dir."
        )
    found = complete_checkpoints(run_dir)
    if not found:  # nothing to continue from (e.g. a start that failed its data check): start afresh
        return None
    _check_same_run(run_dir, config)
    return found[-1][1]


def _check_same_run(run_dir: Path, config: dict[str, Any]) -> None:
    saved_path = run_dir / CONFIG
    if not saved_path.is_file():
        return
    saved = yaml.safe_load(saved_path.read_text()) or {}
    diffs = [
        f"{key} ({old!r} -> {new!r})"
        for key, old, new in _diff(saved, config)
        if key.split(".")[0] not in RESUME_MAY_CHANGE
    ]
    if diffs:
        raise ConfigError(
            f"cannot resume the run in {run_dir}: its config differs in {', '.join(diffs)}; restore those "
            "settings or start a new output_dir."
        )


def _diff(old: Any, new: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in dict.fromkeys([*old, *new]):
            out.extend(_diff(old.get(key), new.get(key), f"{prefix}{key}."))
        return out
    return [] if old == new else [(prefix.rstrip("."), old, new)]


# -- run state (read by `vlmtune ui`; written by training.callbacks.RunStatus) -------------------------------


def write_status(run_dir: Path, status: dict[str, Any]) -> None:
    tmp = run_dir / f".{STATUS}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(status, indent=2) + "\n")
    os.replace(tmp, run_dir / STATUS)


def read_status(run_dir: Path) -> dict[str, Any]:
    try:
        status = json.loads((run_dir / STATUS).read_text())
    except (OSError, ValueError):
        return {}
    return status if isinstance(status, dict) else {}


def lock_held(run_dir: Path) -> bool:
    """Whether a training process holds `train.lock` now (a killed one cannot: the kernel releases it)."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): fall back to status.json and file times
        return False
    try:
        fd = os.open(run_dir / LOCK, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)  # closing drops our shared lock too
    return False


def run_state(run_dir: Path) -> str:
    """running | finished | resumable (stopped with a complete checkpoint) | failed (stopped without one)."""
    if (run_dir / ADAPTER).is_dir() and not missing_files(run_dir / ADAPTER):
        return "finished"
    if lock_held(run_dir):
        return "running"
    status = read_status(run_dir)
    metrics = run_dir / METRICS
    if not status and metrics.is_file() and time.time() - metrics.stat().st_mtime < FRESH_METRICS_S:
        return "running"
    return "resumable" if complete_checkpoints(run_dir) else "failed"
