"""The merge against independent references, on tiny folders of all four families, per adapter feature.

References: PEFT's own `merge_and_unload` tensors (fp32 max diff <= 1e-6, bf16 within one ulp), and the
logits of the un-merged PeftModel vs the merged folder loaded with plain `AutoModelForImageTextToText`
and fed through its own `AutoProcessor` (text and image prompts).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import vlmtune
from test_merge_support import (
    BIASED,
    CONV,
    assert_logits_match,
    assert_tensors_match,
    disk_names,
    family_of,
    make_adapter,
    merged_state,
    peft_merged,
    projector,
    rewrite_adapter_keys,
    to_bf16_base,
    unmerged_model,
)
from vlmtune import checkpoint
from vlmtune.families.support import support
from vlmtune.inspection import inspect_path, vllm_cell
from vlmtune.merging import merge


def check_against_peft(
    base: Path, adapters: list[Path], out: Path, dtype: torch.dtype = torch.float32
) -> None:
    ours = merged_state(out)
    ref = peft_merged(base, adapters, dtype)
    assert set(ours) == set(ref)
    assert_tensors_match(ours, ref)


def same_names_and_order(base: Path, out: Path) -> None:
    """The merged folder keeps the base's on-disk names, order and dtypes (a drop-in replacement)."""
    a, b = checkpoint.tensor_index(base), checkpoint.tensor_index(out)
    assert list(a) == list(b)
    assert [(t.dtype, t.shape) for t in a.values()] == [(t.dtype, t.shape) for t in b.values()]


def test_lora_and_modules_to_save(tiny_model, family_name, tmp_path):
    base = tiny_model(family_name)
    family = family_of(base)
    adapter = make_adapter(base, tmp_path / "a", modules_to_save=[projector(family)])
    result = merge(base, adapter, tmp_path / "out")
    out = tmp_path / "out"
    check_against_peft(base, [adapter], out)
    same_names_and_order(base, out)
    assert_logits_match(out, unmerged_model(base, [adapter]), base=base)
    from safetensors import safe_open

    with safe_open(adapter / "adapter_model.safetensors", "pt") as f:
        lora_modules = sum(k.endswith("lora_A.weight") for k in f.keys())  # noqa: SIM118
    assert result.tensors["merged"] == lora_modules > 0
    assert result.tensors["replaced"] > 0
    assert result.check["passed"] and result.check["changed_tensors_checked"] > 0
    # `inspect` on the merged folder gives the README's "vLLM after merge" cell for the family.
    verdict = inspect_path(out)["vllm"]
    assert verdict["servable"] is not bool(family.vllm_unsupported), verdict
    assert vllm_cell(verdict) == support(family)["vLLM after merge"]


@pytest.mark.parametrize(
    "variant", ["rslora_patterns", "dora", "lora_bias", "embedding", "embedding_dora", "conv", "conv_dora"]
)
def test_adapter_features(tiny_model, family_name, tmp_path, variant):
    base = tiny_model(family_name)
    family = family_of(base)
    embed = family.prefix_of("embeddings")
    kwargs: dict = {}
    if variant == "rslora_patterns":
        kwargs = dict(
            use_rslora=True,
            rank_pattern={"q_proj": 6, "down_proj": 2},
            alpha_pattern={"v_proj": 3, "up_proj": 20},
        )
    elif variant == "dora":
        kwargs = dict(use_dora=True)
    elif variant == "lora_bias":
        kwargs = dict(targets=BIASED[family_name], lora_bias=True)
    elif variant == "embedding":
        kwargs = dict(targets=f"(?:{family.default_target_regex})|{embed.replace('.', chr(92) + '.')}")
    elif variant == "embedding_dora":  # DoRA norms over the columns: the one whole-tensor path
        kwargs = dict(targets=[embed], use_dora=True)
    elif variant == "conv":
        kwargs = dict(targets=[CONV[family_name]])
    elif variant == "conv_dora":
        kwargs = dict(targets=[CONV[family_name]], use_dora=True)
    adapter = make_adapter(base, tmp_path / "a", **kwargs)
    out = tmp_path / "out"
    merge(base, adapter, out)
    check_against_peft(base, [adapter], out)
    same_names_and_order(base, out)
    assert_logits_match(out, unmerged_model(base, [adapter]), base=base)


