"""GPU check of un-merged inference: bf16, 4-bit and 8-bit (bitsandbytes) bases under LoRA adapters.

For each family and mode it loads a generated small model with two adapters (one LoRA-only, one that also
trains the projector in full), and prints: how far the engine's logits are from PEFT's reference on the
unquantized base (fp32) (for 4/8-bit: the quantization error), how far they are from PEFT's
`PeftModel.from_pretrained` on the base quantized the same way by plain transformers (should be ~0),
whether mixed batches equal single-adapter runs, how much the adapter changes the output, generation
speed, and peak GPU memory. Exits non-zero when a check fails.

    python bench/gpu_check_infer.py [--families qwen2_vl llava] [--modes bf16 4bit 8bit]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

import torch


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--families", nargs="+", default=["qwen2_vl", "qwen2_5_vl", "llava", "mllama"])
    parser.add_argument("--modes", nargs="+", default=["bf16", "4bit", "8bit"])
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device here: nothing to check (run this on a GPU machine).")
        return 0
    has_bnb = importlib.util.find_spec("bitsandbytes") is not None
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    from test_infer_fixtures import IMAGE_PROMPT, PROJECTOR, encode, image, make_adapter, peft_logits
    from vlmtune import families, tiny
    from vlmtune.errors import VlmtuneError
    from vlmtune.infer import GenerationSettings, Request, load, quant

    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, bitsandbytes: {has_bnb}")
    failures = 0
    rows = []
    with tempfile.TemporaryDirectory(prefix="vlmtune-gpu-check-") as tmp:
        root = Path(tmp)
        for family in args.families:
            base = tiny.write(family, root / family, size="small")
            a = make_adapter(base, root / f"{family}-a", seed=1, r=16, alpha=32)
            b = make_adapter(base, root / f"{family}-b", seed=2, modules_to_save=[PROJECTOR[family]])
            reference = peft_logits(base, a, IMAGE_PROMPT, [image(0)])
            base_reference = peft_logits(base, None, IMAGE_PROMPT, [image(0)])
            for mode in args.modes:
                row: dict[str, object] = {"family": family, "mode": mode}
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                try:
                    quantization = None if mode == "bf16" else mode
                    engine = load(
                        base, {"a": a, "b": b}, device="cuda", dtype="bf16", quantization=quantization
                    )
                except VlmtuneError as exc:
                    row["skipped"] = str(exc)
                    rows.append(row)
                    print(json.dumps(row))
                    continue
                requests = [Request(IMAGE_PROMPT, [image(0)], n) for n in ("a", "b", "none", "a")]
                mixed = engine.logits(requests)
                single = engine.logits(requests[0])[0]
                scale = reference.abs().max().item()
                row["max_diff_vs_fp32_peft_relative"] = (single - reference).abs().max().item() / scale
                # PEFT on the same (quantized) base, loaded by plain transformers.
                kwargs = {"dtype": torch.bfloat16, "device_map": {"": 0}}
                if mode != "bf16":
                    kwargs["quantization_config"] = quant.bnb_config(
                        mode, families.get(family), torch.bfloat16
                    )
                same = PeftModel.from_pretrained(
                    AutoModelForImageTextToText.from_pretrained(base, **kwargs), a
                )
                with torch.inference_mode():
                    inputs = encode(base, IMAGE_PROMPT, [image(0)]).to("cuda").to(torch.bfloat16)
                    same_logits = same.eval()(**inputs).logits[0].float().cpu()
                del same
                row["max_diff_vs_peft_same_base_relative"] = (single - same_logits).abs().max().item() / scale
                row["adapter_effect_relative"] = (reference - base_reference).abs().max().item() / scale
                # LLM.int8 picks its outlier columns over the whole batch, so in 8-bit a row's result depends
                # a little on its batch mates (PEFT's too): the tolerance covers that.
                row["mixed_equals_single"] = bool(torch.allclose(mixed[0], single, atol=0.06 * scale))
                row["mixed_rows_agree"] = bool(torch.allclose(mixed[0], mixed[3], atol=1e-3 * scale))
                settings = GenerationSettings(max_new_tokens=32)
                engine.generate(requests[0], settings)  # warm-up
                start = time.perf_counter()
                out = engine.generate(requests, settings, batch_size=4)
                torch.cuda.synchronize()
                seconds = time.perf_counter() - start
                row["tokens_per_s"] = sum(g.generated_tokens for g in out) / seconds
                row["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
                ok = (
                    row["max_diff_vs_peft_same_base_relative"] < 0.01
                    and row["max_diff_vs_fp32_peft_relative"] < 0.5 * row["adapter_effect_relative"]
                    and row["mixed_equals_single"]
                    and row["mixed_rows_agree"]
                )
                row["ok"] = ok
                failures += not ok
                rows.append(row)
                print(json.dumps(row))
                del engine
    print(f"{failures} failed check(s) out of {sum('ok' in r for r in rows)}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
