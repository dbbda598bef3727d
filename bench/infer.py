"""Un-merged inference benchmark, one run, side by side, on a generated small model (Qwen2-VL, ~25 M params).

1. Latency: greedy generation of one image request (batch 1) with the adapter un-merged (vlmtune engine)
   vs. the same adapter merged into the weights (PEFT `merge_and_unload`, saved, loaded by the same engine
   with no adapter). Runs alternate; medians. Goal: un-merged <= 1.25x merged.
2. Throughput: 64 image requests spread over 8 adapters in random order, served in windows of 8 (a server's
   batch), with mixed batches (one forward per window, PEFT per-row routing) vs. one adapter at a time
   (each window split by adapter). Goal: mixed >= 2x.

    python bench/infer.py [--device cpu|cuda] [--tokens 32] [--reps 7] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch


def make_adapters(base: Path, root: Path, count: int, r: int) -> list[Path]:
    """`count` trained-looking adapters: LoRA r on every language-model projection, random factors."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    from vlmtune import families

    regex = families.get("qwen2_vl").lora_target_patterns["language"]
    out = []
    for i in range(count):
        torch.manual_seed(100 + i)
        model = AutoModelForImageTextToText.from_pretrained(base)
        peft = get_peft_model(
            model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=regex, init_lora_weights=False)
        )
        with torch.no_grad():
            for name, param in peft.named_parameters():
                if "lora_B" in name:
                    param.mul_(0.1)
        path = root / f"adapter{i}"
        peft.save_pretrained(path)
        out.append(path)
    return out


def merged_copy(base: Path, adapter: Path, out: Path) -> Path:
    """The anchor: PEFT's merge_and_unload of the adapter, saved as a model folder with the base's processor."""
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = PeftModel.from_pretrained(AutoModelForImageTextToText.from_pretrained(base), adapter)
    model.merge_and_unload().save_pretrained(out)
    AutoProcessor.from_pretrained(base).save_pretrained(out)
    return out