def test_two_adapters_merge_in_order(tiny_model, family_name, tmp_path):
    base = tiny_model(family_name)
    family = family_of(base)
    a1 = make_adapter(base, tmp_path / "a1", seed=1, modules_to_save=[projector(family)])
    # the second adapter is trained "on top of" the first: DoRA norms depend on what came before
    a2 = make_adapter(base, tmp_path / "a2", seed=2, r=6, use_dora=True)
    merge(base, [a1, a2], tmp_path / "out")
    check_against_peft(base, [a1, a2], tmp_path / "out")
    assert_logits_match(tmp_path / "out", unmerged_model(base, [a1, a2]), base=base)
    # order is honoured: the other order gives other weights
    merge(base, [a2, a1], tmp_path / "rev")
    fwd, rev = merged_state(tmp_path / "out"), merged_state(tmp_path / "rev")
    assert any(not torch.equal(fwd[k], rev[k]) for k in fwd)


def test_legacy_key_layout(tiny_model, family_name, tmp_path):
    """Adapter keys in the family's on-disk / pre-4.52 layout (`base_model.model.model.layers...` for Qwen,
    `base_model.model.language_model.model.layers...` for LLaVA/Mllama), which PEFT itself cannot place."""
    base = tiny_model(family_name)
    family = family_of(base)
    if not family.keys.renames:
        pytest.skip(
            f"{family_name} checkpoints use the runtime names since release: no pre-4.52 layout exists"
        )
    adapter = make_adapter(base, tmp_path / "a", modules_to_save=[projector(family)])
    disk = disk_names(base)
    prefix = "base_model.model."

    def legacy(key: str) -> str:
        name = key[len(prefix) :]
        for slot in (".lora_A.weight", ".lora_B.weight"):
            if name.endswith(slot):
                module = name[: -len(slot)]
                return prefix + disk[module + ".weight"][: -len(".weight")] + slot
        return prefix + disk[name]

    old = rewrite_adapter_keys(adapter, tmp_path / "legacy", legacy)
    key = legacy(prefix + "model.language_model.layers.0.self_attn.q_proj.lora_A.weight")
    assert key in (
        prefix + "model.layers.0.self_attn.q_proj.lora_A.weight",  # Qwen
        prefix + "language_model.model.layers.0.self_attn.q_proj.lora_A.weight",  # LLaVA, Mllama
    )
    merge(base, old, tmp_path / "out")
    check_against_peft(base, [adapter], tmp_path / "out")
    assert json.loads((tmp_path / "out" / "vlmtune.json").read_text())["adapters"][0]["key_layouts"] == [
        "original"
    ]


