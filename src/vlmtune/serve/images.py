"""Images of an OpenAI request, fetched and checked under the server's rules before any model work.

`data:` URLs (png, jpeg, webp, gif) always; local paths and `file://` only inside `--image-dir` (after
resolving links); `http(s)` only with `--allow-remote-images`, then only to public addresses (the address
checked is the one connected to, so a name that re-resolves to a private one does not get through), with
no redirects, a byte cap and a timeout. Every image is size-checked before it is decoded (no pixel bombs),
then decoded by `vlmtune.conversation.open_image` under the allowed formats; paths are resolved by its
`resolve_path` with `--image-dir` as the root.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import http.client
import io
import ipaddress
import socket
import ssl
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..conversation import ImageError, ImagePolicy, open_image
from ..conversation.images import resolve_path
from .errors import ApiError
from .settings import ServeSettings

MIME = {
    "image/png": "png",
    "image/jpeg": "jpeg",
    "image/jpg": "jpeg",
    "image/webp": "webp",
    "image/gif": "gif",
}


@dataclass
class LoadedImage:
    image: Any  # RGB PIL image
    digest: str  # sha256 of the encoded bytes (cache key)
    nbytes: int


def load_image(url: str, settings: ServeSettings, param: str) -> LoadedImage:
    """The decoded image an `image_url.url` names, or an ApiError (400 refused source, 413 too large)."""
    if url.startswith("data:"):
        data = from_data_url(url, settings, param)
    elif url.startswith(("http://", "https://")):
        if not settings.allow_remote_images:
            raise ApiError(
                400,
                "remote image URLs are not fetched by this server (start it with --allow-remote-images); "
                "send the image inline as a data: URL.",
                param=param,
            )
        data = fetch(url, settings, param)
    else:
        data = from_local(url, settings, param)
    return decode(data, settings, param)


def from_data_url(url: str, settings: ServeSettings, param: str) -> bytes:
    header, sep, payload = url.partition(",")
    mime = header[5:].split(";")[0].lower()
    if not sep or ";base64" not in header:
        raise ApiError(400, "an image data: URL must be base64 (data:image/png;base64,...).", param=param)
    if MIME.get(mime) not in settings.allowed_image_types:
        allowed = ", ".join(settings.allowed_image_types)
        raise ApiError(400, f"image type {mime or '?'} is not accepted; send {allowed}.", param=param)
    if len(payload) * 3 // 4 > settings.max_image_bytes:
        raise too_large(settings, param)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "the image data: URL is not valid base64.", param=param) from None


def from_local(url: str, settings: ServeSettings, param: str) -> bytes:
    if settings.image_dir is None:
        raise ApiError(
            400,
            "local image paths are refused by this server (start it with --image-dir DIR to allow paths "
            "inside DIR); send the image inline as a data: URL.",
            param=param,
        )
    raw = urllib.parse.unquote(urllib.parse.urlparse(url).path) if url.startswith("file://") else url
    if "://" in raw:
        raise ApiError(400, f"image URL scheme of {url[:40]!r} is not supported.", param=param)
    try:
        path = resolve_path(Path(raw), ImagePolicy(root=settings.image_dir))
    except ImageError as exc:
        message = "the image path is outside --image-dir; paths must stay inside it."
        raise ApiError(400, message if exc.code == "image_refused" else str(exc), param=param) from None
    if path.stat().st_size > settings.max_image_bytes:
        raise too_large(settings, param)
    return path.read_bytes()


def public_address(host: str, port: int, param: str) -> str:
    """One resolved address of `host` that is public, or an ApiError when any address is not."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError:
        raise ApiError(400, f"the image host {host} cannot be resolved.", param=param) from None
    addresses = [info[4][0] for info in infos]
    for address in addresses:
        ip = ipaddress.ip_address(address.split("%")[0])
        if not ip.is_global or ip.is_multicast:
            raise ApiError(
                400,
                f"the image host {host} resolves to a non-public address; it is not fetched.",
                param=param,
            )
    return addresses[0]


def fetch(url: str, settings: ServeSettings, param: str) -> bytes:
    parsed = urllib.parse.urlparse(url)
    host = parsed.hostname or ""
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    address = public_address(host, port, param)
    timeout = settings.remote_timeout_s
    if parsed.scheme == "https":
        conn: http.client.HTTPConnection = PinnedHTTPS(host, address, port, timeout)
    else:
        conn = http.client.HTTPConnection(address, port, timeout=timeout)
    target = parsed.path or "/"
    if parsed.query:
        target += "?" + parsed.query
    try:
        conn.request("GET", target, headers={"Host": parsed.netloc, "User-Agent": "vlmtune-serve"})
        response = conn.getresponse()
        if response.status != 200:
            raise ApiError(
                400, f"fetching the image gave HTTP {response.status} (redirects are not followed)."
            )
        data = response.read(settings.max_image_bytes + 1)
    except (OSError, http.client.HTTPException) as exc:
        raise ApiError(400, f"the image could not be fetched ({type(exc).__name__}).", param=param) from None
    finally:
        conn.close()
    if len(data) > settings.max_image_bytes:
        raise too_large(settings, param)
    return data


class PinnedHTTPS(http.client.HTTPSConnection):
    """HTTPS to an address checked beforehand, with the certificate checked against the host name."""

    def __init__(self, host: str, address: str, port: int, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self.address = address

    def connect(self) -> None:
        sock = socket.create_connection((self.address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)  # type: ignore[attr-defined]


def decode(data: bytes, settings: ServeSettings, param: str) -> LoadedImage:
    """Check the size from the header, then decode fully with the conversation module's opener."""
    from PIL import Image

    if len(data) > settings.max_image_bytes:
        raise too_large(settings, param)
    formats = [f.upper() for f in settings.allowed_image_types]
    try:
        with Image.open(io.BytesIO(data), formats=formats) as img:
            width, height = img.size
    except Exception:  # PIL raises many types for a bad file; all mean the same to the client
        allowed = ", ".join(settings.allowed_image_types)
        raise ApiError(400, f"the image cannot be decoded as {allowed}.", param=param) from None
    if width * height > settings.max_image_pixels:
        raise ApiError(
            413,
            f"the image is {width}x{height} pixels, over the server's limit of {settings.max_image_pixels} "
            "(--max-image-pixels).",
            param=param,
            code="image_too_large",
        )
    try:
        rgb = open_image(data, ImagePolicy(formats=tuple(formats), paths=False))
    except ImageError as exc:
        raise ApiError(400, str(exc), param=param) from None
    return LoadedImage(rgb, hashlib.sha256(data).hexdigest(), len(data))


def too_large(settings: ServeSettings, param: str) -> ApiError:
    return ApiError(
        413,
        f"the image is over the server's limit of {settings.max_image_bytes} bytes (--max-image-bytes).",
        param=param,
        code="image_too_large",
    )
