"""Tiny HTTP GET/POST for CRLs and OCSP: bounded time, bounded size, http(s) only.

No proxies from the environment (the configuration is the only source of settings), at most
a few redirects and only to http/https. Every failure is a FetchError naming the URL.

urllib.request (with http.client, email and ssl behind it) costs tens of milliseconds to
import, so it is imported on the first request, not by a login that never fetches.
"""

from __future__ import annotations

import time
import urllib.parse
from typing import Any, Protocol

from ..errors import FetchError

CRL_MAX_BYTES = 64 * 1024 * 1024  # a 1M-entry CRL is about 40 MB
OCSP_MAX_BYTES = 64 * 1024
_SCHEMES = ("http", "https")
_CHUNK = 64 * 1024


class Fetcher(Protocol):
    """What the revocation code needs from the network (tests may pass a stub)."""

    def get(self, url: str, *, max_bytes: int, timeout: float) -> bytes: ...

    def post(
        self, url: str, body: bytes, *, content_type: str, max_bytes: int, timeout: float
    ) -> bytes: ...


def check_url(url: str) -> None:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in _SCHEMES or not parts.hostname:
        raise FetchError(f"{url}: only http:// and https:// URLs with a host are fetched")


def _build_opener() -> Any:
    import urllib.request

    class Redirects(urllib.request.HTTPRedirectHandler):
        max_redirections = 3

        def redirect_request(self, req, fp, code, msg, headers, newurl):
            if urllib.parse.urlsplit(newurl).scheme not in _SCHEMES:
                raise FetchError(f"{req.full_url}: redirect to a non-http(s) URL refused")
            return super().redirect_request(req, fp, code, msg, headers, newurl)

    return urllib.request.build_opener(urllib.request.ProxyHandler({}), Redirects())


class HttpFetcher:
    """urllib with a total deadline per request and a response size cap."""

    def __init__(self, user_agent: str = "pam_svmm") -> None:
        self._opener: Any = None
        self._user_agent = user_agent

    def get(self, url: str, *, max_bytes: int = CRL_MAX_BYTES, timeout: float = 3.0) -> bytes:
        return self._request(url, None, "", max_bytes, timeout)

    def post(
        self,
        url: str,
        body: bytes,
        *,
        content_type: str = "application/ocsp-request",
        max_bytes: int = OCSP_MAX_BYTES,
        timeout: float = 3.0,
    ) -> bytes:
        return self._request(url, body, content_type, max_bytes, timeout)

    def _request(
        self, url: str, body: bytes | None, content_type: str, max_bytes: int, timeout: float
    ) -> bytes:
        import http.client
        import urllib.error
        import urllib.request

        if self._opener is None:
            self._opener = _build_opener()
        check_url(url)
        if timeout <= 0:
            raise FetchError(f"{url}: no time left for the request")
        headers = {"User-Agent": self._user_agent}
        if body is not None:
            headers["Content-Type"] = content_type
        req = urllib.request.Request(url, data=body, headers=headers)  # noqa: S310 (checked)
        deadline = time.monotonic() + timeout
        try:
            with self._opener.open(req, timeout=timeout) as resp:
                length = resp.headers.get("Content-Length")
                if length and length.isdigit() and int(length) > max_bytes:
                    raise FetchError(f"{url}: response of {length} bytes exceeds {max_bytes}")
                return self._read(url, resp, max_bytes, deadline, timeout)
        except FetchError:
            raise
        except urllib.error.HTTPError as e:
            raise FetchError(f"{url}: HTTP {e.code} {e.reason}") from None
        except urllib.error.URLError as e:
            if isinstance(e.reason, TimeoutError):
                raise FetchError(f"{url}: timed out after {timeout:g}s") from None
            raise FetchError(f"{url}: {e.reason}") from None
        except TimeoutError:
            raise FetchError(f"{url}: timed out after {timeout:g}s") from None
        except (OSError, http.client.HTTPException, ValueError) as e:
            raise FetchError(f"{url}: {type(e).__name__}: {e}") from None

    @staticmethod
    def _read(url: str, resp: Any, max_bytes: int, deadline: float, timeout: float) -> bytes:
        # The socket timeout bounds each read; the deadline bounds a server that trickles.
        chunks: list[bytes] = []
        size = 0
        while True:
            chunk = resp.read(min(_CHUNK, max_bytes + 1 - size))
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
            size += len(chunk)
            if size > max_bytes:
                raise FetchError(f"{url}: response exceeds {max_bytes} bytes")
            if time.monotonic() > deadline:
                raise FetchError(f"{url}: timed out after {timeout:g}s")
