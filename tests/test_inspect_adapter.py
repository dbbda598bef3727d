"""`vlmtune inspect ADAPTER_DIR [--base BASE]`: format, ranks per module group, roles, fully trained
modules, size, fit to a base, and whether vLLM can serve the adapter as it is."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file
from typer.testing import CliRunner

from conftest import FAMILY_NAMES
from test_infer_fixtures import (
    LM_REGEX,
    PROJECTOR,
    VISION_REGEX,
    legacy_key,
    make_adapter,
    rewrite_keys,
    to_llava_format,
)
from vlmtune import families
from vlmtune.adapters.inspect import inspect_adapter
from vlmtune.cli import app
from vlmtune.inspection import inspect_path


@pytest.fixture(scope="module")
def made(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("inspect")
    qwen = tiny_model("qwen2_vl")
    return {
        "qwen": qwen,
        "llava": tiny_model("llava"),
        "mllama": tiny_model("mllama"),
        "projector": make_adapter(qwen, root / "projector", seed=41, modules_to_save=["model.visual.merger"]),
        "rank32": make_adapter(qwen, root / "rank32", seed=43, r=32, alpha=16, use_rslora=True),
        "vision": make_adapter(
            qwen, root / "vision", seed=44, target_modules=f"{LM_REGEX}|{VISION_REGEX['qwen2_vl']}"
        ),
        "dora": make_adapter(qwen, root / "dora", seed=45, use_dora=True),
        "head": make_adapter(qwen, root / "head", seed=46, target_modules=[r"q_proj", "lm_head"]),
        "root": root,
    }


def test_report_without_base(made):
    report = inspect_adapter(made["projector"])
    assert report["kind"] == "adapter" and report["format"] == "peft" and report["family"] == "qwen2_vl"
    assert report["made_for"] == str(made["qwen"])
    lora = report["lora"]
    assert lora["roles"] == ["language"] and lora["ranks"] == [4] and lora["modules"] == 14
    group = lora["groups"]["language r=4 alpha=8 scaling=2"]
    assert group["modules"] == 14 and group["kind"] == "linear"
    assert sorted(group["layers"]) == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    assert report["full_modules"]["roles"] == ["projector"]
    assert "model.visual.merger.mlp.0" in report["full_modules"]["modules"]
    tensors = load_file(made["projector"] / "adapter_model.safetensors")
    assert report["size"]["tensors"] == len(tensors)
    assert report["size"]["bytes"] == sum(t.numel() * t.element_size() for t in tensors.values())
    assert report["fit"]["checked"] is False
    assert report["key_layouts"] == ["runtime"]


def test_fit_to_a_base(made):
    good = inspect_adapter(made["projector"], base=made["qwen"])
    assert good["fit"]["fits"] is True and good["fit"]["lora_modules"] == 14
    assert good["fit"]["placed_tensors"] == good["size"]["tensors"]
    bad = inspect_adapter(made["vision"], base=made["llava"])
    assert bad["fit"]["fits"] is False
    assert "model.visual.blocks" in bad["fit"]["error"] and "cannot be placed" in bad["fit"]["error"]


def test_rslora_scaling_and_legacy_layout(made, tmp_path):
    report = inspect_adapter(made["rank32"])
    assert report["lora"]["use_rslora"] is True
    (group,) = report["lora"]["groups"].values()
    assert group["r"] == 32 and group["scaling"] == pytest.approx(16 / 32**0.5, abs=1e-6)
    legacy = rewrite_keys(made["vision"], tmp_path / "legacy", lambda k: legacy_key("qwen2_vl", k))
    report = inspect_adapter(legacy)
    assert report["key_layouts"] == ["original"]
    assert report["lora"]["roles"] == ["language", "vision"]


@pytest.fixture(scope="module", params=FAMILY_NAMES)
def per_family(request, tiny_model, tmp_path_factory):
    """One family's tiny base and three PEFT adapters on it: language LoRA, language LoRA plus the projector
    trained fully (modules_to_save), and language plus vision-tower LoRA (None where the family has none)."""
    name = request.param
    base = tiny_model(name)
    root = tmp_path_factory.mktemp(f"vllm-{name}")
    family = families.get(name)
    return {
        "name": name,
        "family": family,
        "base": base,
        "plain": make_adapter(base, root / "plain", seed=51),
        "projector": make_adapter(base, root / "projector", seed=52, modules_to_save=[PROJECTOR[name]]),
        "vision": make_adapter(
            base, root / "vision", seed=53, target_modules=f"{LM_REGEX}|{VISION_REGEX[name]}"
        )
        if "vision" in family.lora_target_patterns
        else None,
    }


def family_problem(family) -> list[str]:
    """The problems a plain adapter of this family has: the family's own declaration, or none."""
    return [family.vllm_unsupported] if family.vllm_unsupported else []


