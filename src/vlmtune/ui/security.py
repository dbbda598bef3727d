"""Who may use the dashboard, and which files it may touch.

- Bind: loopback by default; any other host needs a token (refused at start-up otherwise): the one bind
  rule of vlmtune's servers (`serve.settings.check_bind`), as the bearer comparison is theirs
  (`serve.auth`) and so is the body cap (`serve.errors.BodyLimit`, which counts streamed bytes too).
- Auth: with a token, every `/api` route needs `Authorization: Bearer TOKEN` or the session cookie that
  `POST /api/login` sets (HttpOnly, SameSite=Strict); 401 otherwise. The page and its static files are
  public (they hold no data).
- CSRF: a state-changing request that a browser could send on its own (cookie or no auth) needs the
  `X-CSRF-Token` header equal to the `vlmtune_csrf` cookie (double submit: a page of another origin can
  neither read the cookie nor set the header without a CORS preflight, which is never granted) and, when
  the browser sends an Origin, one equal to the Host; 403 otherwise. Bearer requests are exempt (browsers
  never attach that header by themselves).
- Host header: on a loopback bind only loopback names are served (403 otherwise): a DNS-rebinding page
  cannot reach the dashboard under its own name.
- Files: only under the folders named on the command line (`resolve_under`); `..`, absolute paths and
  symlinks that lead out are 403.
- Bodies: capped (413).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from ..serve.auth import bearer_token, token_matches
from ..serve.settings import check_bind as serve_check_bind
from ..serve.settings import is_loopback

SESSION_COOKIE = "vlmtune_session"
CSRF_COOKIE = "vlmtune_csrf"
CSRF_HEADER = "x-csrf-token"
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
PUBLIC_API = ("/api/session", "/api/login")


TOKEN_FLAG = "--token (or VLMTUNE_UI_TOKEN)"


def check_bind(host: str, token: str | None) -> None:
    """Refuse to listen beyond this machine without a token (the dashboard has no --insecure)."""
    serve_check_bind(host, token, False, key_flag=TOKEN_FLAG)


def session_value(token: str) -> str:
    """The login cookie: derived from the token (never the token itself), so it survives a restart."""
    return hmac.new(token.encode(), b"vlmtune-ui-session", hashlib.sha256).hexdigest()


def equal(given: str | None, expected: str | None) -> bool:
    return expected is not None and token_matches(given, expected)


def host_name(host_header: str) -> str:
    """'127.0.0.1:7860' -> '127.0.0.1'; '[::1]:7860' -> '::1'."""
    if host_header.startswith("["):
        return host_header[1 : host_header.find("]")] if "]" in host_header else host_header
    return host_header.rsplit(":", 1)[0] if host_header.count(":") == 1 else host_header


def resolve_under(roots: Sequence[Path], relative: str, root: Path | None = None) -> Path:
    """`relative` inside one of `roots` (or inside `root`), resolved; raises PermissionError otherwise."""
    pure = PurePosixPath(relative.replace("\\", "/"))
    if pure.is_absolute() or ".." in pure.parts or relative.startswith("~"):
        raise PermissionError(f"{relative!r}: only paths inside the dashboard's folders are served")
    bases = [root] if root is not None else list(roots)
    for base in bases:
        base = base.resolve()
        candidate = (base / pure).resolve()
        if candidate == base or candidate.is_relative_to(base):
            return candidate
    raise PermissionError(f"{relative!r} leads outside the dashboard's folders")


class Guard:
    """The checks above (but the body cap) as one HTTP middleware (`app.middleware("http")(Guard(...))`)."""

    def __init__(self, token: str | None, host: str, own: tuple[str, ...] = ("/api/", "/static/")) -> None:
        self.token = token
        self.loopback = is_loopback(host)
        # Path prefixes of the dashboard; other paths (a mounted `vlmtune serve`) check the token themselves.
        self.own = own

    def authenticated(self, request: Any) -> str | None:
        """'bearer' | 'cookie' | 'open' (no token configured) | None."""
        if not self.token:
            return "open"
        if equal(bearer_token(request.scope.get("headers", [])), self.token):
            return "bearer"
        if equal(request.cookies.get(SESSION_COOKIE), session_value(self.token)):
            return "cookie"
        return None

    async def __call__(self, request: Any, call_next: Callable[[Any], Awaitable[Any]]) -> Any:
        from fastapi.responses import JSONResponse

        def deny(status: int, message: str) -> Any:
            return JSONResponse({"error": message}, status_code=status)

        if self.loopback and not is_loopback(host_name(request.headers.get("host", ""))):
            return deny(403, "this dashboard answers on loopback names only (localhost, 127.0.0.1)")
        path = request.url.path
        if path != "/" and not path.startswith(self.own):  # serve's routes: its own bearer auth, same token
            return await call_next(request)
        how = self.authenticated(request)
        if path.startswith("/api/") and path not in PUBLIC_API and how is None:
            return deny(401, "log in first: send Authorization: Bearer TOKEN or POST /api/login")
        if request.method not in SAFE_METHODS and how != "bearer":
            origin = request.headers.get("origin")
            if origin and origin.split("://", 1)[-1] != request.headers.get("host"):
                return deny(403, f"cross-origin request from {origin} refused")
            cookie = request.cookies.get(CSRF_COOKIE)
            if not equal(request.headers.get(CSRF_HEADER), cookie):
                return deny(
                    403, "missing or wrong X-CSRF-Token header (it must equal the vlmtune_csrf cookie)"
                )
        response = await call_next(request)
        if CSRF_COOKIE not in request.cookies:
            response.set_cookie(CSRF_COOKIE, secrets.token_urlsafe(24), samesite="strict", path="/")
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("X-Frame-Options", "DENY")
        response.headers.setdefault("Referrer-Policy", "no-referrer")
        response.headers.setdefault(
            "Content-Security-Policy",
            "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; frame-ancestors 'none'",
        )
        return response
