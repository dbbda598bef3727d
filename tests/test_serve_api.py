"""`vlmtune serve` over HTTP with the official `openai` client, on a real server bound to a loopback port:
answers against `vlmtune predict` and plain `PeftModel.generate`, 1/4/8 adapters in flight against
single-request runs, streaming, models, runtime load/unload and reload, auth and limits."""

from __future__ import annotations

import base64
import io
import json
import shutil
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch

from test_infer_fixtures import LM_REGEX, PROJECTOR, VISION_REGEX, base_model, encode, image, make_adapter
from vlmtune.infer import load
from vlmtune.serve import ServeSettings, create_app
from vlmtune.serve.run import background

FAMILY = "qwen2_vl"
KEY = "test-key"
PROMPT = "What colour is the shape?"
MAX_TOKENS = 8


def data_url(img, fmt="PNG") -> str:
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


def user(text=PROMPT, img=None):
    content = [{"type": "text", "text": text}]
    if img is not None:
        content.insert(0, {"type": "image_url", "image_url": {"url": data_url(img)}})
    return [{"role": "user", "content": content}]


@pytest.fixture(scope="module")
def setup(tiny_model, tmp_path_factory):
    base = tiny_model(FAMILY)
    root = tmp_path_factory.mktemp("serve-adapters")
    made = {
        "proj": make_adapter(base, root / "proj", seed=1, modules_to_save=[PROJECTOR[FAMILY]]),
        "vis": make_adapter(base, root / "vis", seed=3, target_modules=f"{VISION_REGEX[FAMILY]}|{LM_REGEX}"),
    }
    for k in range(6):
        made[f"lm{k}"] = make_adapter(base, root / f"lm{k}", seed=10 + k, r=4 + k)
    engine = load(base, made, device="cpu")
    images = tmp_path_factory.mktemp("serve-images")
    image(5).save(images / "five.png")
    spare = tmp_path_factory.mktemp("serve-runtime")
    for name in ("x1", "x2"):
        shutil.copytree(made["lm0" if name == "x1" else "lm1"], spare / name)
    settings = ServeSettings(port=0, api_key=KEY, image_dir=images, adapter_dir=spare, max_tokens=64)
    app = create_app(engine, settings)
    with background(app, settings) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=120)
        yield {"base": base, "adapters": made, "url": url, "app": app, "client": client, "engine": engine}


def ask(client, model, img_seed=0, text=PROMPT, **kwargs):
    img = image(img_seed) if img_seed is not None else None
    kwargs.setdefault("max_tokens", MAX_TOKENS)
    kwargs.setdefault("temperature", 0)
    return client.chat.completions.create(model=model, messages=user(text, img), **kwargs)


def peft_generate(base, adapter, img_seed):
    """Plain transformers + PEFT: `PeftModel.from_pretrained(...).generate`, greedy."""
    from peft import PeftModel
    from transformers import AutoProcessor

    model = PeftModel.from_pretrained(base_model(base), adapter).eval()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
    inputs = encode(base, messages, [image(img_seed)])
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=MAX_TOKENS, do_sample=False)
    tokenizer = AutoProcessor.from_pretrained(base).tokenizer
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).strip()


def test_answers_equal_predict_and_peft_generate(setup, tmp_path):
    from vlmtune.infer import GenerationSettings
    from vlmtune.infer.predict import predict

    image(0).save(tmp_path / "0.png")
    rows = [{"messages": [{"role": "user", "content": "<image>" + PROMPT}], "images": ["0.png"]}]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    chosen = {name: setup["adapters"][name] for name in ("proj", "vis", "lm2")}
    predict(
        setup["base"],
        chosen,
        tmp_path / "data.jsonl",
        tmp_path / "p.jsonl",
        settings=GenerationSettings(max_new_tokens=MAX_TOKENS),
        progress=False,
        device="cpu",
    )
    predicted = {
        r["adapter"]: r["prediction"]
        for r in map(json.loads, (tmp_path / "p.jsonl").read_text().splitlines())
    }
    for name, folder in chosen.items():
        served = ask(setup["client"], name).choices[0].message.content
        assert served == predicted[name] == peft_generate(setup["base"], folder, 0), name
    assert len(set(predicted.values())) == 3  # the adapters differ, so the comparison means something


@pytest.mark.parametrize("distinct", [1, 4, 8])
def test_adapters_in_flight_answer_as_alone(setup, distinct):
    """16 requests at once over `distinct` adapters (vision LoRA and trained projector among them): every
    answer token-identical to the same request sent alone."""
    names = ["vis", "proj", "lm0", "lm1", "lm2", "lm3", "lm4", "lm5"][:distinct]
    jobs = [(names[k % distinct], k % 5, 4 + (k * 3) % 12) for k in range(16)]
    client = setup["client"]
    alone = {
        job: ask(client, job[0], job[1], max_tokens=job[2]).choices[0].message.content for job in set(jobs)
    }
    scheduler = setup["app"].state.scheduler
    scheduler.peak_adapters = 0
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda j: ask(client, j[0], j[1], max_tokens=j[2]), jobs))
    for job, response in zip(jobs, together, strict=True):
        assert response.choices[0].message.content == alone[job], job
        assert response.usage.completion_tokens <= job[2]
    assert scheduler.peak_adapters >= min(distinct, 2)


