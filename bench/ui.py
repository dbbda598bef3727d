"""`vlmtune ui` benchmark: how long the dashboard's server takes to answer a run page of a 10k-step run.

Opening a run page asks for the run's details and its (downsampled) curves; the browser then draws at most
~2000 points per curve (about 25 ms for 10k raw points, measured in the browser test's Chromium). This
script writes a 10k-row `metrics.jsonl`, serves it with the real app (in-process HTTP client) and times both
requests together, as the page makes them. Goal: the whole page in under a second.

    python bench/ui.py [--steps 10000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from fastapi.testclient import TestClient

from vlmtune.ui.app import UiSettings, create_app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp())
    run = root / "big"
    run.mkdir()
    (run / "config.yaml").write_text("model: x\noutput_dir: big\n")
    row = {"lr": 1e-3, "grad_norm": 0.5, "tokens_per_second": 1000.0, "padding_ratio": 0.1}
    lines = (json.dumps({"step": i, "loss": 1.0 / (1 + i), **row}) + "\n" for i in range(1, args.steps + 1))
    (run / "metrics.jsonl").write_text("".join(lines))
    client = TestClient(create_app(UiSettings(runs=[root])), base_url="http://127.0.0.1")
    run_id = client.get("/api/runs").json()["runs"][0]["id"]
    times, points = [], 0
    for _ in range(args.repeats):
        start = time.perf_counter()
        details = client.get("/api/run", params={"id": run_id})
        curves = client.get("/api/run/metrics", params={"id": run_id})
        times.append(time.perf_counter() - start)
        details.raise_for_status()
        curves.raise_for_status()
        points = len(curves.json()["series"]["loss"])
    median = statistics.median(times)
    print(
        f"{args.steps} steps: run page answered in {median:.3f} s (median of {args.repeats}), {points} loss points sent"
    )
    print(f"goal (< 1 s for the page): {'met' if median + 0.025 < 1.0 else 'missed'}")


if __name__ == "__main__":
    main()
