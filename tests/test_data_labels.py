"""Assistant-only labels on every family: the supervised tokens decode to exactly each assistant turn followed
by the tokenizer's end-of-turn token, with the template's generation markers and with the prefix-rendering
fallback used for templates without them; truncation is counted before training."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor

from vlmtune.data import check_data
from vlmtune.data.collate import GENERATION_MARKER, IGNORE_INDEX, Collator, SampleDataset, TemplateError

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
            {"role": "system", "content": "Answer in a few words."},
            {"role": "user", "content": "<image>What is it?<image>"},
            {"role": "assistant", "content": "a big circle and a small square"},
            {"role": "user", "content": "How many?"},
            {"role": "assistant", "content": "two"},
        ],
        "images": ["a.png", "b.png"],
    },
    {
        "image": "b.png",
        "conversations": [
            {"from": "human", "value": "<image>\nDescribe the picture."},
            {"from": "gpt", "value": "There is one blue square in the image."},
        ],
    },
]
TEXT_ONLY = [
    {
        "messages": [
            {"role": "user", "content": "Hello there"},
            {"role": "assistant", "content": "hello, how are you"},
        ]
    },
]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("labels")
    Image.new("RGB", (56, 56), (200, 30, 30)).save(root / "a.png")
    Image.new("RGB", (84, 56), (30, 30, 200)).save(root / "b.png")
    (root / "images.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    (root / "text.jsonl").write_text("".join(json.dumps(r) + "\n" for r in TEXT_ONLY))
    return root / "images.jsonl", root / "text.jsonl"


def spans(labels: torch.Tensor) -> list[list[int]]:
    """Contiguous runs of supervised token ids."""
    out, current = [], []
    for token in labels.tolist():
        if token == IGNORE_INDEX:
            if current:
                out.append(current)
            current = []
        else:
            current.append(token)
    if current:
        out.append(current)
    return out


def batch(processor, path: Path, **kwargs) -> tuple[dict, list]:
    samples = check_data(path).samples
    dataset = SampleDataset(samples)
    return Collator(processor, **kwargs)([dataset[i] for i in range(len(dataset))]), samples


def without_markers(processor):
    processor.chat_template = GENERATION_MARKER.sub("", processor.chat_template).replace(
        "{% endgeneration %}", ""
    )
    assert "{% generation" not in processor.chat_template and "endgeneration" not in processor.chat_template
    return processor


@pytest.mark.parametrize("mode", ["markers", "prefix-fallback"])
def test_supervised_tokens_are_exactly_the_assistant_turns(tiny_model, family_name, data, mode):
    processor = AutoProcessor.from_pretrained(tiny_model(family_name))
    if mode == "prefix-fallback":
        without_markers(processor)
    tokenizer = processor.tokenizer
    for path in data:
        out, samples = batch(processor, path)
        assert out["input_ids"].shape == out["labels"].shape
        for row, sample in enumerate(samples):
            labels = out["labels"][row]
            assert (labels[out["attention_mask"][row] == 0] == IGNORE_INDEX).all()
            got = [tokenizer.decode(span) for span in spans(labels)]
            assert got == [text + tokenizer.eos_token for text in sample.assistant_texts]


def test_fallback_labels_equal_marker_labels(tiny_model, family_name, data):
    folder = tiny_model(family_name)
    with_markers = AutoProcessor.from_pretrained(folder)
    fallback = without_markers(AutoProcessor.from_pretrained(folder))
    for path in data:
        a, _ = batch(with_markers, path)
        b, _ = batch(fallback, path)
        assert torch.equal(a["labels"], b["labels"]) and torch.equal(a["input_ids"], b["input_ids"])


def test_loss_on_all_supervises_text_but_never_image_tokens_or_padding(tiny_model, data):
    processor = AutoProcessor.from_pretrained(tiny_model("qwen2_vl"))
    out, _ = batch(processor, data[0], loss_on="all")
    labels, ids = out["labels"], out["input_ids"]
    assert not (labels == processor.image_token_id).any()
    assert (labels[out["attention_mask"] == 0] == IGNORE_INDEX).all()
    text = out["attention_mask"].bool() & (ids != processor.image_token_id)
    assert torch.equal(labels[text], ids[text])


def test_template_that_is_not_prefix_stable_is_refused(tiny_model, data):
    processor = without_markers(AutoProcessor.from_pretrained(tiny_model("qwen2_vl")))
    # A template that renders earlier turns differently once more turns follow (e.g. drops old reasoning).
    processor.chat_template = processor.chat_template.replace(
        "{% for message in messages %}",
        "{% for message in messages %}{% if loop.length > 2 %}[long]{% endif %}",
        1,
    )
    with pytest.raises(TemplateError, match=re.escape("{% generation %}")):
        batch(processor, data[0])


def test_max_length_truncation_is_counted_and_unsafe_cuts_are_row_errors(tiny_model, data):
    processor = AutoProcessor.from_pretrained(tiny_model("qwen2_vl"))
    full = check_data(data[0], processor=processor)
    lengths = sorted(
        int(n) for n in batch(processor, data[0])[0]["attention_mask"].sum(dim=1)
    )  # per-row token counts
    assert full.longest == lengths[-1] and full.truncated_rows == 0 and full.tokens == sum(lengths)

    # Cut just before the last token of the longest row: it is truncated and still has supervised tokens.
    report = check_data(data[0], processor=processor, max_length=lengths[-1] - 1)
    assert report.truncated_rows == 1 and report.invalid_rows == 0
    assert "1 truncated to max_length" in report.summary()
    out, _ = batch(processor, data[0], max_length=lengths[-1] - 1)
    assert out["input_ids"].shape[1] == lengths[-1] - 1 and out["labels"].shape[1] == lengths[-1] - 1

    # Cut inside the image tokens: the rows are invalid, with a reason, instead of failing mid-training.
    tight = check_data(data[0], processor=processor, max_length=10)
    assert tight.invalid_rows == 3
    assert {e.code for e in tight.errors} == {"too_long"}
    assert all("image tokens" in e.message for e in tight.errors)
