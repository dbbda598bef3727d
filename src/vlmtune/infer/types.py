"""Plain data types of the inference engine (no torch): what a caller asks for and what it gets back."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import VlmtuneError

# The adapter name that runs the base model alone. `none` is accepted as an alias (case-insensitive).
BASE = "__base__"
BASE_ALIASES = ("__base__", "none")


class InferenceError(VlmtuneError):
    """A request or an adapter the engine cannot serve as asked."""


def canonical_adapter(name: str | None) -> str | None:
    """`none` / `__base__` -> BASE; other names unchanged; None stays None (the engine's default)."""
    if name is None:
        return None
    return BASE if name.strip().lower() in BASE_ALIASES else name


@dataclass(frozen=True)
class GenerationSettings:
    """Decoding settings. The defaults are greedy and deterministic: the base's `generation_config`
    sampling values are *not* inherited, so two runs (and two adapters) are comparable."""

    max_new_tokens: int = 128
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    repetition_penalty: float | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise VlmtuneError(f"max_new_tokens must be at least 1 (got {self.max_new_tokens}).")
        if self.do_sample and self.temperature <= 0:
            raise VlmtuneError(
                f"temperature must be > 0 when sampling (got {self.temperature}); for greedy decoding "
                "leave sampling off instead."
            )
        if not 0 < self.top_p <= 1:
            raise VlmtuneError(f"top_p must be in (0, 1] (got {self.top_p}).")


@dataclass
class Request:
    """One generation request.

    `messages` are chat messages (`{"role", "content"}`); a content string may hold `<image>`
    placeholders, or content may be a list of `{"type": "text", "text": ...}` / `{"type": "image"}` parts
    (an image part may carry the image itself under `"image"`). `images` (paths, bytes or PIL images)
    fill the placeholders in order. `messages` may also be a `vlmtune.conversation.Conversation` (the
    server builds one from OpenAI messages, with its images already opened). `adapter` names a loaded adapter, `__base__`/`none` for the base alone,
    or None for the engine's default adapter.
    """

    messages: list[dict[str, Any]] | str
    images: list[Any] = field(default_factory=list)
    adapter: str | None = None


@dataclass
class Prepared:
    """A request checked and rendered, the unit `Engine.encode` batches: the adapter it runs under (a
    loaded name or BASE), the key of the processor that renders and encodes it, the prompt text, its
    images (decoded PIL images, or still their sources when prepared with `policy=None`), and the
    adapter's content hash (what caches of derived results are keyed by)."""

    adapter: str
    processor: str
    text: str
    images: list[Any]
    sha256: str | None = None  # the adapter's content hash when prepared (None: the base)


@dataclass
class Generation:
    """The result for one request."""

    text: str
    adapter: str
    prompt_tokens: int
    generated_tokens: int
    finish_reason: str  # 'stop' (end-of-turn token) | 'length' (max_new_tokens reached)


@dataclass
class AdapterInfo:
    """What the engine knows about a loaded adapter."""

    name: str
    path: Path
    format: str  # 'peft' | 'llava'
    layouts: list[str]  # key layouts found in the file: 'runtime', 'original', 'llava_original'
    lora_modules: int
    full_modules: list[str]
    use_dora: bool
    mixable: bool  # may share a forward with other adapters (PEFT `adapter_names=`)
    not_mixable_because: str | None
    processor: str  # 'base' or the adapter folder whose processor/chat template is used
    sha256: str  # content hash of the files the adapter was loaded from (weights, configs, processor)
    warnings: list[str] = field(default_factory=list)
