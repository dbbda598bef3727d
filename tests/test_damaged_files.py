"""A corpus of damaged files through every verb: each ends in exit code 2 and one line `error: ...` naming
the damaged file, never a traceback, and nothing is written (no OUT, no temp folder, inputs untouched).

The damages are the ones users meet (a partial download, a hand-edited header, a config saved as a
list): safetensors headers that are not JSON or not an object, a header length or offsets past the end
of the file, overlapping byte ranges, a dtype/shape that disagrees with the byte range, an unknown dtype,
a truncated file; and garbage or non-object JSON in config.json, the shard index, processor/tokenizer
configs, adapter_config.json and vlmtune.json. Verbs run in-process through `cli.main()` (what the
`vlmtune` command runs), plus a few as real subprocesses.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

import vlmtune
from test_merge_support import make_adapter
from vlmtune import checkpoint, cli
from vlmtune.adapters.manifest import BaseInfo, Manifest
from vlmtune.demo import write_split
from vlmtune.errors import VlmtuneError

SHARD = "<the shard with most tensors>"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


# ---- damaging a safetensors file ---------------------------------------------------------------------
def split(raw: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def join(header: object, data: bytes) -> bytes:
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + data


def entries(header: dict) -> list[dict]:
    """The tensor entries with bytes, in data order."""
    found = [
        v for k, v in header.items() if k != "__metadata__" and v["data_offsets"][1] > v["data_offsets"][0]
    ]
    return sorted(found, key=lambda v: v["data_offsets"][0])


def edit(change: Callable[[dict, bytes], object]) -> Callable[[bytes], bytes]:
    def damage(raw: bytes) -> bytes:
        header, data = split(raw)
        return join(change(header, data), data)

    return damage


def offsets_beyond_end(header: dict, data: bytes) -> dict:
    last = entries(header)[-1]
    last["data_offsets"] = [o + len(data) for o in last["data_offsets"]]
    return header


def overlapping(header: dict, data: bytes) -> dict:
    first, second = entries(header)[:2]
    length = second["data_offsets"][1] - second["data_offsets"][0]
    second["data_offsets"] = [first["data_offsets"][0], first["data_offsets"][0] + length]
    return header


def shape_mismatch(header: dict, data: bytes) -> dict:
    entries(header)[0]["shape"][0] += 1
    return header


def unknown_dtype(header: dict, data: bytes) -> dict:
    entries(header)[0]["dtype"] = "Q4_K"
    return header


TENSOR_DAMAGES: dict[str, Callable[[bytes], bytes]] = {
    "garbage_header": lambda raw: raw[:8] + b"#" * struct.unpack("<Q", raw[:8])[0] + split(raw)[1],
    "header_not_object": edit(lambda header, data: [sorted(header)]),
    "header_length_beyond_file": lambda raw: struct.pack("<Q", len(raw) * 4) + raw[8:],
    "offsets_beyond_end": edit(offsets_beyond_end),
    "overlapping_ranges": edit(overlapping),
    "shape_vs_bytes": edit(shape_mismatch),
    "unknown_dtype": edit(unknown_dtype),
    "truncated": lambda raw: raw[: len(raw) * 2 // 3],
    "empty_file": lambda raw: b"",
}
GARBAGE_JSON = {
    "garbage": b'{"model_type": "qwen2_vl", oops',
    "list": b"[1, 2, 3]",
    "binary": b"\xff\xfe\x00",
}

# (target folder, file, damage name, new bytes from old) -> one damaged case per entry
CASES: dict[str, tuple[str, str, Callable[[bytes], bytes]]] = {}
for name, fn in TENSOR_DAMAGES.items():
    CASES[f"base-shard-{name}"] = ("base", SHARD, fn)
    CASES[f"adapter-weights-{name}"] = ("adapter", ADAPTER_WEIGHTS, fn)
for kind, text in GARBAGE_JSON.items():
    CASES[f"base-config-{kind}"] = ("base", "config.json", lambda raw, t=text: t)
    CASES[f"adapter-config-{kind}"] = ("adapter", "adapter_config.json", lambda raw, t=text: t)
    CASES[f"adapter-manifest-{kind}"] = ("adapter", "vlmtune.json", lambda raw, t=text: t)
CASES["base-index-garbage"] = ("base", "model.safetensors.index.json", lambda raw: GARBAGE_JSON["garbage"])
CASES["base-index-traversal"] = (
    "base",
    "model.safetensors.index.json",
    lambda raw: json.dumps({"weight_map": {"x": "../../etc/passwd"}}).encode(),
)
CASES["base-processor-config-garbage"] = (
    "base",
    "processor_config.json",
    lambda raw: GARBAGE_JSON["garbage"],
)
CASES["base-tokenizer-config-list"] = ("base", "tokenizer_config.json", lambda raw: GARBAGE_JSON["list"])
CASES["adapter-tokenizer-config-garbage"] = (
    "adapter",
    "tokenizer_config.json",
    lambda raw: GARBAGE_JSON["garbage"],
)
CASES["adapter-manifest-fields"] = ("adapter", "vlmtune.json", lambda raw: b'{"format": "vlmtune-adapter/1"}')
CASES["adapter-llava-config-garbage"] = ("adapter", "config.json", lambda raw: GARBAGE_JSON["garbage"])

BASE_CASES = sorted(k for k, v in CASES.items() if v[0] == "base")
ADAPTER_CASES = sorted(k for k, v in CASES.items() if v[0] == "adapter")


def checksums(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def corpus(tiny_model, tmp_path_factory):
    """`corpus(case)` -> (base, adapter, damaged file): copies of a sharded tiny base and a PEFT adapter
    for it, one of them damaged; made once per case and shared by the verbs (which must not write)."""
    root = tmp_path_factory.mktemp("damaged")
    good_base = tiny_model("qwen2_vl", max_shard_size="200KB")
    good_adapter = make_adapter(good_base, root / "good-adapter")
    data = write_split(root / "data", "rows", 2, seed=0)
    made: dict[str, tuple[Path, Path, Path]] = {}

    def get(case: str) -> tuple[Path, Path, Path]:
        if case not in made:
            target, file, damage = CASES[case]
            base, adapter = root / case / "base", root / case / "adapter"
            shutil.copytree(good_base, base)
            shutil.copytree(good_adapter, adapter)
            if file == SHARD:
                file = max(base.glob("model-*.safetensors"), key=lambda p: len(split(p.read_bytes())[0])).name
            path = (base if target == "base" else adapter) / file
            old = path.read_bytes() if path.is_file() else b""
            path.write_bytes(damage(old))
            made[case] = (base, adapter, path)
        return made[case]

    get.data = data  # type: ignore[attr-defined]
    get.root = root  # type: ignore[attr-defined]
    return get


def run_cli(args: list[str], monkeypatch, capsys) -> tuple[int, str]:
    """`vlmtune ARGS` in this process, as the console script runs it: (exit code, stderr)."""
    monkeypatch.setattr(sys, "argv", ["vlmtune", *args])
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        cli.main()
    return stop.value.code, capsys.readouterr().err


def assert_one_line_error(code: int, err: str, damaged: Path) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    assert str(damaged) in lines[0], lines[0]


def assert_untouched(case_dir: Path, before: dict[str, dict[str, str]]) -> None:
    assert sorted(p.name for p in case_dir.iterdir()) == sorted(before), "nothing new beside the inputs"
    for name, sums in before.items():
        assert checksums(case_dir / name) == sums, f"{name} was modified"


def verbs(base: Path, adapter: Path, out: Path, data: Path, target: str) -> dict[str, list[str]]:
    common = {
        "merge": ["merge", "--base", str(base), "--adapter", str(adapter), "--out", str(out)],
        "predict": [
            "predict",
            "--model",
            str(base),
            "--adapter",
            str(adapter),
            "--data",
            str(data),
            "--out",
            str(out),
            "--no-progress",
        ],
        "inspect-adapter-with-base": ["inspect", str(adapter), "--base", str(base)],
    }
    if target == "base":
        common["inspect-model"] = ["inspect", str(base)]
    else:
        common["inspect-adapter"] = ["inspect", str(adapter)]
    return common


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_verb_refuses_in_one_line(case, corpus, monkeypatch, capsys):
    base, adapter, damaged = corpus(case)
    case_dir = base.parent
    before = {"base": checksums(base), "adapter": checksums(adapter)}
    out = case_dir / "out"
    for verb, args in verbs(base, adapter, out, corpus.data, CASES[case][0]).items():
        code, err = run_cli(args, monkeypatch, capsys)
        assert_one_line_error(code, err, damaged)
        assert not out.exists(), f"{verb} wrote {out}"
        assert_untouched(case_dir, before)


@pytest.mark.parametrize("case", sorted(CASES))
def test_load_refuses_in_one_line(case, corpus):
    base, adapter, damaged = corpus(case)
    with pytest.raises(VlmtuneError) as info:
        vlmtune.load(base, adapters={"a": adapter}, device="cpu")
    assert str(damaged) in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("case", BASE_CASES)
def test_train_refuses_a_damaged_base(case, corpus, tmp_path, monkeypatch, capsys):
    base, _, damaged = corpus(case)
    config = tmp_path / "train.yaml"
    run_dir = tmp_path / "run"
    config.write_text(
        yaml.safe_dump({"model": str(base), "output_dir": str(run_dir), "data": {"train": str(corpus.data)}})
    )
    code, err = run_cli(["train", str(config), "max_steps=1"], monkeypatch, capsys)
    assert_one_line_error(code, err, damaged)
    assert not run_dir.exists()


@pytest.mark.parametrize("case", ["adapter-weights-truncated", "adapter-weights-shape_vs_bytes"])
def test_train_init_from_a_damaged_adapter(case, corpus, tmp_path):
    """`init_from` reads the earlier adapter's weights through the same reader: a damaged file is one
    line naming it, before the run dir exists."""
    base, adapter, damaged = corpus(case)
    earlier = tmp_path / "earlier"
    shutil.copytree(adapter, earlier)
    info = BaseInfo(
        str(base), checkpoint.fingerprint(base), "Qwen2VLForConditionalGeneration", "qwen2_vl", "qwen2_vl"
    )
    Manifest(base=info).write(earlier)
    run_dir = tmp_path / "run"
    config = {"model": str(base), "output_dir": str(run_dir), "data": {"train": str(corpus.data)}}
    with pytest.raises(VlmtuneError) as error:
        vlmtune.train({**config, "max_steps": 1, "init_from": str(earlier)})
    assert str(earlier / damaged.name) in str(error.value) and "\n" not in str(error.value)
    assert not run_dir.exists()


@pytest.mark.parametrize("case", [k for k in BASE_CASES if k.endswith(".json") or "config" in k])
def test_data_check_refuses_a_damaged_base_config(case, corpus, monkeypatch, capsys):
    base, _, damaged = corpus(case)
    code, err = run_cli(["data", "check", str(corpus.data), "--model", str(base)], monkeypatch, capsys)
    assert_one_line_error(code, err, damaged)


@pytest.mark.parametrize(
    ("case", "verb"),
    [("adapter-weights-garbage_header", "merge"), ("adapter-weights-truncated", "inspect-adapter")],
)
def test_the_command_itself_prints_one_line(case, verb, corpus):
    """Through the real console entry (a subprocess): no traceback reaches the terminal."""
    base, adapter, damaged = corpus(case)
    out = base.parent / "out-subprocess"
    args = verbs(base, adapter, out, corpus.data, CASES[case][0])[verb]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "vlmtune", *args], capture_output=True, text=True, env=env)
    assert_one_line_error(done.returncode, done.stderr, damaged)
    assert not out.exists()