def test_vllm_verdict_of_a_language_lora_is_the_familys(per_family):
    for base in (None, per_family["base"]):
        report = inspect_adapter(per_family["plain"], base=base)
        assert report["family"] == per_family["name"]
        vllm = report["vllm"]
        want = family_problem(per_family["family"])
        assert (
            vllm["servable_as_is"] is (not want) and vllm["flags"] == ["--enable-lora"] and not vllm["notes"]
        )
        assert len(vllm["problems"]) == len(want)
        assert all(w in p for w, p in zip(want, vllm["problems"], strict=True)), vllm["problems"]
    assert report["fit"]["fits"] is True


def test_vllm_refuses_a_fully_trained_projector_of_every_family(per_family):
    vllm = inspect_adapter(per_family["projector"])["vllm"]
    assert vllm["servable_as_is"] is False
    (problem,) = [p for p in vllm["problems"] if "modules_to_save, which vLLM rejects" in p]
    assert PROJECTOR[per_family["name"]] in problem and "vlmtune merge" in problem
    assert len(vllm["problems"]) == 1 + len(family_problem(per_family["family"]))


def test_vllm_verdict_of_vision_lora_needs_the_tower_flag(per_family):
    if per_family["vision"] is None:
        pytest.skip(f"{per_family['name']} has no vision LoRA")
    report = inspect_adapter(per_family["vision"])
    assert report["lora"]["roles"] == ["language", "vision"]
    vllm = report["vllm"]
    assert vllm["servable_as_is"] is (not family_problem(per_family["family"]))
    assert len(vllm["problems"]) == len(family_problem(per_family["family"]))
    assert vllm["flags"] == ["--enable-lora", "--enable-tower-connector-lora"]
    assert "silently ignores it otherwise" in vllm["notes"][0]


def test_vllm_rank_above_the_default_needs_the_flag(made):
    rank32 = inspect_adapter(made["rank32"])["vllm"]
    assert rank32["servable_as_is"] and "--max-lora-rank 32" in rank32["flags"]


@pytest.mark.parametrize(
    ("adapter", "problem"),
    [
        ("dora", "DoRA adapter, which vLLM does not support"),
        ("head", "LoRA on lm_head, which vLLM rejects"),
    ],
)
def test_vllm_problems(made, adapter, problem):
    report = inspect_adapter(made[adapter])["vllm"]
    assert report["servable_as_is"] is False
    assert any(problem in p for p in report["problems"]), report["problems"]


def test_lm_head_lora_with_its_saved_base_weight(made):
    """PEFT saves lm_head's base weight beside LoRA on lm_head: reported as a copy, not as modules_to_save."""
    report = inspect_adapter(made["head"])
    assert report["base_weight_copies"] == ["lm_head.weight"]
    assert report["full_modules"]["modules"] == []
    assert "lm_head" in report["lora"]["roles"]
    assert not any("modules_to_save" in p for p in report["vllm"]["problems"])


def test_llava_format_and_mllama(made, tmp_path):
    peft_dir = make_adapter(
        made["llava"], tmp_path / "peft", seed=47, modules_to_save=["model.multi_modal_projector"]
    )
    llava_dir = to_llava_format(peft_dir, tmp_path / "llava-out")
    report = inspect_path(llava_dir, base=made["llava"])
    assert report["format"] == "llava" and report["family"] == "llava"
    assert report["key_layouts"] == ["llava_original"] and report["fit"]["fits"] is True
    assert report["full_modules"]["modules"] == [
        "model.multi_modal_projector.linear_1",
        "model.multi_modal_projector.linear_2",
    ]
    assert any("LLaVA training output" in p for p in report["vllm"]["problems"])
    mllama = make_adapter(made["mllama"], tmp_path / "mllama", seed=48)
    assert any("Mllama" in p for p in inspect_adapter(mllama)["vllm"]["problems"])


def test_family_guessed_from_keys_alone(made, tmp_path):
    anonymous = rewrite_keys(made["vision"], tmp_path / "anon", lambda k: k)
    config = json.loads((anonymous / "adapter_config.json").read_text())
    config.pop("base_model_name_or_path")
    (anonymous / "adapter_config.json").write_text(json.dumps(config))
    report = inspect_adapter(anonymous)
    assert report["family"] in ("qwen2_vl", "qwen2_5_vl") and report["lora"]["roles"] == [
        "language",
        "vision",
    ]


def test_cli_inspect_adapter(made):
    result = CliRunner().invoke(app, ["inspect", str(made["dora"]), "--base", str(made["qwen"]), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["lora"]["use_dora"] is True and report["fit"]["fits"] is True
    text = CliRunner().invoke(app, ["inspect", str(made["dora"])])
    assert text.exit_code == 0 and "servable_as_is: False" in text.stdout