def timed(fn: Any) -> tuple[float, Any]:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per request")
    parser.add_argument("--reps", type=int, default=7, help="latency runs of each side")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--window", type=int, default=8, help="requests per server batch")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()

    from vlmtune import tiny
    from vlmtune.infer import GenerationSettings, Request, load

    settings = GenerationSettings(max_new_tokens=args.tokens)
    with tempfile.TemporaryDirectory(prefix="vlmtune-bench-infer-") as tmp:
        root = Path(tmp)
        base = tiny.write("qwen2_vl", root / "base", size="small", overrides={"initializer_range": 0.1})
        adapters = make_adapters(base, root, 8, args.rank)
        merged = merged_copy(base, adapters[0], root / "merged")
        from PIL import Image

        rng = random.Random(0)
        images = [Image.new("RGB", (56, 56), tuple(rng.randrange(256) for _ in range(3))) for _ in range(8)]
        question = "<image>What colour is the shape?"

        # 1. latency, batch 1, alternating sides
        unmerged = load(base, {"a0": adapters[0]}, device=args.device, dtype="fp32")
        anchor = load(merged, device=args.device, dtype="fp32")
        request = Request(question, [images[0]], None)
        for engine in (unmerged, anchor):  # warm-up
            engine.generate(request, settings)
        times: dict[str, list[float]] = {"merged": [], "unmerged": []}
        outputs = {}
        for _ in range(args.reps):
            for side, engine in (("merged", anchor), ("unmerged", unmerged)):
                seconds, result = timed(lambda e=engine: e.generate(request, settings)[0])
                times[side].append(seconds)
                outputs[side] = result
        latency = {side: statistics.median(values) for side, values in times.items()}
        same_tokens = outputs["merged"].generated_tokens == outputs["unmerged"].generated_tokens
        del unmerged, anchor

        # 2. throughput: 8 adapters, requests in random adapter order, served in windows
        engine = load(base, {f"a{i}": p for i, p in enumerate(adapters)}, device=args.device, dtype="fp32")
        names = [f"a{i % 8}" for i in range(args.requests)]
        rng.shuffle(names)
        requests = [Request(question, [images[i % 8]], name) for i, name in enumerate(names)]
        windows = [requests[i : i + args.window] for i in range(0, len(requests), args.window)]
        engine.generate(windows[0], settings, batch_size=args.window)  # warm-up
        # Both modes on each window in turn, so load from other processes hits both alike.
        modes = {"one adapter at a time": False, "mixed batches": True}
        seconds = dict.fromkeys(modes, 0.0)
        results: dict[str, list[Any]] = {mode: [] for mode in modes}
        for window in windows:
            for mode, mixed in modes.items():
                engine.mixed_batches = mixed
                took, out = timed(lambda w=window: engine.generate(w, settings, batch_size=args.window))
                seconds[mode] += took
                results[mode] += out
        throughput = {}
        for mode, out in results.items():
            tokens = sum(g.generated_tokens for g in out)
            throughput[mode] = {
                "seconds": seconds[mode],
                "requests_per_s": len(out) / seconds[mode],
                "tokens_per_s": tokens / seconds[mode],
            }
        texts = {mode: [g.text for g in out] for mode, out in results.items()}
        identical = sum(
            a == b for a, b in zip(texts["mixed batches"], texts["one adapter at a time"], strict=True)
        )
        # The same check on logits: one window's prompts, mixed in one forward vs one adapter at a time.
        logits = {}
        for mixed in (True, False):
            engine.mixed_batches = mixed
            logits[mixed] = engine.logits(windows[0], batch_size=args.window)
        logit_diff = max((x - y).abs().max().item() for x, y in zip(logits[True], logits[False], strict=True))
        # The floor: the base alone, the same prompts batched together vs one at a time (batch shape only).
        base_rows = [Request(r.messages, r.images, "__base__") for r in windows[0]]
        together = engine.logits(base_rows, batch_size=args.window)
        alone = [engine.logits(r)[0] for r in base_rows]
        noise = max((x - y).abs().max().item() for x, y in zip(together, alone, strict=True))

    figures = {
        "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
        "torch_threads": torch.get_num_threads(),
        "model": "qwen2_vl small (hidden 512, 6 layers, vision 256x4), fp32",
        "adapter": f"LoRA r={args.rank} on all 7 language-model projections",
        "new_tokens": args.tokens,
        "latency_s": latency,
        "latency_ratio_unmerged_over_merged": latency["unmerged"] / latency["merged"],
        "same_generated_tokens": same_tokens,
        "throughput": throughput,
        "throughput_ratio_mixed_over_one_at_a_time": throughput["mixed batches"]["tokens_per_s"]
        / throughput["one adapter at a time"]["tokens_per_s"],
        "identical_texts_mixed_vs_one_at_a_time": f"{identical}/{len(requests)}",
        "max_logit_diff_mixed_vs_one_at_a_time": logit_diff,
        "max_logit_diff_base_batched_vs_alone": noise,
        "requests": args.requests,
        "window": args.window,
    }
    print(json.dumps(figures, indent=2))
    print(
        f"\nlatency: un-merged {latency['unmerged'] * 1000:.0f} ms vs merged {latency['merged'] * 1000:.0f} ms "
        f"-> {figures['latency_ratio_unmerged_over_merged']:.2f}x (goal <= 1.25x)\n"
        f"throughput: mixed {throughput['mixed batches']['tokens_per_s']:.0f} tok/s vs one adapter at a time "
        f"{throughput['one adapter at a time']['tokens_per_s']:.0f} tok/s "
        f"-> {figures['throughput_ratio_mixed_over_one_at_a_time']:.2f}x (goal >= 2x); identical texts "
        f"{identical}/{len(requests)}, max logit difference {logit_diff:.1e} (base alone, batched vs not: {noise:.1e})",
        file=sys.stderr,
    )
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
