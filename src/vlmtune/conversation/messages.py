"""Messages: the conversation type, parsing (placeholders, content parts, turns, requests) and validation."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from .images import ConversationError, ImagePolicy, ImageSource, open_image

IMAGE_PLACEHOLDER = "<image>"
ROLES = ("system", "user", "assistant")
Answer = Literal["required", "optional"]


@dataclass(frozen=True)
class RowError:
    """Why a row or request cannot be used. `code` is stable (for tests and tools); `message` says what to
    do; `where` is the file and row (empty for a request)."""

    where: str
    code: str
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}" if self.where else self.message


@dataclass(frozen=True)
class Part:
    """One piece of a message: `type` 'text' (with `text`) or 'image' (its image is the conversation's
    next one, in order)."""

    type: Literal["text", "image"]
    text: str = ""


IMAGE = Part("image")


@dataclass(frozen=True)
class Message:
    role: str  # system | user | assistant
    parts: tuple[Part, ...]

    @property
    def text(self) -> str:
        """The message as written, `<image>` where each image goes."""
        return "".join(IMAGE_PLACEHOLDER if p.type == "image" else p.text for p in self.parts)

    @property
    def image_count(self) -> int:
        return sum(p.type == "image" for p in self.parts)


@dataclass(frozen=True)
class Conversation:
    messages: tuple[Message, ...]
    images: tuple[ImageSource, ...] = field(default=())

    def to_template(self, with_answer: bool = True) -> list[dict[str, Any]]:
        """Chat-template messages with typed content parts (`{"type": "image"}` where each image goes;
        the images themselves go to the processor in order). `with_answer=False` drops a final assistant
        turn (a generation prompt)."""
        messages = self.messages
        if not with_answer and messages and messages[-1].role == "assistant":
            messages = messages[:-1]
        out = []
        for message in messages:
            parts: list[dict[str, Any]] = []
            after_image = False
            for part in message.parts:
                if part.type == "image":
                    parts.append({"type": "image"})
                    after_image = True
                    continue
                # LLaVA data writes "<image>\n<question>"; the template places the image itself.
                text = part.text.removeprefix("\n") if after_image else part.text
                after_image = False
                if text:
                    parts.append({"type": "text", "text": text})
            out.append({"role": message.role, "content": parts})
        return out


def from_placeholders(text: str) -> tuple[Part, ...]:
    """'<image>\\nWhat is it?' -> (image, text '\\nWhat is it?'): text as written, an image part where each
    placeholder stood, empty pieces dropped."""
    parts: list[Part] = []
    for i, piece in enumerate(text.split(IMAGE_PLACEHOLDER)):
        if i > 0:
            parts.append(IMAGE)
        if piece:
            parts.append(Part("text", piece))
    return tuple(parts)


def image_source(part: Mapping[str, Any]) -> ImageSource | None:
    """The image an image part carries (`image`, `path`, `url`, or OpenAI's `image_url: {url}`), or None."""
    for key in ("image", "path", "url", "image_url"):
        value = part.get(key)
        if isinstance(value, Mapping):
            value = value.get("url")
        if value is not None:
            return value
    return None


Fail = Callable[[str, str], None]


def parse_content(
    content: Any, label: str, fail: Fail, inline_images: bool
) -> tuple[tuple[Part, ...], list[ImageSource | None]] | None:
    """(parts, the image each image part carries or None) of a message's content: a string with
    placeholders or a list of `{"type": "text", "text"}` / `{"type": "image"}` parts (`image_url` parts
    and images inside parts only with `inline_images`, as requests send them; data rows list their images
    apart). None after reporting through `fail`."""
    if isinstance(content, str):
        parts = from_placeholders(content)
        return parts, [None] * sum(p.type == "image" for p in parts)
    if not isinstance(content, list):
        fail(
            "content_type",
            f"{label} content must be a string or a list of parts (got {type(content).__name__}: {content!r}).",
        )
        return None
    out: list[Part] = []
    carried: list[ImageSource | None] = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, Mapping) else None
        if (
            kind == "text"
            and isinstance(part.get("text"), str)
            and (inline_images or set(part) <= {"type", "text"})
        ):
            new = from_placeholders(part["text"])
            carried += [None] * sum(p.type == "image" for p in new)
            out += new
        elif kind == "image" and set(part) == {"type"}:
            out.append(IMAGE)
            carried.append(None)
        elif inline_images and kind in ("image", "image_url") and image_source(part) is not None:
            out.append(IMAGE)
            carried.append(image_source(part))
        else:
            where = "" if inline_images else " (image paths go in the row's 'images')"
            fail(
                "content_type",
                f"{label} content part {j} is {part!r}; parts are {{'type': 'text', 'text': ...}} or "
                f"{{'type': 'image'}}{where}.",
            )
            return None
    return tuple(out), carried


