"""Resume: a run SIGKILLed right after a checkpoint (Qwen2-VL; the other families crash in-process) and
resumed with `resume: auto` ends with the same adapter (<= 1e-6, fp32) as an uninterrupted run with the same
seed — with dropout, augmentation, gradient accumulation and epoch boundaries in play. Unsafe resumes are
errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from vlmtune import families
from vlmtune.config import ConfigError
from vlmtune.demo import write_split
from vlmtune.training import run

KILL_AT = 4
STEPS = 6


def config(base, data, out) -> dict:
    return {
        "model": str(base),
        "output_dir": str(out),
        "data": {"train": str(data), "eval_split": 0.2},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.1},
        "projector": "full",
        "augment": True,
        "lr": 5e-3,
        "warmup": 1,
        "max_steps": STEPS,  # 16 train rows / (batch 4 x accumulation 2) = 2 steps per epoch: 3 epochs
        "batch_size": 4,
        "gradient_accumulation": 2,
        "save_steps": 2,
        "eval_steps": 3,
        "logging_steps": 1,
        "precision": "fp32",
        "seed": 7,
    }


KILLER = textwrap.dedent(
    """
    import json, os, signal, sys
    import torch
    from transformers import TrainerCallback
    from vlmtune.training import run

    class KillAfterCheckpoint(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.global_step == {kill_at}:
                os.kill(os.getpid(), signal.SIGKILL)

    torch.set_num_threads(1)
    run(json.loads(sys.argv[1]), callbacks=[KillAfterCheckpoint()])
    """
)


def tensors(folder):
    return load_file(folder / "adapter_model.safetensors")


def test_killed_after_checkpoint_then_resumed_equals_uninterrupted(tiny_model, tmp_path):
    base = tiny_model("qwen2_vl")
    data = write_split(tmp_path / "data", "train", 20, seed=3)

    straight = run(config(base, data, tmp_path / "straight"))

    cut = tmp_path / "cut"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    killed = subprocess.run(
        [
            sys.executable,
            "-c",
            KILLER.replace("{kill_at}", str(KILL_AT)),
            json.dumps(config(base, data, cut)),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert sorted(p.name for p in (cut / "checkpoints").iterdir()) == ["step-2", "step-4"]
    assert not (cut / "adapter").exists()
    # A save that was cut short leaves a checkpoint-N folder; resume must ignore and remove it.
    partial = cut / "checkpoints" / "checkpoint-6"
    partial.mkdir()
    (partial / "adapter_model.safetensors").write_bytes(b"half")

    resumed = run(config(base, data, cut))  # resume: auto is the default
    assert not partial.exists()

    expected, got = tensors(straight / "adapter"), tensors(resumed / "adapter")
    assert expected.keys() == got.keys() and len(expected) > 10
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-6, msg=key)
    start = tensors(straight / "checkpoints" / "step-2")
    assert any(not torch.equal(start[k], expected[k]) for k in expected)  # training moved the weights

    # metrics.jsonl reads as one run: each step's train log once, same losses as the uninterrupted run.
    def losses(run_dir):
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return [(r["step"], round(r["loss"], 5)) for r in rows if "loss" in r]

    assert losses(resumed) == losses(straight) and [s for s, _ in losses(straight)] == list(
        range(1, STEPS + 1)
    )


def test_unsafe_resumes_are_errors(tiny_model, tmp_path):
    base = tiny_model("qwen2_vl")
    data = write_split(tmp_path / "data", "train", 12, seed=1)
    cfg = {**config(base, data, tmp_path / "run"), "max_steps": 2, "save_steps": 1, "eval_steps": None}
    cfg["data"] = {"train": str(data)}
    run_dir = run(cfg)

    with pytest.raises(ConfigError, match="has finished"):
        run(cfg)
    with pytest.raises(ConfigError, match="not empty"):
        run({**cfg, "resume": False})

    # Continue from an explicit checkpoint, but only with the same settings.
    step1 = run_dir / "checkpoints" / "step-1"
    other = {**cfg, "output_dir": str(tmp_path / "other"), "resume": str(step1)}
    with pytest.raises(ConfigError, match=r"its config differs in lr \(0.005 -> 0.001\);"):
        run({**other, "lr": 1e-3})
    continued = run(other)
    assert json.loads((continued / "adapter" / "vlmtune.json").read_text())["training"]["steps"] == 2
    for key, value in tensors(run_dir / "adapter").items():
        torch.testing.assert_close(tensors(continued / "adapter")[key], value, rtol=0, atol=1e-6)

    (step1 / "trainer_state.json").unlink()
    other["output_dir"] = str(tmp_path / "third")
    with pytest.raises(ConfigError, match="not a complete checkpoint"):
        run(other)


class CrashAfterCheckpoint(TrainerCallback):
    """An in-process stand-in for a kill: the run dies right after checkpoint `step` is complete."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt


@pytest.mark.parametrize("family", ["qwen2_5_vl", "llava", "mllama", "llava_next"])
def test_crash_after_checkpoint_then_resume_equals_uninterrupted(tiny_model, tmp_path, family):
    base = tiny_model(family)
    data = write_split(tmp_path / "data", "train", 20, seed=3)
    straight = run(config(base, data, tmp_path / "straight"))
    with pytest.raises(KeyboardInterrupt):
        run(config(base, data, tmp_path / "cut"), callbacks=[CrashAfterCheckpoint(KILL_AT)])
    assert not (tmp_path / "cut" / "adapter").exists()
    resumed = run(config(base, data, tmp_path / "cut"))
    expected, got = tensors(straight / "adapter"), tensors(resumed / "adapter")
    assert expected.keys() == got.keys()
    # A bare parameter trained in full (llava_next's image_newline) resumes from its checkpoint value too.
    assert all(f"base_model.model.{n}" in got for n in families.get(family).bare_parameters)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-6, msg=key)
