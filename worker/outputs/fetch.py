"""Download one provider output safely: bounded in size and time, checked to be an image.

`download` streams the body into a spooled temporary file (memory up to a few MB, then
disk), hashing it on the way, and raises `CopyError` with a reason code when it cannot:

    permanent (recorded at once, never retried)
        expired     403, 404 or 410: the provider deleted it (after ~7 days) or never had it
        http_error  any other 4xx but 408 and 429
        not_image   the body's first bytes are no JPEG, PNG, WebP, GIF or AVIF/HEIF,
                    whatever the Content-Type header says
        too_large   Content-Length or the bytes read pass the configured limit
        bad_url     not an http(s) URL
    transient (retried with back-off; after the last attempt recorded with that reason)
        timeout          no byte for the read timeout, or the whole download took longer
                         than its overall limit (a server trickling bytes)
        download_failed  connection errors, 408, 429, 5xx

The content type recorded is the one the magic bytes say, not the header's.
"""

from __future__ import annotations

import hashlib
import tempfile
import time
from dataclasses import dataclass
from typing import IO, Final
from urllib.parse import urlsplit

import httpx

from worker.errors import KqError

# Bytes kept in memory before the spooled file moves to disk.
SPOOL_BYTES: Final = 8 * 1024 * 1024
# Enough of the head of a body to recognise every format below.
MAGIC_BYTES: Final = 32


class CopyError(KqError):
    """A copy that did not happen; `reason` is its code, `permanent` says whether retrying
    could help (see the module docstring)."""

    def __init__(self, reason: str, message: str, *, permanent: bool) -> None:
        super().__init__(message)
        self.reason = reason
        self.permanent = permanent


@dataclass
class Downloaded:
    """A downloaded output: its bytes in `body` (rewound), and what was learnt of them."""

    body: IO[bytes]
    size: int
    sha256: str
    content_type: str


def sniff(head: bytes) -> str | None:
    """The image content type the first bytes show, or None when they are no image."""
    if head.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand in (b"avif", b"avis"):
            return "image/avif"
        if brand in (b"heic", b"heix", b"mif1", b"msf1"):
            return "image/heif"
    return None


EXTENSIONS: Final = {
    "image/jpeg": "jpeg",
    "image/png": "png",
    "image/webp": "webp",
    "image/gif": "gif",
    "image/avif": "avif",
    "image/heif": "heif",
}


def download(client: httpx.Client, url: str, *, max_bytes: int, timeout_s: float) -> Downloaded:
    """GET `url` into a temporary file; CopyError when it is no usable image.

    `timeout_s` bounds each wait for bytes and, times 3, the whole download.
    """
    if urlsplit(url).scheme not in ("http", "https"):
        raise CopyError("bad_url", f"not an http(s) URL: {url[:200]!r}", permanent=True)
    deadline = time.monotonic() + 3 * timeout_s
    body: IO[bytes] = tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES)  # noqa: SIM115
    try:
        return _download(client, url, body, max_bytes, timeout_s, deadline)
    except BaseException:
        body.close()
        raise


def _download(
    client: httpx.Client,
    url: str,
    body: IO[bytes],
    max_bytes: int,
    timeout_s: float,
    deadline: float,
) -> Downloaded:
    digest = hashlib.sha256()
    size = 0
    head = b""
    try:
        with client.stream("GET", url, timeout=timeout_s, follow_redirects=True) as response:
            _check_status(response.status_code)
            declared = response.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > max_bytes:
                raise CopyError(
                    "too_large",
                    f"{declared} bytes declared, the limit is {max_bytes}",
                    permanent=True,
                )
            for chunk in response.iter_bytes():
                size += len(chunk)
                if size > max_bytes:
                    raise CopyError("too_large", f"more than {max_bytes} bytes", permanent=True)
                if len(head) < MAGIC_BYTES:
                    head += chunk[: MAGIC_BYTES - len(head)]
                digest.update(chunk)
                body.write(chunk)
                if time.monotonic() > deadline:
                    raise CopyError(
                        "timeout",
                        f"download still running after {3 * timeout_s:g} s",
                        permanent=False,
                    )
    except httpx.TimeoutException as exc:
        raise CopyError(
            "timeout", f"no answer within {timeout_s:g} s ({type(exc).__name__})", permanent=False
        ) from exc
    except httpx.HTTPError as exc:
        raise CopyError("download_failed", f"{type(exc).__name__}: {exc}", permanent=False) from exc
    content_type = sniff(head)
    if content_type is None:
        raise CopyError(
            "not_image",
            f"the body ({size} bytes, starting {head[:8].hex() or 'empty'}) is not an image",
            permanent=True,
        )
    body.seek(0)
    return Downloaded(body=body, size=size, sha256=digest.hexdigest(), content_type=content_type)


def _check_status(status: int) -> None:
    if status < 300:
        return
    if status in (403, 404, 410):
        raise CopyError("expired", f"HTTP {status}: the provider no longer has it", permanent=True)
    if 400 <= status < 500 and status not in (408, 429):
        raise CopyError("http_error", f"HTTP {status}", permanent=True)
    raise CopyError("download_failed", f"HTTP {status}", permanent=False)
