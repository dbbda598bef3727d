"""What a server allows: bind address, key, folders it may read, and the per-request limits.

The defaults are the safe ones: loopback, no remote images, no folders, bounded bodies, images, prompts,
answers and queue. `check()` refuses a non-loopback bind without a key unless `insecure` is set.
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import VlmtuneError

API_KEY_ENV = "VLMTUNE_API_KEY"


@dataclass
class ServeSettings:
    """Settings of one server (`vlmtune serve` options; `create_app(engine, ServeSettings(...))`)."""

    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None  # bearer key for every route but /health; None: no auth (loopback only)
    insecure: bool = False  # allow a non-loopback bind without a key
    adapter_dir: Path | None = None  # POST /v1/adapters paths must resolve under it (None: runtime loads off)
    image_dir: Path | None = None  # local image paths / file:// URLs must resolve under it (None: refused)
    allow_remote_images: bool = False  # fetch http(s) image URLs (public addresses only)
    remote_timeout_s: float = 10.0
    max_batch_size: int = 16  # rows decoding together
    max_queue: int = 64  # requests waiting for a slot before 429
    max_body_bytes: int = 20 * 2**20
    max_image_bytes: int = 10 * 2**20
    max_image_pixels: int = 4096 * 4096
    max_images: int = 8  # images per request
    max_prompt_tokens: int = 8192
    max_tokens: int = 2048  # cap on max_tokens / max_completion_tokens
    default_max_tokens: int = 256
    max_n: int = 8  # choices per request
    encoded_cache: int = 256  # processed requests kept (keyed by adapter content hash, prompt, images)
    allowed_image_types: tuple[str, ...] = field(default=("png", "jpeg", "webp", "gif"))

    def __post_init__(self) -> None:
        if self.api_key is None:
            self.api_key = os.environ.get(API_KEY_ENV) or None
        for name in ("adapter_dir", "image_dir"):
            value = getattr(self, name)
            if value is not None:
                folder = Path(value).expanduser().resolve()
                if not folder.is_dir():
                    raise VlmtuneError(f"--{name.replace('_', '-')} {value} is not a folder.")
                setattr(self, name, folder)
        for name in ("max_batch_size", "max_queue", "max_tokens", "max_prompt_tokens", "max_n"):
            if getattr(self, name) < 1:
                raise VlmtuneError(
                    f"--{name.replace('_', '-')} must be at least 1 (got {getattr(self, name)})."
                )
        self.default_max_tokens = min(self.default_max_tokens, self.max_tokens)

    def check_bind(self) -> None:
        """Refuse to listen beyond this machine without a key (unless `insecure`)."""
        check_bind(self.host, self.api_key, self.insecure, key_flag=f"--api-key (or {API_KEY_ENV})")


def is_loopback(host: str) -> bool:
    """Whether a bind address only accepts connections from this machine."""
    if host in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name that may resolve anywhere


def check_bind(host: str, key: str | None, insecure: bool, *, key_flag: str = "--api-key") -> None:
    """The one bind rule of vlmtune's servers (serve, ui): loopback, or a key, or an explicit `--insecure`."""
    if key or insecure or is_loopback(host):
        return
    raise VlmtuneError(
        f"refusing to listen on {host} without a key: anyone who can reach it could use the model. "
        f"Set {key_flag}, bind 127.0.0.1, or pass --insecure if the network is trusted."
    )
