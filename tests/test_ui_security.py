"""The dashboard's safety rules over real HTTP: a token (bearer or login cookie) or 401; CSRF on every
state-changing request; loopback names only on a loopback bind; no path out of the given folders; a
non-loopback bind without a token refused; bodies capped."""

from __future__ import annotations

import json
import os

import httpx
import pytest

from test_ui_support import Page, serve
from vlmtune.errors import VlmtuneError
from vlmtune.ui import UiSettings, create_app
from vlmtune.ui.security import resolve_under

TOKEN = "s3cret-token"


@pytest.fixture
def runs_root(tmp_path):
    """One fake run dir (enough for listing) and a secret file beside the runs folder."""
    run = tmp_path / "runs" / "a"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("model: m\noutput_dir: a\n")
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n")
    (tmp_path / "secret.txt").write_text("do not serve")
    return tmp_path / "runs"


def test_token_required(runs_root):
    with serve(UiSettings(runs=[runs_root], token=TOKEN)) as url:
        anonymous = Page(url)
        assert anonymous.get("/").status_code == 200  # the page itself holds no data
        for path in ("/api/runs", "/api/run?id=runs/a", "/api/adapters", "/api/merges"):
            response = anonymous.get(path)
            assert response.status_code == 401, path
            assert "log in" in response.json()["error"]
        assert anonymous.post("/api/generate", {"prompt": "x"}).status_code == 401
        assert anonymous.get("/api/session").json() == {
            "auth_required": True,
            "authenticated": False,
            "model": None,
            "merge_dir": None,
            "gallery": False,
            "openai": False,
        }
        wrong = Page(url, token="nope", bearer=True)
        assert wrong.get("/api/runs").status_code == 401

        assert Page(url, token=TOKEN, bearer=True).get("/api/runs").status_code == 200

        browser = Page(url)
        assert browser.login("nope").status_code == 401
        assert browser.get("/api/runs").status_code == 401
        response = browser.login(TOKEN)
        assert response.status_code == 200
        cookie = response.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie and TOKEN not in cookie
        assert [r["id"] for r in browser.get("/api/runs").json()["runs"]] == ["runs/a"]
        assert browser.get("/api/session").json()["authenticated"] is True
        assert browser.post("/api/logout").status_code == 200
        assert browser.get("/api/runs").status_code == 401


def test_csrf(runs_root):
    with serve(UiSettings(runs=[runs_root], token=TOKEN)) as url:
        browser = Page(url)
        assert browser.login(TOKEN).status_code == 200
        body = {"adapter": "run/runs/a", "name": "x"}
        missing = browser.post("/api/merge", body, csrf=False)
        assert missing.status_code == 403 and "X-CSRF-Token" in missing.json()["error"]
        wrong = browser.post("/api/merge", body, csrf=False, headers={"X-CSRF-Token": "guess"})
        assert wrong.status_code == 403
        foreign = browser.post("/api/merge", body, headers={"Origin": "http://evil.example"})
        assert foreign.status_code == 403 and "cross-origin" in foreign.json()["error"]
        # With the header the request gets through the guard (and fails on its merits: no such adapter).
        assert browser.post("/api/merge", body).status_code == 404
        # Login itself needs the header too (no login CSRF).
        assert Page(url).post("/api/login", {"token": TOKEN}, csrf=False).status_code == 403
        # Scripts with the bearer header need no CSRF token: browsers never send that header by themselves.
        assert Page(url, token=TOKEN, bearer=True).post("/api/merge", body, csrf=False).status_code == 404

    with serve(UiSettings(runs=[runs_root])) as url:  # no token (loopback): CSRF still applies
        page = Page(url)
        assert page.post("/api/merge", {"adapter": "x", "name": "y"}, csrf=False).status_code == 403
        assert page.post("/api/merge", {"adapter": "x", "name": "y"}).status_code == 404


