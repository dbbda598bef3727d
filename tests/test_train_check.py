"""`vlmtune train CONFIG --check`: passes on the normal config of every family, and names the module that
gets no gradient (a fully trained projector whose rows have no image) in a one-line error."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from vlmtune.cli import app
from vlmtune.demo import write_split
from vlmtune.errors import VlmtuneError
from vlmtune.training.check import check_gradients


def config(base, data, **extra) -> dict:
    return {
        "model": str(base),
        "output_dir": "unused",
        "data": {"train": str(data)},
        "batch_size": 2,
        "precision": "fp32",
        **extra,
    }


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_split(tmp_path_factory.mktemp("check"), "train", 4, 0)


def test_normal_configs_of_every_family_pass(tiny_model, family_name, data):
    report = check_gradients(config(tiny_model(family_name), data, projector="full"))
    assert report.modules["language"] and report.modules["projector"] and not report.dead


def test_a_projector_that_never_sees_an_image_is_named(tiny_model, tmp_path):
    text = tmp_path / "text.jsonl"
    text.write_text(
        "".join(
            json.dumps(
                {"messages": [{"role": "user", "content": f"Say {w}."}, {"role": "assistant", "content": w}]}
            )
            + "\n"
            for w in ("red", "blue")
        )
    )
    with pytest.raises(
        VlmtuneError, match=r"got no gradient on a real batch \(projector: model\.visual\.merger\)"
    ):
        check_gradients(config(tiny_model("qwen2_vl"), text, projector="full"))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"model: {tiny_model('qwen2_vl')}\noutput_dir: {tmp_path}/run\ndata:\n  train: {text}\nprojector: full\n"
    )
    result = CliRunner().invoke(app, ["train", str(cfg), "--check"])
    assert isinstance(result.exception, VlmtuneError) and "\n" not in str(result.exception)
    assert not (tmp_path / "run").exists()
