"""Packed batches are exact, on CPU in fp32, for every family that declares a packed path: per-sample losses
and LoRA gradients of one packed row equal those of the same samples run one at a time (and the padded
batch's loss); changing one sample leaves the other samples' logits bit-identical; a family without an
exact path refuses `packing: on`. The references are the model run on each sample alone, unpacked."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from vlmtune import families
from vlmtune.data import check_data
from vlmtune.data.collate import IGNORE_INDEX, Collator, SampleDataset
from vlmtune.data.packing import (
    MIN_PADDING,
    PackedCollator,
    PackingError,
    choose,
    positions_for,
)
from vlmtune.training.loss import supervised_token_loss

ROWS = [
    {
        "messages": [
            {"role": "user", "content": "<image>What colour is the shape?"},
            {"role": "assistant", "content": "red"},
        ],
        "images": ["a.png"],
    },
    {
        "messages": [
            {"role": "user", "content": "<image>Compare the two pictures.<image>"},
            {
                "role": "assistant",
                "content": "the first is a big red circle and the second a small blue square",
            },
            {"role": "user", "content": "Which is larger?"},
            {"role": "assistant", "content": "the circle"},
        ],
        "images": ["a.png", "b.png"],
    },
    {
        "messages": [
            {"role": "user", "content": "Say hello."},
            {"role": "assistant", "content": "hello there, how are you doing today"},
        ]
    },
]
# Every registered family that declares a packed path is held to these tests; every other one must refuse.
PACKABLE = [name for name, family in families.FAMILIES.items() if family.packed_positions]
UNPACKABLE = [name for name, family in families.FAMILIES.items() if not family.packed_positions]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("packing")
    Image.new("RGB", (56, 56), (200, 30, 30)).save(root / "a.png")
    Image.new("RGB", (84, 56), (30, 30, 200)).save(root / "b.png")
    Image.new("RGB", (56, 56), (30, 200, 30)).save(root / "c.png")
    path = root / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


def lora_model(folder: Path, attention: str):
    """The tiny base with LoRA on the language model, B made non-zero so every LoRA factor gets a gradient."""
    family = families.detect(json.loads((folder / "config.json").read_text()))
    base = AutoModelForImageTextToText.from_pretrained(
        folder, dtype=torch.float32, attn_implementation=attention
    )
    model = get_peft_model(
        base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=family.default_target_regex)
    )
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    return model.eval(), family


def per_token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each supervised next token (row-major), from logits_to_keep rows."""
    shifted = labels[:, 1:]
    return F.cross_entropy(logits.float(), shifted[shifted != IGNORE_INDEX], reduction="none")


def forward(model, batch: dict):
    """The model on a collator batch, labels held back (the Trainer passes them to the loss function)."""
    return model(**{k: v for k, v in batch.items() if k != "labels"})


