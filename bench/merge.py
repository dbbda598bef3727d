"""Benchmark `vlmtune merge` against the I/O floor (`cp -r` + `sync`) and the PEFT path, as whole processes.

    python bench/merge.py [--work DIR] [--repeats 3] [--keep] [--json out.json]

Generates two multi-shard bf16 Qwen2-VL checkpoints with the same widths (hidden 1536, MLP 8960, the
widths of Qwen2-VL-2B; a small vision tower; vocabulary 32000) and 6 vs 12 decoder layers (~0.8 GB and
~1.4 GB), plus a plain PEFT adapter per model: r=32 on every language-model projection, `modules_to_save`
on the projector (`model.visual.merger`). Then, per model and repeat, in a fresh process each:

- cp:      `cp -r BASE OUT && sync`
- peft:    load the whole model (dtype auto), `PeftModel.from_pretrained(...).merge_and_unload()`,
           `save_pretrained(OUT)`, then `sync`
- vlmtune: `vlmtune merge --base BASE --adapter ADAPTER --out OUT && sync`

Wall time and peak RSS come from `os.wait4` on the process (the peak of the process tree it waited for).
Reports medians, the ratios the merge issue sets as goals, and the machine load. Deletes the generated
GBs at the end unless --keep.

    python bench/merge.py --work DIR --keep --against OTHER/src [--repeats 5]

compares two versions of vlmtune instead (this checkout vs the `src` folder of another one, e.g. a
`git worktree` of main): only `vlmtune merge`, the two alternating on the same models, the order swapped
every repeat, so machine load hits both alike.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HIDDEN, INTERMEDIATE, HEADS, KV_HEADS, VOCAB = 1536, 8960, 12, 2, 32000
VISION_WIDTH, VISION_DEPTH = 640, 4
SIZES = {"0.8GB": 6, "1.4GB": 12}  # decoder layers
SHARD = "300MB"
RANK = 32

PEFT_SCRIPT = """
import sys, torch
from transformers import AutoModelForImageTextToText
from peft import PeftModel
base, adapter, out = sys.argv[1:4]
model = AutoModelForImageTextToText.from_pretrained(base, dtype="auto")
model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
model.save_pretrained(out)
"""


def make_model(folder: Path, layers: int) -> None:
    """A random bf16 checkpoint saved by transformers itself (hub layout, sharded), with the tiny
    tokenizer and processor, and its adapter beside it."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForImageTextToText

    from vlmtune import families, tiny
    from vlmtune.families.qwen2_vl import tiny as qwen2_vl

    family = families.get("qwen2_vl")
    spec = families.tiny_spec("qwen2_vl")
    _, processor = tiny.build("qwen2_vl")  # tokenizer + processor only; the model is built below
    tokens = {t: processor.tokenizer.convert_tokens_to_ids(t) for t in spec.special_tokens}
    raw = spec.config("tiny", tokens, VOCAB)
    raw["text_config"].update(
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=layers,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        rope_scaling={"type": "mrope", "mrope_section": qwen2_vl.mrope_section(HIDDEN, HEADS)},
    )
    raw["vision_config"].update(embed_dim=VISION_WIDTH, depth=VISION_DEPTH, num_heads=10, hidden_size=HIDDEN)
    config = AutoConfig.for_model(raw.pop("model_type"), **raw)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config, dtype=torch.bfloat16)
    model = model.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02, generator=gen)
    model.config.dtype = "bfloat16"
    base = folder / "base"
    model.save_pretrained(base, max_shard_size=SHARD)
    processor.save_pretrained(base)
    lora = LoraConfig(
        r=RANK,
        lora_alpha=2 * RANK,
        target_modules=family.default_target_regex,
        modules_to_save=["model.visual.merger"],
        init_lora_weights=False,
    )
    peft_model = get_peft_model(model, lora)
    peft_model.save_pretrained(folder / "adapter")


