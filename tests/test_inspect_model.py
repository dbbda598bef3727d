"""`vlmtune inspect MODEL_DIR` and the command line's error handling."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save
from transformers import AutoModelForImageTextToText
from typer.testing import CliRunner

from vlmtune import checkpoint, families
from vlmtune.cli import app
from vlmtune.inspection import inspect_model


def test_report_counts_equal_the_loaded_model(family_name, tiny_model):
    folder = tiny_model(family_name)
    report = inspect_model(folder)
    model = AutoModelForImageTextToText.from_pretrained(folder)
    family = families.get(family_name)
    assert report["family"] == family_name
    assert report["architecture"] == type(model).__name__
    assert report["parameters"]["total"] == sum(p.numel() for p in model.parameters())
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    for role in ("vision", "projector", "language", "lm_head"):
        expected = [m for n, m in linears if family.role_of(n) == role]
        if not expected:  # e.g. Gemma 3's projector: a bare weight, no Linear layer
            assert role not in report["linear_layers"], role
            continue
        assert report["linear_layers"][role]["modules"] == len(expected), role
        assert report["linear_layers"][role]["params"] == sum(
            p.numel() for m in expected for p in m.parameters()
        )
    targeted = [m for n, m in linears if re.fullmatch(family.default_target_regex, n)]
    assert report["default_lora_targets"]["modules"] == len(targeted)
    assert report["default_lora_targets"]["params"] == sum(
        p.numel() for m in targeted for p in m.parameters()
    )
    assert report["default_lora_targets"]["roles"] == ["language"]
    assert report["tied_embeddings"] is False
    assert report["weights"]["tensors"] == len(model.state_dict())


def test_inspect_reports_tied_embeddings_and_layout(tiny_model):
    tied = inspect_model(tiny_model("qwen2_vl", tied=True))
    assert tied["tied_embeddings"] is True
    runtime = inspect_model(tiny_model("llava", layout="runtime"))
    assert runtime["weights"]["layout"] == "runtime"
    assert inspect_model(tiny_model("llava"))["weights"]["layout"] == "original"


def test_cli_inspect_json(tiny_model):
    result = CliRunner().invoke(app, ["inspect", str(tiny_model("llava")), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["family"] == "llava"
    assert report["linear_layers"]["projector"]["modules"] == 2


def test_cli_tiny_writes_a_folder(tmp_path):
    result = CliRunner().invoke(app, ["tiny", "qwen2_5_vl", str(tmp_path / "m"), "--seed", "1"])
    assert result.exit_code == 0, result.output
    assert inspect_model(tmp_path / "m")["family"] == "qwen2_5_vl"


def test_unsupported_model_is_one_line_not_a_traceback(tmp_path):
    folder = tmp_path / "fuyu"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "fuyu"}))
    result = subprocess.run(
        [sys.executable, "-m", "vlmtune", "inspect", str(folder)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert "fuyu" in lines[0]
    for name in families.FAMILIES:
        assert name in lines[0]


@pytest.fixture(scope="module")
def servable(tiny_model):
    return tiny_model("qwen2_vl")


def test_a_complete_model_folder_is_vllm_servable(servable):
    assert inspect_model(servable)["vllm"] == {"servable": True, "problems": []}


def broken_copy(base, tmp_path, **changes):
    """A copy of the tiny base with `changes` applied: file name -> None (removed) or new bytes/JSON."""
    out = tmp_path / "model"
    shutil.copytree(base, out)
    for name, value in changes.items():
        if value is None:
            (out / name).unlink()
        elif isinstance(value, dict):
            (out / name).write_text(json.dumps(value))
        else:
            (out / name).write_bytes(value)
    return out


@pytest.mark.parametrize(
    ("what", "problem"),
    [
        ("no_template", "no chat template"),
        ("no_tokenizer", "no tokenizer file"),
        ("no_processor", "no image processor config"),
        ("architecture", "not Qwen2VLForConditionalGeneration: vLLM picks its model class"),
        ("adapter_files", "still holds PEFT adapter parts (adapter_config.json)"),
        ("peft_keys", "still holds PEFT adapter parts (base_model.model."),
        ("pickled", "holds only pickled .bin weights"),
    ],
)
def test_model_folder_vllm_cannot_serve_says_why(servable, tmp_path, what, problem):
    config = json.loads((servable / "config.json").read_text())
    tensors = load_file(servable / "model.safetensors")
    changes: dict = {
        "no_template": {"chat_template.jinja": None},
        "no_tokenizer": {"tokenizer.json": None},
        "no_processor": {"processor_config.json": None},
        "architecture": {"config.json": {**config, "architectures": ["Qwen2VLForCausalLM"]}},
        "adapter_files": {"adapter_config.json": {"peft_type": "LORA"}},
        "peft_keys": {"model.safetensors": save({f"base_model.model.{k}": v for k, v in tensors.items()})},
        "pickled": {"model.safetensors": None},
    }[what]
    folder = broken_copy(servable, tmp_path, **changes)
    if what == "pickled":
        torch.save(tensors, folder / "pytorch_model.bin")
    report = inspect_model(folder)["vllm"]
    assert report["servable"] is False
    assert len(report["problems"]) == 1 and problem in report["problems"][0], report["problems"]
    assert "\n" not in report["problems"][0]


def test_hub_id_is_judged_without_its_weights(servable, tmp_path, monkeypatch):
    """A hub id is inspected from its *.json / *.jinja files alone: missing weights are not a vLLM problem."""
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    for f in servable.iterdir():
        if f.suffix in (".json", ".jinja"):
            shutil.copy(f, snapshot / f.name)
    monkeypatch.setattr(checkpoint, "resolve", lambda path, allow_patterns=None: snapshot)
    report = inspect_model("someone/tiny-qwen2-vl")
    assert "error" in report["weights"]
    assert report["vllm"] == {
        "servable": True,
        "problems": [],
        "note": "weights not checked (not downloaded)",
    }
    (snapshot / "chat_template.jinja").unlink()
    assert "no chat template" in inspect_model("someone/tiny-qwen2-vl")["vllm"]["problems"][0]
