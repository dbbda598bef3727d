"""One matrix of odd adapter folders through every verb: `predict`'s engine (un-merged), `merge` and
`inspect` must agree. Each row states the verdict per use; the test checks that the engine and the merge
act on it (refuse = a one-line VlmtuneError, nothing written), that `inspect --base` reports exactly those
verdicts, and the numbers: where both uses accept, the un-merged logits equal the merged folder's; where
only one accepts, that one equals PEFT's own run of the folder (`PeftModel.from_pretrained`)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from test_infer_fixtures import IMAGE_PROMPT, TEXT_PROMPT, image, make_adapter, peft_logits, to_llava_format
from vlmtune.adapters.inspect import inspect_adapter
from vlmtune.adapters.manifest import BaseInfo, Manifest
from vlmtune.adapters.rules import RULES
from vlmtune.errors import VlmtuneError
from vlmtune.infer import Request, load
from vlmtune.merging import merge

HEAD_COPY = "base_model.model.lm_head.base_layer.weight"
PATCH_EMBED = "model.visual.patch_embed.proj"


def edit(src: Path, dst: Path, config: Callable | None = None, tensors: Callable | None = None) -> Path:
    shutil.copytree(src, dst)
    if config is not None:
        values = json.loads((dst / "adapter_config.json").read_text())
        config(values)
        (dst / "adapter_config.json").write_text(json.dumps(values))
    if tensors is not None:
        save_file(tensors(load_file(dst / "adapter_model.safetensors")), dst / "adapter_model.safetensors")
    return dst


def shifted_biases(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v + 0.1 if k.endswith(".bias") and "lora_" not in k else v for k, v in t.items()}


def unmergeable_conv(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    key = next(k for k in t if k.endswith("lora_B.weight") and "patch_embed" in k)
    return {**t, key: torch.randn(t[key].shape[0], t[key].shape[1], 1, 3, 3)}


# row -> (base family, how the folder is made from the plain adapters, unmerged verdict, merge verdict)
# Folders are built by `build` below from: plain (LM LoRA), head (LoRA on lm_head: PEFT saves its base
# weight beside it), conv (LoRA on the vision patch embedding), biased (bias='all'), nobias (lora_bias on
# o_proj, which has no bias), dora_embed (DoRA on the embeddings and q_proj), tied_embed (LoRA on the
# embeddings of a base with tied embeddings), llava_output (a LLaVA training output: LoRA + projector).
MATRIX = {
    "plain": ("qwen2_vl", "plain", None, "accept", "accept"),
    "fan_in_fan_out_on_linear": ("qwen2_vl", "plain", {"fan_in_fan_out": True}, "refuse", "refuse"),
    "pissa_init": ("qwen2_vl", "plain", {"init_lora_weights": "pissa"}, "refuse", "refuse"),
    "loftq_init": ("qwen2_vl", "plain", {"init_lora_weights": "loftq"}, "refuse", "refuse"),
    "unsupported_setting": ("qwen2_vl", "plain", {"use_qalora": True}, "refuse", "refuse"),
    "not_lora": ("qwen2_vl", "plain", {"peft_type": "IA3"}, "refuse", "refuse"),
    "declared_base_of_another_family": ("llava", "plain", None, "refuse", "refuse"),
    "manifest_of_another_family": ("llava", "manifest_qwen", None, "refuse", "refuse"),
    "manifest_of_other_weights": ("qwen2_vl", "manifest_qwen", None, "warn", "warn"),
    "unchanged_base_copy": ("qwen2_vl", "head", None, "accept", "accept"),
    "changed_base_copy": ("qwen2_vl", "head_changed", None, "refuse", "accept"),
    "trained_base_biases": ("qwen2_vl", "biased", None, "refuse", "accept"),
    "lora_bias_without_base_bias": ("qwen2_vl", "nobias", None, "accept", "refuse"),
    "unmergeable_conv_kernel": ("qwen2_vl", "conv_bad", None, "refuse", "refuse"),
    "dora_on_embeddings": ("qwen2_vl", "dora_embed", None, "accept", "accept"),
    "dora_magnitude_of_another_size": ("qwen2_vl", "dora_bad", None, "refuse", "refuse"),
    "ensure_weight_tying_on_tied_base": (
        "tied",
        "tied_embed",
        {"ensure_weight_tying": True},
        "refuse",
        "refuse",
    ),
    "lora_on_tied_embeddings": ("tied", "tied_embed", None, "accept", "accept"),
    "foreign_format_output": ("llava", "llava_output", None, "accept", "accept"),
    "foreign_format_on_another_family": ("qwen2_vl", "llava_output", None, "refuse", "refuse"),
    "foreign_format_settings_mismatch": ("llava", "llava_output_linear", None, "refuse", "refuse"),
}


@pytest.fixture(scope="module")
def folders(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("rules")
    qwen = root / "qwen2_vl"
    shutil.copytree(tiny_model("qwen2_vl"), qwen)  # a private base: adapters declare it as their base
    plain = make_adapter(qwen, root / "plain", seed=60)
    head = make_adapter(qwen, root / "head", seed=61, target_modules=["q_proj", "lm_head"])
    out = {
        "qwen2_vl": qwen,
        "llava": tiny_model("llava"),
        "plain": plain,
        "head": head,
        "head_changed": edit(
            head, root / "head_changed", tensors=lambda t: {**t, HEAD_COPY: t[HEAD_COPY] + 0.5}
        ),
        "biased": edit(
            make_adapter(qwen, root / "biased0", seed=62, bias="all"), root / "biased", tensors=shifted_biases
        ),
        "nobias": make_adapter(qwen, root / "nobias", seed=63, target_modules=r".*\.o_proj", lora_bias=True),
        "conv_bad": edit(
            make_adapter(qwen, root / "conv", seed=64, target_modules=[PATCH_EMBED]),
            root / "conv_bad",
            tensors=unmergeable_conv,
        ),
        "dora_embed": make_adapter(
            qwen, root / "dora_embed", seed=65, target_modules=["embed_tokens", "q_proj"], use_dora=True
        ),
    }

    def short_magnitude(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        key = next(k for k in t if k.endswith("q_proj.lora_magnitude_vector"))
        return {**t, key: t[key][:-8]}

    out["dora_bad"] = edit(out["dora_embed"], root / "dora_bad", tensors=short_magnitude)
    tied = tiny_model("qwen2_vl", overrides={"tie_word_embeddings": True})
    out["tied"] = tied
    out["tied_embed"] = make_adapter(
        tied, root / "tied_embed", seed=66, target_modules=["embed_tokens", "q_proj"]
    )
    llava_peft = make_adapter(
        out["llava"], root / "llava_peft", seed=67, modules_to_save=["model.multi_modal_projector"]
    )
    out["llava_output"] = to_llava_format(llava_peft, root / "llava_output")
    out["llava_output_linear"] = to_llava_format(llava_peft, root / "llava_linear", projector_type="linear")
    # a manifest naming a qwen2_vl base with other weights (and no declared base in adapter_config.json)
    folder = edit(plain, root / "manifest_qwen", config=lambda c: c.pop("base_model_name_or_path"))
    Manifest(
        BaseInfo(str(qwen), "sha256:0", "Qwen2VLForConditionalGeneration", "qwen2_vl", "qwen2_vl")
    ).write(folder)
    out["manifest_qwen"] = folder
    return out


def requests(adapter: str | None) -> list[Request]:
    return [Request(IMAGE_PROMPT, [image(3)], adapter), Request(TEXT_PROMPT, [], adapter)]


def close(got: list[torch.Tensor], want: list[torch.Tensor], tol: float = 1e-4) -> float:
    worst = max(float((g - w).abs().max()) for g, w in zip(got, want, strict=True))
    scale = max(1.0, max(float(w.abs().max()) for w in want))
    assert worst <= tol * scale, f"logits differ by {worst:.3g} (tolerance {tol * scale:.3g})"
    return worst


def peft_reference(base: Path, folder: Path) -> list[torch.Tensor]:
    """PEFT's own un-merged run of the folder, on the same prompts (its logits trimmed like the engine's)."""
    return [
        peft_logits(base, folder, IMAGE_PROMPT, [image(3)]),
        peft_logits(base, folder, TEXT_PROMPT, []),
    ]


def test_every_rule_of_the_table_has_a_row():
    covered = {
        "peft_type": "not_lora",
        "unsupported_setting": "unsupported_setting",
        "base_rewriting_init": "pissa_init",
        "trained_on_other_family": "manifest_of_another_family",
        "declared_base_other_family": "declared_base_of_another_family",
        "fan_in_fan_out_on_linear": "fan_in_fan_out_on_linear",
        "trained_base_biases": "trained_base_biases",
        "changed_base_weight_copy": "changed_base_copy",
        "ensure_weight_tying": "ensure_weight_tying_on_tied_base",
        "foreign_format_mismatch": "foreign_format_on_another_family",
        "lora_bias_without_base_bias": "lora_bias_without_base_bias",
        "unmergeable_conv_kernel": "unmergeable_conv_kernel",
        "trained_on_other_weights": "manifest_of_other_weights",
    }
    assert set(covered) == {r.name for r in RULES}
    for rule in RULES:
        row = covered[rule.name]
        if row is not None:
            assert MATRIX[row][3:] == (rule.unmerged, rule.merge), row


@pytest.mark.parametrize("row", list(MATRIX))
def test_predict_merge_and_inspect_agree(row, folders, tmp_path):
    family, source, change, want_unmerged, want_merge = MATRIX[row]
    base = folders[family]
    folder = (
        folders[source]
        if change is None
        else edit(folders[source], tmp_path / "a", config=lambda c: c.update(change))
    )

    # inspect reports what the two verbs will do
    report = inspect_adapter(folder, base=base)["rules"]
    assert (report["unmerged"]["verdict"], report["merge"]["verdict"]) == (want_unmerged, want_merge), report

    # predict (un-merged): the engine
    unmerged = None
    if want_unmerged == "refuse":
        with pytest.raises(VlmtuneError) as err:
            load(base, {"x": folder}, device="cpu")
        assert "\n" not in str(err.value).strip()
        assert str(err.value) in report["unmerged"]["because"]
    else:
        engine = load(base, {"x": folder}, device="cpu")
        assert bool(engine.adapters["x"].warnings) == (want_unmerged == "warn")
        unmerged = engine.logits(requests("x"))
        del engine

    # merge
    out = tmp_path / "merged"
    merged = None
    if want_merge == "refuse":
        with pytest.raises(VlmtuneError) as err:
            merge(base, folder, out)
        assert not out.exists()
        assert str(err.value) in report["merge"]["because"]
    else:
        result = merge(base, folder, out)
        assert bool(set(result.warnings) & set(report["merge"]["because"])) == (want_merge == "warn")
        merged = load(out, device="cpu").logits(requests(None))

    # the numbers: the adapter must matter, or equal logits prove nothing
    got = unmerged if unmerged is not None else merged
    if got is not None:
        plain = load(base, device="cpu").logits(requests(None))
        assert max(float((g - p).abs().max()) for g, p in zip(got, plain, strict=True)) > 1e-2
    if unmerged is not None and merged is not None:
        close(unmerged, merged)
    elif got is not None:
        close(got, peft_reference(base, folder))


def test_inspect_without_a_base_checks_the_folders_own_settings(folders, tmp_path):
    """With no --base, the rules that read the folder alone still give their verdicts; those that need the
    base (family, foreign format) are left to --base, so a LLaVA output is not refused for want of one."""
    fifo = edit(folders["plain"], tmp_path / "fifo", config=lambda c: c.update(fan_in_fan_out=True))
    report = inspect_adapter(fifo)["rules"]
    assert report["checked"].startswith("without a base")
    assert (report["unmerged"]["verdict"], report["merge"]["verdict"]) == ("refuse", "refuse")
    assert [f["rule"] for f in report["findings"]] == ["fan_in_fan_out_on_linear"]
    biased = inspect_adapter(folders["biased"])["rules"]
    assert (biased["unmerged"]["verdict"], biased["merge"]["verdict"]) == ("refuse", "accept")
    for clean in ("plain", "llava_output"):
        report = inspect_adapter(folders[clean])["rules"]
        assert report["findings"] == [] and report["merge"]["verdict"] == "accept", clean
