"""The pieces every vlmtune server shares: the bind rule, the bearer check, the body cap (ASGI level)."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from vlmtune.errors import VlmtuneError
from vlmtune.serve.auth import BearerAuth, bearer_token, token_matches
from vlmtune.serve.errors import BodyLimit, send_error
from vlmtune.serve.settings import ServeSettings, check_bind, is_loopback


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1", "127.5.0.1", "[::1]"])
def test_loopback_hosts(host):
    assert is_loopback(host)
    check_bind(host, None, False)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.10", "example.org"])
def test_non_loopback_bind_needs_a_key_or_insecure(host):
    with pytest.raises(VlmtuneError, match=r"refusing to listen on .* without a key.*--insecure"):
        check_bind(host, None, False)
    check_bind(host, "k", False)
    check_bind(host, None, True)


def test_settings_read_the_key_from_the_environment(monkeypatch):
    monkeypatch.setenv("VLMTUNE_API_KEY", "from-env")
    assert ServeSettings().api_key == "from-env"
    monkeypatch.delenv("VLMTUNE_API_KEY")
    with pytest.raises(VlmtuneError, match="without a key"):
        ServeSettings(host="0.0.0.0").check_bind()


def test_settings_refuse_missing_folders_and_zero_limits(tmp_path):
    with pytest.raises(VlmtuneError, match=r"--adapter-dir .*nope is not a folder"):
        ServeSettings(adapter_dir=tmp_path / "nope")
    with pytest.raises(VlmtuneError, match="--max-queue must be at least 1"):
        ServeSettings(max_queue=0)


def test_token_comparison():
    assert token_matches("abc", "abc")
    assert not token_matches("abd", "abc")
    assert not token_matches("", "abc")
    assert not token_matches(None, "abc")
    assert bearer_token([(b"Authorization", b"Bearer  t0k ")]) == "t0k"
    assert bearer_token([(b"authorization", b"Basic xyz")]) is None


async def echo(scope, receive, send):
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": str(len(body)).encode()})


def call(app, method, path, **kwargs):
    async def run():
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return await client.request(method, path, **kwargs)

    return asyncio.run(run())


def test_bearer_middleware_guards_all_but_open_paths():
    app = BearerAuth(echo, "secret", lambda send: send_error(send, 401, "no key"))
    assert call(app, "GET", "/health").status_code == 200
    denied = call(app, "GET", "/v1/models")
    assert denied.status_code == 401
    assert denied.json()["error"]["type"] == "authentication_error"
    assert call(app, "GET", "/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert call(app, "GET", "/v1/models", headers={"Authorization": "Bearer secret"}).status_code == 200


def test_body_limit_by_header_and_by_bytes():
    app = BodyLimit(echo, 100)
    assert call(app, "POST", "/", content=b"x" * 100).text == "100"
    big = call(app, "POST", "/", content=b"x" * 101)
    assert big.status_code == 413
    assert "--max-body-bytes" in big.json()["error"]["message"]

    async def chunks():  # no Content-Length: counted as it arrives
        for _ in range(5):
            yield b"y" * 30

    streamed = call(app, "POST", "/", content=chunks())
    assert streamed.status_code == 413
