"""Two processes on CPU (gloo), the same config as one process: DDP and FSDP2 give the adapter a single
process gives (same global batch, seed; <= 1e-5 in fp32; FSDP2 also with a bf16 base, see BF16_TOL), with
text-only rows that leave a rank without any image in some steps (the every-rank image row, no hang); under
FSDP2 with a bf16 base no unit mixes the fp32 trained weights with the bf16 base; the save integrity check
fails a deliberately broken gather; a 2-process run (DDP and FSDP2) killed after a checkpoint and resumed
equals the uninterrupted one, from an FSDP2 checkpoint that holds every rank's part; QLoRA (4-bit, bf16 quant
storage) under FSDP2 gives the single-process QLoRA adapter.

FSDP2 on CPU runs accelerate's own FSDP2 path (`fsdp2_prepare_model`, wrap asserted before step 1): only
accelerate's device gate is switched (see vlmtune.training.distributed). Slow: each launch costs the imports
of two processes, so there are eleven, on the tiny Qwen2-VL, 10 steps at most (2-4 min on 2 cores).
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
# bf16: relative (Frobenius) distance of all adapter tensors. Measured 1.9e-3; one process at bf16 with the
# same batch as two accumulated halves differs from itself by 1.6e-3 (bf16 rounding of one padded batch vs
# two rows), bf16 from fp32 by 2.6e-3. Not max |diff|: Adam moves each weight by up to lr per step, so bf16
# noise in a near-zero gradient reaches half the size of the trained lora_B values (5e-3 here).
BF16_TOL = 1e-2


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
    if cfg.get("distributed") == "fsdp2":
        class Units(TrainerCallback):  # torch's own record of each FSDP2 unit's parameters, before step 1
            def on_step_begin(self, args, state, control, model=None, **kwargs):
                from torch.distributed.fsdp import FSDPModule
                if getattr(self, "done", False) or rank:
                    return
                self.done, groups, seen = True, [], set()
                path = {id(m): n for n, m in model.named_modules()}
                for m in model.modules():
                    group = m._get_fsdp_state()._fsdp_param_group if isinstance(m, FSDPModule) else None
                    if group is not None and id(group) not in seen:
                        seen.add(id(group))
                        groups.append([[path[id(p._module_info.module)] + "." + p._module_info.param_name,
                                        str(p.sharded_param.dtype), p.sharded_param.requires_grad]
                                       for p in group.fsdp_params])
                with open(log + ".units", "w") as f:
                    json.dump(groups, f)
        callbacks.append(Units())
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


def assert_close(a: dict, b: dict, tol: float = 1e-5, relative: bool = False) -> None:
    assert sorted(a) == sorted(b)
    if relative:
        worst = (sum(((a[k] - b[k]) ** 2).sum() for k in a) / sum((b[k] ** 2).sum() for k in a)).sqrt().item()
    else:
        worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst <= tol, worst
    assert max(a[k].abs().max().item() for k in a if "lora_B" in k) > 1e-3  # it did train


@pytest.fixture(scope="module")
def single(setup):
    """The single-process adapter, by precision (each trained once)."""
    base, data, root = setup
    made: dict[str, dict] = {}

    def get(precision: str = "fp32") -> dict[str, torch.Tensor]:
        if precision not in made:
            made[precision] = adapter(
                run(config(base, data, root / f"single-{precision}", precision=precision))
            )
        return made[precision]

    return get


@pytest.fixture(scope="module")
def two(setup):
    """The run dir of an uninterrupted 2-process run, by strategy and precision (each launched once)."""
    base, data, root = setup
    made: dict[str, Path] = {}

    def get(
        strategy: str, precision: str = "fp32", checkpointing: bool = False, packing: str = "auto"
    ) -> Path:
        name = f"{strategy}-{precision}" + ("-checkpointing" if checkpointing else "") + f"-{packing}"
        if name not in made:
            out = root / name
            # `auto` pads here (one row per process: nothing to unpad); `on` runs the packed path
            extra = {"gradient_checkpointing": True} if checkpointing else {}
            extra["packing"] = packing
            done = torchrun(root, config(base, data, out, distributed=strategy, precision=precision, **extra))
            assert done.returncode == 0, done.stderr[-3000:]
            made[name] = out
        return made[name]

    return get


@pytest.mark.parametrize(
    ("strategy", "precision", "tol", "checkpointing", "packing"),
    [
        ("ddp", "fp32", 1e-5, False, "auto"),
        ("ddp", "fp32", 1e-5, False, "on"),
        ("fsdp2", "fp32", 1e-5, False, "auto"),
        ("fsdp2", "bf16", BF16_TOL, False, "auto"),
        # FSDP's own activation checkpointing (blocks in torch's CheckpointWrapper, the trained leaves units
        # inside them): the same adapter, saved under the names without the wrapper's prefix.
        ("fsdp2", "fp32", 1e-5, True, "auto"),
    ],
    ids=["ddp", "ddp-packed", "fsdp2", "fsdp2-bf16", "fsdp2-checkpointing"],
)
def test_two_processes_equal_one(setup, single, two, strategy, precision, tol, checkpointing, packing):
    root = setup[2]
    out = two(strategy, precision, checkpointing, packing)
    assert_close(adapter(out), single(precision), tol, relative=precision == "bf16")
    manifest = json.loads((out / "adapter" / "vlmtune.json").read_text())
    assert manifest["training"]["world_size"] == 2 and manifest["training"]["steps"] == STEPS
    text_only = [json.loads(line) for line in (root / f"{out.name}-plain.jsonl").read_text().splitlines()]
    assert text_only, "no step left a rank without an image: the data does not test the image row"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-10", "step-5"]


def test_qlora_under_fsdp2_equals_one_process(setup):
    """4-bit NF4 weights stored as bf16 (so FSDP2 can shard them; uint8 storage is the known crash / NaN):
    two processes give the single-process QLoRA adapter (bf16 tolerance, see BF16_TOL; measured 1.7e-3)."""
    base, data, root = setup
    qlora = {"precision": "bf16", "quantization": "4bit", "max_steps": 4, "save_steps": 2}
    one = adapter(run(config(base, data, root / "qlora-single", **qlora)))
    out = root / "qlora-fsdp2"
    done = torchrun(root, config(base, data, out, distributed="fsdp2", **qlora))
    assert done.returncode == 0, done.stderr[-3000:]
    assert_close(adapter(out), one, BF16_TOL, relative=True)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [row["loss"] for row in rows if "loss" in row]
    assert len(losses) == 4 and all(0 < loss < 100 for loss in losses)  # finite, not the loss-0 failure
    # torch's record of the FSDP2 units: the sharded 4-bit weights are stored as bf16, never uint8
    units = json.loads((root / "qlora-fsdp2-plain.jsonl.units").read_text())
    packed = {dtype for group in units for name, dtype, _ in group if name.endswith("base_layer.weight")}
    assert packed == {"torch.bfloat16"}


def test_fsdp2_units_keep_trained_fp32_apart_from_the_bf16_base(setup, two):
    """torch's own record of the units (read inside the run, before step 1): each LoRA factor and the
    projector's trained copy a unit of their own, in fp32; every other unit frozen bf16; none mixed."""
    out = two("fsdp2", "bf16")
    units = json.loads((setup[2] / f"{out.name}-plain.jsonl.units").read_text())
    trained, frozen = [], []
    for params in units:
        kinds = {(dtype, grad) for _, dtype, grad in params}
        assert len(kinds) == 1, params  # one dtype, all trained or all frozen
        (trained if params[0][2] else frozen).append(params)
    assert {params[0][1] for params in trained} == {"torch.float32"}
    assert {params[0][1] for params in frozen} == {"torch.bfloat16"}
    names = [n for params in trained for n, _, _ in params]
    lora = [params for params in trained if "lora_" in params[0][0]]
    assert all(len(p) == 1 for p in lora)  # one factor per unit
    assert len(lora) == sum("lora_" in k for k in adapter(out)) > 0
    assert all("modules_to_save" in n for params in trained if params not in lora for n, _, _ in params)
    assert len(names) == len(adapter(out))  # every trained tensor is in a trained unit
    assert len(frozen) >= 4  # language and vision blocks at least


