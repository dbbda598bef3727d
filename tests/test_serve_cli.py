"""`vlmtune serve` on the command line: the bind rule before anything loads, and the vLLM hand-off."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from test_infer_fixtures import LM_REGEX, PROJECTOR, VISION_REGEX, make_adapter
from vlmtune.cli import app


@pytest.fixture(scope="module")
def folders(tiny_model, tmp_path_factory):
    base = tiny_model("qwen2_vl")
    root = tmp_path_factory.mktemp("serve-cli")
    return base, {
        "lm": make_adapter(base, root / "lm", seed=1, r=32),
        "vis": make_adapter(
            base, root / "vis", seed=2, target_modules=f"{VISION_REGEX['qwen2_vl']}|{LM_REGEX}"
        ),
        "proj": make_adapter(base, root / "proj", seed=3, modules_to_save=[PROJECTOR["qwen2_vl"]]),
    }


def test_non_loopback_bind_without_a_key_is_refused_before_loading(folders):
    base, _ = folders
    env = {k: v for k, v in os.environ.items() if k != "VLMTUNE_API_KEY"}
    done = subprocess.run(
        [sys.executable, "-m", "vlmtune", "serve", "--model", str(base), "--host", "0.0.0.0", "--port", "1"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert done.returncode == 2
    assert "refusing to listen on 0.0.0.0 without a key" in done.stderr
    assert "Traceback" not in done.stderr


def test_print_vllm(folders):
    base, adapters = folders
    args = ["serve", "--model", str(base), "--print-vllm"]
    for name, path in adapters.items():
        args += ["--adapter", f"{name}={path}"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    command, *notes = result.output.strip().splitlines()
    assert command.startswith(
        f"vllm serve {base} --enable-lora --enable-tower-connector-lora --lora-modules "
    )
    assert f"lm={adapters['lm']}" in command and f"vis={adapters['vis']}" in command
    assert "proj=" not in command
    assert command.endswith("--max-lora-rank 32 --max-loras 2")
    assert len(notes) == 1 and notes[0].startswith("# proj") and "modules_to_save" in notes[0]


def test_start_up_adapter_with_pickled_weights_is_refused_before_loading(folders, tmp_path):
    """Servers never unpickle, not even start-up adapters with `weights_only`: one line, exit 2."""
    import shutil

    import torch
    from safetensors.torch import load_file

    base, adapters = folders
    pickled = tmp_path / "pickled"
    shutil.copytree(adapters["lm"], pickled)
    weights = pickled / "adapter_model.safetensors"
    torch.save(load_file(weights), pickled / "adapter_model.bin")
    weights.unlink()
    done = subprocess.run(
        [sys.executable, "-m", "vlmtune", "serve", "--model", str(base), "--adapter", f"p={pickled}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2
    assert done.stderr.startswith(f"error: --adapter p={pickled} holds pickled weights (adapter_model.bin)")
    assert len(done.stderr.strip().splitlines()) == 1
