"""Adapters in other key layouts and formats load un-merged with the original adapter's logits: pre-4.52
transformers layouts, LLaVA training outputs, and PEFT folders as LLaMA-Factory, ms-swift, VLM-R1 and
TRL write them. Fixtures are built by rewriting the keys of a trained adapter."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from test_infer_fixtures import (
    IMAGE_PROMPT,
    LM_REGEX,
    PROJECTOR,
    TEXT_PROMPT,
    VISION_REGEX,
    image,
    legacy_key,
    make_adapter,
    peft_logits,
    rewrite_keys,
    to_llava_format,
)
from vlmtune import families
from vlmtune.infer import Request, load

ATOL = 1e-4


def logits_of(engine, name):
    return engine.logits([Request(IMAGE_PROMPT, [image(0)], name), Request(TEXT_PROMPT, [], name)])


def assert_same(got, want):
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape and torch.allclose(g, w, atol=ATOL, rtol=1e-4), (g - w).abs().max()


def test_legacy_layout_adapter_equals_the_original(family_name, tiny_model, tmp_path):
    """Keys as pre-4.52 transformers wrote them (`base_model.model.model.layers...`, `...visual...`,
    `...language_model.model...`), for LoRA on the language model and the vision tower and a projector
    trained in full, give the original adapter's logits."""
    if not families.get(family_name).keys.renames:
        pytest.skip(
            f"{family_name} checkpoints use the runtime names since release: no pre-4.52 layout exists"
        )
    base = tiny_model(family_name)
    original = make_adapter(
        base,
        tmp_path / "original",
        seed=11,
        target_modules=f"{LM_REGEX}|{VISION_REGEX[family_name]}",
        modules_to_save=[PROJECTOR[family_name], "lm_head"],
    )
    legacy = rewrite_keys(original, tmp_path / "legacy", lambda k: legacy_key(family_name, k))
    keys = [k[len("base_model.model.") :] for k in load_file(legacy / "adapter_model.safetensors")]
    assert not any(k.startswith(("model.language_model.", "model.visual.")) for k in keys)  # really old
    engine = load(base, {"orig": original, "old": legacy}, device="cpu")
    assert "original" in engine.adapters["old"].layouts  # (lm_head is spelled alike in both)
    assert_same(logits_of(engine, "old"), logits_of(engine, "orig"))
    assert_same(
        logits_of(engine, "orig"),
        [peft_logits(base, original, IMAGE_PROMPT, [image(0)]), peft_logits(base, original, TEXT_PROMPT, [])],
    )


@pytest.mark.parametrize("suffix", [".bin", ".safetensors"])
def test_llava_training_output_equals_the_peft_adapter(tiny_model, tmp_path, suffix):
    """adapter_model.bin|safetensors with `model.layers` keys + non_lora_trainables.bin with
    `mm_projector.0/.2` + LLaVA's config.json load onto the HF Llava base with the projector in place."""
    base = tiny_model("llava")
    peft_dir = make_adapter(base, tmp_path / "peft", seed=12, modules_to_save=["model.multi_modal_projector"])
    llava_dir = to_llava_format(peft_dir, tmp_path / "llava-out", adapter_suffix=suffix)
    engine = load(base, {"llava": llava_dir}, device="cpu")
    info = engine.adapters["llava"]
    assert info.format == "llava" and info.layouts == ["llava_original"]
    assert info.full_modules == [
        "model.multi_modal_projector.linear_1",
        "model.multi_modal_projector.linear_2",
    ]
    assert_same(
        logits_of(engine, "llava"),
        [peft_logits(base, peft_dir, IMAGE_PROMPT, [image(0)]), peft_logits(base, peft_dir, TEXT_PROMPT, [])],
    )


