"""`vlmtune serve` benchmark: three ratios measured in one run against one server, on a generated small model.

The server runs in this process (uvicorn in a thread, as `vlmtune serve` would run it) and is driven over
HTTP by the official `openai` client from client threads. Requests: one 56-px image + a question, greedy.

1. Throughput: 64 requests over 8 adapters sent at once (continuous batching) vs. the same 64 sent one at
   a time. Goal >= 3x.
2. Head-of-line blocking: median latency of short requests (8 tokens) sent one after another while long
   ones (128 tokens, `--long` of them, each resent as soon as it ends) keep the batch busy, vs. the same
   short requests on an idle server (two rounds of each, alternating). Goal <= 2x. The short requests are
   streamed, so the time to their first token (how soon a request starts) is reported too.
3. Mixed adapters: throughput of 64 requests spread over 8 adapters vs. the same 64 all under one adapter
   (both concurrent). Goal >= 0.8x.

Load test: every response of every phase must be an answer (no error) and equal, token for token, to
the same request's answer when sent alone (greedy decoding: a row's answer must not depend on its batch).

    python bench/serve.py [--size small|tiny] [--tokens 32] [--json OUT]
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

from infer import make_adapters  # the same adapters as the inference benchmark


def image_url(seed: int) -> str:
    import numpy as np
    from PIL import Image

    pixels = np.random.RandomState(seed).randint(0, 256, (56, 56, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


class Client:
    def __init__(self, url: str) -> None:
        import openai

        self.client = openai.OpenAI(base_url=url + "/v1", api_key="bench", max_retries=0, timeout=600)
        self.errors: list[str] = []
        self.lock = threading.Lock()

    def ask(self, model: str, seed: int, tokens: int) -> tuple[str, float]:
        text, _, seconds = self.request(model, seed, tokens, stream=False)
        return text, seconds

    def request(self, model: str, seed: int, tokens: int, stream: bool) -> tuple[str, float, float]:
        """(answer, seconds to the first content chunk (streamed) or to the answer, seconds in all)."""
        messages = [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": image_url(seed)}},
                    {"type": "text", "text": f"Describe picture {seed}."},
                ],
            }
        ]
        start = time.perf_counter()
        first = None
        try:
            reply = self.client.chat.completions.create(
                model=model, messages=messages, max_tokens=tokens, temperature=0, stream=stream
            )
            if not stream:
                text = reply.choices[0].message.content or ""
            else:
                pieces = []
                for chunk in reply:
                    if chunk.choices and chunk.choices[0].delta.content:
                        first = first or time.perf_counter() - start
                        pieces.append(chunk.choices[0].delta.content)
                text = "".join(pieces)
        except Exception as exc:  # counted, never hidden
            with self.lock:
                self.errors.append(f"{model}/{seed}: {type(exc).__name__}: {exc}")
            return "", 0.0, time.perf_counter() - start
        seconds = time.perf_counter() - start
        return text, first or seconds, seconds


def concurrently(client: Client, jobs: list[tuple[str, int, int]]) -> tuple[float, list[str]]:
    start = time.perf_counter()
    with ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(lambda j: client.ask(*j)[0], jobs))
    return time.perf_counter() - start, answers


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", default="small", choices=["tiny", "small"])
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per throughput request")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--short", type=int, default=12, help="short requests in the head-of-line phase")
    parser.add_argument("--long", type=int, default=8, help="long requests kept running in that phase")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    import torch

    from vlmtune import tiny
    from vlmtune.infer import load
    from vlmtune.serve import ServeSettings, create_app
    from vlmtune.serve.run import background

    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="vlmtune-bench-serve-"))
    base = tiny.write("qwen2_vl", work / "base", size=args.size, seed=0)
    folders = make_adapters(base, work, 8, r=16)
    names = [f"a{i}" for i in range(8)]
    engine = load(base, dict(zip(names, folders, strict=True)), device="cpu", dtype="fp32")
    settings = ServeSettings(port=0, max_batch_size=64, max_queue=256, max_tokens=256)
    app = create_app(engine, settings)
    scheduler = app.state.scheduler
    report: dict[str, Any] = {"size": args.size, "tokens": args.tokens, "requests": args.requests}
    with background(app, settings) as url:
        client = Client(url)
        client.ask(names[0], 0, 4)  # warm up
        mixed = [(names[i % 8], i, args.tokens) for i in range(args.requests)]
        single = [(names[0], i, args.tokens) for i in range(args.requests)]

        # The reference answers, and the anchor of ratio 1: one request at a time.
        start = time.perf_counter()
        alone = {job: client.ask(*job)[0] for job in mixed}
        sequential_s = time.perf_counter() - start
        alone.update({job: client.ask(*job)[0] for job in single[:8]})  # for the correctness check

        # 1 and 3: concurrent, 8 adapters and one adapter (best of 2 runs each, interleaved).
        mixed_runs, single_runs, wrong = [], [], 0
        for _ in range(2):
            seconds, answers = concurrently(client, mixed)
            mixed_runs.append(seconds)
            wrong += sum(a != alone[j] for j, a in zip(mixed, answers, strict=True))
            seconds, answers = concurrently(client, single)
            single_runs.append(seconds)
            wrong += sum(a != alone[j] for j, a in zip(single[:8], answers[:8], strict=True))
        peak = scheduler.peak_rows

        # 2: short requests on an idle server, then while long ones keep the batch busy; two rounds of
        # each, alternating, so a change in the machine's load hits both sides.
        shorts = [(names[i % 8], 1000 + i, 8) for i in range(args.short)]
        answers: dict[tuple[str, int, int], str] = {}
        idle: list[float] = []
        busy: list[float] = []
        idle_first: list[float] = []
        busy_first: list[float] = []
        rows_seen: list[int] = []
        half = len(shorts) // 2
        for part in (shorts[:half], shorts[half:]):
            for job in part:
                answers[job], first, seconds = client.request(*job, stream=True)
                idle.append(seconds)
                idle_first.append(first)
            stop = threading.Event()

            def keep_busy(k: int, stop: threading.Event = stop) -> None:
                while not stop.is_set():
                    client.ask(names[k % 8], 2000 + k, 128)

            threads = [threading.Thread(target=keep_busy, args=(k,)) for k in range(args.long)]
            for t in threads:
                t.start()
            deadline = time.monotonic() + 120
            while scheduler.active_rows < args.long and time.monotonic() < deadline:
                time.sleep(0.05)
            for job in part:
                rows_seen.append(scheduler.active_rows)
                answer, first, seconds = client.request(*job, stream=True)
                busy.append(seconds)
                busy_first.append(first)
                wrong += answer != answers[job]  # streamed, busy == streamed, idle
            stop.set()
            for t in threads:
                t.join()
        errors = list(client.errors)

    seq_thr = args.requests / sequential_s
    mixed_thr = args.requests / min(mixed_runs)
    single_thr = args.requests / min(single_runs)
    report.update(
        sequential_s=round(sequential_s, 2),
        concurrent_mixed_s=[round(s, 2) for s in mixed_runs],
        concurrent_one_adapter_s=[round(s, 2) for s in single_runs],
        peak_rows_in_one_forward=peak,
        throughput_ratio=round(mixed_thr / seq_thr, 2),
        short_latency_idle_s=round(statistics.median(idle), 3),
        short_latency_busy_s=round(statistics.median(busy), 3),
        rows_decoding_when_short_sent=rows_seen,
        head_of_line_ratio=round(statistics.median(busy) / statistics.median(idle), 2),
        short_first_token_idle_s=round(statistics.median(idle_first), 3),
        short_first_token_busy_s=round(statistics.median(busy_first), 3),
        first_token_ratio=round(statistics.median(busy_first) / statistics.median(idle_first), 2),
        mixed_vs_one_adapter_ratio=round(mixed_thr / single_thr, 2),
        errors=len(errors),
        wrong_answers=wrong,
        checked_answers=2 * (args.requests + 8) + args.short,
        torch_threads=torch.get_num_threads(),
    )
    report["goals"] = {
        "throughput >= 3x": report["throughput_ratio"] >= 3,
        "head-of-line <= 2x": report["head_of_line_ratio"] <= 2,
        "mixed vs one adapter >= 0.8x": report["mixed_vs_one_adapter_ratio"] >= 0.8,
        "load test: no errors, every answer equal to its solo run": not errors and wrong == 0,
    }
    for line in errors[:5]:
        print("error:", line, file=sys.stderr)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
