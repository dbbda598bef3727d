"""The public surface: the verbs are plain typed functions, `import vlmtune` stays light, `vlmtune.adapters`
names its public pieces, and user mistakes on the command line are one-line VlmtuneErrors (no traceback)."""

from __future__ import annotations

import importlib
import inspect
import subprocess
import sys

import pytest
from typer.testing import CliRunner

import vlmtune
import vlmtune.adapters
from vlmtune.cli import app
from vlmtune.errors import VlmtuneError


def test_verbs_are_plain_functions_with_signatures():
    for verb in (vlmtune.train, vlmtune.merge, vlmtune.load):
        assert inspect.isfunction(verb)
        assert inspect.signature(verb).return_annotation != inspect.Signature.empty
    assert list(inspect.signature(vlmtune.load).parameters) == [
        "base",
        "adapters",
        "dtype",
        "device",
        "quantization",
        "mixed_batches",
        "default_adapter",
    ]
    importlib.import_module("vlmtune.merging.stream")  # importing implementation modules does not
    importlib.import_module("vlmtune.training.recipe")  # rebind the verbs
    assert inspect.isfunction(vlmtune.merge) and inspect.isfunction(vlmtune.train)


def test_load_signature_matches_the_engine():
    from vlmtune.infer import load

    assert inspect.signature(vlmtune.load).parameters.keys() == inspect.signature(load).parameters.keys()


def test_import_vlmtune_does_not_import_torch():
    code = "import sys, vlmtune, vlmtune.adapters, vlmtune.merging; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_adapters_exports_resolve():
    from vlmtune.adapters import rules

    data = {"RULES": rules.RULES}  # exported tables (no __name__): the module's own object
    for name in vlmtune.adapters.__all__:
        if name in data:
            assert getattr(vlmtune.adapters, name) is data[name]
        else:
            assert getattr(vlmtune.adapters, name).__name__ == name
    assert set(data) <= set(vlmtune.adapters.__all__)
    with pytest.raises(AttributeError):
        vlmtune.adapters.nothing_here  # noqa: B018


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["tiny", "qwen2_vl", "{tmp}/t", "--size", "huge"], "unknown size 'huge'"),
        (["tiny", "qwen2_vl", "{tmp}/t", "--layout", "flat"], "unknown layout 'flat'"),
        (["tiny", "qwen2_vl", "{tmp}/t", "--max-shard-size", "abc"], "'abc' is not a size"),
        (
            [
                "predict",
                "--model",
                "{tmp}/m",
                "--data",
                "{tmp}/d.jsonl",
                "--out",
                "{tmp}/p",
                "--batch-size",
                "0",
            ],
            "--batch-size must be at least 1",
        ),
        (["data", "check", "{tmp}/d.jsonl", "--loss-on", "everything"], "loss_on must be assistant or all"),
        (["demo", "--steps", "0", "--out", "{tmp}/demo"], "--steps must be at least 1"),
        (["train", "{tmp}/c.yaml", "scheduler=bogus"], "scheduler must be one of"),
    ],
)
def test_user_errors_are_one_line(tmp_path, args, message):
    (tmp_path / "d.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    (tmp_path / "c.yaml").write_text(f"model: m\noutput_dir: {tmp_path}/run\ndata:\n  train: d.jsonl\n")
    result = CliRunner().invoke(app, [a.format(tmp=tmp_path) for a in args])
    assert isinstance(result.exception, VlmtuneError), result.output
    assert message in str(result.exception) and "\n" not in str(result.exception)
    assert not (tmp_path / "t").exists() and not (tmp_path / "run").exists()


def test_inspect_base_on_a_model_folder_is_refused(tiny_model):
    result = CliRunner().invoke(app, ["inspect", str(tiny_model("qwen2_vl")), "--base", "x"])
    assert isinstance(result.exception, VlmtuneError)
    assert "is not an adapter folder" in str(result.exception)