def test_llava_format_output(tiny_model, tmp_path):
    """An original LLaVA training output: adapter_model.bin with LLaVA module paths, the projector in
    non_lora_trainables.bin (mm_projector.0/.2) and a config.json with mm_* fields."""
    base = tiny_model("llava")
    adapter = make_adapter(base, tmp_path / "a", modules_to_save=["model.multi_modal_projector"])
    from safetensors.torch import load_file

    state = load_file(adapter / "adapter_model.safetensors")
    folder = tmp_path / "llava-v1.5-7b-lora"
    folder.mkdir()
    lora, trainables = {}, {}
    for k, v in state.items():
        if "multi_modal_projector" in k:
            new = k.replace("model.multi_modal_projector.linear_1", "model.mm_projector.0").replace(
                "model.multi_modal_projector.linear_2", "model.mm_projector.2"
            )
            trainables[new] = v.clone()
        else:
            lora[k.replace("model.language_model.layers", "model.layers")] = v.clone()
    assert all(".mm_projector." in k for k in trainables) and len(trainables) == 4
    torch.save(lora, folder / "adapter_model.bin")
    torch.save(trainables, folder / "non_lora_trainables.bin")
    config = json.loads((adapter / "adapter_config.json").read_text())
    config.update(
        modules_to_save=None,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    (folder / "adapter_config.json").write_text(json.dumps(config))
    (folder / "config.json").write_text(
        json.dumps(
            {"mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2, "model_type": "llava_llama"}
        )
    )
    merge(base, folder, tmp_path / "out")
    check_against_peft(base, [adapter], tmp_path / "out")
    assert_logits_match(tmp_path / "out", unmerged_model(base, [adapter]), base=base)
    record = json.loads((tmp_path / "out" / "vlmtune.json").read_text())["adapters"][0]
    assert record["format"] == "llava" and "llava_original" in record["key_layouts"]


def test_multi_shard_base_and_max_shard_size(tiny_model, family_name, tmp_path):
    base = tiny_model(family_name, max_shard_size="200KB")
    assert len(checkpoint.weight_files(base)) > 1
    family = family_of(base)
    adapter = make_adapter(base, tmp_path / "a", modules_to_save=[projector(family)])
    limit = 100_000
    result = merge(base, adapter, tmp_path / "out", max_shard_size="100KB")
    out = tmp_path / "out"
    files = checkpoint.weight_files(out)
    assert len(files) == len(result.shards) > 2
    for f in files:
        header, _ = checkpoint.read_header(f)
        sizes = [
            v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"
        ]
        assert sum(sizes) <= limit or len(sizes) == 1, (f.name, sum(sizes), len(sizes))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(checkpoint.tensor_index(base))
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in checkpoint.tensor_index(out).values())
    check_against_peft(base, [adapter], out)
    assert_logits_match(out, unmerged_model(base, [adapter]))
    # the default (5GB) writes one file
    merge(base, adapter, tmp_path / "one")
    assert [f.name for f in checkpoint.weight_files(tmp_path / "one")] == ["model.safetensors"]


def test_runtime_layout_base(tiny_model, family_name, tmp_path):
    base = tiny_model(family_name, layout="runtime")
    family = family_of(base)
    assert family.disk_layout(checkpoint.tensor_index(base)) == "runtime"
    adapter = make_adapter(base, tmp_path / "a", modules_to_save=[projector(family)])
    merge(base, adapter, tmp_path / "out")
    same_names_and_order(base, tmp_path / "out")
    check_against_peft(base, [adapter], tmp_path / "out")
    assert_logits_match(tmp_path / "out", unmerged_model(base, [adapter]), base=base)


@pytest.fixture(scope="module")
def bf16_bases(tmp_path_factory):
    made: dict[str, Path] = {}

    def get(tiny_model, family: str) -> Path:
        if family not in made:
            made[family] = to_bf16_base(tiny_model(family), tmp_path_factory.mktemp("bf16") / family)
        return made[family]

    return get


def test_bf16_base(tiny_model, family_name, tmp_path, bf16_bases):
    base = bf16_bases(tiny_model, family_name)
    family = family_of(base)
    adapter = make_adapter(
        base,
        tmp_path / "a",
        dtype=torch.bfloat16,
        modules_to_save=[projector(family)],
        use_dora=family_name == "qwen2_vl",
    )
    merge(base, adapter, tmp_path / "out")
    assert {t.dtype for t in checkpoint.tensor_index(tmp_path / "out").values()} == {"BF16"}
    check_against_peft(base, [adapter], tmp_path / "out", torch.bfloat16)
    # logits in fp32 compute: only the rounding of merged weights to bf16 separates the two
    assert_logits_match(tmp_path / "out", unmerged_model(base, [adapter]), tol=3e-2, base=base)


@pytest.mark.parametrize(
    "dtype,torch_dtype,name", [("bf16", torch.bfloat16, "bfloat16"), ("fp16", torch.float16, "float16")]
)
def test_output_dtype(tiny_model, tmp_path, dtype, torch_dtype, name):
    base = tiny_model("qwen2_vl")
    adapter = make_adapter(base, tmp_path / "a", modules_to_save=["model.visual.merger"])
    merge(base, adapter, tmp_path / "out", dtype=dtype)
    ours = merged_state(tmp_path / "out")
    ref = {k: v.to(torch_dtype) for k, v in peft_merged(base, [adapter]).items()}
    assert_tensors_match(ours, ref)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["dtype"] == name
    assert config["text_config"]["dtype"] == name and config["vision_config"]["dtype"] == name


@pytest.mark.parametrize("family", ["qwen2_vl", "llava"])
@pytest.mark.parametrize("what", ["embedding_lora", "lm_head_lora", "embedding_full", "language_only"])
def test_tied_embeddings(tiny_model, tmp_path, family, what):
    """On a tied base, un-merged PEFT changes only the module the adapter targets; the merge must write
    lm_head explicitly and set tie_word_embeddings false at both levels (or the head is re-tied away)."""
    base = tiny_model(family, overrides={"tie_word_embeddings": True})
    fam = family_of(base)
    embed, head = fam.prefix_of("embeddings"), fam.prefix_of("lm_head")
    kwargs = {
        "embedding_lora": dict(targets=[embed]),
        "lm_head_lora": dict(targets=[head]),
        "embedding_full": dict(targets=fam.default_target_regex, modules_to_save=[embed]),
        "language_only": dict(),
    }[what]
    adapter = make_adapter(base, tmp_path / "a", **kwargs)
    result = merge(base, adapter, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    names = checkpoint.tensor_index(tmp_path / "out")
    if what == "language_only":
        assert not result.untied_lm_head
        base_config = json.loads((base / "config.json").read_text())
        assert config["tie_word_embeddings"] == base_config["tie_word_embeddings"]
        assert config["text_config"]["tie_word_embeddings"] is True
        assert not any(fam.to_runtime(n) == f"{head}.weight" for n in names)
    else:
        assert result.untied_lm_head
        assert (
            config["tie_word_embeddings"] is False and config["text_config"]["tie_word_embeddings"] is False
        )
        assert any(fam.to_runtime(n) == f"{head}.weight" for n in names)
        ours = merged_state(tmp_path / "out")
        original = merged_state(base)[f"{embed}.weight"]
        if what == "lm_head_lora":
            assert torch.equal(ours[f"{embed}.weight"], original)
        else:
            assert torch.equal(ours[f"{head}.weight"], original)
    assert_logits_match(tmp_path / "out", unmerged_model(base, [adapter]), base=base)


def test_complete_export_prefers_adapter_files(tiny_model, tmp_path):
    base_src = tiny_model("qwen2_vl")
    base = tmp_path / "base"
    shutil.copytree(base_src, base)
    (base / "pytorch_model.bin").write_bytes(b"stale un-merged weights")  # must not reach the output
    (base / "README.md").write_text("base card")
    adapter = make_adapter(base, tmp_path / "a", modules_to_save=["model.visual.merger"])
    processor = json.loads((base / "processor_config.json").read_text())
    processor["image_processor"]["size"]["longest_edge"] = 56 * 56  # a training-time resolution limit
    (adapter / "processor_config.json").write_text(json.dumps(processor))
    (adapter / "chat_template.jinja").write_text((base / "chat_template.jinja").read_text() + "{# trained #}")
    (adapter / "generation_config.json").write_text(json.dumps({"do_sample": False, "max_new_tokens": 7}))
    result = merge(base, adapter, tmp_path / "out")
    out = tmp_path / "out"
    for name in (
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "processor_config.json",
        "chat_template.jinja",
        "README.md",
        "vlmtune.json",
    ):
        assert (out / name).is_file(), name
    assert not (out / "pytorch_model.bin").exists()
    assert (out / "chat_template.jinja").read_text().endswith("{# trained #}")
    assert json.loads((out / "generation_config.json").read_text())["max_new_tokens"] == 7
    from transformers import AutoProcessor

    assert AutoProcessor.from_pretrained(out).image_processor.size["longest_edge"] == 56 * 56
    manifest = json.loads((out / "vlmtune.json").read_text())
    assert manifest["format"] == "vlmtune-merged/1"
    assert manifest["base"]["fingerprint"] == checkpoint.fingerprint(base)
    assert manifest["base"]["family"] == "qwen2_vl" and manifest["dtype"] == "auto"
    assert manifest["adapters"][0]["path"] == str(adapter) and len(manifest["adapters"][0]["sha256"]) == 64
    assert (
        manifest["files"]["processor_config.json"] == "adapter"
        and manifest["files"]["tokenizer.json"] == "base"
    )
    assert manifest["check"]["passed"] and manifest["verification"] == {"run": False}
    assert result.manifest == manifest and not result.warnings


def test_python_api_spellings(tiny_model, tmp_path):
    base = tiny_model("mllama")
    adapter = make_adapter(base, tmp_path / "a")
    r1 = vlmtune.merge(base, adapter, tmp_path / "o1")
    r2 = vlmtune.merging.merge(base, [str(adapter)], str(tmp_path / "o2"))
    assert r1.tensors == r2.tensors
    assert (tmp_path / "o1" / "model.safetensors").read_bytes() == (
        tmp_path / "o2" / "model.safetensors"
    ).read_bytes()


def test_memory_stays_at_a_block(tiny_model, tmp_path):
    """Python-side allocations (numpy reports them to tracemalloc) stay far below the model and shard
    size: tensors are streamed in ~1 MB blocks (a few per compute thread, a few queued for the writer),
    untouched ones copied by the kernel. The bound is a constant, not a fraction of the model (the
    benchmark shows the same for RSS on 0.8 vs 1.4 GB models)."""
    import tracemalloc

    base = tiny_model("qwen2_vl", size="small")
    adapter = make_adapter(base, tmp_path / "a", r=16, modules_to_save=["model.visual.merger"])
    model_bytes = sum(t.nbytes for t in checkpoint.tensor_index(base).values())
    largest = max(t.nbytes for t in checkpoint.tensor_index(base).values())
    tracemalloc.start()
    try:
        merge(base, adapter, tmp_path / "out")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert model_bytes > 80e6 and len(checkpoint.weight_files(base)) == 1  # one 89 MB shard
    assert peak < 24e6 and peak < model_bytes / 3, (peak, model_bytes, largest)
    check_against_peft(base, [adapter], tmp_path / "out")


def test_output_does_not_depend_on_threads(tiny_model, tmp_path):
    """Blocks are computed on a thread pool; the bytes written are the same with 1 or 3 threads."""
    from vlmtune.merging.plan import build_plan
    from vlmtune.merging.stream import write_shards

    base = tiny_model("qwen2_5_vl", max_shard_size="200KB")
    adapter = make_adapter(base, tmp_path / "a", use_dora=True, modules_to_save=["model.visual.merger"])
    plan = build_plan(base, [adapter], dtype="bf16", max_shard_size="150KB")
    outputs = []
    for threads in (1, 3):
        folder = tmp_path / f"t{threads}"
        folder.mkdir()
        write_shards(plan, folder, threads=threads)
        outputs.append({p.name: p.read_bytes() for p in sorted(folder.iterdir())})
    assert outputs[0] == outputs[1] and len(outputs[0]) > 2


def test_warns_when_adapter_was_made_for_another_checkpoint(tiny_model, tmp_path):
    from vlmtune.adapters.manifest import BaseInfo, Manifest

    base = tiny_model("qwen2_vl")
    adapter = make_adapter(base, tmp_path / "a")
    Manifest(
        BaseInfo("other/checkpoint", "sha256:0123", "Qwen2VLForConditionalGeneration", "qwen2_vl", "qwen2_vl")
    ).write(adapter)
    result = merge(base, adapter, tmp_path / "out")
    assert any("other/checkpoint" in w for w in result.warnings)
    assert json.loads((tmp_path / "out" / "vlmtune.json").read_text())["warnings"] == result.warnings
    assert "warning:" in result.summary()
