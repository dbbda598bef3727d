"""Bare parameters (LLaVA-NeXT / LLaVA-OneVision `model.image_newline`: an `nn.Parameter` of the whole
`model`, no module PEFT's `modules_to_save` could wrap) through the life cycle: placed without wrapping
`model`, swapped in per adapter un-merged (the shared base value intact), trained with `projector: full`,
stored under PEFT's own key, merged.

References: PEFT's own loader (`PeftModel.from_pretrained` puts `base_model.model.model.image_newline` from
the adapter file into the base parameter), fresh single-adapter loads, the base model alone, and PEFT's
`merge_and_unload`.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from test_infer_fixtures import (
    IMAGE_PROMPT,
    PROJECTOR,
    TEXT_PROMPT,
    base_model,
    image,
    make_adapter,
    peft_logits,
)
from vlmtune.infer import BASE, Request, load

FAMILIES = ["llava_next", "llava_onevision"]
KEY = "base_model.model.model.image_newline"  # PEFT's key for the runtime parameter model.image_newline
ATOL = 1e-4


def with_newline(src: Path, out: Path, key: str = KEY, seed: int = 0) -> Path:
    """A copy of a PEFT adapter folder that also replaces image_newline (base value + noise) under `key`."""
    shutil.copytree(src, out)
    tensors = load_file(src / "adapter_model.safetensors")
    base = base_model(Path(_base_of(src))).model.image_newline.detach()
    gen = torch.Generator().manual_seed(seed)
    tensors[key] = base + torch.randn(base.shape, generator=gen)
    save_file(tensors, out / "adapter_model.safetensors", metadata={"format": "pt"})
    return out


def _base_of(adapter: Path) -> str:
    import json

    return json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]


@pytest.fixture(scope="module")
def adapters(tiny_model, tmp_path_factory):
    """Per family: 'plain' (LM LoRA + projector in full, PEFT-made), 'a' (the same plus a trained
    image_newline), 'old' ('a' with the newline under the pre-4.52 key `base_model.model.image_newline`),
    'c' (LM LoRA only: mixable)."""
    made: dict[str, dict[str, Path]] = {}

    def get(family: str) -> dict[str, Path]:
        if family not in made:
            base = tiny_model(family)
            root = tmp_path_factory.mktemp(f"bare-{family}")
            plain = make_adapter(base, root / "plain", seed=1, modules_to_save=[PROJECTOR[family]])
            made[family] = {
                "base": base,
                "plain": plain,
                "a": with_newline(plain, root / "a"),
                "old": with_newline(plain, root / "old", key="base_model.model.image_newline"),
                "c": make_adapter(base, root / "c", seed=5),
            }
        return made[family]

    return get


def req(messages, adapter, with_image=True):
    return Request(messages, [image(0)] if with_image else [], adapter)


def close(x: torch.Tensor, y: torch.Tensor) -> bool:
    return x.shape == y.shape and torch.allclose(x, y, atol=ATOL, rtol=1e-4)


def newline(engine) -> torch.Tensor:
    return engine.base_model.model.image_newline.detach().clone()


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("which", ["a", "old"])
def test_bare_parameter_is_placed_apart_and_equals_peft(adapters, family, which):
    """The newline (runtime or pre-4.52 key) is an override of its own: PEFT is never asked to wrap
    `model`, the rows run apart, and the logits equal plain PEFT's load of the runtime-key folder."""
    ad = adapters(family)
    engine = load(ad["base"], {"a": ad[which]}, device="cpu")
    info = engine.adapters["a"]
    wrapped = engine.peft.peft_config["ad_a"].modules_to_save
    assert info.full_modules == wrapped and len(wrapped) == 2
    assert all(m.startswith(PROJECTOR[family] + ".") for m in wrapped)  # never `model` itself
    assert not info.mixable and "model.image_newline" in info.not_mixable_because
    got = engine.logits(req(IMAGE_PROMPT, "a"))[0]
    want = peft_logits(ad["base"], ad["a"], IMAGE_PROMPT, [image(0)])
    assert close(got, want), (got - want).abs().max()
    # The newline matters: without it the answer differs (so the comparison above tests it).
    without = peft_logits(ad["base"], ad["plain"], IMAGE_PROMPT, [image(0)])
    assert (want - without).abs().max() > 1e-2


