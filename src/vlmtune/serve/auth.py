"""Bearer-key checks shared by vlmtune's servers (serve, ui): constant-time comparison, open paths.

`BearerAuth` is a plain ASGI middleware (not a FastAPI dependency) so no route can be added without it;
`token_matches` is the comparison the dashboard also uses for its login cookie.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

Scope = dict[str, Any]
ASGIApp = Callable[[Scope, Callable[..., Awaitable[Any]], Callable[..., Awaitable[Any]]], Awaitable[None]]


def token_matches(given: str | None, key: str) -> bool:
    """Whether `given` equals `key`, in time that does not depend on where they differ."""
    if not given:
        return False
    return hmac.compare_digest(given.encode(), key.encode())


def bearer_token(headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    """The token of an `Authorization: Bearer TOKEN` header (ASGI raw headers), or None."""
    for name, value in headers:
        if name.lower() == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            if scheme.lower() == "bearer":
                return token.strip()
    return None


class BearerAuth:
    """Reject every HTTP request without the key, except paths in `open_paths`; `reject(send)` writes the
    401 response (each server words it in its own error shape)."""

    def __init__(
        self,
        app: ASGIApp,
        key: str,
        reject: Callable[[Callable[..., Awaitable[Any]]], Awaitable[None]],
        open_paths: Iterable[str] = ("/health",),
    ) -> None:
        self.app = app
        self.key = key
        self.reject = reject
        self.open_paths = frozenset(open_paths)

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] in self.open_paths:
            await self.app(scope, receive, send)
            return
        if not token_matches(bearer_token(scope.get("headers", [])), self.key):
            await self.reject(send)
            return
        await self.app(scope, receive, send)