def lora_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("name", PACKABLE)
def test_packed_losses_and_lora_gradients_equal_one_sample_at_a_time(tiny_model, data, name, attention):
    folder = tiny_model(name)
    processor = AutoProcessor.from_pretrained(folder)
    model, family = lora_model(folder, attention)
    samples = SampleDataset(check_data(data).samples)
    items = [samples[i] for i in range(len(samples))]
    single = Collator(processor, supervised_logits_only=True)
    packed_collator = PackedCollator(
        processor, positions_for(family, model.config), supervised_logits_only=True
    )
    batch = packed_collator(items)
    assert "attention_mask" not in batch and batch["input_ids"].shape[0] == 1
    total = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())

    # One at a time: each sample's per-token losses, and the gradient of their sum normalised by the
    # whole batch's supervised-token count (what the Trainer does for one global batch).
    reference, counts = [], []
    model.zero_grad()
    for item in items:
        one = single([item])
        out = forward(model, one)
        reference.append(per_token_losses(out.logits, one["labels"]).detach())
        counts.append(reference[-1].numel())
        supervised_token_loss(out, one["labels"], num_items_in_batch=total).backward()
    expected_grads = lora_grads(model)
    assert sum(counts) == total

    model.zero_grad()
    out = forward(model, batch)
    losses = per_token_losses(out.logits, batch["labels"])
    supervised_token_loss(out, batch["labels"], num_items_in_batch=total).backward()
    for got, want in zip(losses.detach().split(counts), reference, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    grads = lora_grads(model)
    assert grads.keys() == expected_grads.keys() and grads
    for key, want in expected_grads.items():
        assert want.abs().max() > 0, key
        torch.testing.assert_close(grads[key], want, rtol=0, atol=1e-5, msg=key)

    # The padded batch of the same rows (vlmtune's padded path) has the same loss.
    if not family.mixed_image_batches:
        return
    with torch.no_grad():
        padded = single(items)
        torch.testing.assert_close(
            supervised_token_loss(forward(model, padded), padded["labels"]),
            supervised_token_loss(forward(model, batch), batch["labels"]),
            rtol=0,
            atol=1e-5,
        )


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("name", PACKABLE)
def test_changing_one_sample_leaves_the_others_bit_identical(tiny_model, data, name, attention):
    folder = tiny_model(name)
    processor = AutoProcessor.from_pretrained(folder)
    model, family = lora_model(folder, attention)
    samples = check_data(data).samples
    collator = PackedCollator(processor, positions_for(family, model.config))
    items = list(SampleDataset(samples))
    batch = collator(items)
    lengths = [collator.rows([it])["input_ids"].shape[1] for it in items]
    starts = [sum(lengths[:i]) for i in range(len(lengths))]

    def logits(b: dict) -> torch.Tensor:
        with torch.no_grad():
            return forward(model, b).logits[0]

    before = logits(batch)
    # Sample 0 changes: its text tokens (not its image tokens) are replaced, and its image's pixels.
    changed = dict(batch)
    ids = batch["input_ids"].clone()
    span = slice(starts[0], starts[0] + lengths[0])
    text = batch["labels"][0, span] != IGNORE_INDEX
    ids[0, span][text] = (ids[0, span][text] + 7) % 50 + 10
    changed["input_ids"] = ids
    first_image_rows = collator.rows([items[0]])["pixel_values"].shape[0]
    pixels = batch["pixel_values"].clone()
    pixels[:first_image_rows] = torch.randn_like(pixels[:first_image_rows])
    changed["pixel_values"] = pixels
    after = logits(changed)
    assert not torch.equal(after[span], before[span])  # the change reached sample 0
    for start, length in zip(starts[1:], lengths[1:], strict=True):
        assert torch.equal(after[start : start + length], before[start : start + length])


def test_positions_restart_per_sample_with_the_text_row_first(tiny_model, data):
    folder = tiny_model("qwen2_vl")
    processor = AutoProcessor.from_pretrained(folder)
    model, family = lora_model(folder, "sdpa")
    items = list(SampleDataset(check_data(data).samples))
    collator = PackedCollator(processor, positions_for(family, model.config))
    batch = collator(items)
    positions = batch["position_ids"]
    assert positions.shape == (4, 1, batch["input_ids"].shape[1])
    lengths = [collator.rows([it])["input_ids"].shape[1] for it in items]
    assert positions[0, 0].tolist() == [p for n in lengths for p in range(n)]
    # The rotary rows are the model's own get_rope_index of each sample alone.
    start = 0
    for item, n in zip(items, lengths, strict=True):
        one = collator.rows([item])
        kwargs = {k: one[k] for k in ("image_grid_thw",) if k in one}
        rope, _ = model.base_model.model.model.get_rope_index(
            one["input_ids"], one["mm_token_type_ids"], **kwargs
        )
        assert torch.equal(positions[1:, :, start : start + n], rope)
        start += n


def test_the_families_declare_what_was_verified():
    verified = {"qwen2_vl", "qwen2_5_vl", "qwen3_vl", "glm4v", "llava", "internvl"}
    assert verified <= set(PACKABLE) and {"mllama", "qwen3_5"} <= set(UNPACKABLE)


@pytest.mark.parametrize("name", UNPACKABLE)
def test_every_family_without_a_packed_path_says_why(name):
    """Each undeclared family states its own reason (not the generic default), in one line."""
    family = families.get(name)
    default = families.Family.__dataclass_fields__["packing_unsupported"].default
    assert family.packing_unsupported and family.packing_unsupported != default
    with pytest.raises(PackingError) as raised:
        choose("on", family, None)
    assert family.packing_unsupported in str(raised.value) and "\n" not in str(raised.value)


def test_qwen3_5_refuses_for_its_linear_attention():
    with pytest.raises(PackingError, match=r"qwen3_5 has no exact packed path \(.*Gated DeltaNet.*seq_idx"):
        choose("on", families.get("qwen3_5"), None)


@pytest.mark.parametrize("name", UNPACKABLE)
def test_family_without_an_exact_path_refuses_on_and_auto_pads(name):
    family = families.get(name)
    with pytest.raises(PackingError, match=rf"packing: on, but {name} has no exact packed path \(.+\)"):
        choose("on", family, None)
    choice = choose("auto", family, None)
    assert not choice.packed and "falls back to padded batches" in choice.message
    with pytest.raises(PackingError, match="no exact packed path"):
        positions_for(family, None)


def test_mllama_says_why(tiny_model):
    config = AutoModelForImageTextToText.from_pretrained(tiny_model("mllama")).config
    with pytest.raises(PackingError, match=r"mllama has no exact packed path \(.*cross-attention"):
        choose("on", families.get("mllama"), config)
    assert not choose("off", families.get("qwen2_vl"), config).packed


def test_attention_kernel_without_a_packed_mask_refuses_on(tiny_model):
    config = AutoModelForImageTextToText.from_pretrained(tiny_model("qwen2_vl")).config
    qwen = families.get("qwen2_vl")
    assert choose("on", qwen, config).packed
    config.get_text_config()._attn_implementation = "paged|sdpa"
    with pytest.raises(PackingError, match=re.escape("attention implementation 'paged|sdpa'")):
        choose("on", qwen, config)
    assert not choose("auto", qwen, config).packed


def test_auto_packs_only_where_padded_batches_would_carry_padding(tiny_model):
    config = AutoModelForImageTextToText.from_pretrained(tiny_model("qwen2_vl")).config
    qwen = families.get("qwen2_vl")
    uniform = choose("auto", qwen, config, padding=MIN_PADDING / 2)
    assert not uniform.packed and uniform.message.startswith(
        "packing: auto pads: padded batches of these rows"
    )
    assert choose("auto", qwen, config, padding=MIN_PADDING).packed
    assert choose("auto", qwen, config).packed  # no lengths known (token budgets): the family decides
    assert choose("on", qwen, config, padding=0.0).packed  # `on` packs anyway