@pytest.mark.parametrize("family", FAMILIES)
def test_mixed_call_equals_single_runs_and_base_stays(adapters, family):
    ad = adapters(family)
    base_value = base_model(ad["base"]).model.image_newline.detach()
    prompts = [(IMAGE_PROMPT, True), (TEXT_PROMPT, False)]
    want = {
        "a": [peft_logits(ad["base"], ad["a"], m, [image(0)] if i else []) for m, i in prompts],
        BASE: [peft_logits(ad["base"], None, m, [image(0)] if i else []) for m, i in prompts],
    }
    single = load(ad["base"], {"c": ad["c"]}, device="cpu")
    want["c"] = [single.logits(req(m, "c", i))[0] for m, i in prompts]

    engine = load(ad["base"], {"c": ad["c"], "a": ad["a"]}, device="cpu")
    assert torch.equal(newline(engine), base_value)  # loading did not write the shared base
    rows = [("a", 0), ("c", 0), (BASE, 0), ("a", 1), ("c", 1), (BASE, 1), ("a", 0), (BASE, 0)]
    got = engine.logits([req(prompts[p][0], n, prompts[p][1]) for n, p in rows], batch_size=8)
    for (name, p), logits in zip(rows, got, strict=True):
        assert close(logits, want[name][p]), (name, p, (logits - want[name][p]).abs().max())
    assert torch.equal(newline(engine), base_value)  # nor did running
    # Generation takes the same path; then removing the adapter leaves the base as it was.
    engine.generate([req(IMAGE_PROMPT, n) for n in ("a", "c", BASE)])
    engine.remove_adapter("a")
    assert torch.equal(newline(engine), base_value)
    assert close(engine.logits(req(IMAGE_PROMPT, BASE))[0], want[BASE][0])


@pytest.mark.parametrize("which", ["a", "old"])
def test_inspect_names_the_parameter_not_the_model(adapters, which):
    from vlmtune.adapters.inspect import inspect_adapter

    ad = adapters("llava_next")
    for base in (None, ad["base"]):
        report = inspect_adapter(ad[which], base)
        assert "model.image_newline" in report["full_modules"]["modules"]
        assert "model" not in report["full_modules"]["modules"]
        assert report["full_modules"]["roles"] == ["projector"]


def test_mixed_route_refuses_image_features_with_an_override(adapters):
    """A caller driving the seam by hand cannot mix an override adapter's image rows with others."""
    from vlmtune.infer import InferenceError

    ad = adapters("llava_next")
    engine = load(ad["base"], {"c": ad["c"], "a": ad["a"]}, device="cpu")
    rows = engine.prepare([req(IMAGE_PROMPT, "a"), req(IMAGE_PROMPT, "c")])
    inputs = engine.encode(rows)
    refused = pytest.raises(InferenceError, match=r"adapter 'a' replaces a bare parameter of model")
    with refused, torch.inference_mode(), engine.route(["a", "c"]):
        engine.model(**inputs)


