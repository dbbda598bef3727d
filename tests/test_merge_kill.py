"""Killing a merge midway (a real `vlmtune merge` process, stopped while it writes its first shard) leaves
no OUT and the base untouched; SIGTERM also removes the temp folder, SIGKILL cannot (it leaves only a
hidden `.OUT.tmp-*` folder beside OUT). Also: the merge command imports neither torch, transformers nor
PEFT, and a refusal is one line on stderr with exit status 2."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_merge_support import make_adapter, tree_checksums

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def big(tiny_model, tmp_path_factory):
    """A ~100 MB fp32 base (the 'small' size, several shards) and a LoRA adapter for it."""
    base = tiny_model("qwen2_vl", size="small", max_shard_size="30MB")
    adapter = make_adapter(
        base, tmp_path_factory.mktemp("kill") / "adapter", r=8, modules_to_save=["model.visual.merger"]
    )
    return base, adapter


def merge_command(base: Path, adapter: Path, out: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "vlmtune",
        "merge",
        "--base",
        str(base),
        "--adapter",
        str(adapter),
        "--out",
        str(out),
    ]


def start_and_stop_midway(base: Path, adapter: Path, out: Path) -> tuple[subprocess.Popen, Path]:
    """Start `vlmtune merge`, and SIGSTOP it as soon as its temp folder holds a shard being written."""
    proc = subprocess.Popen(
        merge_command(base, adapter, out),
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=lambda: os.nice(10),  # the watcher below must not be starved by the merge it watches
    )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        tmps = [p for p in out.parent.glob(f".{out.name}.tmp-*") if any(p.glob("*.safetensors"))]
        if tmps:
            proc.send_signal(signal.SIGSTOP)
            return proc, tmps[0]
        if proc.poll() is not None:
            break
        time.sleep(0.0005)
    proc.kill()
    pytest.fail(
        f"never caught the merge mid-write (exit {proc.poll()}): {proc.stderr.read().decode()[-500:]}"
    )


def test_sigkill_midway_leaves_no_output_and_base_untouched(big, tmp_path):
    base, adapter = big
    before = tree_checksums(base)
    out = tmp_path / "out"
    proc, tmp = start_and_stop_midway(base, adapter, out)
    shards = list(tmp.glob("*.safetensors"))
    assert not out.exists() and shards  # stopped mid-write: output half written, only in the temp folder
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()
    assert tree_checksums(base) == before
    # a rerun is unaffected by the leftover temp folder
    done = subprocess.run(
        merge_command(base, adapter, out),
        env=ENV,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert (out / "vlmtune.json").is_file()


def test_sigterm_midway_cleans_up(big, tmp_path):
    base, adapter = big
    before = tree_checksums(base)
    out = tmp_path / "out"
    proc, tmp = start_and_stop_midway(base, adapter, out)
    assert tmp.exists() and not out.exists()
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGCONT)
    proc.wait(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM
    assert not out.exists()
    assert not list(tmp_path.glob(".out.tmp-*")), "SIGTERM should remove the temp folder"
    assert tree_checksums(base) == before


def test_cli_is_light_and_refusals_are_one_line(tiny_model, tmp_path):
    """`vlmtune merge` runs without importing torch/transformers/peft; a refusal prints one line, exit 2."""
    base = tiny_model("llava")
    adapter = make_adapter(base, tmp_path / "a")
    probe = (
        "import sys\n"
        "from vlmtune import cli\n"
        "sys.argv = ['vlmtune', 'merge', '--base', sys.argv[1], '--adapter', sys.argv[2], '--out', sys.argv[3]]\n"
        "try:\n    cli.main()\nexcept SystemExit as e:\n    assert not e.code, e.code\n"
        "heavy = [m for m in ('torch', 'transformers', 'peft', 'safetensors.torch') if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    ok = subprocess.run(
        [sys.executable, "-c", probe, str(base), str(adapter), str(tmp_path / "out")],
        env=ENV,
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0, ok.stderr
    assert "HEAVY []" in ok.stdout
    assert "merged into" in ok.stdout and "check:" in ok.stdout
    bad = subprocess.run(
        merge_command(base, adapter, base / "x"),
        env=ENV,
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "inside the base" in lines[0]
