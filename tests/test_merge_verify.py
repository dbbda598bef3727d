"""`--verify` (base + adapter un-merged in PEFT vs the merged folder in plain transformers, on a text and an
image probe) passes on real merges and fails on the failure users met in other tools: a merged folder
that silently holds the untuned weights. The cheap post-write check catches the same without torch."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from test_merge_support import family_of, make_adapter, projector, to_bf16_base
from vlmtune.merging import MergeError, merge
from vlmtune.merging.check import check_written
from vlmtune.merging.plan import build_plan
from vlmtune.merging.verify import verify


def test_verify_passes_and_is_recorded(tiny_model, family_name, tmp_path):
    base = tiny_model(family_name)
    adapter = make_adapter(
        base, tmp_path / "a", modules_to_save=[projector(family_of(base))], use_dora=family_name == "llava"
    )
    result = merge(base, adapter, tmp_path / "out", verify=True)
    v = result.verification
    assert v is not None and v["passed"] and v["discriminating"]
    assert set(v["probes"]) == {"text", "image"}
    assert v["max_abs_logit_diff"] < v["tolerance"] < v["adapter_effect"]
    recorded = json.loads((tmp_path / "out" / "vlmtune.json").read_text())["verification"]
    assert recorded["passed"] and recorded["max_abs_logit_diff"] == v["max_abs_logit_diff"]
    assert "verify:" in result.summary()


def test_verify_two_adapters_and_bf16(tiny_model, tmp_path):
    src = tiny_model("qwen2_5_vl")
    base = to_bf16_base(src, tmp_path / "bf16")
    a1 = make_adapter(
        base, tmp_path / "a1", seed=1, dtype=torch.bfloat16, modules_to_save=["model.visual.merger"]
    )
    a2 = make_adapter(base, tmp_path / "a2", seed=2, dtype=torch.bfloat16, use_rslora=True)
    result = merge(base, [a1, a2], tmp_path / "out", verify=True)
    assert result.verification["passed"] and result.verification["discriminating"]
    assert "earlier adapters merged by PEFT" in result.verification["reference"]


def test_untuned_weights_are_caught(tiny_model, tmp_path):
    """LLaMA-Factory #9051: the export wrote the base's weights. Replace the merged weights with the
    base's: both the float64 check and --verify's logits comparison must fail."""
    base = tiny_model("qwen2_vl")
    adapter = make_adapter(base, tmp_path / "a", modules_to_save=["model.visual.merger"])
    merge(base, adapter, tmp_path / "out")
    bad = tmp_path / "bad"
    shutil.copytree(tmp_path / "out", bad)
    shutil.copyfile(base / "model.safetensors", bad / "model.safetensors")
    plan = build_plan(base, [adapter])
    with pytest.raises(MergeError, match="check failed"):
        check_written(plan, bad)
    check_written(plan, tmp_path / "out")  # and the good one passes
    v = verify(base, plan.adapters, bad, "F32")
    assert not v["passed"] and v["max_abs_logit_diff"] > v["tolerance"]
    good = verify(base, plan.adapters, tmp_path / "out", "F32")
    assert good["passed"]


def test_check_catches_a_mis_scaled_tensor(tiny_model, tmp_path):
    """One merged tensor with its delta doubled (a wrong scaling) fails the float64 check."""
    import numpy as np

    from vlmtune import checkpoint

    base = tiny_model("mllama")
    adapter = make_adapter(base, tmp_path / "a")
    merge(base, adapter, tmp_path / "out")
    plan = build_plan(base, [adapter])
    target = next(t for t in plan.tensors if t.steps)
    info = checkpoint.tensor_index(tmp_path / "out")[target.name]
    src = checkpoint.tensor_index(base)[target.name]
    with open(src.file, "rb") as f:
        f.seek(src.start)
        w0 = np.frombuffer(f.read(src.nbytes), dtype=np.float32)
    with open(info.file, "r+b") as f:
        f.seek(info.start)
        w1 = np.frombuffer(f.read(info.nbytes), dtype=np.float32)
        f.seek(info.start)
        f.write((w0 + 2 * (w1 - w0)).astype(np.float32).tobytes())
    with pytest.raises(MergeError, match=target.name.replace(".", r"\.")):
        check_written(plan, tmp_path / "out")


def test_verify_refuses_fan_in_fan_out(tiny_model, tmp_path):
    from safetensors.torch import save_file

    base = tiny_model("qwen2_vl")
    module = "model.language_model.layers.0.self_attn.o_proj"
    g = torch.Generator().manual_seed(0)
    folder = tmp_path / "fifo"
    folder.mkdir()
    save_file(
        {
            f"base_model.model.{module}.lora_A.weight": torch.randn(4, 64, generator=g) * 0.05,
            f"base_model.model.{module}.lora_B.weight": torch.randn(64, 4, generator=g) * 0.05,
        },
        folder / "adapter_model.safetensors",
    )
    (folder / "adapter_config.json").write_text(
        json.dumps(
            {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": [module], "fan_in_fan_out": True}
        )
    )
    with pytest.raises(MergeError, match="fan_in_fan_out"):
        merge(base, folder, tmp_path / "out", verify=True)
    assert not (tmp_path / "out").exists()
