"""Training throughput: `vlmtune train` vs. a plain transformers.Trainer + PEFT script, in one run.

Both train the same model (a `small` random Qwen2-VL written by `vlmtune tiny`), on the same data (the demo's
coloured-shapes rows), with the same settings: LoRA r=16 on the language model + the projector trained fully,
batch 8, lr 1e-3, fp32, the same number of steps, one checkpoint at the end, the same torch thread count.
Each training runs in its own subprocess, alternating the order, `--repeats` times.

Reported per variant (median over repeats):
- tokens/s: non-padding input tokens / seconds inside `Trainer.train()` (the Trainer's own `train_runtime`
  and `num_input_tokens_seen`, measured the same way for both),
- end-to-end seconds of the whole process (imports, data checks, model load, training, saving),
- peak RSS of the training process (exact, getrusage) and peak PSS of its process tree (sampled every
  0.2 s from /proc; includes DataLoader workers, counts pages they share with the parent once).
The ratio is vlmtune / plain tokens/s; it must be >= 1.0.

    python bench/train_throughput.py --work /tmp/bench-train [--steps 40] [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LANGUAGE = (
    r"model\.language_model\.layers\.\d+\.(?:self_attn\.(?:q_proj|k_proj|v_proj|o_proj)"
    r"|mlp\.(?:gate_proj|up_proj|down_proj))"
)
SETTINGS = {"r": 16, "alpha": 32, "dropout": 0.05, "lr": 1e-3, "batch_size": 8, "seed": 0}


# Qwen2-VL's real vocabulary (embedding and lm_head rows); the tiny tokenizer uses the first 1,024 ids.
QWEN2_VL_VOCAB = 151936


def prepare(work: Path, size: str, vocab: str, rows: int) -> tuple[Path, Path]:
    from vlmtune import tiny
    from vlmtune.demo import write_split

    model, data = work / f"model-{size}-{vocab}", work / "data" / "train.jsonl"
    if not model.exists():
        overrides = {"vocab_size": QWEN2_VL_VOCAB} if vocab == "qwen2_vl" else None
        tiny.write("qwen2_vl", model, size=size, seed=0, overrides=overrides)
    if not data.exists():
        write_split(work / "data", "train", rows, seed=0)
    return model, data


# -- the two variants (each runs in a child process) --------------------------------------------------------


def child_vlmtune(model: Path, data: Path, out: Path, steps: int) -> dict:
    import vlmtune

    run_dir = vlmtune.train(
        {
            "model": str(model),
            "output_dir": str(out),
            "data": {"train": str(data)},
            "lora": {"r": SETTINGS["r"], "alpha": SETTINGS["alpha"], "dropout": SETTINGS["dropout"]},
            "projector": "full",
            "lr": SETTINGS["lr"],
            "batch_size": SETTINGS["batch_size"],
            "max_steps": steps,
            "save_steps": steps,
            "logging_steps": 10,
            "precision": "fp32",
            "seed": SETTINGS["seed"],
            "resume": False,
        }
    )
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    summary = next(r for r in rows if "train_runtime" in r)
    tokens = max(r["tokens"] for r in rows if "tokens" in r)
    return {"tokens": tokens, "train_runtime": summary["train_runtime"]}


def child_plain(model: Path, data: Path, out: Path, steps: int) -> dict:
    """What a user writes with transformers + PEFT alone (the anchor)."""
    import torch
    from datasets import load_dataset
    from peft import LoraConfig, get_peft_model
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor, Trainer, TrainingArguments

    processor = AutoProcessor.from_pretrained(model)
    base = AutoModelForImageTextToText.from_pretrained(model, dtype=torch.float32)
    peft_model = get_peft_model(
        base,
        LoraConfig(
            r=SETTINGS["r"],
            lora_alpha=SETTINGS["alpha"],
            lora_dropout=SETTINGS["dropout"],
            target_modules=LANGUAGE,
            modules_to_save=["model.visual.merger"],
            task_type="CAUSAL_LM",
        ),
    )
    dataset = load_dataset("json", data_files=str(data), split="train")
    root = data.parent

    def collate(rows: list[dict]) -> dict:
        conversations, images = [], []
        for row in rows:
            user, answer = row["messages"][0]["content"], row["messages"][1]["content"]
            conversations.append(
                [
                    {
                        "role": "user",
                        "content": [{"type": "image"}, {"type": "text", "text": user.replace("<image>", "")}],
                    },
                    {"role": "assistant", "content": [{"type": "text", "text": answer}]},
                ]
            )
            images.append([Image.open(root / p).convert("RGB") for p in row["images"]])
        batch = processor.apply_chat_template(
            conversations,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
            return_assistant_tokens_mask=True,
            processor_kwargs={"images": images, "padding": True},
        )
        mask = batch.pop("assistant_masks").bool() & batch["attention_mask"].bool()
        batch["labels"] = batch["input_ids"].masked_fill(~mask, -100)
        return dict(batch)

    args = TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=SETTINGS["batch_size"],
        learning_rate=SETTINGS["lr"],
        max_steps=steps,
        lr_scheduler_type="cosine",
        save_steps=steps,
        logging_steps=10,
        seed=SETTINGS["seed"],
        use_cpu=not torch.cuda.is_available(),
        remove_unused_columns=False,
        include_num_input_tokens_seen="non_padding",
        report_to=[],
    )
    trainer = Trainer(model=peft_model, args=args, train_dataset=dataset, data_collator=collate)
    result = trainer.train()
    return {"tokens": trainer.state.num_input_tokens_seen, "train_runtime": result.metrics["train_runtime"]}


def child(variant: str, model: Path, data: Path, out: Path, steps: int, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    started = time.perf_counter()
    fn = child_vlmtune if variant == "vlmtune" else child_plain
    result = fn(model, data, out, steps)
    result["seconds"] = time.perf_counter() - started
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(result), flush=True)


# -- the driver ------------------------------------------------------------------------------------------


def tree_pss_kb(pid: int) -> int:
    """Proportional set size of a process and its descendants (DataLoader workers included; pages they
    share are counted once in total). Linux /proc; 0 where unavailable."""
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        try:
            for line in Path(f"/proc/{current}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
                    break
            for task in Path(f"/proc/{current}/task").iterdir():
                todo.extend(int(c) for c in (task / "children").read_text().split())
        except (OSError, ValueError):
            continue
    return total


def run_child(variant: str, model: Path, data: Path, out: Path, steps: int, threads: int) -> dict:
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    command = [sys.executable, __file__, "--child", variant, "--model", str(model), "--data", str(data)]
    command += ["--out", str(out), "--steps", str(steps), "--threads", str(threads)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    started = time.perf_counter()
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
        proc = subprocess.Popen(command, stdout=stdout, stderr=stderr, text=True, env=env)
        peak_pss = 0
        while proc.poll() is None:
            peak_pss = max(peak_pss, tree_pss_kb(proc.pid))
            time.sleep(0.2)
        stdout.seek(0)
        stderr.seek(0)
        out_text, err_text = stdout.read(), stderr.read()
    if proc.returncode != 0:
        raise SystemExit(f"{variant} failed:\n{err_text[-4000:]}")
    line = next(line for line in out_text.splitlines() if line.startswith("RESULT "))
    result = json.loads(line.removeprefix("RESULT "))
    result["process_seconds"] = time.perf_counter() - started
    result["tree_peak_pss_mb"] = peak_pss / 1024
    result["tokens_per_second"] = result["tokens"] / result["train_runtime"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--work", type=Path, default=Path("/tmp/vlmtune-bench-train"))
    parser.add_argument("--size", default="small", choices=("tiny", "small"))
    parser.add_argument(
        "--vocab",
        default="qwen2_vl",
        choices=("qwen2_vl", "tokenizer"),
        help="vocabulary rows of the model: Qwen2-VL's 151,936 (default) or the tiny tokenizer's 1,024",
    )
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads in each child")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--child", choices=("vlmtune", "plain"), help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.model, args.data, args.out, args.steps, args.threads)
        return

    args.work.mkdir(parents=True, exist_ok=True)
    model, data = prepare(args.work, args.size, args.vocab, args.rows)
    results: dict[str, list[dict]] = {"vlmtune": [], "plain": []}
    for repeat in range(args.repeats):
        order = ("vlmtune", "plain") if repeat % 2 == 0 else ("plain", "vlmtune")
        for variant in order:
            result = run_child(variant, model, data, args.work / f"out-{variant}", args.steps, args.threads)
            results[variant].append(result)
            print(
                f"repeat {repeat} {variant:8s} {result['tokens_per_second']:9.1f} tokens/s  "
                f"train {result['train_runtime']:6.1f} s  process {result['process_seconds']:6.1f} s  "
                f"peak RSS {result['peak_rss_mb']:7.1f} MB  tree PSS {result['tree_peak_pss_mb']:7.1f} MB",
                flush=True,
            )

    def median(variant: str, key: str) -> float:
        return statistics.median(r[key] for r in results[variant])

    summary = {
        variant: {
            key: round(median(variant, key), 1)
            for key in (
                "tokens_per_second",
                "train_runtime",
                "process_seconds",
                "peak_rss_mb",
                "tree_peak_pss_mb",
            )
        }
        for variant in results
    }
    ratio = median("vlmtune", "tokens_per_second") / median("plain", "tokens_per_second")
    report = {
        "model": f"qwen2_vl {args.size}, vocab {args.vocab}",
        "steps": args.steps,
        "repeats": args.repeats,
        "threads": args.threads,
        "cpu_count": os.cpu_count(),
        "settings": SETTINGS,
        "median": summary,
        "ratio_tokens_per_second": round(ratio, 3),
        "runs": results,
    }
    print(
        "\n| variant | tokens/s | train s | process s | peak RSS MB | peak PSS, process tree MB |\n"
        + "|---|---|---|---|---|---|\n"
        + "\n".join(
            f"| {v} | {s['tokens_per_second']} | {s['train_runtime']} | {s['process_seconds']} | {s['peak_rss_mb']} "
            f"| {s['tree_peak_pss_mb']} |"
            for v, s in summary.items()
        )
        + f"\n\nratio vlmtune / plain tokens/s: {ratio:.3f}"
    )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    if ratio < 1.0:
        raise SystemExit(f"vlmtune is slower than the plain script (ratio {ratio:.3f} < 1.0)")


if __name__ == "__main__":
    main()
