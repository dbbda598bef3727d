"""OpenAI chat messages -> the engine's request, and the engine's answers -> OpenAI response bodies."""

from __future__ import annotations

import time
import uuid
from typing import Any

from ..infer.types import Request
from .errors import ApiError
from .images import load_image
from .schemas import ChatRequest, ImagePart
from .settings import ServeSettings


def to_request(chat: ChatRequest, adapter: str, settings: ServeSettings) -> tuple[Request, list[str]]:
    """(engine request, sha256 of each image in order). Images are fetched and checked here, so a bad one
    fails the request with its message index before anything runs."""
    messages: list[dict[str, Any]] = []
    digests: list[str] = []
    count = 0
    for i, message in enumerate(chat.messages):
        role = "system" if message.role == "developer" else message.role
        content = message.content
        if content is None or isinstance(content, str):
            messages.append({"role": role, "content": content or ""})
            continue
        parts: list[dict[str, Any]] = []
        for j, part in enumerate(content):
            if isinstance(part, ImagePart):
                count += 1
                if count > settings.max_images:
                    raise ApiError(
                        400,
                        f"at most {settings.max_images} images per request (--max-images).",
                        param="messages",
                    )
                if role != "user":
                    raise ApiError(400, f"message {i} ({role}) holds an image; images go in user messages.")
                loaded = load_image(part.image_url.url, settings, f"messages[{i}].content[{j}].image_url")
                digests.append(loaded.digest)
                parts.append({"type": "image", "image": loaded.image})
            else:
                parts.append({"type": "text", "text": part.text})
        messages.append({"role": role, "content": parts})
    return Request(messages, [], adapter), digests


def max_tokens(chat: ChatRequest, settings: ServeSettings) -> int:
    wanted = chat.max_completion_tokens or chat.max_tokens or settings.default_max_tokens
    if wanted > settings.max_tokens:
        field = "max_completion_tokens" if chat.max_completion_tokens else "max_tokens"
        raise ApiError(
            400,
            f"{field} {wanted} is over the server's cap of {settings.max_tokens} (--max-tokens).",
            param=field,
        )
    return wanted


def stops(chat: ChatRequest) -> list[str]:
    values = [chat.stop] if isinstance(chat.stop, str) else list(chat.stop or [])
    if len(values) > 4 or any(not s for s in values):
        raise ApiError(400, "stop takes up to 4 non-empty strings.", param="stop")
    return values


def completion_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex[:24]


def usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def completion(
    cid: str, model: str, choices: list[dict[str, Any]], prompt_tokens: int, fingerprint: str, logprobs: bool
) -> dict[str, Any]:
    """The non-streamed body, from each choice's `done` event (in choice order)."""
    return {
        "id": cid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": fingerprint,
        "choices": [
            {
                "index": c["choice"],
                "message": {"role": "assistant", "content": c["text"]},
                "finish_reason": c["finish_reason"],
                "logprobs": {"content": c["all_logprobs"]} if logprobs else None,
            }
            for c in choices
        ],
        "usage": usage(prompt_tokens, sum(c["completion_tokens"] for c in choices)),
    }


def chunk(
    cid: str,
    model: str,
    fingerprint: str,
    choices: list[dict[str, Any]],
    *,
    include_usage: bool,
    usage_body: dict[str, int] | None = None,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "system_fingerprint": fingerprint,
        "choices": choices,
    }
    if include_usage:
        body["usage"] = usage_body
    return body


def chunk_choice(
    index: int, delta: dict[str, Any], finish: str | None = None, logprobs: list[Any] | None = None
) -> dict[str, Any]:
    return {
        "index": index,
        "delta": delta,
        "finish_reason": finish,
        "logprobs": {"content": logprobs} if logprobs is not None else None,
    }
