"""Across the verbs: what `vlmtune train` writes, `vlmtune.load` and `vlmtune merge` must take as it is.

A projector-only stage-1 adapter (language frozen, projector trained fully) has no LoRA layer at all; PEFT
marks it with `target_modules: "dummy-target-modules"`. Un-merged inference and the merge must treat it
like any other adapter.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

import vlmtune
from test_infer_fixtures import IMAGE_PROMPT, image, peft_logits
from vlmtune.demo import write_split
from vlmtune.infer import Request
from vlmtune.training import run


@pytest.fixture(scope="module")
def stage1(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("stage1")
    base = tiny_model("qwen2_vl")
    data = write_split(root / "data", "train", 16, seed=0)
    run_dir = run(
        {
            "model": str(base),
            "output_dir": str(root / "run"),
            "data": {"train": str(data)},
            "language": "frozen",
            "projector": "full",
            "lr": 5e-3,
            "max_steps": 2,
            "batch_size": 4,
            "save_steps": 2,
            "precision": "fp32",
        }
    )
    return base, run_dir / "adapter"


def test_projector_only_adapter_runs_unmerged_like_peft(stage1):
    base, adapter = stage1
    images = [image()]
    want = peft_logits(base, adapter, IMAGE_PROMPT, images)
    base_logits = peft_logits(base, None, IMAGE_PROMPT, images)
    assert (want - base_logits).abs().max() > 1e-3, "the trained projector changes the output"
    engine = vlmtune.load(base, {"s1": adapter}, device="cpu")
    (got,) = engine.logits(Request(IMAGE_PROMPT, images, "s1"))
    assert torch.allclose(got, want, atol=1e-5)


def test_projector_only_adapter_merges_to_the_trained_projector(stage1, tmp_path):
    base, adapter = stage1
    result = vlmtune.merge(base, adapter, tmp_path / "merged", verify=True)
    assert result.verification["passed"]
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    trained = load_file(adapter / "adapter_model.safetensors")
    for key, tensor in trained.items():
        disk = key.removeprefix("base_model.model.model.")  # on disk (hub layout): visual.merger...
        assert torch.equal(merged[disk], tensor), key
