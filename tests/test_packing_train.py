"""Packing inside `vlmtune train`: a packed run trains like the padded run of the same rows (same loss per
step under gradient accumulation, same real-token count), metrics.jsonl reports the padding ratio and real
tokens/s, planned batches (group_by_length, max_tokens_per_batch) train, `auto` says what it chose, and
`packing: on` for a family without an exact path is refused before anything is written."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from PIL import Image
from transformers import TrainerCallback

from vlmtune.adapters.manifest import read_manifest
from vlmtune.data.packing import PackingError
from vlmtune.training import run
from vlmtune.training.callbacks import read_metrics

WORDS = "the a red blue green small big circle square shape is on left right of and with near".split()


def varied_rows(root: Path, rows: int) -> Path:
    """Rows whose answers run from one word to a few dozen, with one or two images (or none)."""
    Image.new("RGB", (56, 56), (200, 30, 30)).save(root / "a.png")
    Image.new("RGB", (84, 56), (30, 30, 200)).save(root / "b.png")
    lines = []
    for i in range(rows):
        answer = " ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(1 + (i * 11) % 40))
        images = [["a.png"], ["a.png", "b.png"], []][i % 3]
        prompt = "<image>" * len(images) + "Describe it."
        lines.append(
            {
                "messages": [
                    {"role": "user", "content": prompt},
                    {"role": "assistant", "content": answer},
                ],
                "images": images,
            }
        )
    path = root / "train.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


class SeenLogs(TrainerCallback):
    """What every log callback (the progress bar's included) is handed."""

    def __init__(self) -> None:
        self.logs: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs or {}))


def config(base: Path, data: Path, out: Path, **extra) -> dict:
    return {
        "model": str(base),
        "output_dir": str(out),
        "data": {"train": str(data)},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "lr": 1e-3,
        "max_steps": 2,
        "batch_size": 3,
        "gradient_accumulation": 2,
        "save_steps": 100,
        "logging_steps": 1,
        "precision": "fp32",
        **extra,
    }


@pytest.fixture(scope="module")
def runs(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("packing-train")
    data = varied_rows(root, 12)
    base = tiny_model("qwen2_vl")
    out, seen = {}, {}
    for name, extra in {
        "padded": {"packing": "off"},
        "packed": {"packing": "on"},
        "grouped": {"packing": "off", "group_by_length": True},
        "budget": {"batch_size": 1, "max_tokens_per_batch": 400},
    }.items():
        seen[name] = SeenLogs()
        run_dir = run(config(base, data, root / name, **extra), callbacks=[seen[name]])
        out[name] = (run_dir, [r for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r])
    out["seen"] = seen
    return out


def test_packed_run_trains_like_the_padded_run(runs):
    (_, padded), (_, packed) = runs["padded"], runs["packed"]
    assert [r["step"] for r in packed] == [r["step"] for r in padded] == [1, 2]
    for a, b in zip(packed, padded, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-4)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-3)
        assert (
            a["tokens"] == b["tokens"]
        )  # real tokens: all of a packed row, the unpadded part of a padded one


def test_metrics_report_padding_ratio_and_real_tokens_per_second(runs):
    for name in ("padded", "packed", "grouped", "budget"):
        rows = runs[name][1]
        for row in rows:
            assert row["tokens_per_second"] > 0, name
            assert 0 <= row["padding_ratio"] < 1, name
        # The progress line prints the logs every callback is handed: the same step values.
        step_logs = [log for log in runs["seen"][name].logs if "loss" in log]
        assert [log["padding_ratio"] for log in step_logs] == [r["padding_ratio"] for r in rows], name
        assert all(log["tokens_per_second"] > 0 for log in step_logs), name
    assert all(r["padding_ratio"] == 0 for r in runs["packed"][1] + runs["budget"][1])
    assert all(r["padding_ratio"] > 0.1 for r in runs["padded"][1])
    summary = read_manifest(runs["packed"][0] / "adapter").training
    assert summary["packed"] is True
    assert {k: summary["config"][k] for k in ("packing", "group_by_length", "max_tokens_per_batch")} == {
        "packing": "on",
        "group_by_length": False,
        "max_tokens_per_batch": None,
    }
    budget = read_manifest(runs["budget"][0] / "adapter").training
    assert budget["packed"] is True and budget["config"]["max_tokens_per_batch"] == 400


def test_auto_pads_a_family_without_an_exact_path_and_says_so_once(tiny_model, tmp_path, caplog):
    data = varied_rows(tmp_path, 4)
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows if r["images"]))  # Mllama: no mixed batches
    with caplog.at_level(logging.INFO, logger="vlmtune.train"):
        run_dir = run(
            config(tiny_model("mllama"), data, tmp_path / "auto", max_steps=1, gradient_accumulation=1)
        )
    said = [r for r in caplog.records if "packing" in r.getMessage()]
    assert len(said) == 1 and said[0].levelno == logging.WARNING
    assert "falls back to padded batches" in said[0].getMessage()
    assert read_manifest(run_dir / "adapter").training["packed"] is False


def test_on_is_refused_before_anything_is_written(tiny_model, tmp_path):
    data = varied_rows(tmp_path, 3)
    out = tmp_path / "refused"
    with pytest.raises(PackingError, match="packing: on, but mllama has no exact packed path"):
        run(config(tiny_model("mllama"), data, out, packing="on", batch_size=1))
    assert not out.exists()


def test_auto_weighs_the_rows_packs_varied_ones_and_pads_rows_of_one_length(tiny_model, tmp_path, caplog):
    """`auto` packs where padded batches of the run's rows would be padding (varied answers) and pads
    where they would not (every row one image and a one-word answer): padding_stats of random batches."""
    from vlmtune.demo import write_split

    base = tiny_model("qwen2_vl")
    chosen = {}
    for name, data in {
        "varied": varied_rows(tmp_path, 6),
        "uniform": write_split(tmp_path / "u", "train", 6, 0),
    }.items():
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="vlmtune.train"):
            run_dir = run(config(base, data, tmp_path / name, max_steps=1, gradient_accumulation=1))
        said = [r.getMessage() for r in caplog.records if "packing" in r.getMessage()]
        chosen[name] = (read_manifest(run_dir / "adapter").training["packed"], said)
    assert chosen["varied"][0] is True
    packed, said = chosen["uniform"]
    assert packed is False and len(said) == 1 and said[0].startswith("packing: auto pads: padded batches")
