"""The dashboard's runs: states read from the run dir (lock, status.json, checkpoints, adapter), the runs
list, run page, metrics (downsampled, incremental, live while a tiny training runs in a thread, and as
server-sent events), compare, and the data view against the processor's own output."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml
from transformers import AutoProcessor, TrainerCallback

from test_ui_support import FAMILY, Page, copy_run, serve, tiny_run, train_config
from vlmtune import train as train_run
from vlmtune.demo import write_split
from vlmtune.errors import VlmtuneError
from vlmtune.training import rundir
from vlmtune.training.callbacks import RunStatus
from vlmtune.ui import UiSettings
from vlmtune.ui.runs import downsample, read_from, series


@pytest.fixture(scope="module")
def finished(tiny_model, tmp_path_factory) -> Path:
    return tiny_run(tiny_model(FAMILY), tmp_path_factory.mktemp("ui-runs"))


@pytest.fixture
def runs_root(finished, tmp_path) -> Path:
    root = tmp_path / "runs"
    root.mkdir()
    copy_run(finished, root / "done")
    copy_run(finished, root / "stopped", keep_adapter=False)
    copy_run(finished, root / "broken", keep_adapter=False, keep_checkpoints=False)
    (root / "not-a-run").mkdir()
    return root


def test_states_from_files(runs_root):
    assert rundir.run_state(runs_root / "done") == "finished"
    assert rundir.run_state(runs_root / "stopped") == "resumable"
    assert rundir.run_state(runs_root / "broken") == "failed"
    with RunStatus(runs_root / "stopped"):
        assert rundir.run_state(runs_root / "stopped") == "running"
        with pytest.raises(VlmtuneError, match=r"another process \(pid \d+ on .*\) is training"):
            RunStatus(runs_root / "stopped").__enter__()
    with pytest.raises(ZeroDivisionError), RunStatus(runs_root / "broken"):
        raise ZeroDivisionError("boom")
    assert rundir.run_state(runs_root / "broken") == "failed"
    assert rundir.read_status(runs_root / "broken")["error"] == "ZeroDivisionError: boom"


def test_killed_trainer_releases_the_lock(runs_root):
    """A training process killed with SIGKILL cannot report anything: the kernel drops its flock."""
    folder = runs_root / "stopped"
    code = (
        "import sys, time; from pathlib import Path; from vlmtune.training.callbacks import RunStatus\n"
        "with RunStatus(Path(sys.argv[1])):\n    print('locked', flush=True); time.sleep(120)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        assert rundir.run_state(folder) == "running"
        assert rundir.read_status(folder)["pid"] == proc.pid
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    assert rundir.run_state(folder) == "resumable"


def test_runs_list_and_run_page(runs_root, finished):
    with serve(UiSettings(runs=[runs_root])) as url:
        page = Page(url)
        listed = {r["id"]: r for r in page.get("/api/runs").json()["runs"]}
        assert set(listed) == {"runs/done", "runs/stopped", "runs/broken"}
        assert [listed[k]["state"] for k in ("runs/done", "runs/stopped", "runs/broken")] == [
            "finished",
            "resumable",
            "failed",
        ]
        rows = [json.loads(line) for line in (finished / "metrics.jsonl").read_text().splitlines()]
        last_loss = [r["loss"] for r in rows if "loss" in r][-1]
        assert listed["runs/done"]["step"] == 6 and listed["runs/done"]["loss"] == last_loss

        run = page.get("/api/run", params={"id": "runs/done"}).json()
        assert run["config"] == yaml.safe_load((finished / "config.yaml").read_text())
        assert run["data"] == json.loads((finished / "data.json").read_text())
        assert [(c["name"], c["complete"]) for c in run["checkpoints"]] == [
            ("step-3", True),
            ("step-6", True),
        ]
        assert run["adapter"] is True

        metrics = page.get("/api/run/metrics", params={"id": "runs/done"}).json()
        assert metrics["series"]["loss"] == [[r["step"], r["loss"]] for r in rows if "loss" in r]
        assert {"lr", "grad_norm", "tokens_per_second", "padding_ratio"} <= set(metrics["series"])
        png = page.get("/api/run/file", params={"id": "runs/done", "name": "loss.png"})
        assert png.status_code == 200 and png.content == (finished / "loss.png").read_bytes()
        assert page.get("/api/run", params={"id": "runs/nope"}).status_code == 404


def test_compare_overlays_and_diffs(runs_root, finished):
    config = yaml.safe_load((finished / "config.yaml").read_text())
    config["lr"] = 0.005
    (runs_root / "stopped" / "config.yaml").write_text(yaml.safe_dump(config))
    with serve(UiSettings(runs=[runs_root])) as url:
        data = Page(url).get("/api/compare", params={"ids": "runs/done,runs/stopped"}).json()
    assert data["config_diff"] == {"lr": [0.01, 0.005]}
    assert data["series"]["runs/done"]["loss"] == data["series"]["runs/stopped"]["loss"]


def test_downsampling_keeps_shape_and_extremes(tmp_path):
    rows = [{"step": i, "loss": 1.0 / (1 + i), "lr": 1e-3} for i in range(1, 10001)]
    rows[4321]["loss"] = 50.0  # a spike must survive
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    points = series(read_from(path)[0])["loss"]
    small = downsample(points, 2000)
    assert len(points) == 10000 and len(small) <= 2001
    assert small[0] == points[0] and small[-1] == points[-1]
    assert [4322, 50.0] in small and min(p[1] for p in small) == min(p[1] for p in points)
    assert [p[0] for p in small] == sorted(p[0] for p in small)


def test_incremental_reads_stop_at_complete_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')
    rows, offset, reset = read_from(path, 0)
    assert rows == [{"step": 1, "loss": 2.0}] and not reset
    with open(path, "a") as f:
        f.write('ss": 1.5}\n')
    rows, offset2, reset = read_from(path, offset)
    assert rows == [{"step": 2, "loss": 1.5}] and not reset and offset2 == path.stat().st_size
    path.write_text('{"step": 1, "loss": 2.0}\n')  # a resumed run rewrote the file shorter
    rows, _, reset = read_from(path, offset2)
    assert reset and rows == [{"step": 1, "loss": 2.0}]


class Gate(TrainerCallback):
    """Holds training at one step (after metrics.jsonl got it) until the test has looked."""

    def __init__(self, step: int) -> None:
        self.step, self.reached, self.release = step, threading.Event(), threading.Event()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.global_step == self.step and "loss" in (logs or {}):
            self.reached.set()
            assert self.release.wait(120), "the test never released the gate"


def test_live_metrics_while_training(tiny_model, tmp_path):
    base = tiny_model(FAMILY)
    root = tmp_path / "runs"
    data = write_split(tmp_path / "data", "train", 16, seed=1)
    gate = Gate(3)
    errors: list[BaseException] = []

    def train() -> None:
        try:
            train_run(train_config(base, data, root / "live", steps=6), callbacks=[gate])
        except BaseException as exc:
            errors.append(exc)
            gate.reached.set()

    root.mkdir()
    with serve(UiSettings(runs=[root])) as url:
        page = Page(url)
        thread = threading.Thread(target=train, daemon=True)
        thread.start()
        assert gate.reached.wait(300) and not errors, errors
        summary = page.get("/api/runs").json()["runs"][0]
        assert (summary["id"], summary["state"], summary["step"], summary["max_steps"]) == (
            "runs/live",
            "running",
            3,
            6,
        )
        assert summary["eta_s"] is not None
        first = page.get("/api/run/metrics", params={"id": "runs/live"}).json()
        assert [p[0] for p in first["series"]["loss"]] == [1, 2, 3]
        with page.http.stream("GET", "/api/run/events", params={"id": "runs/live"}) as events:
            lines = events.iter_lines()
            event = next(lines)
            assert event == "event: metrics"
            assert [p[0] for p in json.loads(next(lines)[len("data: ") :])["series"]["loss"]] == [1, 2, 3]
            gate.release.set()
            seen = []
            for line in lines:  # the stream ends by itself once the run stops running
                if line.startswith("data: "):
                    seen.append(json.loads(line[len("data: ") :]))
        thread.join(300)
        assert not errors, errors
        states = [e["state"] for e in seen if "state" in e]
        assert states[-1] == "finished"
        later = page.get("/api/run/metrics", params={"id": "runs/live", "offset": first["offset"]}).json()
        assert not later["reset"] and [p[0] for p in later["series"]["loss"]] == [4, 5, 6]
        assert page.get("/api/runs").json()["runs"][0]["state"] == "finished"


def test_data_view_is_what_the_collator_makes(finished, tmp_path, runs_root):
    """Image span = the image tokens the processor inserts; supervised tokens = the answer + end of turn."""
    with serve(UiSettings(runs=[runs_root])) as url:
        view = Page(url).get("/api/run/data", params={"id": "runs/done", "count": 2}).json()
    config = yaml.safe_load((finished / "config.yaml").read_text())
    rows = [json.loads(line) for line in Path(config["data"]["train"]).read_text().splitlines()]
    processor = AutoProcessor.from_pretrained(config["model"], **config["image_limits"])
    from PIL import Image

    for shown, row in zip(view["rows"], rows[:2], strict=True):
        image = Image.open(Path(config["data"]["train"]).parent / row["images"][0]).convert("RGB")
        messages = [
            {
                "role": "user",
                "content": [{"type": "image"}, {"type": "text", "text": row["messages"][0]["content"][7:]}],
            },
            {"role": "assistant", "content": [{"type": "text", "text": row["messages"][1]["content"]}]},
        ]
        text = processor.apply_chat_template(messages, tokenize=False)
        ids = list(processor(text=[text], images=[image])["input_ids"][0])
        assert shown["tokens"] == len(ids)
        assert shown["image_tokens"] == ids.count(processor.image_token_id) > 0
        image_spans = [s for s in shown["spans"] if s["kind"] == "image"]
        assert sum(s["count"] for s in image_spans) == shown["image_tokens"]
        labels = "".join(s["text"] for s in shown["spans"] if s["kind"] == "label")
        assert labels.strip().startswith(row["messages"][1]["content"])
        assert shown["images"][0]["src"].startswith("data:image/png;base64,")
        assert shown["warnings"] == []

    # The same row with a max_length that cuts its answer: a warning, and the cut tokens marked.
    length = view["rows"][0]["tokens"]
    config["max_length"] = length - 2
    cut = copy_run(finished, runs_root / "short")
    (cut / "config.yaml").write_text(yaml.safe_dump(config))
    with serve(UiSettings(runs=[runs_root])) as url:
        view = Page(url).get("/api/run/data", params={"id": "runs/short", "count": 1}).json()
    row = view["rows"][0]
    assert row["warnings"] and f"max_length={length - 2}: the last 2 are cut" in row["warnings"][0]
    assert sum(s["count"] for s in row["spans"] if s["cut"]) == 2
