"""The dashboard's adapters: the inspect report is `inspect_adapter`'s, side-by-side answers (one mixed
engine call) equal what `vlmtune predict` writes for the same image and prompt, and a merge job started
over HTTP writes a verified folder under --merge-dir only, whose logits match PEFT's un-merged model."""

from __future__ import annotations

import base64
import json
import time

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForImageTextToText, AutoTokenizer

import vlmtune
from test_ui_support import FAMILY, Page, serve, tiny_run
from vlmtune.adapters.inspect import inspect_adapter
from vlmtune.infer.predict import predict
from vlmtune.ui import UiSettings

PROMPT = "What colour is the shape?"


@pytest.fixture(scope="module")
def setup(tiny_model, tmp_path_factory):
    base = tiny_model(FAMILY)
    root = tmp_path_factory.mktemp("ui-adapters")
    run_dir = tiny_run(base, root / "runs")
    adapters = {"final": run_dir / "adapter", "early": run_dir / "checkpoints" / "step-3"}
    engine = vlmtune.load(base, adapters, device="cpu")
    image = run_dir.parent / "data" / "images" / "train" / "0.png"
    return base, root, run_dir, adapters, engine, image


def test_adapters_listed_and_inspected(setup):
    base, root, run_dir, adapters, engine, _ = setup
    with serve(UiSettings(runs=[root / "runs"], model=str(base), adapters=adapters), engine) as url:
        page = Page(url)
        listed = page.get("/api/adapters").json()
        assert listed["engine"] == ["__base__", "final", "early"]
        assert {a["id"] for a in listed["adapters"]} == {"engine/final", "engine/early", "run/runs/shapes"}
        for adapter_id, folder in (
            ("engine/early", adapters["early"]),
            ("run/runs/shapes", run_dir / "adapter"),
        ):
            shown = page.get("/api/adapter/inspect", params={"id": adapter_id}).json()
            assert shown["report"] == json.loads(json.dumps(inspect_adapter(folder, base=str(base))))
            assert shown["report"]["fit"]["fits"] is True
        assert page.get("/api/adapter/inspect", params={"id": "engine/../x"}).status_code == 404


def test_side_by_side_equals_predict(setup, tmp_path):
    base, root, _, adapters, engine, image = setup
    names = ["__base__", "final", "early"]
    data = tmp_path / "prompts.jsonl"
    data.write_text(
        "".join(
            json.dumps(
                {
                    "messages": [{"role": "user", "content": f"<image>{PROMPT}"}],
                    "images": [str(image)],
                    "adapter": n,
                }
            )
            + "\n"
            for n in names
        )
    )
    predict(
        base,
        adapters,
        data,
        tmp_path / "preds.jsonl",
        device="cpu",
        progress=False,
        settings=vlmtune.infer.GenerationSettings(max_new_tokens=8),
    )
    expected = {
        row["adapter"]: row["prediction"]
        for row in map(json.loads, (tmp_path / "preds.jsonl").read_text().splitlines())
    }

    image_url = "data:image/png;base64," + base64.b64encode(image.read_bytes()).decode()
    with serve(UiSettings(runs=[root / "runs"], model=str(base), adapters=adapters), engine) as url:
        page = Page(url)
        response = page.post(
            "/api/generate", {"prompt": PROMPT, "image": image_url, "adapters": names, "max_new_tokens": 8}
        )
        assert response.status_code == 200, response.text
        answers = response.json()["answers"]
        assert [a["adapter"] for a in answers] == names
        assert {a["adapter"]: a["text"] for a in answers} == expected
        assert len(set(expected.values())) > 1, (
            "the adapters should answer differently for this test to mean much"
        )

        bad = page.post("/api/generate", {"prompt": PROMPT, "image": "file:///etc/passwd", "adapters": names})
        assert bad.status_code == 400 and "data URL" in bad.json()["error"]
        unknown = page.post("/api/generate", {"prompt": PROMPT, "adapters": ["nope"]})
        assert unknown.status_code == 400 and "no adapter called 'nope'" in unknown.json()["error"]


