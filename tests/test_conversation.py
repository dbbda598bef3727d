"""The one conversation module: placeholders -> parts, one validation for data rows and requests, and
`open_image` under an allow-list (formats, a root folder for paths, no remote URLs)."""

from __future__ import annotations

import base64
import io
import os

import pytest
from PIL import Image

from vlmtune.conversation import (
    Conversation,
    ConversationError,
    ImageError,
    ImagePolicy,
    Message,
    from_placeholders,
    from_request,
    open_image,
    validate,
)
from vlmtune.data.formats import RawRow, parse_row


def png_bytes(size=(8, 6), colour=(255, 0, 0), fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format=fmt)
    return buf.getvalue()


def test_data_rows_and_requests_share_one_validation(tmp_path):
    """The same messages give the same verdicts as a data row (all reasons, with codes) and as a request
    (the first reason as one error)."""
    bad = [
        {"role": "user", "content": "<image><image>hi"},
        {"role": "user", "content": "again"},
        {"role": "assistant", "content": "<image>"},
    ]
    sample, errors = parse_row(RawRow("f.jsonl line 3", {"messages": bad, "images": ["a.png"]}, tmp_path))
    assert sample is None
    assert [e.code for e in errors] == ["role_order", "image_placeholder_role", "image_count"]
    assert str(errors[0]).startswith("f.jsonl line 3: turns 0 and 1 are both user turns")
    with pytest.raises(ConversationError, match="turns 0 and 1 are both user turns") as err:
        from_request(bad, ["a.png"])
    assert str(err.value) == errors[0].message
    # An answered request is accepted (it is a prompt with its reference); training rows need the answer.
    chat = from_request([{"role": "user", "content": "hi"}])
    assert [e.code for e in validate(chat)] == ["no_assistant"]
    assert validate(chat, answer="optional") == []


def test_parts_keep_the_text_as_written_and_the_template_drops_llava_newlines():
    message = Message("user", from_placeholders("<image>\nWhat?"))
    assert message.text == "<image>\nWhat?" and message.image_count == 1
    chat = Conversation((message, Message("assistant", from_placeholders("red"))), ("x.png",))
    assert chat.to_template(with_answer=False) == [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]}
    ]
    assert chat.to_template()[1] == {"role": "assistant", "content": [{"type": "text", "text": "red"}]}


def test_requests_carry_images_in_parts_or_beside_them():
    url = "data:image/png;base64," + base64.b64encode(png_bytes()).decode()
    parts = [{"type": "text", "text": "What?"}, {"type": "image_url", "image_url": {"url": url}}]
    chat = from_request([{"role": "system", "content": "Be brief."}, {"role": "user", "content": parts}])
    assert chat.images == (url,) and chat.messages[1].text == "What?<image>"
    opened = from_request(chat, policy=ImagePolicy(paths=False))  # a Conversation passes through
    assert opened.images[0].size == (8, 6) and opened.messages == chat.messages
    with pytest.raises(ConversationError, match="some image parts carry an image"):
        from_request([{"role": "user", "content": [*parts, {"type": "image"}]}])
    with pytest.raises(ConversationError, match="at least one message"):
        from_request([])


def test_open_image_allow_list(tmp_path):
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "ok.png").write_bytes(png_bytes())
    (tmp_path / "secret.png").write_bytes(png_bytes())
    os.symlink(tmp_path / "secret.png", root / "link.png")
    policy = ImagePolicy(root=root)

    assert open_image("sub/ok.png", policy).size == (8, 6)  # relative to the root
    assert open_image(root / "sub" / "ok.png", policy).mode == "RGB"
    for escape in ("../secret.png", str(tmp_path / "secret.png"), "link.png", "sub/../../secret.png"):
        with pytest.raises(ImageError, match="outside the image folder") as err:
            open_image(escape, policy)
        assert err.value.code == "image_refused"
    assert open_image(tmp_path / "secret.png").size == (8, 6)  # no root: any local path (CLI, data files)
    with pytest.raises(ImageError, match="not accepted here"):
        open_image(root / "sub" / "ok.png", ImagePolicy(paths=False))
    with pytest.raises(ImageError, match="remote URLs are not fetched"):
        open_image("https://example.com/cat.png", policy)
    with pytest.raises(ImageError, match="does not exist") as err:
        open_image("missing.png", policy)
    assert err.value.code == "image_missing"

    # Formats: only the allowed decoders are tried.
    assert open_image(png_bytes(fmt="JPEG")).size == (8, 6)
    with pytest.raises(ImageError, match="cannot be decoded as PNG") as err:
        open_image(png_bytes(fmt="JPEG"), ImagePolicy(formats=("PNG",)))
    assert err.value.code == "image_corrupt"
    with pytest.raises(ImageError, match="cannot be decoded"):
        open_image(png_bytes()[:40])  # truncated
    with pytest.raises(ImageError, match="data: URL image could not be decoded"):
        open_image("data:image/png;base64,@@@")
    with pytest.raises(ImageError, match="more than the 40 pixels allowed") as err:
        open_image(png_bytes(), ImagePolicy(max_pixels=40))
    assert err.value.code == "image_refused"
    with pytest.raises(ImageError, match="cannot use a int"):
        open_image(3)