def test_traversal_refused(runs_root):
    with serve(UiSettings(runs=[runs_root])) as url:
        page = Page(url)
        for name in (
            "../../secret.txt",
            "/etc/passwd",
            "..%2F..%2Fsecret.txt",
            "config.yaml/../../../secret.txt",
        ):
            response = page.get("/api/run/file", params={"id": "runs/a", "name": name})
            assert response.status_code in (403, 404), name
            assert "do not serve" not in response.text
        assert (
            page.get("/api/run/file", params={"id": "runs/a", "name": "../../secret.txt"}).status_code == 403
        )
        assert page.get("/api/run", params={"id": "runs/../.."}).status_code == 403
        assert page.get("/api/run", params={"id": "../secret.txt"}).status_code == 403
        assert page.get("/api/run/file", params={"id": "runs/a", "name": "config.yaml"}).status_code == 200
        # Only the run files the page needs are served, even inside the run dir.
        (runs_root / "a" / "notes.txt").write_text("x")
        assert page.get("/api/run/file", params={"id": "runs/a", "name": "notes.txt"}).status_code == 404
        assert page.get("/static/../app.py").status_code == 404


def test_symlink_out_of_a_root_refused(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    (tmp_path / "outside.txt").write_text("x")
    (root / "link.txt").symlink_to(tmp_path / "outside.txt")
    with pytest.raises(PermissionError, match="outside"):
        resolve_under([root], "link.txt")
    assert resolve_under([root], "ok.txt") == (root / "ok.txt").resolve()


def test_loopback_names_only(runs_root):
    """A DNS-rebinding page reaches 127.0.0.1 under its own host name: refused."""
    with serve(UiSettings(runs=[runs_root])) as url:
        assert httpx.get(url + "/api/runs", headers={"Host": "evil.example:7860"}).status_code == 403
        assert httpx.get(url + "/api/runs", headers={"Host": "localhost:7860"}).status_code == 200


def test_bind_and_body_limits(runs_root):
    with pytest.raises(VlmtuneError, match=r"refusing to listen on 0\.0\.0\.0 without a key.*--token"):
        create_app(UiSettings(runs=[runs_root], host="0.0.0.0"))
    create_app(UiSettings(runs=[runs_root], host="0.0.0.0", token=TOKEN))  # allowed with a token
    with serve(UiSettings(runs=[runs_root], max_body_bytes=1000)) as url:
        page = Page(url)
        response = page.post("/api/generate", {"prompt": "x" * 5000})
        assert response.status_code == 413
        chunked = page.post("/api/generate", content=iter([b"x" * 600, b"x" * 600]))  # no Content-Length
        assert chunked.status_code == 413


def test_command_line(runs_root, tmp_path):
    """`vlmtune ui` itself: refuses an open non-loopback bind in one line; serves the runs with a token."""
    import socket
    import subprocess
    import sys
    import time

    refused = subprocess.run(
        [sys.executable, "-m", "vlmtune", "ui", "--runs", str(runs_root), "--host", "0.0.0.0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert refused.returncode == 2
    assert (
        refused.stderr.startswith("error: refusing to listen on 0.0.0.0")
        and len(refused.stderr.splitlines()) == 1
    )

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "vlmtune", "ui", "--runs", str(runs_root), "--port", str(port)],
        env={**os.environ, "VLMTUNE_UI_TOKEN": TOKEN},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == f"vlmtune ui on http://127.0.0.1:{port}/"
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                response = httpx.get(url + "/api/runs", headers={"Authorization": f"Bearer {TOKEN}"})
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "vlmtune ui did not start listening"
                time.sleep(0.2)
        assert [r["id"] for r in response.json()["runs"]] == ["runs/a"]
        assert httpx.get(url + "/api/runs").status_code == 401
    finally:
        proc.terminate()
        proc.wait(30)


def test_start_up_adapter_with_pickled_weights_refused(tmp_path):
    """The dashboard is a server too: a start-up adapter read from a pickle is refused before loading."""
    from vlmtune.adapters import AdapterError
    from vlmtune.ui import UiSettings

    folder = tmp_path / "old"
    folder.mkdir()
    (folder / "adapter_model.bin").write_bytes(b"not read")
    settings = UiSettings(model=str(tmp_path), adapters={"old": folder})
    with pytest.raises(AdapterError, match=r"--adapter old=.* holds pickled weights \(adapter_model.bin\)"):
        settings.check()
