"""Request-level rules of `vlmtune serve` that need no model: image sources, adapter paths, OpenAI fields."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

from vlmtune.serve.errors import ApiError
from vlmtune.serve.images import load_image, public_address
from vlmtune.serve.registry import check_name, resolve_adapter_path
from vlmtune.serve.schemas import ChatRequest
from vlmtune.serve.settings import ServeSettings


def png(size=(8, 8), fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 200, 30)).save(buf, format=fmt)
    return buf.getvalue()


def data_url(data: bytes, mime="image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


def refused(status, match, fn, *args):
    with pytest.raises(ApiError, match=match) as info:
        fn(*args)
    assert info.value.status == status


def test_data_urls():
    settings = ServeSettings()
    img = load_image(data_url(png()), settings, "p")
    assert img.image.size == (8, 8) and len(img.digest) == 64
    assert load_image(data_url(png(fmt="WEBP"), "image/webp"), settings, "p").image.size == (8, 8)
    refused(
        400,
        "image type image/bmp is not accepted",
        load_image,
        data_url(png(fmt="BMP"), "image/bmp"),
        settings,
        "p",
    )
    refused(400, "must be base64", load_image, "data:image/png,abc", settings, "p")
    refused(400, "not valid base64", load_image, "data:image/png;base64,@@@", settings, "p")
    refused(400, "cannot be decoded", load_image, data_url(b"not an image"), settings, "p")
    # A BMP labelled as PNG is still refused: the decoder list is the allow-list, not the label.
    refused(400, "cannot be decoded", load_image, data_url(png(fmt="BMP")), settings, "p")


def test_size_limits():
    small = ServeSettings(max_image_bytes=100, max_image_pixels=64)
    refused(413, "--max-image-bytes", load_image, data_url(png((64, 64)) + b"\0" * 200), small, "p")
    refused(
        413,
        r"9x9 pixels.*--max-image-pixels",
        load_image,
        data_url(png((9, 9))),
        ServeSettings(max_image_pixels=64),
        "p",
    )


def test_local_paths_only_inside_the_image_dir(tmp_path):
    inside = tmp_path / "images"
    inside.mkdir()
    (inside / "a.png").write_bytes(png())
    (tmp_path / "secret.png").write_bytes(png())
    (inside / "link.png").symlink_to(tmp_path / "secret.png")
    refused(400, "--image-dir DIR", load_image, "a.png", ServeSettings(), "p")
    settings = ServeSettings(image_dir=inside)
    assert load_image("a.png", settings, "p").image.size == (8, 8)
    assert load_image(f"file://{inside}/a.png", settings, "p").image.size == (8, 8)
    for bad in ("../secret.png", str(tmp_path / "secret.png"), "link.png", f"file://{tmp_path}/secret.png"):
        refused(400, "outside --image-dir", load_image, bad, settings, "p")
    refused(400, "no image file|does not exist", load_image, "missing.png", settings, "p")
    refused(400, "scheme", load_image, "ftp://x/a.png", settings, "p")


def test_remote_images_off_by_default_and_never_private():
    refused(400, "--allow-remote-images", load_image, "https://example.org/a.png", ServeSettings(), "p")
    remote = ServeSettings(allow_remote_images=True)
    for url in (
        "http://127.0.0.1:9/a.png",
        "http://localhost/a.png",
        "http://10.1.2.3/a.png",
        "http://169.254.169.254/latest/meta-data",
        "http://[::1]/a.png",
        "http://192.168.0.1/a.png",
    ):
        refused(400, "non-public address", load_image, url, remote, "p")
    refused(400, "non-public", public_address, "127.0.0.2", 80, "p")


def test_adapter_paths_and_names(tmp_path):
    root = tmp_path / "adapters"
    (root / "ok").mkdir(parents=True)
    (root / "ok" / "adapter_model.safetensors").write_bytes(b"")
    (root / "pickled").mkdir()
    (root / "pickled" / "adapter_model.bin").write_bytes(b"")
    (root / "llava").mkdir()
    (root / "llava" / "adapter_model.safetensors").write_bytes(b"")
    (root / "llava" / "non_lora_trainables.bin").write_bytes(b"")
    (tmp_path / "outside").mkdir()
    (root / "escape").symlink_to(tmp_path / "outside")
    refused(403, "--adapter-dir DIR", resolve_adapter_path, "ok", ServeSettings())
    settings = ServeSettings(adapter_dir=root)
    assert resolve_adapter_path("ok", settings) == (root / "ok").resolve()
    for bad in ("../outside", str(tmp_path / "outside"), "escape"):
        refused(400, "outside --adapter-dir", resolve_adapter_path, bad, settings)
    refused(400, "pickled weights", resolve_adapter_path, "pickled", settings)
    refused(400, "pickled weights", resolve_adapter_path, "llava", settings)
    for name in ("../x", "a/b", "", "none", "__base__", "x" * 65, "a b"):
        refused(400, "adapter names are", check_name, name)
    check_name("ok_name-2")


def test_fields_that_would_do_nothing_are_refused():
    base = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    assert ChatRequest(**base).refused() is None
    assert ChatRequest(**base, user="u", frequency_penalty=0).refused() is None
    cases = {
        "tools": {"tools": [{"type": "function"}]},
        "response_format": {"response_format": {"type": "json_object"}},
        "logit_bias": {"logit_bias": {"1": 2.0}},
        "presence_penalty": {"presence_penalty": 0.5},
        "top_logprobs": {"top_logprobs": 2},
    }
    for field, extra in cases.items():
        assert ChatRequest(**base, **extra).refused()[0] == field
