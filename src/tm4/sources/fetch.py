"""Fetch a list from a file or an HTTP(S) URL: a timeout, a size limit, conditional GET.

The standard library's urllib is enough here: one GET, If-None-Match / If-Modified-Since,
and a body read in chunks that stops at the limit (a hostile server cannot fill memory).
"""

from __future__ import annotations

import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from tm4.core.errors import Tm4Error, ValidationError

DEFAULT_TIMEOUT = 20.0
DEFAULT_MAX_BYTES = 16 * 1024 * 1024
USER_AGENT = "tm4-blocklist/1"


class FetchError(Tm4Error):
    """A list could not be fetched (unreachable, refused, too big, not text)."""


@dataclass(frozen=True)
class Fetched:
    """What one fetch brought: a new body, or `not_modified` (the copy we have is current)."""

    body: bytes | None
    etag: str | None = None
    last_modified: str | None = None

    @property
    def not_modified(self) -> bool:
        return self.body is None


def is_url(source: str) -> bool:
    return source.startswith(("http://", "https://"))


def check_source(source: str) -> str:
    """A blocklist source is an absolute file path or an http(s) URL; nothing else."""
    s = source.strip()
    if is_url(s):
        if any(c.isspace() for c in s) or len(s) > 2048:
            raise ValidationError(f"{source!r} is not a usable URL")
        return s
    if s.startswith("/") and "\0" not in s:
        return s
    raise ValidationError(f"{source!r}: give an absolute file path or an http:// or https:// URL")


def _read_limited(stream: BinaryIO, max_bytes: int, where: str) -> bytes:
    chunks: list[bytes] = []
    total = 0
    while True:
        chunk = stream.read(min(65536, max_bytes + 1 - total))
        if not chunk:
            return b"".join(chunks)
        total += len(chunk)
        if total > max_bytes:
            raise FetchError(f"{where} is over the limit of {max_bytes} bytes; refused")
        chunks.append(chunk)


def fetch(source: str, *, etag: str | None = None, last_modified: str | None = None,
          timeout: float = DEFAULT_TIMEOUT, max_bytes: int = DEFAULT_MAX_BYTES) -> Fetched:
    """The list's bytes, or not-modified when the server says our copy (etag /
    last_modified) is current. Raises FetchError; never returns a partial body."""
    source = check_source(source)
    if not is_url(source):
        try:
            with open(Path(source), "rb") as f:
                return Fetched(_read_limited(f, max_bytes, source))
        except OSError as exc:
            raise FetchError(f"cannot read {source}: {exc.strerror or exc}") from None
    headers = {"User-Agent": USER_AGENT, "Accept": "text/plain, */*"}
    if etag:
        headers["If-None-Match"] = etag
    if last_modified:
        headers["If-Modified-Since"] = last_modified
    req = urllib.request.Request(source, headers=headers, method="GET")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310 (http(s) checked above)
            length = resp.headers.get("Content-Length")
            if length and length.isdigit() and int(length) > max_bytes:
                raise FetchError(f"{source} announces {length} bytes, over the limit of {max_bytes}; refused")
            body = _read_limited(resp, max_bytes, source)  # type: ignore[arg-type]
            return Fetched(body, resp.headers.get("ETag"), resp.headers.get("Last-Modified"))
    except urllib.error.HTTPError as exc:
        if exc.code == 304:
            return Fetched(None, exc.headers.get("ETag") or etag,
                           exc.headers.get("Last-Modified") or last_modified)
        raise FetchError(f"{source} answered HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        raise FetchError(f"cannot fetch {source}: {exc.reason}") from None
    except (TimeoutError, OSError) as exc:
        raise FetchError(f"cannot fetch {source}: {exc}") from None
