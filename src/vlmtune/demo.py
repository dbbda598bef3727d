"""`make demo` / `vlmtune demo`: the whole LoRA life cycle on a tiny Qwen2-VL that visibly learns a
synthetic visual task on CPU.

Coloured shapes on light backgrounds; each row asks either "What colour is the shape?" (6 colours) or
"What shape is it?" (4 shapes). The demo writes a tiny random model and then, with vlmtune's own verbs:
measures greedy exact-match accuracy of the base on held-out images (`predict`), trains a LoRA on the
language model with the projector trained fully (`train`), measures the adapter un-merged (`predict`),
merges it (`merge --verify`), and measures the merged folder loaded with plain transformers, which must
answer as the un-merged adapter did.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from pathlib import Path
from typing import Any

from . import families
from .errors import VlmtuneError

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 160, 40),
    "blue": (30, 60, 220),
    "yellow": (225, 205, 20),
    "purple": (140, 40, 170),
    "orange": (245, 130, 20),
}
SHAPES = ("circle", "square", "triangle", "cross")
QUESTIONS = {"colour": ("What colour is the shape?", tuple(COLOURS)), "shape": ("What shape is it?", SHAPES)}
IMAGE_SIZE = 56
MARKER = ".vlmtune-demo"

# Settings measured to reach >= 0.95 held-out accuracy on 2 CPU cores (docs/training.md has the figures).
TRAIN_SETTINGS: dict[str, Any] = {
    "lora": {"r": 16, "alpha": 32, "dropout": 0.0},
    "projector": "full",
    "lr": 1e-3,
    "warmup": 0.1,
    "scheduler": "cosine",
    "batch_size": 8,
    "logging_steps": 50,
    "precision": "fp32",
    # `packing: auto` (the default) pads here: the rows are one 56-px image and a one-word answer, so padded
    # batches are ~1% padding and packing would only cost its per-sample encoding (1.45x slower on CPU).
}
# A text init_range of 0.1 instead of 0.02 lets the tiny model learn 2-3x faster (FIELD_NOTES §6).
MODEL_OVERRIDES = {"initializer_range": 0.1}


def draw(colour: str, shape: str, rng: random.Random, size: int | None = None) -> Any:
    """One image: a shape of a colour at a random place and size on a random light background."""
    from PIL import Image, ImageDraw

    size = size or IMAGE_SIZE
    background = tuple(rng.randint(215, 255) for _ in range(3))
    img = Image.new("RGB", (size, size), background)
    pen = ImageDraw.Draw(img)
    side = rng.randint(size * 7 // 10, size * 9 // 10)
    x, y = rng.randint(2, size - side - 2), rng.randint(2, size - side - 2)
    fill = COLOURS[colour]
    if shape == "circle":
        pen.ellipse([x, y, x + side, y + side], fill=fill)
    elif shape == "square":
        pen.rectangle([x, y, x + side, y + side], fill=fill)
    elif shape == "triangle":
        pen.polygon([(x + side / 2, y), (x, y + side), (x + side, y + side)], fill=fill)
    else:
        third = side // 3
        pen.rectangle([x + third, y, x + 2 * third, y + side], fill=fill)
        pen.rectangle([x, y + third, x + side, y + 2 * third], fill=fill)
    return img


def write_split(folder: Path, name: str, rows: int, seed: int) -> Path:
    """`name.jsonl` in the messages+images format, images under `folder/images/name/`."""
    rng = random.Random(seed)
    image_dir = folder / "images" / name
    image_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(rows):
        colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
        draw(colour, shape, rng).save(image_dir / f"{i}.png")
        kind = rng.choice(sorted(QUESTIONS))
        question = QUESTIONS[kind][0]
        answer = colour if kind == "colour" else shape
        lines.append(
            {
                "messages": [
                    {"role": "user", "content": f"<image>{question}"},
                    {"role": "assistant", "content": answer},
                ],
                "images": [f"images/{name}/{i}.png"],
            }
        )
    path = folder / f"{name}.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def chance(path: Path) -> float:
    """Expected exact match of guessing uniformly among the classes each question allows."""
    from .data import read_rows

    rows = [r.value for r in read_rows(path)]
    sizes = {q: len(classes) for q, classes in QUESTIONS.values()}
    return sum(1 / sizes[r["messages"][0]["content"].removeprefix("<image>")] for r in rows) / len(rows)


def exact_match(model: Any, processor: Any, data: Path, batch_size: int = 32) -> tuple[float, list[str]]:
    """Greedy generation with plain transformers on each row's question (independent of vlmtune's engine);
    an answer counts when it equals the reference exactly. Returns (accuracy, answers)."""
    import torch

    from .data import check_data, to_messages
    from .data.images import open_image

    samples = check_data(data).samples
    tokenizer = processor.tokenizer
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    correct = 0
    all_answers: list[str] = []
    try:
        for start in range(0, len(samples), batch_size):
            batch = samples[start : start + batch_size]
            inputs = processor.apply_chat_template(
                [to_messages(s, with_answer=False) for s in batch],
                add_generation_prompt=True,
                tokenize=True,
                return_dict=True,
                return_tensors="pt",
                processor_kwargs={
                    "images": [[open_image(i) for i in s.images] for s in batch],
                    "padding": True,
                },
            )
            with torch.inference_mode():
                out = model.generate(
                    **inputs, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id
                )
            answers = tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
            correct += sum(a.strip() == s.assistant_texts[-1] for a, s in zip(answers, batch, strict=True))
            all_answers += answers
    finally:
        tokenizer.padding_side = side
    return correct / len(samples), all_answers


def prepare_out(out: Path) -> None:
    """Reuse `out` only when an earlier demo made it; never delete anything else."""
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).is_file():
            raise VlmtuneError(f"{out} exists and was not made by `vlmtune demo`; choose another --out.")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("made by vlmtune demo; the next demo run replaces this folder\n")


def run_demo(
    out: str | Path = "runs/demo",
    family: str = families.DEMO_FAMILY,
    size: str = "tiny",
    steps: int = 800,
    train_rows: int = 2000,
    eval_rows: int = 200,
    seed: int = 0,
) -> dict[str, Any]:
    """Run the whole demo and write `out/report.json`; returns the report."""
    if steps < 1:
        raise VlmtuneError(f"--steps must be at least 1 (got {steps}).")
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from . import tiny
    from .infer.predict import predict
    from .infer.types import BASE, GenerationSettings
    from .merging import merge
    from .training import run as train_run

    started = time.perf_counter()
    # One intra-op thread: for a model this small, threads cost more than they give, and on a machine
    # shared with other jobs two OpenMP threads per process can slow each step down 10-30x.
    torch.set_num_threads(1)
    out = Path(out).absolute()
    prepare_out(out)
    torch.manual_seed(seed)
    model_dir = tiny.write(family, out / "model", size=size, seed=seed, overrides=MODEL_OVERRIDES)
    train_path = write_split(out / "data", "train", train_rows, seed)
    eval_path = write_split(out / "data", "eval", eval_rows, seed + 1)

    # Answers are one word: 4 new tokens are plenty, and keep the untrained base from rambling for 128.
    short = {"settings": GenerationSettings(max_new_tokens=4), "batch_size": 32, "progress": False}
    before = predict(model_dir, None, eval_path, out / "predictions" / "base.jsonl", **short)

    config = {
        **TRAIN_SETTINGS,
        "model": str(model_dir),
        "output_dir": str(out / "run"),
        "data": {"train": str(train_path)},
        "max_steps": steps,
        "save_steps": steps,
        "seed": seed,
    }
    train_started = time.perf_counter()
    run_dir = train_run(config)
    train_seconds = time.perf_counter() - train_started
    adapter = run_dir / "adapter"

    after = predict(model_dir, {"demo": adapter}, eval_path, out / "predictions" / "adapter.jsonl", **short)
    merged = merge(model_dir, adapter, out / "merged", verify=True)
    model = AutoModelForImageTextToText.from_pretrained(merged.out, dtype=torch.float32).eval()
    merged_accuracy, merged_answers = exact_match(model, AutoProcessor.from_pretrained(merged.out), eval_path)
    unmerged_answers = [
        json.loads(line)["prediction"]
        for line in (out / "predictions" / "adapter.jsonl").read_text().splitlines()
    ]

    report = {
        "task": "coloured shapes: 'What colour is the shape?' (6 colours) / 'What shape is it?' (4 shapes)",
        "family": family,
        "size": size,
        "train_rows": train_rows,
        "eval_rows": eval_rows,
        "steps": steps,
        "accuracy_before": round(before.scores[BASE].exact_match, 4),
        "accuracy_after": round(after.scores["demo"].exact_match, 4),
        "accuracy_merged": round(merged_accuracy, 4),
        "merged_answers_equal_unmerged": sum(
            a.strip() == b.strip() for a, b in zip(merged_answers, unmerged_answers, strict=True)
        )
        / len(merged_answers),
        "merge_verify_max_logit_diff": merged.verification["max_abs_logit_diff"],
        "chance": round(chance(eval_path), 4),
        "train_seconds": round(train_seconds, 1),
        "total_seconds": round(time.perf_counter() - started, 1),
        "adapter": str(adapter),
        "merged": str(merged.out),
    }
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