def test_a_broken_gather_fails_the_save_on_every_rank(setup):
    base, data, root = setup
    out = root / "broken"
    done = torchrun(root, config(base, data, out, distributed="fsdp2", max_steps=2, save_steps=1), "broken")
    assert done.returncode != 0
    assert "save integrity check failed" in done.stderr and "differs from the live parameter" in done.stderr
    assert not (out / "adapter").exists()
    assert not any(p.name.startswith("step-") for p in (out / "checkpoints").iterdir())


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_kill_after_a_checkpoint_and_resume_equals_uninterrupted(setup, two, strategy):
    base, data, root = setup
    out = root / f"resumed-{strategy}"
    killed = torchrun(root, config(base, data, out, distributed=strategy), "kill")
    assert killed.returncode != 0 and (out / "checkpoints" / "step-5").is_dir()
    assert not (out / "adapter").exists()
    if strategy == "fsdp2":
        fsdp_checkpoint_is_complete(out / "checkpoints" / "step-5")
    resumed = torchrun(root, config(base, data, out, distributed=strategy))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_close(adapter(out), adapter(two(strategy)), tol=1e-6)


def fsdp_checkpoint_is_complete(step: Path) -> None:
    """What an FSDP2 resume restores holds every rank's part (not rank 0's slice: accelerate PR #4206): the
    trained weights in the Trainer's `pytorch_model_fsdp.bin` (accelerate's gather) equal the adapter file
    (ours), and every Adam moment in `optimizer.bin` has its parameter's full shape and is non-zero in each
    rank's half."""
    written = load_file(step / "adapter_model.safetensors")
    weights = torch.load(step / "pytorch_model_fsdp.bin", weights_only=True)
    as_saved = {k.replace("modules_to_save.", "").replace(".default", ""): v for k, v in weights.items()}
    assert sorted(as_saved) == sorted(written)
    assert all(torch.equal(v, written[k]) for k, v in as_saved.items())
    state = torch.load(step / "optimizer.bin", weights_only=True)["state"]
    assert sorted(state) == sorted(weights)
    for name, moments in state.items():
        for moment in ("exp_avg", "exp_avg_sq"):
            assert moments[moment].shape == weights[name].shape, name
            assert all(half.abs().max() > 0 for half in moments[moment].chunk(2)), (name, moment)