def measure(cmd: list[str], env: dict[str, str] | None = None) -> tuple[float, float]:
    """(wall seconds, peak RSS in GB) of one process tree."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode() if proc.stderr else ""
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[:3]} failed ({proc.returncode}): {err[-2000:]}")
    return wall, usage.ru_maxrss / 1024**2  # ru_maxrss is in KiB on Linux


def commands(folder: Path, out: Path) -> dict[str, list[str]]:
    base, adapter = folder / "base", folder / "adapter"
    vlmtune = str(Path(sys.executable).with_name("vlmtune"))
    return {
        "cp": ["bash", "-c", f'cp -r "{base}" "{out}" && sync'],
        "peft": [
            "bash",
            "-c",
            f'"{sys.executable}" -c \'{PEFT_SCRIPT}\' "{base}" "{adapter}" "{out}" && sync',
        ],
        "vlmtune": [
            "bash",
            "-c",
            f'"{vlmtune}" merge --base "{base}" --adapter "{adapter}" --out "{out}" && sync',
        ],
    }


def compare_versions(
    folder: Path, out: Path, env: dict[str, str], other_src: Path, repeats: int, loads: list[float]
) -> dict[str, dict[str, object]]:
    """`vlmtune merge` of this checkout ('this') and of `other_src` ('other'), interleaved."""
    here = str(Path(__file__).resolve().parents[1] / "src")
    versions = {"this": here, "other": str(other_src.resolve())}
    runs: dict[str, list[tuple[float, float]]] = {k: [] for k in versions}
    for rep in range(repeats):
        order = list(versions) if rep % 2 == 0 else list(versions)[::-1]
        for name in order:
            shutil.rmtree(out, ignore_errors=True)
            subprocess.run(["sync"], check=True)
            loads.append(os.getloadavg()[0])
            cmd = commands(folder, out)["vlmtune"]
            runs[name].append(measure(cmd, {**env, "PYTHONPATH": versions[name]}))
            print(f"  {folder.name} {name} #{rep + 1}: {runs[name][-1][0]:.2f} s, {runs[name][-1][1]:.3f} GB")
    shutil.rmtree(out, ignore_errors=True)
    return {
        name: {
            "seconds": statistics.median(r[0] for r in rs),
            "peak_rss_gb": statistics.median(r[1] for r in rs),
            "seconds_all": [round(r[0], 2) for r in rs],
        }
        for name, rs in runs.items()
    }


def folder_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temp folder)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--keep", action="store_true", help="keep the generated models")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures as JSON")
    ap.add_argument("--against", type=Path, default=None, help="src folder of another vlmtune to A/B against")
    ap.add_argument("--generate", nargs=2, metavar=("DIR", "LAYERS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.generate:
        make_model(Path(args.generate[0]), int(args.generate[1]))
        return
    work = args.work or Path(tempfile.mkdtemp(prefix="vlmtune-bench-merge-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    results: dict[str, dict[str, dict[str, float]]] = {}
    loads = [os.getloadavg()[0]]
    try:
        for label, layers in SIZES.items():
            folder = work / label
            if not (folder / "adapter").is_dir():
                print(f"generating the {label} model ({layers} layers) ...", flush=True)
                # in a child process: a parent that held the model would pass its peak RSS on to every
                # child it forks afterwards (ru_maxrss counts the pages shared before exec)
                subprocess.run(
                    [sys.executable, __file__, "--generate", str(folder), str(layers)], env=env, check=True
                )
            size = folder_size(folder / "base")
            subprocess.run(["sync"], check=True)
            if args.against:
                results[label] = compare_versions(
                    folder, work / "out", env, args.against, args.repeats, loads
                )
                continue
            runs: dict[str, list[tuple[float, float]]] = {k: [] for k in ("cp", "peft", "vlmtune")}
            for rep in range(args.repeats):
                for name, cmd in commands(folder, work / "out").items():
                    shutil.rmtree(work / "out", ignore_errors=True)
                    subprocess.run(["sync"], check=True)
                    loads.append(os.getloadavg()[0])
                    runs[name].append(measure(cmd, env))
                    print(
                        f"  {label} {name} #{rep + 1}: {runs[name][-1][0]:.2f} s, {runs[name][-1][1]:.2f} GB",
                        flush=True,
                    )
            shutil.rmtree(work / "out", ignore_errors=True)
            results[label] = {
                name: {
                    "seconds": statistics.median(r[0] for r in rs),
                    "peak_rss_gb": statistics.median(r[1] for r in rs),
                    "seconds_all": [round(r[0], 2) for r in rs],
                }
                for name, rs in runs.items()
            }
            results[label]["model_gb"] = {"bytes": size / 1e9}  # type: ignore[dict-item]
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    if args.against:
        print(
            json.dumps(
                {"results": results, "load_average_1min": {"min": min(loads), "max": max(loads)}}, indent=2
            )
        )
        return
    big, small = results["1.4GB"], results["0.8GB"]
    goals = {
        "vlmtune / (cp+sync) <= 4": big["vlmtune"]["seconds"] / big["cp"]["seconds"],
        "peft / vlmtune >= 3": big["peft"]["seconds"] / big["vlmtune"]["seconds"],
        "RSS vlmtune / peft <= 0.45": big["vlmtune"]["peak_rss_gb"] / big["peft"]["peak_rss_gb"],
        "RSS vlmtune 1.4GB / 0.8GB <= 1.15": big["vlmtune"]["peak_rss_gb"] / small["vlmtune"]["peak_rss_gb"],
    }
    met = {
        k: (v <= float(k.split()[-1]) if "<=" in k else v >= float(k.split()[-1])) for k, v in goals.items()
    }
    report = {
        "results": results,
        "goals": {k: {"ratio": round(v, 3), "met": met[k]} for k, v in goals.items()},
        "load_average_1min": {"min": min(loads), "max": max(loads)},
        "cpus": os.cpu_count(),
        "repeats": args.repeats,
    }
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
