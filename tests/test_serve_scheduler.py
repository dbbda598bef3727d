"""The continuous-batching scheduler against the engine's own generate, on tiny folders of all four
families: rows of different adapters (LoRA in the vision tower, a fully trained projector, DoRA, the base)
joining and leaving one running batch give token-identical greedy answers to single-request runs."""

from __future__ import annotations

import queue
import threading

import pytest

from test_infer_fixtures import (
    IMAGE_PROMPT,
    LM_REGEX,
    PROJECTOR,
    TEXT_PROMPT,
    VISION_REGEX,
    image,
    make_adapter,
)
from vlmtune import families
from vlmtune.infer import BASE, GenerationSettings, Request, load
from vlmtune.serve.sampling import Sampling
from vlmtune.serve.scheduler import Scheduler, job_for

TIMEOUT = 120


@pytest.fixture(scope="module")
def engines(tiny_model, tmp_path_factory):
    made = {}

    def get(family):
        if family not in made:
            base = tiny_model(family)
            root = tmp_path_factory.mktemp(f"sched-{family}")
            folders = {
                "proj": make_adapter(base, root / "proj", seed=1, modules_to_save=[PROJECTOR[family]]),
                "lm": make_adapter(base, root / "lm", seed=2, r=8),
                "vis": make_adapter(
                    base, root / "vis", seed=3, target_modules=f"{VISION_REGEX[family]}|{LM_REGEX}"
                ),
                "dora": make_adapter(base, root / "dora", seed=4, use_dora=True),
            }
            made[family] = load(base, folders, device="cpu")
        return made[family]

    return get


def requests():
    """Prompts of different lengths, with and without images, under every adapter and the base."""
    out = []
    for k, adapter in enumerate(["proj", "lm", "vis", "dora", BASE, "lm", "vis", "proj"]):
        if k % 3 == 2:
            out.append(Request(TEXT_PROMPT, [], adapter))
        else:
            out.append(Request(IMAGE_PROMPT, [image(k)], adapter))
    return out


def run(engine, reqs, max_tokens, *, batch=16, stagger=False, n=1, sampling=None):
    """Answers through the scheduler: all submitted at once (or one more after each event when staggered)."""
    scheduler = Scheduler(engine, batch, 64)
    scheduler.start()
    events: queue.Queue = queue.Queue()
    try:
        jobs = []
        for i, r in enumerate(reqs):
            job = job_for(
                engine,
                r,
                max_tokens=max_tokens[i],
                n=n,
                sampling=sampling,
                sink=lambda e, i=i: events.put((i, e)),
            )
            jobs.append(job)
        pending = list(jobs)
        if not stagger:
            for job in pending:
                scheduler.submit(job)
            pending = []
        else:
            scheduler.submit(pending.pop(0))
        done: dict[tuple[int, int], dict] = {}
        while len(done) < len(reqs) * n:
            i, event = events.get(timeout=TIMEOUT)
            assert event["type"] != "error", event
            if event["type"] == "done":
                done[(i, event["choice"])] = event
            if pending and event["type"] == "delta":
                scheduler.submit(pending.pop(0))  # joins while the others are decoding
        return done, scheduler
    finally:
        scheduler.stop()


def reference(engine, reqs, max_tokens):
    return [
        engine.generate(r, GenerationSettings(max_new_tokens=m))[0]
        for r, m in zip(reqs, max_tokens, strict=True)
    ]


@pytest.mark.parametrize("stagger", [False, True])
def test_greedy_answers_equal_single_request_generate(family_name, engines, stagger):
    engine = engines(family_name)
    reqs = requests()
    lengths = [12, 5, 9, 16, 7, 3, 14, 10]
    if families.get(family_name).serve_unsupported:  # the support table's "no": the scheduler says why
        with pytest.raises(AssertionError, match="continuous batching needs plain full-attention caches"):
            run(engine, reqs[:1], lengths[:1], stagger=stagger)
        return
    want = reference(engine, reqs, lengths)
    got, scheduler = run(engine, reqs, lengths, stagger=stagger)
    for i, w in enumerate(want):
        event = got[(i, 0)]
        assert event["text"] == w.text, (i, reqs[i].adapter)
        assert event["completion_tokens"] == w.generated_tokens
        assert event["finish_reason"] == w.finish_reason
    # The rows really shared forwards: several adapters (vision LoRA and projector included) in one decode.
    assert scheduler.peak_adapters >= 3


def test_batch_cap_and_n_choices(engines):
    """With room for 2 rows only, 4 requests of n=2 queue and still all finish; greedy choices agree."""
    engine = engines("qwen2_vl")
    reqs = requests()[:4]
    want = reference(engine, reqs, [6] * 4)
    got, scheduler = run(engine, reqs, [6] * 4, batch=2, n=2)
    assert scheduler.peak_rows <= 2
    for i, w in enumerate(want):
        assert got[(i, 0)]["text"] == got[(i, 1)]["text"] == w.text


def test_seeded_sampling_does_not_depend_on_the_batch(engines):
    engine = engines("qwen2_vl")
    reqs = requests()[:3]
    sampling = Sampling(temperature=1.0, top_p=0.9, seed=7)
    alone = [run(engine, [r], [8], sampling=sampling)[0][(0, 0)]["text"] for r in reqs]
    together, _ = run(engine, reqs, [8] * 3, sampling=sampling)
    assert [together[(i, 0)]["text"] for i in range(3)] == alone
    other = run(engine, reqs[:1], [8], sampling=Sampling(temperature=1.0, seed=8))[0][(0, 0)]["text"]
    greedy = reference(engine, reqs[:1], [8])[0].text
    assert len({alone[0], other, greedy}) > 1  # sampling does sample


def test_a_cancelled_row_leaves_the_batch(engines):
    engine = engines("qwen2_vl")
    scheduler = Scheduler(engine, 4, 8)
    scheduler.start()
    try:
        seen = threading.Event()
        job = job_for(engine, requests()[1], max_tokens=10_000, sink=lambda e: seen.set())
        scheduler.submit(job)
        assert seen.wait(TIMEOUT)
        job.cancelled.set()
        finished = threading.Event()
        scheduler.call(lambda: None).add_done_callback(lambda f: finished.set())
        assert finished.wait(TIMEOUT)
        done = threading.Event()
        scheduler.call(lambda: None).add_done_callback(lambda f: done.set())
        assert done.wait(TIMEOUT)
        assert scheduler.active_rows == 0
    finally:
        scheduler.stop()