@pytest.mark.parametrize("family", FAMILIES)
def test_serve_rows_get_their_own_newline(adapters, family):
    """Through the continuous-batching scheduler (prefill per request, decode steps shared with other
    adapters' rows), each row's first-token log-probability is that of its own adapter's prompt logits (for
    'a', PEFT's: see above), and greedy answers equal single-request generate."""
    import queue

    from test_serve_scheduler import reference
    from vlmtune.serve.sampling import Sampling
    from vlmtune.serve.scheduler import Scheduler, job_for

    ad = adapters(family)
    engine = load(ad["base"], {"a": ad["a"], "c": ad["c"], "plain": ad["plain"]}, device="cpu")
    names = ["a", "c", BASE, "plain", "a", "c", "a"]
    reqs = [Request(IMAGE_PROMPT, [image(k % 3)], name) for k, name in enumerate(names)]
    lengths = [8, 5, 7, 8, 6, 4, 3]
    want = reference(engine, reqs, lengths)
    first = [torch.log_softmax(engine.logits(r)[0][-1], dim=-1) for r in reqs]

    scheduler = Scheduler(engine, 16, 64)
    scheduler.start()
    events: queue.Queue = queue.Queue()
    try:
        for i, r in enumerate(reqs):
            sink = lambda e, i=i: events.put((i, e))  # noqa: E731
            scheduler.submit(
                job_for(engine, r, max_tokens=lengths[i], sampling=Sampling(logprobs=True), sink=sink)
            )
        logprobs: dict[int, list] = {i: [] for i in range(len(reqs))}
        text: dict[int, str] = {}
        while len(text) < len(reqs):
            i, event = events.get(timeout=120)
            assert event["type"] != "error", event
            logprobs[i] += event.get("logprobs") or []
            if event["type"] == "done":
                text[i] = event["text"]
    finally:
        scheduler.stop()
    assert [text[i] for i in range(len(reqs))] == [w.text for w in want]
    for i in range(len(reqs)):
        token = int(torch.argmax(first[i]))
        assert abs(logprobs[i][0]["logprob"] - float(first[i][token])) < 1e-4, (i, names[i])
    assert scheduler.peak_adapters >= 2  # rows of several adapters did share decode steps
    # Same image with and without the trained newline: the prompts' distributions differ.
    assert (first[0] - first[3]).abs().max() > 1e-3


@pytest.fixture(scope="module")
def trained(tiny_model, tmp_path_factory):
    """Two steps of `projector: full` (+ language LoRA) per family; the run dir."""
    from vlmtune.demo import write_split
    from vlmtune.training import run

    made: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in made:
            root = tmp_path_factory.mktemp(f"train-bare-{family}")
            data = write_split(root / "data", "train", 8, seed=0)
            made[family] = run(
                {
                    "model": str(tiny_model(family)),
                    "output_dir": str(root / "run"),
                    "data": {"train": str(data)},
                    "projector": "full",
                    "lr": 1e-2,
                    "max_steps": 2,
                    "batch_size": 4,
                    "save_steps": 1,
                    "precision": "fp32",
                }
            )
        return made[family]

    return get


@pytest.mark.parametrize("family", FAMILIES)
def test_projector_full_trains_and_stores_the_newline(tiny_model, trained, family):
    from vlmtune.adapters.manifest import read_manifest

    base = tiny_model(family)
    run_dir = trained(family)
    before = base_model(base).model.image_newline.detach()
    for folder in (run_dir / "adapter", run_dir / "checkpoints" / "step-1"):
        stored = load_file(folder / "adapter_model.safetensors")
        assert KEY in stored and stored[KEY].dtype == torch.float32
        assert read_manifest(folder).full_parameters == ["model.image_newline"]
    trained_value = load_file(run_dir / "adapter" / "adapter_model.safetensors")[KEY]
    assert (trained_value - before).abs().max() > 1e-4  # it was trainable and got a gradient
    step1 = load_file(run_dir / "checkpoints" / "step-1" / "adapter_model.safetensors")[KEY]
    assert not torch.equal(step1, trained_value)  # each save holds its own step's value

    # vlmtune's un-merged engine equals plain PEFT (which loads the newline into the base parameter).
    engine = load(base, {"t": run_dir / "adapter"}, device="cpu")
    assert not engine.adapters["t"].mixable
    for messages, images in ((IMAGE_PROMPT, [image(0)]), (TEXT_PROMPT, [])):
        got = engine.logits(Request(messages, images, "t"))[0]
        want = peft_logits(base, run_dir / "adapter", messages, images)
        assert close(got, want), (got - want).abs().max()


