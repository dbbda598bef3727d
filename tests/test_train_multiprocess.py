"""Two processes on CPU (gloo), the same config as one process: DDP and FSDP2 give the adapter a single
process gives (same global batch, seed; <= 1e-5), with text-only rows that leave a rank without any image in
some steps (the every-rank image row, no hang); the save integrity check fails a deliberately broken gather;
a 2-process run killed after a checkpoint and resumed equals the uninterrupted one.

FSDP2 on CPU runs accelerate's own FSDP2 path (`fsdp2_prepare_model`, wrapped blocks asserted before step
1): only accelerate's device gate is switched (see vlmtune.training.distributed). Slow: each launch costs
the imports of two processes, so there are five, on the tiny Qwen2-VL, 10 steps at most.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vlmtune.demo import write_split
from vlmtune.training import run

pytestmark = pytest.mark.slow
STEPS = 10
TIMEOUT = 900  # a hang fails the test instead of the suite


def config(base: Path, data: Path, out: Path, **extra) -> dict:
    return {
        "model": str(base),
        "output_dir": str(out),
        "data": {"train": str(data)},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
        "projector": "full",
        "lr": 1e-3,
        "max_steps": STEPS,
        "batch_size": 2,  # global: one row per process
        "save_steps": 5,
        "logging_steps": 1,
        "precision": "fp32",
        "seed": 3,
        **extra,
    }


@pytest.fixture(scope="module")
def setup(tiny_model, tmp_path_factory):
    """A tiny Qwen2-VL, and rows of which a third are text only (so some steps give a rank no image)."""
    root = tmp_path_factory.mktemp("mp")
    data = write_split(root / "data", "train", 16, 0)
    words = ("red", "blue", "green", "cross", "yellow", "circle", "square", "triangle")
    text = [
        {"messages": [{"role": "user", "content": f"Say {w}."}, {"role": "assistant", "content": w}]}
        for w in words
    ]
    data.write_text(data.read_text() + "".join(json.dumps(t) + "\n" for t in text))
    return tiny_model("qwen2_vl"), data, root


SCRIPT = textwrap.dedent(
    """
    import json, os, signal, sys
    import torch
    torch.set_num_threads(1)
    from transformers import TrainerCallback
    from vlmtune.training import batches, integrity, run

    cfg, mode, log = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
    rank = int(os.environ["RANK"])
    callbacks = []
    added = batches.ImageInEveryBatch.__call__

    def recording(self, items):  # note each step in which this rank drew no image
        if not any(i.sample.images for i in items):
            with open(log, "a") as f:
                f.write(json.dumps({"rank": rank}) + "\\n")
        return added(self, items)

    batches.ImageInEveryBatch.__call__ = recording
    if mode == "broken":  # every rank writes its own fill instead of the trained values
        def broken(model):
            return {n: torch.full_like(p.full_tensor() if hasattr(p, "full_tensor") else p, float(rank + 1))
                    for n, p in model.named_parameters() if p.requires_grad}
        integrity.gather_adapter = broken
    if mode == "kill":
        class Kill(TrainerCallback):
            def on_save(self, args, state, control, **kwargs):
                if state.global_step == 5 and rank == 0:
                    os.kill(os.getpid(), signal.SIGKILL)
        callbacks.append(Kill())
    run(cfg, callbacks=callbacks)
    """
)


def torchrun(tmp: Path, cfg: dict, mode: str = "plain") -> subprocess.CompletedProcess:
    script = tmp / "child.py"
    script.write_text(SCRIPT)
    log = tmp / f"{Path(cfg['output_dir']).name}-{mode}.jsonl"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [*command, str(script), json.dumps(cfg), mode, str(log)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=env,
    )


def adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "adapter" / "adapter_model.safetensors")


def assert_close(a: dict, b: dict, tol: float = 1e-5) -> None:
    assert sorted(a) == sorted(b)
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= tol, worst
    assert max(a[k].abs().max().item() for k in a if "lora_B" in k) > 1e-3  # it did train


@pytest.fixture(scope="module")
def single(setup):
    base, data, root = setup
    return adapter(run(config(base, data, root / "single")))


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_processes_equal_one(setup, single, strategy):
    base, data, root = setup
    out = root / strategy
    done = torchrun(root, config(base, data, out, distributed=strategy))
    assert done.returncode == 0, done.stderr[-3000:]
    assert_close(adapter(out), single)
    manifest = json.loads((out / "adapter" / "vlmtune.json").read_text())
    assert manifest["training"]["world_size"] == 2 and manifest["training"]["steps"] == STEPS
    text_only = [json.loads(line) for line in (root / f"{strategy}-plain.jsonl").read_text().splitlines()]
    assert text_only, "no step left a rank without an image: the data does not test the image row"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-10", "step-5"]


def test_a_broken_gather_fails_the_save_on_every_rank(setup):
    base, data, root = setup
    out = root / "broken"
    done = torchrun(root, config(base, data, out, distributed="fsdp2", max_steps=2, save_steps=1), "broken")
    assert done.returncode != 0
    assert "save integrity check failed" in done.stderr and "differs from the live parameter" in done.stderr
    assert not (out / "adapter").exists()
    assert not any(p.name.startswith("step-") for p in (out / "checkpoints").iterdir())


def test_kill_after_a_checkpoint_and_resume_equals_uninterrupted(setup):
    base, data, root = setup
    out = root / "resumed"
    killed = torchrun(root, config(base, data, out), "kill")
    assert killed.returncode != 0 and (out / "checkpoints" / "step-5").is_dir()
    assert not (out / "adapter").exists()
    resumed = torchrun(root, config(base, data, out))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_close(adapter(out), adapter(root / "ddp"), tol=1e-6)
