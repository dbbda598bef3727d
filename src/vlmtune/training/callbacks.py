"""Trainer callbacks: complete checkpoints, metrics.jsonl (+ tokens/s), loss.png, epoch-seeded augmentation."""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from ..adapters.manifest import Manifest
from ..adapters.save import complete
from ..errors import VlmtuneError
from . import integrity, rundir

# Trainer log keys -> metrics.jsonl keys.
RENAME = {"learning_rate": "lr"}
SKIP = {"epoch", "num_input_tokens_seen", "total_flos"}


class CompleteCheckpoints(TrainerCallback):
    """After the Trainer saved `checkpoint-N` (adapter, optimizer, scheduler, RNG, trainer state): add the
    processor files and the manifest, then rename it to `step-N` in one atomic step and rotate old ones."""

    def __init__(
        self,
        run_dir: Path,
        processor: Any,
        manifest_for: Callable[[Any], Manifest],
        keep: int | None,
    ) -> None:
        self.run_dir = run_dir
        self.processor = processor
        self.manifest_for = manifest_for
        self.keep = keep

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        written = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        # Every process has written its part (its RNG state) and re-reads the adapter against its live
        # parameters before rank 0 makes the folder a checkpoint (see vlmtune.training.integrity).
        integrity.barrier()
        integrity.check_saved(kwargs["model"], written)
        if state.is_world_process_zero:
            self.complete(written, state)
        integrity.barrier()

    def complete(self, written: Path, state: Any) -> None:
        complete(written, self.processor, self.manifest_for(state))
        target = rundir.step_dir(self.run_dir, state.global_step)
        if target.exists():  # the same step saved again (a resumed run that ends where it was cut)
            shutil.rmtree(target)
        os.replace(written, target)
        rundir.rotate(self.run_dir, self.keep)


class MetricsLog(TrainerCallback):
    """Append every log and eval event to metrics.jsonl with step, loss, lr, grad_norm, tokens/s, eval_loss.

    On resume the lines after the resumed step are dropped first, so the file reads as one run."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if not state.is_world_process_zero:
            return
        kept = [row for row in read_metrics(self.path) if row.get("step", 0) <= state.global_step]
        self.path.write_text("".join(json.dumps(row) + "\n" for row in kept))

    def on_log(
        self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any
    ) -> None:
        if not state.is_world_process_zero or not logs:
            return
        entry: dict[str, Any] = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4)}
        step_log = "loss" in logs
        for key, value in logs.items():
            # Trainer adds run-so-far averages to step logs; the interval rate (VlmTrainer.log) is what a curve needs.
            if key not in SKIP and not (step_log and key in ("train_runtime", "train_tokens_per_second")):
                entry[RENAME.get(key, key)] = value
        if "loss" in logs:  # tokens_per_second and padding_ratio come with the log (VlmTrainer.log)
            entry["tokens"] = state.num_input_tokens_seen or 0
        with open(self.path, "a") as f:
            f.write(json.dumps(entry) + "\n")


class EpochSeed(TrainerCallback):
    """Tell the dataset which epoch runs, so per-sample augmentation seeds are (seed, epoch, index)."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def on_epoch_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.dataset.epoch = math.floor((state.epoch or 0.0) + 1e-6)


class RunStatus(TrainerCallback):
    """`with RunStatus(run_dir): trainer.train(); save...` holds `train.lock` (flock) while training and records in
    status.json who trains (pid, host), from which step to which, and how it ended (finished | failed).
    The lock is what tells a reader (`vlmtune ui`) that the run is alive: a killed process cannot keep it.
    Only the rank-0 process writes."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir
        self.fd: int | None = None
        self.status: dict[str, Any] = {}
        self.rank0 = int(os.environ.get("RANK", "0")) == 0

    def __enter__(self) -> RunStatus:
        if not self.rank0:
            return self
        import fcntl

        self.fd = os.open(self.run_dir / rundir.LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            self.fd = None
            other = rundir.read_status(self.run_dir)
            raise VlmtuneError(
                f"another process (pid {other.get('pid')} on {other.get('host')}) is training in {self.run_dir}; "
                "wait for it to end or choose another output_dir."
            ) from None
        self.status = {
            "state": "running",
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.time(),
        }
        rundir.write_status(self.run_dir, self.status)
        return self

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.fd is not None:
            self.status.update(start_step=state.global_step, max_steps=state.max_steps)
            rundir.write_status(self.run_dir, self.status)

    def __exit__(self, kind: Any, exc: BaseException | None, tb: Any) -> None:
        if self.fd is None:
            return
        self.status.update(state="failed" if exc is not None else "finished", ended=time.time())
        if exc is not None:
            self.status["error"] = f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
        try:
            rundir.write_status(self.run_dir, self.status)
        finally:
            os.close(self.fd)  # releases the lock
            self.fd = None


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_loss(metrics_path: Path, out: Path) -> Path | None:
    """loss.png: train loss (and eval loss when present) against step."""
    rows = read_metrics(metrics_path)
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    if not train and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss")
    if evals:
        ax.plot(*zip(*evals, strict=True), marker="o", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = out.with_name(out.name + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, out)
    return out