def test_a_tampered_newline_fails_the_integrity_check(tiny_model, trained):
    """The post-save check compares the stored newline with the live one like every other tensor."""
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    from vlmtune.training import integrity

    run_dir = trained("llava_next")
    folder = run_dir / "adapter"
    model = AutoModelForImageTextToText.from_pretrained(tiny_model("llava_next"), dtype=torch.float32)
    peft = PeftModel.from_pretrained(model, folder, is_trainable=True)
    peft.get_base_model().model.image_newline.requires_grad_(True)
    assert integrity.mismatches(peft, folder) == []
    with torch.no_grad():
        peft.get_base_model().model.image_newline.add_(1.0)
    assert any(KEY in p and "differs" in p for p in integrity.mismatches(peft, folder))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("which", ["a", "old", "trained"])
def test_merge_writes_the_newline(adapters, trained, family, which, tmp_path):
    """`merge --verify` passes; the merged folder keeps the base's on-disk names and holds the adapter's
    newline; where PEFT can load the folder itself (runtime keys), the merged tensors equal its
    `merge_and_unload`."""
    from test_merge_support import assert_tensors_match, merged_state, peft_merged
    from vlmtune import checkpoint
    from vlmtune.merging import merge

    ad = adapters(family)
    adapter = trained(family) / "adapter" if which == "trained" else ad[which]
    result = merge(ad["base"], adapter, tmp_path / "out", verify=True)
    assert result.verification["passed"] and result.verification["discriminating"]
    assert list(checkpoint.tensor_index(tmp_path / "out")) == list(checkpoint.tensor_index(ad["base"]))
    stored = load_file(adapter / "adapter_model.safetensors")
    want = stored[KEY if which != "old" else "base_model.model.image_newline"]
    ours = merged_state(tmp_path / "out")
    torch.testing.assert_close(ours["model.image_newline"], want, rtol=0, atol=0)
    if which != "old":  # PEFT 0.21 does not map the pre-4.52 key: no reference for it
        ref = peft_merged(ad["base"], [adapter])
        assert set(ours) == set(ref)
        assert_tensors_match(ours, ref)


def test_init_from_starts_from_the_stored_newline(tiny_model, trained, tmp_path):
    """A later stage (`init_from`) starts from the earlier adapter's newline, and `projector_lr` puts the
    newline in the projector's optimizer group."""
    from test_train_stages import AtStart
    from vlmtune.demo import write_split
    from vlmtune.training import run

    earlier = trained("llava_next") / "adapter"
    start = AtStart()
    run(
        {
            "model": str(tiny_model("llava_next")),
            "output_dir": str(tmp_path / "run"),
            "data": {"train": str(write_split(tmp_path / "data", "train", 4, seed=1))},
            "projector": "full",
            "projector_lr": 1e-4,
            "init_from": str(earlier),
            "max_steps": 1,
            "batch_size": 4,
            "precision": "fp32",
        },
        callbacks=[start],
    )
    stored = load_file(earlier / "adapter_model.safetensors")[KEY]
    torch.testing.assert_close(start.weights[KEY], stored, rtol=0, atol=0)
    projector_group = next(names for lr, names in start.groups if lr == 1e-4)
    assert KEY in projector_group


@pytest.mark.slow
def test_fsdp2_two_processes_equal_one(tiny_model, tmp_path):
    """Under FSDP2 the newline is a parameter of the root unit (sharded, gathered for the save, checked
    shard by shard): two processes give the adapter one process gives, newline included."""
    from test_train_multiprocess import adapter, config, torchrun
    from vlmtune.demo import write_split
    from vlmtune.training import run

    base = tiny_model("llava_next")
    data = write_split(tmp_path / "data", "train", 8, 0)
    short = {"max_steps": 4, "save_steps": 2}
    single = adapter(run(config(base, data, tmp_path / "single", **short)))
    done = torchrun(tmp_path, config(base, data, tmp_path / "fsdp2", distributed="fsdp2", **short))
    assert done.returncode == 0, done.stderr[-3000:]
    got = adapter(tmp_path / "fsdp2")
    assert sorted(got) == sorted(single) and KEY in got
    for key in single:
        torch.testing.assert_close(got[key], single[key], rtol=0, atol=1e-5, msg=key)
    assert (single[KEY] - base_model(base).model.image_newline.detach()).abs().max() > 1e-5
