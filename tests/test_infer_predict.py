"""`vlmtune predict` and `vlmtune chat`: datasets in the training formats, adapters per row or every row
under every adapter, scores against references, and the interactive chat, checked against the engine's
single-request generation on a fresh load."""

from __future__ import annotations

import io
import json

import pytest
from typer.testing import CliRunner

from test_infer_fixtures import image, make_adapter
from vlmtune.cli import app
from vlmtune.errors import VlmtuneError
from vlmtune.infer import BASE, GenerationSettings, Request, load
from vlmtune.infer.chat import run_chat
from vlmtune.infer.data import read_prompts
from vlmtune.infer.metrics import exact_match, token_f1
from vlmtune.infer.predict import predict

SETTINGS = GenerationSettings(max_new_tokens=4)


@pytest.fixture(scope="module")
def setup(tiny_model, tmp_path_factory):
    base = tiny_model("qwen2_vl")
    root = tmp_path_factory.mktemp("predict")
    adapters = {
        "b": make_adapter(base, root / "b", seed=31),
        "c": make_adapter(base, root / "c", seed=32, r=8),
    }
    image(1).save(root / "red.png")
    image(2).save(root / "img2.png")
    return base, adapters, root


def fresh_prediction(base, adapter_dir, name, messages, images):
    engine = load(base, {name: adapter_dir} if adapter_dir else None, device="cpu")
    return engine.generate(Request(messages, images, name if adapter_dir else BASE), SETTINGS)[0].text


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_every_row_runs_under_every_adapter_and_is_scored(setup, tmp_path):
    base, adapters, root = setup
    msg0 = [{"role": "user", "content": "<image>What colour is it?"}]
    want_b0 = fresh_prediction(base, adapters["b"], "b", msg0, [root / "red.png"])
    rows = [
        {"id": "r0", "messages": [*msg0, {"role": "assistant", "content": want_b0}], "images": ["red.png"]},
        {
            "conversations": [
                {"from": "human", "value": "<image>\nWhat is this?"},
                {"from": "gpt", "value": "a cat"},
            ],
            "image": "img2.png",
        },
        {"messages": [{"role": "user", "content": "Say hello."}]},
    ]
    data = write_jsonl(root / "data.jsonl", rows)
    out = tmp_path / "preds.jsonl"
    summary = predict(
        base, adapters, data, out, batch_size=4, settings=SETTINGS, device="cpu", progress=False
    )
    preds = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(p["id"], p["adapter"]) for p in preds] == [
        ("r0", "b"),
        ("r0", "c"),
        (1, "b"),
        (1, "c"),
        (2, "b"),
        (2, "c"),
    ]
    assert (
        preds[0]["prompt"] == "<image>What colour is it?" and preds[2]["prompt"] == "<image>\nWhat is this?"
    )
    assert preds[0]["prediction"] == want_b0 and preds[0]["reference"] == want_b0
    assert "reference" not in preds[4]
    msg1 = [{"role": "user", "content": "<image>\nWhat is this?"}]
    assert preds[3]["prediction"] == fresh_prediction(base, adapters["c"], "c", msg1, [root / "img2.png"])
    b = summary.scores["b"]
    assert b.rows == 3 and b.with_reference == 2
    assert b.exact_match == pytest.approx((1.0 + exact_match(preds[2]["prediction"], "a cat")) / 2)
    assert b.token_f1 == pytest.approx((1.0 + token_f1(preds[2]["prediction"], "a cat")) / 2)
    assert summary.rows == 6 and summary.generated_tokens == sum(p["generated_tokens"] for p in preds)
    assert summary.samples_per_s > 0 and summary.peak_rss_bytes > 0
    assert "exact match" in summary.render()


def test_adapter_column_picks_the_adapter(setup, tmp_path):
    base, adapters, _ = setup
    msg = [{"role": "user", "content": "Say hello."}]
    rows = [
        {"messages": msg, "adapter": "c"},
        {"messages": msg, "adapter": "none"},
        {"messages": msg, "adapter": "b"},
    ]
    out = tmp_path / "preds.jsonl"
    predict(
        base,
        adapters,
        write_jsonl(tmp_path / "d.jsonl", rows),
        out,
        settings=SETTINGS,
        device="cpu",
        progress=False,
    )
    preds = [json.loads(line) for line in out.read_text().splitlines()]
    assert [p["adapter"] for p in preds] == ["c", BASE, "b"]
    assert preds[1]["prediction"] == fresh_prediction(base, None, BASE, msg, [])
    assert preds[2]["prediction"] == fresh_prediction(base, adapters["b"], "b", msg, [])


