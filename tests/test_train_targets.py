"""Target selection: `--dry-run` counts (from module shapes on the meta device) equal what PEFT trains on the
real model; LoRA lands only in the roles asked for; settings that would do nothing are errors."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from transformers import AutoModelForImageTextToText
from typer.testing import CliRunner

from vlmtune import families
from vlmtune.adapters.targets import NO_LORA_TARGETS, TargetError, plan_targets
from vlmtune.cli import app
from vlmtune.config import ConfigError
from vlmtune.families.support import support
from vlmtune.training import dry_run

SETTINGS = {
    "default": {},
    "vision+full-projector": {"lora": {"targets": "language+vision"}, "projector": "full"},
    "projector-lora-dora": {"projector": "lora", "lora": {"dora": True, "r": 4}},
    "stage1-projector-only": {"language": "frozen", "projector": "full"},
    "vision-switch-rslora": {"vision": "lora", "lora": {"rslora": True, "r": 16}},
}


def config(base, **extra) -> dict:
    return {"model": str(base), "output_dir": "unused", "data": {"train": "unused.jsonl"}, **extra}


def linear_names(model, prefix: str, exclude: tuple[str, ...] = ()) -> set[str]:
    return {
        n
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and n.startswith(prefix + ".") and not n.startswith(exclude)
    }


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_dry_run_counts_equal_peft(tiny_model, family_name, setting):
    base = tiny_model(family_name)
    options = SETTINGS[setting]
    if options.get("projector") == "lora" and support(families.get(family_name))["projector LoRA"] != "yes":
        # The support table says this family cannot: the one-line error says what to use instead.
        with pytest.raises(TargetError, match=r"projector has no Linear layer .* use projector: full"):
            dry_run(config(base, **options))
        return
    plan = dry_run(config(base, **options))
    lora = {"r": 8, "dora": False, **options.get("lora", {})}

    model = AutoModelForImageTextToText.from_pretrained(base, dtype=torch.float32)
    peft_model = get_peft_model(
        model,
        LoraConfig(
            r=lora["r"],
            lora_alpha=16,
            target_modules=plan.target_regex,
            modules_to_save=plan.full_modules or None,
            use_dora=lora["dora"],
        ),
    )
    for name in plan.bare_parameters:  # no module to wrap: trained beside PEFT, as training does
        peft_model.get_base_model().get_parameter(name).requires_grad_(True)
    trainable, _ = peft_model.get_nb_trainable_parameters()
    assert plan.trainable_params == trainable

    wrapped = {
        n.removeprefix("base_model.model.") for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)
    }
    assert wrapped == set(plan.lora_modules)

    # Independent of the family's regexes: which Linear layers each role holds.
    family = families.get(family_name)
    reference = AutoModelForImageTextToText.from_pretrained(base, dtype=torch.float32)
    language = linear_names(reference, family.prefix_of("language"))
    vision = linear_names(
        reference, family.prefix_of("vision"), exclude=tuple(family.prefixes_of("projector"))
    )
    projector = {
        n
        for p in (p for r, p in family.role_prefixes if r == "projector")
        for n, m in reference.named_modules()
        if isinstance(m, torch.nn.Linear) and (n == p or n.startswith(p + "."))
    }
    expected: set[str] = set()
    if options.get("language") != "frozen":
        expected |= language
    if "vision" in str(options.get("lora", {}).get("targets", "")) or options.get("vision") == "lora":
        expected |= {
            n for n in vision if re.search(r"(layers|layer|blocks)\.\d+\.", n)
        }  # not patch/pos embeddings
    if options.get("projector") == "lora":
        expected |= projector
    assert wrapped == expected
    if options.get("projector") == "full":
        params = dict(reference.named_parameters())
        assert plan.bare_parameters == [n for n in family.bare_parameters if n in params]
        assert plan.full_params == {
            "projector": sum(
                p.numel()
                for n, p in params.items()
                if any(n.startswith(f + ".") for f in plan.full_modules) or n in plan.bare_parameters
            )
        }
    else:
        assert plan.bare_parameters == []
    if setting == "stage1-projector-only":
        assert plan.target_regex == NO_LORA_TARGETS and not plan.lora_modules


def test_dry_run_cli_lists_roles_and_counts(tiny_model, tmp_path):
    base = tiny_model("qwen2_vl")
    runner = CliRunner()
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {base}\noutput_dir: unused\ndata:\n  train: unused.jsonl\nprojector: full\n")
    text = runner.invoke(app, ["train", str(cfg), "--dry-run", "vision=lora"])
    as_json = runner.invoke(app, ["train", str(cfg), "--dry-run", "--json"])
    assert text.exit_code == 0, text.output
    assert "vision: 8 modules" in text.output and "language: 14 modules" in text.output
    assert "model.visual.merger" in text.output and "trainable parameters:" in text.output
    data = json.loads(as_json.output)
    assert data["full_modules"] == ["model.visual.merger"] and set(data["lora_roles"]) == {"language"}


def meta(family_name: str):
    from vlmtune import modeling, tiny

    model, _ = tiny.build(family_name)
    return modeling.meta_model({"model_type": model.config.model_type, **model.config.to_dict()})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"language": "frozen"}, "nothing would be trained"),
        ({"targets": "language+vision", "vision": "frozen"}, "vision: frozen"),
        ({"targets": "language+vision+projector", "projector": "full"}, "projector: full"),
        ({"targets": r"model\.language_model\..*q_proj", "vision": "lora"}, "would be ignored"),
        ({"targets": "q_proj"}, "as a suffix it would hit"),
        ({"targets": r"model\.visual\.patch_embed\.proj"}, "must be Linear"),
        ({"targets": r"model\.visual\.merger\.mlp\.0", "projector": "full"}, "inside the projector"),
        ({"targets": ["nothing_like_this"]}, "matches no module"),
        ({"targets": "[unclosed"}, "nor a valid regex"),
    ],
)
def test_settings_that_do_nothing_or_clash_are_errors(kwargs, message):
    with pytest.raises(TargetError, match=re.escape(message)):
        plan_targets(meta("qwen2_vl"), families.get("qwen2_vl"), **kwargs)


def test_projector_lora_without_linear_projector_is_an_error():
    family = families.get("qwen2_vl")
    no_linear = dataclasses.replace(
        family,
        lora_target_patterns={k: v for k, v in family.lora_target_patterns.items() if k != "projector"},
    )
    with pytest.raises(TargetError, match="projector has no Linear layer"):
        plan_targets(meta("qwen2_vl"), no_linear, projector="lora")


def test_image_limits_on_a_family_without_them_is_an_error(tiny_model):
    with pytest.raises(ConfigError, match="max_pixels would do nothing"):
        dry_run(config(tiny_model("llava"), image_limits={"max_pixels": 1000}))