def parse_turn(
    turn: Any,
    label: str,
    fail: Fail,
    *,
    keys: tuple[str, str] = ("role", "content"),
    roles: Mapping[str, str] | None = None,
    strict_keys: bool = True,
    inline_images: bool = False,
) -> tuple[Message, list[ImageSource | None]] | None:
    """One turn `{role_key: ..., content_key: ...}` -> Message; `roles` maps the format's role names to
    ours (default: ours as they are). None after reporting through `fail`."""
    role_key, content_key = keys
    roles = roles if roles is not None else {r: r for r in ROLES}
    if not isinstance(turn, Mapping):
        fail("turn_type", f"{label} must be an object with '{role_key}' and '{content_key}' (got {turn!r}).")
        return None
    missing = [k for k in keys if k not in turn]
    if missing:
        fail("turn_missing_field", f"{label} lacks {' and '.join(repr(m) for m in missing)}.")
        return None
    ok = True
    extra = sorted(set(turn) - set(keys))
    if strict_keys and extra:
        fail(
            "unknown_turn_key",
            f"{label} has unknown key(s) {extra}; a turn has only '{role_key}' and '{content_key}'.",
        )
        ok = False
    value = turn[role_key]
    role = roles.get(value) if isinstance(value, str) else None
    if role is None:
        fail("unknown_role", f"{label} has {role_key} {value!r}; use one of {', '.join(roles)}.")
        return None
    parsed = parse_content(turn[content_key], label, fail, inline_images)
    if parsed is None or not ok:
        return None
    return Message(role, parsed[0]), parsed[1]


def validate(conversation: Conversation, answer: Answer = "required", where: str = "") -> list[RowError]:
    """Every reason `conversation` cannot be used: an optional system turn first, then user and assistant
    turns alternating from a user turn; no empty user or assistant turn; images in user turns only; one
    image per image part. `answer='required'` (training) wants a final assistant turn; 'optional'
    (prediction rows, requests) takes one as the reference answer or leaves it out."""
    errors: list[RowError] = []

    def fail(code: str, message: str) -> None:
        errors.append(RowError(where, code, message))

    messages = conversation.messages
    if not messages:
        fail("empty_conversation", "the conversation is empty; it needs at least one user turn.")
        return errors
    check_order(messages, fail, answer)
    for i, m in enumerate(messages):
        empty = not any(p.type == "image" or p.text.strip() for p in m.parts)
        if m.role == "assistant" and empty:
            fail(
                "empty_assistant", f"turn {i} is an empty assistant turn; there is nothing to learn from it."
            )
        if m.role == "user" and empty:
            fail("empty_user", f"turn {i} is an empty user turn.")
        if m.role != "user" and m.image_count:
            fail("image_placeholder_role", f"turn {i} ({m.role}) holds an image; images go in user turns.")
    count, given = sum(m.image_count for m in messages), len(conversation.images)
    if count != given:
        mismatch = (
            f"the text has {count} {IMAGE_PLACEHOLDER} placeholder(s) but the row lists {given} image(s)"
            if where
            else f"the messages have {count} image placeholder(s) but {given} image(s) were given"
        )
        fail("image_count", f"{mismatch}; put one {IMAGE_PLACEHOLDER} (or image part) where each image goes.")
    return errors


def check_order(messages: Sequence[Message], fail: Fail, answer: Answer) -> None:
    for i, m in enumerate(messages):
        if m.role == "system" and i > 0:
            fail("role_order", f"turn {i} is a system turn; only the first turn may be a system turn.")
            return
    offset = 1 if messages[0].role == "system" else 0
    body = messages[offset:]
    if not body:
        fail(
            "no_assistant", "the conversation has only a system turn; add a user turn and an assistant reply."
        )
        return
    if body[0].role != "user":
        fail(
            "role_order",
            f"turn {offset} is {body[0].role}; a conversation starts with a user turn (after an optional system turn).",
        )
        return
    for i in range(1, len(body)):
        if body[i].role == body[i - 1].role:
            fail(
                "role_order",
                f"turns {offset + i - 1} and {offset + i} are both {body[i].role} turns; user and assistant "
                "turns must alternate.",
            )
            return
    if body[-1].role != "assistant" and answer == "required":
        fail(
            "no_assistant",
            f"the last turn ({offset + len(body) - 1}) is a user turn with no assistant reply; add the reply or drop the turn.",
        )


def from_request(
    messages: Conversation | Sequence[Mapping[str, Any]] | str,
    images: Sequence[ImageSource] = (),
    policy: ImagePolicy | None = None,
) -> Conversation:
    """A request's messages (a string = one user message; dicts with `role` and `content`, as the engine,
    `vlmtune chat` and OpenAI clients send them) and images -> a checked Conversation, or a
    ConversationError with the first problem. Images come either inside the parts or in `images`, never
    both. With a `policy`, every image is opened now (so a refused path fails the request, not a batch)."""
    conversation = messages if isinstance(messages, Conversation) else _parse_request(messages, images)
    errors = validate(conversation, answer="optional")
    if errors:
        raise ConversationError(errors[0].message)
    if policy is not None:
        opened = tuple(open_image(src, policy) for src in conversation.images)
        conversation = Conversation(conversation.messages, opened)
    return conversation


def _parse_request(
    messages: Sequence[Mapping[str, Any]] | str, images: Sequence[ImageSource]
) -> Conversation:
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    if not isinstance(messages, Sequence) or not messages:
        raise ConversationError("a request needs at least one message ({'role': 'user', 'content': ...}).")
    errors: list[str] = []

    def fail(code: str, message: str) -> None:
        errors.append(message)

    parsed: list[Message] = []
    carried: list[ImageSource | None] = []
    for i, raw in enumerate(messages):
        turn = parse_turn(raw, f"message {i}", fail, strict_keys=False, inline_images=True)
        if turn is None:
            raise ConversationError(errors[0])
        parsed.append(turn[0])
        carried += turn[1]
    inline = [src for src in carried if src is not None]
    if inline and images:
        raise ConversationError("pass images either inside the message parts or in `images`, not both.")
    if inline and len(inline) != len(carried):
        raise ConversationError(
            "some image parts carry an image and some do not; give every image part its image."
        )
    return Conversation(tuple(parsed), tuple(inline or images))
