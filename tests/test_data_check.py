"""Row checks: a corpus of malformed rows (one kind per row) where each row gets its own reason with file and
line; valid rows of every accepted format pass; `vlmtune data check` and training refuse invalid rows unless
`data.skip_invalid` is set."""

from __future__ import annotations

import json
import re
from pathlib import Path

import datasets
import pytest
from PIL import Image
from typer.testing import CliRunner

from vlmtune.cli import app
from vlmtune.data import InvalidDataError, check_data, read_rows
from vlmtune.data.formats import DataError

OK_TURNS = [{"role": "user", "content": "<image>What colour?"}, {"role": "assistant", "content": "red"}]


def ok(**extra):
    return {"messages": OK_TURNS, "images": ["ok.png"], **extra}


# (expected error code, raw JSONL line). Every line holds exactly one problem.
MALFORMED = [
    ("invalid_json", '{"messages": [{"role": "user", "content": "hi"}'),
    ("not_object", json.dumps(["a", "list"])),
    ("no_conversation", json.dumps({"images": ["ok.png"], "text": "hi"})),
    ("both_formats", json.dumps({**ok(), "conversations": [{"from": "human", "value": "hi"}]})),
    ("unknown_key", json.dumps(ok(label="cat"))),
    ("conversation_type", json.dumps({"messages": "What colour?"})),
    ("empty_conversation", json.dumps({"messages": []})),
    ("turn_type", json.dumps({"messages": ["hi", OK_TURNS[1]]})),
    ("turn_missing_field", json.dumps({"messages": [{"role": "user"}, OK_TURNS[1]]})),
    (
        "unknown_turn_key",
        json.dumps({"messages": [{**OK_TURNS[0], "name": "bob"}, OK_TURNS[1]], "images": ["ok.png"]}),
    ),
    ("unknown_role", json.dumps({"messages": [{"role": "bot", "content": "hi"}, OK_TURNS[1]]})),
    ("content_type", json.dumps({"messages": [{"role": "user", "content": 42}, OK_TURNS[1]]})),
    (
        "content_type",
        json.dumps(
            {"messages": [{"role": "user", "content": [{"type": "image", "path": "ok.png"}]}, OK_TURNS[1]]}
        ),
    ),
    ("role_order", json.dumps({"messages": [OK_TURNS[1], OK_TURNS[0]], "images": ["ok.png"]})),
    (
        "role_order",
        json.dumps(
            {
                "messages": [OK_TURNS[0], {"role": "user", "content": "again"}, OK_TURNS[1]],
                "images": ["ok.png"],
            }
        ),
    ),
    (
        "role_order",
        json.dumps({"messages": [*OK_TURNS, {"role": "system", "content": "late"}], "images": ["ok.png"]}),
    ),
    ("no_assistant", json.dumps({"messages": [OK_TURNS[0]], "images": ["ok.png"]})),
    (
        "empty_assistant",
        json.dumps({"messages": [OK_TURNS[0], {"role": "assistant", "content": "  "}], "images": ["ok.png"]}),
    ),
    ("empty_user", json.dumps({"messages": [{"role": "user", "content": ""}, OK_TURNS[1]]})),
    ("image_count", json.dumps({"messages": OK_TURNS, "images": ["ok.png", "ok.png"]})),
    ("image_count", json.dumps({"messages": OK_TURNS})),
    (
        "image_placeholder_role",
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": "hi"},
                    {"role": "assistant", "content": "<image>red"},
                ],
                "images": ["ok.png"],
            }
        ),
    ),
    ("images_type", json.dumps({"messages": OK_TURNS, "images": [3]})),
    ("image_missing", json.dumps({"messages": OK_TURNS, "images": ["nope.png"]})),
    ("image_missing", json.dumps({"messages": OK_TURNS, "images": ["subdir"]})),
    ("image_corrupt", json.dumps({"messages": OK_TURNS, "images": ["garbage.png"]})),
    ("image_corrupt", json.dumps({"messages": OK_TURNS, "images": ["truncated.png"]})),
    (
        "unknown_role",
        json.dumps(
            {
                "image": "ok.png",
                "conversations": [{"from": "robot", "value": "<image>hi"}, {"from": "gpt", "value": "x"}],
            }
        ),
    ),
    (
        "turn_missing_field",
        json.dumps({"image": "ok.png", "conversations": [{"from": "human"}, {"from": "gpt", "value": "x"}]}),
    ),
]
VALID = [
    json.dumps(ok(id="row-1")),
    json.dumps(
        {
            "image": "ok.png",
            "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "red"}],
        }
    ),
    json.dumps({"messages": [{"role": "system", "content": "Be brief."}, *OK_TURNS], "images": ["ok.png"]}),
    json.dumps(
        {
            "messages": [
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]},
                OK_TURNS[1],
            ],
            "images": ["ok.png"],
        }
    ),
    json.dumps({"messages": [{"role": "user", "content": "no image here"}, OK_TURNS[1]]}),
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    Image.new("RGB", (56, 56), (200, 30, 30)).save(root / "ok.png")
    (root / "garbage.png").write_bytes(b"this is not an image at all")
    Image.new("RGB", (64, 64), (1, 2, 3)).save(root / "full.png")
    raw = (root / "full.png").read_bytes()
    (root / "truncated.png").write_bytes(raw[: len(raw) // 2])
    (root / "subdir").mkdir()
    lines = [line for _, line in MALFORMED] + VALID
    (root / "rows.jsonl").write_text("\n".join(lines) + "\n")
    return root / "rows.jsonl"


def test_each_malformed_row_gets_its_own_reason(corpus):
    assert len({code for code, _ in MALFORMED}) >= 15
    report = check_data(corpus)
    by_line: dict[int, set[str]] = {}
    for error in report.errors:
        assert error.where.startswith(f"{corpus} line ")
        by_line.setdefault(int(error.where.rsplit(" ", 1)[1]), set()).add(error.code)
        assert str(error).startswith(str(corpus)) and len(error.message) > 20
    expected = {i + 1: {code} for i, (code, _) in enumerate(MALFORMED)}
    assert by_line == expected
    assert report.rows == len(MALFORMED) + len(VALID)
    assert report.invalid_rows == len(MALFORMED) and len(report.samples) == len(VALID)


def test_messages_name_what_to_fix(corpus):
    messages: dict[str, str] = {}
    for error in check_data(corpus).errors:
        messages[error.code] = messages.get(error.code, "") + error.message + "\n"
    assert "nope.png does not exist" in messages["image_missing"]
    assert "relative to the data file" in messages["image_missing"]
    assert "1 <image> placeholder(s) but the row lists 2 image(s)" in messages["image_count"]
    assert "did you" not in messages["unknown_key"] and "'label'" in messages["unknown_key"]
    assert "use one of system, user, assistant" in messages["unknown_role"]


def test_json_array_and_datasets_folder_and_parquet(tmp_path, corpus):
    Image.new("RGB", (56, 56), (0, 200, 0)).save(tmp_path / "ok.png")
    rows = [ok(), {"messages": [OK_TURNS[1]], "images": ["ok.png"]}]
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    report = check_data(tmp_path / "rows.json")
    assert {e.where for e in report.errors} == {f"{tmp_path / 'rows.json'} index 1"}

    ds = datasets.Dataset.from_list(
        [{"messages": OK_TURNS, "images": ["ok.png"]}, {"messages": OK_TURNS, "images": ["missing.png"]}]
    )
    ds.save_to_disk(str(tmp_path / "saved"))
    Image.new("RGB", (56, 56), (0, 200, 0)).save(tmp_path / "saved" / "ok.png")
    report = check_data(tmp_path / "saved")
    assert len(report.samples) == 1 and [e.code for e in report.errors] == ["image_missing"]
    assert report.errors[0].where == f"{tmp_path / 'saved'} row 1"

    # Images stored inside the dataset (an Image column with bytes) are checked too.
    png = {"bytes": (tmp_path / "ok.png").read_bytes(), "path": None}
    broken = {"bytes": b"not a png", "path": None}
    embedded = datasets.Dataset.from_dict(
        {"messages": [OK_TURNS, OK_TURNS, OK_TURNS], "images": [[png], [png], [broken]]},
        features=datasets.Features(
            {
                "messages": datasets.List(
                    {"role": datasets.Value("string"), "content": datasets.Value("string")}
                ),
                "images": datasets.List(datasets.Image()),
            }
        ),
    )
    embedded.to_parquet(str(tmp_path / "rows.parquet"))
    report = check_data(tmp_path / "rows.parquet")
    assert len(report.samples) == 2 and all(isinstance(s.images[0], bytes) for s in report.samples)
    assert [(e.where, e.code) for e in report.errors] == [
        (f"{tmp_path / 'rows.parquet'} row 2", "image_corrupt")
    ]

    with pytest.raises(DataError, match="unknown data file type"):
        list(read_rows(corpus.with_suffix(".png").parent / "ok.png"))


def test_cli_data_check_lists_rows_and_fails(corpus):
    result = CliRunner().invoke(app, ["data", "check", str(corpus)])
    assert result.exit_code != 0
    assert f"{corpus} line 1: not valid JSON" in result.output
    assert f"{len(MALFORMED)} invalid" in result.output


def test_training_refuses_invalid_rows_unless_skipping(tiny_model, corpus, tmp_path):
    from vlmtune.training import run

    config = {
        "model": str(tiny_model("qwen2_vl")),
        "output_dir": str(tmp_path / "run"),
        "data": {"train": str(corpus)},
        "max_steps": 1,
        "precision": "fp32",
    }
    with pytest.raises(
        InvalidDataError, match=f"{len(MALFORMED)} of {len(MALFORMED) + len(VALID)} rows"
    ) as info:
        run(config)
    assert f"{corpus} line 2: a row must be a JSON object" in str(info.value)
    assert not (tmp_path / "run").exists()  # a refused run leaves nothing behind

    run_dir = run({**config, "data": {"train": str(corpus), "skip_invalid": True}})
    summary = json.loads((run_dir / "data.json").read_text())["train"]
    assert summary["invalid"] == len(MALFORMED) and summary["valid"] == len(VALID)
    assert (run_dir / "adapter" / "adapter_model.safetensors").is_file()


def test_cli_data_check_with_model_tokenizes_rows(tiny_model, tmp_path):
    from vlmtune.demo import write_split

    data = write_split(tmp_path, "train", 6, seed=0)
    result = CliRunner().invoke(
        app, ["data", "check", str(data), "--model", str(tiny_model("qwen2_vl")), "--max-length", "56"]
    )
    assert result.exit_code == 0, result.output
    assert "6 rows, 6 valid, 0 invalid" in result.output and "longest row 57" in result.output
    # Rows are 56 or 57 tokens long, so the rows cut at 56 are the tokens beyond 6 x 56.
    tokens = int(re.search(r"; (\d+) tokens", result.output).group(1))
    assert f"; {tokens - 6 * 56} truncated to max_length=56" in result.output and tokens > 6 * 56