def wait_job(page: Page, job_id: str, limit_s: float = 300) -> dict:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        job = page.get("/api/merge", params={"id": job_id}).json()
        if job["state"] != "running":
            return job
        time.sleep(0.2)
    raise AssertionError(f"merge job {job_id} still running after {limit_s}s")


def test_merge_job_writes_a_verified_folder(setup, tmp_path):
    base, root, run_dir, adapters, engine, _ = setup
    merge_dir = tmp_path / "merged"
    with serve(
        UiSettings(runs=[root / "runs"], model=str(base), adapters=adapters, merge_dir=merge_dir), engine
    ) as url:
        page = Page(url)
        started = page.post(
            "/api/merge", {"adapter": "run/runs/shapes", "name": "shapes-merged", "verify": True}
        )
        assert started.status_code == 200, started.text
        job = wait_job(page, started.json()["job"])
        assert job["state"] == "done", job["error"]
        assert job["verification"]["passed"] is True and job["shards_written"]
        listing = page.get("/api/merges").json()
        assert [m["name"] for m in listing["merged"]] == ["shapes-merged"]
        assert listing["merged"][0]["manifest"]["verification"]["passed"] is True

        for name in ("../escape", "/abs", ".hidden", "a/b", ""):
            refused = page.post("/api/merge", {"adapter": "run/runs/shapes", "name": name})
            assert refused.status_code == 400, name
        again = page.post("/api/merge", {"adapter": "run/runs/shapes", "name": "shapes-merged"})
        assert again.status_code == 400 and "exists" in again.json()["error"]
    assert sorted(p.name for p in merge_dir.iterdir()) == ["shapes-merged"]
    assert not (tmp_path / "escape").exists()

    # Independent check: plain transformers on the merged folder vs PEFT's un-merged base + adapter.
    tokenizer = AutoTokenizer.from_pretrained(base)
    ids = tokenizer("a red square and a blue circle", return_tensors="pt")
    merged = AutoModelForImageTextToText.from_pretrained(merge_dir / "shapes-merged", dtype=torch.float32)
    reference = PeftModel.from_pretrained(
        AutoModelForImageTextToText.from_pretrained(base, dtype=torch.float32), run_dir / "adapter"
    )
    with torch.no_grad():
        got, want = merged(**ids).logits, reference(**ids).logits
    assert torch.allclose(got, want, atol=1e-4)


def test_merge_off_without_merge_dir(setup):
    base, root, _, adapters, engine, _ = setup
    with serve(UiSettings(runs=[root / "runs"], model=str(base), adapters=adapters), engine) as url:
        refused = Page(url).post("/api/merge", {"adapter": "run/runs/shapes", "name": "x"})
    assert refused.status_code == 400 and "--merge-dir" in refused.json()["error"]


def test_openai_api_in_the_same_process(setup):
    """With --model, the dashboard also serves `vlmtune serve`'s OpenAI API on the same engine and token:
    the official client's greedy answer equals the side-by-side answer."""
    from openai import AuthenticationError, OpenAI

    base, root, _, adapters, engine, image = setup
    image_url = "data:image/png;base64," + base64.b64encode(image.read_bytes()).decode()
    settings = UiSettings(runs=[root / "runs"], model=str(base), adapters=adapters, token="tok")
    with serve(settings, engine) as url:
        page = Page(url, token="tok", bearer=True)
        gallery = page.post(
            "/api/generate",
            {"prompt": PROMPT, "image": image_url, "adapters": ["final"], "max_new_tokens": 8},
        ).json()["answers"][0]["text"]
        client = OpenAI(base_url=url + "/v1", api_key="tok")
        assert {m.id for m in client.models.list().data} >= {"final", "early"}
        reply = client.chat.completions.create(
            model="final",
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": image_url}},
                        {"type": "text", "text": PROMPT},
                    ],
                }
            ],
            max_tokens=8,
            temperature=0,
        )
        assert reply.choices[0].message.content == gallery
        with pytest.raises(AuthenticationError):
            OpenAI(base_url=url + "/v1", api_key="wrong").models.list()
