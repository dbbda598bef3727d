"""`vlmtune chat`: an interactive terminal chat with images, switching adapters without reloading."""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TextIO

from ..conversation import open_image
from ..errors import VlmtuneError
from .engine import Engine, load
from .types import BASE, GenerationSettings, Request

HELP = """commands:
  /adapter NAME   switch adapter (__base__ or none: the base alone); the conversation stays
  /adapters       list the loaded adapters
  /image PATH     attach an image to your next message
  /reset          start a new conversation
  /help           this text
  /quit           leave (or Ctrl-D)"""


def make_streamer(tokenizer: Any, out: TextIO) -> Any:
    """A transformers TextStreamer that writes the reply to `out` as it is generated."""
    from transformers import TextStreamer

    class Streamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            out.write(text + ("\n" if stream_end else ""))
            out.flush()

    return Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


# Replies in a chat run longer than predictions (GenerationSettings' default is for short answers).
CHAT_SETTINGS = GenerationSettings(max_new_tokens=512)


class ChatSession:
    """The state of one chat: adapter, conversation, images waiting for the next message."""

    def __init__(
        self, engine: Engine, adapter: str | None = None, settings: GenerationSettings | None = None
    ):
        self.engine = engine
        self.adapter = engine.check_adapter(adapter)
        self.settings = settings or CHAT_SETTINGS
        self.history: list[dict[str, Any]] = []
        self.pending: list[Any] = []

    def attach(self, path: str) -> str:
        open_image(path)  # fail now, not at the next message
        self.pending.append(path)
        return f"attached {path} to your next message"

    def switch(self, name: str) -> str:
        self.adapter = self.engine.check_adapter(name)
        return f"now using {self.adapter}"

    def command(self, line: str) -> str | None:
        """Run a /command; returns what to print, or None to quit."""
        cmd, _, arg = line.partition(" ")
        arg = arg.strip()
        if cmd in ("/quit", "/exit"):
            return None
        if cmd == "/help":
            return HELP
        if cmd == "/adapters":
            names = [*self.engine.adapters, BASE]
            return "\n".join(f"{'*' if n == self.adapter else ' '} {n}" for n in names)
        if cmd == "/adapter" and arg:
            return self.switch(arg)
        if cmd == "/image" and arg:
            return self.attach(arg)
        if cmd == "/reset":
            self.history.clear()
            self.pending.clear()
            return "new conversation"
        return f"unknown command {line!r}; /help lists the commands"

    def send(self, text: str, out: TextIO | None = None) -> str:
        """Add a user message (with any attached images), generate the reply, keep both in the history."""
        parts: list[dict[str, Any]] = [{"type": "image", "image": src} for src in self.pending]
        parts.append({"type": "text", "text": text})
        message = {"role": "user", "content": parts}
        streamer = None
        if out is not None:
            out.write(f"[{self.adapter}] ")
            streamer = make_streamer(self.engine.processor_for(self.adapter).tokenizer, out)
        result = self.engine.generate(
            Request([*self.history, message], adapter=self.adapter), self.settings, streamer=streamer
        )[0]
        self.history += [message, {"role": "assistant", "content": result.text}]
        self.pending.clear()
        return result.text


def run_chat(
    engine: Engine,
    adapter: str | None = None,
    image: str | None = None,
    settings: GenerationSettings | None = None,
    input_fn: Callable[[str], str] = input,
    out: TextIO | None = None,
) -> ChatSession:
    """The read-reply loop until /quit or end of input; replies stream to `out` (default: stdout)."""
    out = out or sys.stdout
    session = ChatSession(engine, adapter, settings)
    out.write(f"chatting with {engine.base} under {session.adapter}; /help lists the commands\n")
    if image:
        out.write(session.attach(image) + "\n")
    while True:
        try:
            line = input_fn(f"[{session.adapter}] you> ").strip()
        except (EOFError, KeyboardInterrupt):
            out.write("\n")
            break
        if not line:
            continue
        try:
            if line.startswith("/"):
                reply = session.command(line)
                if reply is None:
                    break
                out.write(reply + "\n")
            else:
                session.send(line, out)
        except VlmtuneError as exc:
            out.write(f"error: {exc}\n")
    return session


def start_chat(
    model: str | Path,
    adapters: Mapping[str, str | Path],
    *,
    adapter: str | None = None,
    image: str | None = None,
    settings: GenerationSettings | None = None,
    dtype: str = "auto",
    device: str | None = None,
    quantization: str | None = None,
) -> ChatSession:
    """`vlmtune chat`: load the base and adapters once, then chat (starting with `adapter`, else the first)."""
    engine = load(model, adapters, dtype=dtype, device=device, quantization=quantization)
    first = adapter if adapter is not None else next(iter(engine.adapters), BASE)
    return run_chat(engine, first, image, settings)