def test_llava_output_with_another_projector_type_fails_clearly(tiny_model, tmp_path):
    base = tiny_model("llava")
    peft_dir = make_adapter(base, tmp_path / "peft", seed=12, modules_to_save=["model.multi_modal_projector"])
    llava_dir = to_llava_format(peft_dir, tmp_path / "llava-out", projector_type="linear")
    with pytest.raises(Exception, match=r"projector is 'linear' but the base's is 'mlp2x_gelu'"):
        load(base, {"llava": llava_dir}, device="cpu")


def test_pickled_bin_loads_only_as_plain_tensors(tiny_model, tmp_path):
    """A .bin that holds anything but tensors is refused (weights_only=True), not unpickled."""
    base = tiny_model("llava")
    peft_dir = make_adapter(base, tmp_path / "peft", seed=12, modules_to_save=["model.multi_modal_projector"])
    llava_dir = to_llava_format(peft_dir, tmp_path / "llava-out")
    torch.save(
        {"base_model.model.model.mm_projector.0.weight": object()}, llava_dir / "non_lora_trainables.bin"
    )
    with pytest.raises(Exception, match="weights_only=True"):
        load(base, {"llava": llava_dir}, device="cpu")


FOREIGN = {
    # LLaMA-Factory: a list of full module paths (its `lora_target` resolved against the model).
    "llamafactory": {
        "target_modules": [
            f"model.language_model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")
        ],
        "modules_to_save": ["model.multi_modal_projector"],
        "task_type": "CAUSAL_LM",
    },
    # ms-swift: an anchored regex over the unfrozen parts.
    "swift": {"target_modules": r"^(model\.language_model(?=\.).*\.(down_proj|gate_proj|up_proj))$"},
    # VLM-R1: every Linear outside the vision tower, lm_head included.
    "vlm_r1": {
        "target_modules": r"^(?!model\.vision_tower).*\.(q_proj|k_proj|v_proj|o_proj|up_proj|down_proj|gate_proj|linear_1|linear_2)$|^lm_head$"
    },
    # TRL: leaf names (PEFT matches them anywhere: here the vision tower's q_proj/v_proj too), rsLoRA.
    "trl": {"target_modules": ["q_proj", "v_proj"], "use_rslora": True, "task_type": "CAUSAL_LM"},
}


@pytest.mark.parametrize("tool", list(FOREIGN))
def test_peft_folders_of_other_tools_equal_peft_from_pretrained(tool, tiny_model, tmp_path):
    base = tiny_model("llava")
    options = dict(FOREIGN[tool])
    adapter = make_adapter(base, tmp_path / tool, seed=13, **options)
    engine = load(base, {tool: adapter}, device="cpu")
    assert_same(
        logits_of(engine, tool),
        [peft_logits(base, adapter, IMAGE_PROMPT, [image(0)]), peft_logits(base, adapter, TEXT_PROMPT, [])],
    )
    if tool == "vlm_r1":
        assert "lm_head" in {m.rsplit(".", 1)[-1] for m in engine.registry[tool].adapter.lora}


def test_rank_and_alpha_patterns_keep_per_module_values(tiny_model, tmp_path):
    base = tiny_model("qwen2_vl")
    adapter = make_adapter(
        base,
        tmp_path / "patterns",
        seed=14,
        r=4,
        alpha=8,
        rank_pattern={"q_proj": 8, r"layers\.1\.mlp\.down_proj": 2},
        alpha_pattern={"v_proj": 3},
        lora_bias=True,
    )
    engine = load(base, {"p": adapter}, device="cpu")
    lora = engine.registry["p"].adapter.lora
    assert lora["model.language_model.layers.0.self_attn.q_proj"].r == 8
    assert lora["model.language_model.layers.1.mlp.down_proj"].r == 2
    assert lora["model.language_model.layers.0.self_attn.v_proj"].alpha == 3
    assert_same(
        logits_of(engine, "p"),
        [peft_logits(base, adapter, IMAGE_PROMPT, [image(0)]), peft_logits(base, adapter, TEXT_PROMPT, [])],
    )