def test_streaming_reassembles_and_reports_usage(setup):
    client = setup["client"]
    whole = ask(client, "vis", max_tokens=20)
    stream = ask(client, "vis", max_tokens=20, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        whole.choices[0].finish_reason
    ]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens > 0


def test_models_lists_base_and_adapters(setup):
    models = setup["client"].models.list().data
    ids = [m.id for m in models]
    assert ids[0] == str(setup["engine"].base) and set(setup["adapters"]) <= set(ids)
    entry = next(m for m in models if m.id == "lm3").model_dump()
    assert entry["ranks"] == [7] and entry["targets"]["roles"] == ["language"]
    assert len(entry["sha256"]) == 64 and entry["path"] == str(setup["adapters"]["lm3"])
    proj = next(m for m in models if m.id == "proj").model_dump()
    assert proj["full_modules"] and proj["vllm_servable"] is False


def test_load_unload_and_reload_under_the_same_name(setup):
    client, url = setup["client"], setup["url"]
    headers = {"Authorization": f"Bearer {KEY}"}
    loaded = httpx.post(url + "/v1/adapters", json={"name": "x", "path": "x1"}, headers=headers, timeout=120)
    assert loaded.status_code == 200, loaded.text
    first = ask(client, "x").choices[0].message.content
    assert first == ask(client, "lm0").choices[0].message.content  # x1 is a copy of lm0
    assert "x" in [m.id for m in client.models.list().data]
    assert httpx.delete(url + "/v1/adapters/x", headers=headers, timeout=60).status_code == 200
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        ask(client, "x")
    sha_before = loaded.json()["sha256"]
    again = httpx.post(url + "/v1/adapters", json={"name": "x", "path": "x2"}, headers=headers, timeout=120)
    assert again.status_code == 200 and again.json()["sha256"] != sha_before
    second = ask(client, "x").choices[0].message.content
    assert second != first and second == ask(client, "lm1").choices[0].message.content
    assert httpx.delete(url + "/v1/adapters/x", headers=headers, timeout=60).status_code == 200


@pytest.mark.parametrize(
    ("body", "status", "match"),
    [
        ({"name": "../x", "path": "x1"}, 400, "adapter names are"),
        ({"name": "y", "path": "../serve-adapters0/lm0"}, 400, "outside --adapter-dir"),
        ({"name": "y", "path": "/etc"}, 400, "outside --adapter-dir"),
        ({"name": "y", "path": "missing"}, 400, "no adapter folder"),
        ({"name": "lm0", "path": "x1"}, 409, "DELETE it first"),
    ],
)
def test_adapter_loads_refused(setup, body, status, match):
    got = httpx.post(
        setup["url"] + "/v1/adapters", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60
    )
    assert got.status_code == status and match in got.json()["error"]["message"]


def test_auth(setup):
    url = setup["url"]
    assert httpx.get(url + "/health").status_code == 200
    for path in ("/v1/models", "/metrics"):
        denied = httpx.get(url + path)
        assert denied.status_code == 401 and denied.json()["error"]["code"] == "invalid_api_key"
    bad = openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_bad_requests(setup):
    client = setup["client"]
    with pytest.raises(openai.NotFoundError, match="does not exist here"):
        ask(client, "nope")
    with pytest.raises(openai.BadRequestError, match="over the server's cap of 64"):
        ask(client, "lm0", max_tokens=65)
    with pytest.raises(openai.BadRequestError, match="tool calls are not supported"):
        ask(client, "lm0", tools=[{"type": "function", "function": {"name": "f"}}])
    with pytest.raises(openai.BadRequestError, match="remote image URLs are not fetched"):
        client.chat.completions.create(
            model="lm0",
            messages=[
                {
                    "role": "user",
                    "content": [{"type": "image_url", "image_url": {"url": "http://10.0.0.1/a.png"}}],
                }
            ],
        )
    with pytest.raises(openai.BadRequestError, match="outside --image-dir"):
        client.chat.completions.create(
            model="lm0",
            messages=[
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "../../etc/passwd"}}]}
            ],
        )
    with pytest.raises(openai.BadRequestError, match="placeholder"):
        client.chat.completions.create(model="lm0", messages=[{"role": "user", "content": "<image> where?"}])


def test_image_from_image_dir_equals_inline(setup):
    client = setup["client"]
    inline = ask(client, "vis", 5).choices[0].message.content
    for url in ("five.png", "file://" + str(setup["app"].state.settings.image_dir / "five.png")):
        msgs = [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": url}},
                    {"type": "text", "text": PROMPT},
                ],
            }
        ]
        got = client.chat.completions.create(model="vis", messages=msgs, max_tokens=MAX_TOKENS, temperature=0)
        assert got.choices[0].message.content == inline


