"""The family registry against the real transformers models it describes."""

from __future__ import annotations

import re

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForImageTextToText

from vlmtune import checkpoint, families
from vlmtune.errors import VlmtuneError
from vlmtune.families import UnsupportedModelError


def load(folder):
    return AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32)


def linear_names(model) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]


def test_detect_by_model_type(family_name, tiny_model):
    config = checkpoint.read_config(tiny_model(family_name))
    assert families.detect(config).name == family_name
    model = load(tiny_model(family_name))
    assert families.detect(model.config).name == family_name
    assert type(model).__name__ == families.get(family_name).architecture


def test_unsupported_model_type_names_the_supported_families():
    with pytest.raises(UnsupportedModelError) as err:
        families.detect({"model_type": "fuyu"})
    message = str(err.value)
    assert "fuyu" in message and "\n" not in message
    for name in families.FAMILIES:
        assert name in message


def test_every_linear_layer_falls_in_exactly_one_role(family_name, tiny_model):
    family = families.get(family_name)
    model = load(tiny_model(family_name))
    patterns = {role: re.compile(p) for role, p in family.lora_target_patterns.items()}
    head = family.prefix_of("lm_head")
    for name in linear_names(model):
        role = family.role_of(name)
        assert role in ("vision", "projector", "language", "lm_head"), f"{name} has role {role}"
        # The role patterns partition the Linear layers: each is claimed by exactly one of them (or is the head).
        claims = [r for r, p in patterns.items() if p.fullmatch(name)] + (["lm_head"] if name == head else [])
        assert claims == [role], f"{name}: role {role}, claimed by {claims}"


def test_role_patterns_match_only_linear_layers(family_name, tiny_model):
    family = families.get(family_name)
    model = load(tiny_model(family_name))
    linears = set(linear_names(model))
    for role, pattern in family.lora_target_patterns.items():
        matched = {n for n, _ in model.named_modules() if re.fullmatch(pattern, n)}
        assert matched, f"{role} pattern matches nothing"
        assert matched <= linears, f"{role} pattern matches non-Linear modules {matched - linears}"


def test_default_targets_are_exactly_the_language_model_linears_by_peft(family_name, tiny_model):
    """PEFT itself applies the regex: LoRA must land on every language-model Linear and nowhere else,
    although the vision towers reuse leaf names like q_proj / gate_proj."""
    from peft import LoraConfig, get_peft_model

    family = families.get(family_name)
    model = load(tiny_model(family_name))
    language = {n for n in linear_names(model) if family.role_of(n) == "language"}
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=family.default_target_regex))
    with_lora = {
        n.removeprefix("base_model.model.") for n, m in peft_model.named_modules() if hasattr(m, "lora_A")
    }
    assert with_lora == language
    vision_leaves = {n.rsplit(".", 1)[-1] for n in linear_names(model) if family.role_of(n) == "vision"}
    assert vision_leaves, "the vision tower has Linear layers"


@pytest.mark.parametrize("layout", ["original", "runtime"])
def test_disk_names_map_to_runtime_names_of_real_save_pretrained(family_name, tiny_model, layout):
    """What transformers writes on disk maps, tensor by tensor, to the runtime parameter of the same value."""
    folder = tiny_model(family_name, layout=layout)
    family = families.get(family_name)
    model = load(folder)
    runtime = dict(model.state_dict())
    index = checkpoint.tensor_index(folder)
    mapping = family.runtime_index(index)
    # Families whose hub checkpoints already use the runtime names (Qwen3-VL, Idefics3, GLM-4.1V...) have an
    # empty key table: both layouts are the runtime one.
    assert family.disk_layout(index) == (layout if family.keys.renames else "runtime")
    tied = families.tied_embeddings(checkpoint.read_config(folder))
    expected = set(runtime) - ({f"{family.prefix_of('lm_head')}.weight"} if tied else set())
    assert set(mapping) == expected
    files = {}
    for runtime_name, disk_name in mapping.items():
        info = index[disk_name]
        f = files.setdefault(info.file, safe_open(info.file, "pt"))
        assert torch.equal(f.get_tensor(disk_name), runtime[runtime_name]), runtime_name


def test_hub_layout_rules_agree_with_transformers_loader_on_pre_5_names(tmp_path, tiny_model):
    """Pre-5.x LLaVA checkpoints nest CLIP under `vision_tower.vision_model.`: transformers loads them, and
    our mapping sends each such name to the same runtime parameter."""
    from safetensors.torch import load_file, save_file

    src = tiny_model("llava")
    family = families.get("llava")
    old = tmp_path / "llava-pre5"
    old.mkdir()
    for f in src.iterdir():
        if f.name != "model.safetensors":
            (old / f.name).write_bytes(f.read_bytes())
    state = load_file(src / "model.safetensors")
    renamed = {re.sub(r"^vision_tower\.", "vision_tower.vision_model.", k): v for k, v in state.items()}
    save_file(renamed, old / "model.safetensors", metadata={"format": "pt"})
    model = load(old)
    runtime = dict(model.state_dict())
    for disk_name, tensor in renamed.items():
        assert torch.equal(runtime[family.to_runtime(disk_name)], tensor), disk_name


def test_tied_embeddings_flag_at_either_level():
    assert families.tied_embeddings({"tie_word_embeddings": True})
    assert families.tied_embeddings(
        {"tie_word_embeddings": False, "text_config": {"tie_word_embeddings": True}}
    )
    assert not families.tied_embeddings({"text_config": {"tie_word_embeddings": False}})


def test_tied_checkpoint_has_no_head_on_disk_and_ties_in_transformers(family_name, tiny_model):
    family = families.get(family_name)
    if not family.can_tie_embeddings:
        with pytest.raises(VlmtuneError, match="cannot tie lm_head to the input embeddings"):
            tiny_model(family_name, tied=True)
        return
    folder = tiny_model(family_name, tied=True)
    config = checkpoint.read_config(folder)
    assert families.tied_embeddings(config)
    mapping = family.runtime_index(checkpoint.tensor_index(folder))
    assert f"{family.prefix_of('lm_head')}.weight" not in mapping
    model = load(folder)
    head, embed = model.get_output_embeddings().weight, model.get_input_embeddings().weight
    assert head.data_ptr() == embed.data_ptr()
