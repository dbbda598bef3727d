"""The demo's plumbing on a few steps (the accuracy claim is measured by `make demo`, see docs/training.md)."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from vlmtune.demo import COLOURS, SHAPES, chance, run_demo, write_split
from vlmtune.errors import VlmtuneError


def test_dataset_answers_match_what_is_drawn(tmp_path):
    path = write_split(tmp_path, "eval", 24, seed=5)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    for row in rows:
        question, answer = row["messages"][0]["content"], row["messages"][1]["content"]
        image = Image.open(tmp_path / row["images"][0]).convert("RGB")
        assert image.size == (56, 56)
        if "colour" in question:
            assert answer in COLOURS
            assert COLOURS[answer] in {
                c for _, c in image.getcolors(4096)
            }  # the shape's fill is in the image
        else:
            assert question == "<image>What shape is it?" and answer in SHAPES
    expected = sum(1 / 6 if "colour" in r["messages"][0]["content"] else 1 / 4 for r in rows) / len(rows)
    assert chance(path) == pytest.approx(expected)


def test_demo_runs_end_to_end_and_replaces_only_its_own_folder(tmp_path):
    out = tmp_path / "demo"
    report = run_demo(out, steps=4, train_rows=16, eval_rows=8)
    saved = json.loads((out / "report.json").read_text())
    assert saved == report
    assert {"accuracy_before", "accuracy_after", "chance", "train_seconds"} <= set(report)
    assert 0 <= report["accuracy_before"] <= 1 and 0 <= report["accuracy_after"] <= 1
    assert (out / "run" / "adapter" / "vlmtune.json").is_file()
    # The life cycle closes: the merged folder, loaded with plain transformers, answers as the adapter did.
    assert report["merged_answers_equal_unmerged"] == 1.0
    assert report["accuracy_merged"] == report["accuracy_after"]
    assert report["merge_verify_max_logit_diff"] < 1e-4
    assert (out / "merged" / "model.safetensors").is_file()

    run_demo(out, steps=2, train_rows=8, eval_rows=4)  # a second run replaces the first
    assert json.loads((out / "report.json").read_text())["steps"] == 2

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(VlmtuneError, match="was not made by `vlmtune demo`"):
        run_demo(foreign, steps=1)
    assert (foreign / "notes.txt").read_text() == "keep me"