def test_oversized_requests_get_413(setup):
    url, headers = setup["url"], {"Authorization": f"Bearer {KEY}"}
    settings = setup["app"].state.settings
    big = httpx.post(
        url + "/v1/chat/completions",
        content=b"{" + b" " * settings.max_body_bytes + b"}",
        headers={**headers, "content-type": "application/json"},
        timeout=60,
    )
    assert big.status_code == 413
    from PIL import Image

    huge = Image.new("RGB", (4097, 4097))
    body = {"model": "lm0", "messages": user(PROMPT, None)}
    body["messages"][0]["content"].insert(0, {"type": "image_url", "image_url": {"url": data_url(huge)}})
    got = httpx.post(url + "/v1/chat/completions", json=body, headers=headers, timeout=60)
    assert got.status_code == 413 and "--max-image-pixels" in got.json()["error"]["message"]


def test_full_queue_gets_429(setup):
    scheduler = setup["app"].state.scheduler
    client = setup["client"]
    gate = threading.Event()
    scheduler.call(lambda: gate.wait(60))  # hold the loop between two steps
    try:
        with ThreadPoolExecutor(scheduler.max_queue + 4) as pool:
            futures = [
                pool.submit(ask, client, "lm0", None, max_tokens=2) for _ in range(scheduler.max_queue + 4)
            ]
            import time

            deadline = time.monotonic() + 60
            # Release the loop once the queue is full and the 4 requests beyond it have been answered.
            while time.monotonic() < deadline and not (
                len(scheduler.waiting) == scheduler.max_queue and sum(f.done() for f in futures) >= 4
            ):
                time.sleep(0.05)
            gate.set()
            outcomes = []
            for f in futures:
                try:
                    outcomes.append(f.result().choices[0].finish_reason)
                except openai.RateLimitError as exc:
                    assert "--max-queue" in str(exc)
                    outcomes.append(429)
    finally:
        gate.set()
    assert outcomes.count(429) == 4 and len(outcomes) == scheduler.max_queue + 4


def test_sampling_seed_n_logprobs_stop(setup):
    client = setup["client"]
    a = ask(client, "lm0", temperature=1.0, seed=3, n=3, max_tokens=10)
    b = ask(client, "lm0", temperature=1.0, seed=3, n=3, max_tokens=10)
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]
    assert len({c.message.content for c in a.choices}) > 1  # each choice has its own draw
    lp = ask(client, "lm0", logprobs=True, top_logprobs=3).choices[0]
    assert len(lp.logprobs.content) >= 1 and all(len(t.top_logprobs) == 3 for t in lp.logprobs.content)
    assert (
        lp.logprobs.content[0].token == lp.logprobs.content[0].top_logprobs[0].token
    )  # greedy = the top one
    full = ask(client, "lm0", max_tokens=20).choices[0].message.content
    cut = full[len(full) // 2 :][:3]
    stopped = ask(client, "lm0", max_tokens=20, stop=[cut]).choices[0]
    assert stopped.finish_reason == "stop" and stopped.message.content == full[: full.index(cut)].rstrip()


def test_a_client_that_leaves_frees_its_row(setup):
    url, scheduler = setup["url"], setup["app"].state.scheduler
    body = {"model": "lm0", "messages": user(PROMPT, None), "max_tokens": 64, "stream": True}
    with httpx.stream(
        "POST",
        url + "/v1/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=60,
    ) as response:
        next(response.iter_lines())
    import time

    deadline = time.monotonic() + 60
    while scheduler.active_rows and time.monotonic() < deadline:
        time.sleep(0.05)
    assert scheduler.active_rows == 0
    metrics = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    assert "vlmtune_requests_total" in metrics and "vlmtune_queue_depth" in metrics


def test_mounted_app_without_lifespan_still_serves(setup):
    """`vlmtune ui` mounts this app inside its own: mounted apps get no lifespan events, so the scheduler
    starts on first use."""
    import asyncio

    from fastapi import FastAPI

    outer = FastAPI()
    inner = create_app(setup["engine"], ServeSettings())
    outer.mount("/", inner)
    body = {"model": "lm0", "messages": user(PROMPT, None), "max_tokens": MAX_TOKENS, "temperature": 0}

    async def call():
        transport = httpx.ASGITransport(app=outer)
        async with httpx.AsyncClient(transport=transport, base_url="http://t", timeout=120) as client:
            return await client.post("/v1/chat/completions", json=body)

    try:
        got = asyncio.run(call())
        assert got.status_code == 200, got.text
        want = ask(setup["client"], "lm0", None).choices[0].message.content
        assert got.json()["choices"][0]["message"]["content"] == want
    finally:
        inner.state.scheduler.stop()
