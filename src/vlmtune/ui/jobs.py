"""Background merges started from the dashboard: `vlmtune.merge(..., verify=True)` in a thread, writing only
`MERGE_DIR/NAME` (MERGE_DIR named at start-up, NAME from a safe charset). The merge publishes its folder by
one rename at the end, so the folders under MERGE_DIR are the truth about finished merges (listed from
their `vlmtune.json`); the in-memory job list only adds the progress of merges still running."""

from __future__ import annotations

import re
import threading
import time
import traceback
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..errors import VlmtuneError

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")


class JobBusy(VlmtuneError):
    """A merge is already running (one at a time: a merge uses every core)."""


@dataclass
class Job:
    id: str
    name: str
    base: str
    adapters: list[str]
    out: str
    verify: bool
    state: str = "running"  # running | done | failed
    started: float = field(default_factory=time.time)
    ended: float | None = None
    shards_written: list[str] = field(default_factory=list)
    phase: str = "planning"
    summary: str | None = None
    error: str | None = None
    verification: dict[str, Any] | None = None


class MergeJobs:
    def __init__(self, merge_dir: Path | None) -> None:
        self.merge_dir = merge_dir.absolute() if merge_dir else None
        self.jobs: dict[str, Job] = {}
        self.lock = threading.Lock()

    def start(self, base: str | Path, adapters: list[Path], name: str, verify: bool = True) -> Job:
        if self.merge_dir is None:
            raise VlmtuneError(
                "merging is off: start the dashboard with --merge-dir DIR to allow merges into DIR."
            )
        if not NAME.match(name) or name in (".", ".."):
            raise VlmtuneError(
                f"output name {name!r}: use letters, digits, '_', '-' and '.' (up to 64, not starting with '.')."
            )
        out = self.merge_dir / name
        with self.lock:
            if any(j.state == "running" for j in self.jobs.values()):
                raise JobBusy("a merge is running; wait for it to end (one at a time).")
            if out.exists():
                raise VlmtuneError(f"{out} exists; choose another name.")
            job = Job(uuid.uuid4().hex[:12], name, str(base), [str(a) for a in adapters], str(out), verify)
            self.jobs[job.id] = job
        threading.Thread(target=self._run, args=(job,), name=f"merge-{name}", daemon=True).start()
        return job

    def _run(self, job: Job) -> None:
        from ..merging import merge

        def progress(shard: str) -> None:
            job.shards_written.append(shard)
            job.phase = "writing shards"

        try:
            job.phase = "writing shards"
            result = merge(job.base, job.adapters, job.out, verify=job.verify, progress=progress)
        except VlmtuneError as exc:
            job.state, job.error = "failed", str(exc)
        except Exception as exc:  # a bug: keep the trace for the report
            job.state, job.error = "failed", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"
        else:
            job.state, job.summary, job.verification = "done", result.summary(), result.verification
        job.phase = job.state
        job.ended = time.time()

    def get(self, job_id: str) -> Job:
        try:
            return self.jobs[job_id]
        except KeyError:
            raise VlmtuneError(f"no merge job {job_id!r}.") from None

    def merged_folders(self) -> list[dict[str, Any]]:
        """Finished merges on disk (any that a previous dashboard or `vlmtune merge` wrote there)."""
        from .runs import read_json

        if self.merge_dir is None or not self.merge_dir.is_dir():
            return []
        out = []
        for folder in sorted(self.merge_dir.iterdir()):
            manifest = read_json(folder / "vlmtune.json") if folder.is_dir() else None
            if folder.name.startswith(".") or not isinstance(manifest, dict):
                continue
            out.append({"name": folder.name, "path": str(folder), "manifest": manifest})
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "merge_dir": str(self.merge_dir) if self.merge_dir else None,
            "jobs": [asdict(j) for j in sorted(self.jobs.values(), key=lambda j: -j.started)],
            "merged": self.merged_folders(),
        }