def test_unknown_adapter_in_data_fails_before_generation(setup, tmp_path):
    base, adapters, _ = setup
    rows = [{"messages": [{"role": "user", "content": "hi"}], "adapter": "zzz"}]
    out = tmp_path / "preds.jsonl"
    with pytest.raises(VlmtuneError, match=r"1 row\(s\) name an adapter that is not loaded \(row 0: 'zzz'\)"):
        predict(base, adapters, write_jsonl(tmp_path / "d.jsonl", rows), out, device="cpu", progress=False)
    assert not out.exists()


def test_bad_rows_are_all_named_before_loading(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    rows = [
        {"messages": [{"role": "user", "content": "<image><image>two?"}], "images": ["a.png"]},
        {"messages": [{"role": "assistant", "content": "hi"}]},
        {"text": "no conversation"},
        {"messages": [{"role": "user", "content": "<image>?"}], "images": ["missing.png"]},
    ]
    with pytest.raises(VlmtuneError) as err:
        read_prompts(write_jsonl(tmp_path / "d.jsonl", rows))
    message = str(err.value)
    assert "4 row(s)" in message
    assert "line 1: the text has 2 <image> placeholder(s) but the row lists 1 image(s)" in message
    assert "line 2: turn 0 is assistant; a conversation starts with a user turn" in message
    assert "line 3: row has neither 'messages'" in message
    assert "missing.png does not exist" in message


def test_metrics_normalise_like_squad():
    assert exact_match("A red circle.", "red circle") == 1.0
    assert exact_match("red square", "red circle") == 0.0
    assert token_f1("red square", "red circle") == pytest.approx(0.5)
    assert token_f1("", "") == 1.0 and token_f1("x", "") == 0.0


def test_cli_predict(setup, tmp_path):
    base, adapters, _ = setup
    data = write_jsonl(
        tmp_path / "d.jsonl",
        [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "hello"}]}],
    )
    out = tmp_path / "preds.jsonl"
    result = CliRunner().invoke(
        app,
        [
            "predict",
            "--model",
            str(base),
            "--adapter",
            f"bee={adapters['b']}",
            "--adapter",
            str(adapters["c"]),
            "--data",
            str(data),
            "--out",
            str(out),
            "--max-new-tokens",
            "3",
            "--device",
            "cpu",
            "--no-progress",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout[result.stdout.index("{") :])
    assert set(summary["scores"]) == {"bee", "c"}
    assert [json.loads(line)["adapter"] for line in out.read_text().splitlines()] == ["bee", "c"]


def test_chat_switches_adapters_and_attaches_images(setup):
    base, adapters, root = setup
    engine = load(base, adapters, device="cpu")
    lines = iter(
        [
            "/image " + str(root / "red.png"),
            "What colour?",
            "/adapter c",
            "And now?",
            "/adapters",
            "/adapter nope",
            "/reset",
            "/quit",
        ]
    )
    out = io.StringIO()
    session = run_chat(engine, "b", settings=SETTINGS, input_fn=lambda _: next(lines), out=out)
    text = out.getvalue()
    first = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": str(root / "red.png")},
                {"type": "text", "text": "What colour?"},
            ],
        }
    ]
    want1 = fresh_prediction(base, adapters["b"], "b", first, [])
    second = [*first, {"role": "assistant", "content": want1}, {"role": "user", "content": "And now?"}]
    want2 = fresh_prediction(base, adapters["c"], "c", second, [])
    assert want1 in text and want2 in text
    assert "now using c" in text and "* c" in text
    assert "error: no adapter called 'nope'" in text
    assert session.history == [] and session.adapter == "c"


def test_cli_chat_reads_stdin(setup):
    base, adapters, _ = setup
    result = CliRunner().invoke(
        app,
        [
            "chat",
            "--model",
            str(base),
            "--adapter",
            f"b={adapters['b']}",
            "--max-new-tokens",
            "3",
            "--device",
            "cpu",
        ],
        input="Hello\n/help\n",
    )
    assert result.exit_code == 0, result.output
    assert "chatting with" in result.stdout and "/adapter NAME" in result.stdout


def test_prompt_rows_share_the_training_reader_but_may_omit_the_answer(tmp_path):
    """Prediction rows go through the training parser in prompt mode: no answer needed and an `adapter`
    column allowed; in training mode both are row errors."""
    from vlmtune.data.formats import parse_row, read_rows

    path = write_jsonl(
        tmp_path / "d.jsonl", [{"messages": [{"role": "user", "content": "hi"}], "adapter": "a"}]
    )
    (raw,) = read_rows(path)
    sample, errors = parse_row(raw, prompt=True)
    assert errors == [] and sample.turns[-1].role == "user"
    _, errors = parse_row(raw)
    assert {e.code for e in errors} == {"unknown_key", "no_assistant"}
    (row,) = read_prompts(path)
    assert (row.adapter, row.reference, row.prompt) == ("a", None, "hi")
