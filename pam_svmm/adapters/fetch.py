"""Tiny HTTP GET/POST for CRLs and OCSP: bounded time, bounded size, http(s) only.

No proxies from the environment (the configuration is the only source of settings), at most
a few redirects and only to http/https. Every failure is a FetchError naming the URL.

``timeout`` is the request's total time (the caller passes what is left of the login's
budget), not a per-read timeout: a server that sends one byte per second keeps every
single read under any socket timeout. So each connection's socket is shut down when the
total is spent (a timer: that ends a read blocked in the TLS layer too), reads return what
has arrived (``read1``), and the deadline is checked between them.

urllib.request (with http.client, email and ssl behind it) costs tens of milliseconds to
import, so it is imported on the first request, not by a login that never fetches.
"""

from __future__ import annotations

import contextlib
import socket
import threading
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


class _Guard:
    """The sockets of one request, shut down when its deadline passes."""

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.expired = False
        self._socks: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(max(0.0, deadline - time.monotonic()), self.expire)
        self._timer.daemon = True

    def __enter__(self) -> _Guard:
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()
        with self._lock:
            self._socks.clear()

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def add(self, sock: socket.socket) -> None:
        with self._lock:
            self._socks.append(sock)
            expired = self.expired
        if expired:
            self._shut(sock)

    def expire(self) -> None:
        with self._lock:
            self.expired = True
            socks = list(self._socks)
        for s in socks:
            self._shut(s)

    @staticmethod
    def _shut(sock: socket.socket) -> None:
        # shutdown, not close: the reader blocked in recv wakes with EOF; the fd stays the
        # request's own until http.client closes it (no fd reuse race).
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


def _build_opener(guard: _Guard) -> Any:
    import http.client
    import urllib.request

    class Http(http.client.HTTPConnection):
        def connect(self) -> None:
            self.timeout = max(0.001, min(self.timeout or guard.left(), guard.left()))
            super().connect()
            guard.add(self.sock)

    class Https(http.client.HTTPSConnection):
        def connect(self) -> None:
            self.timeout = max(0.001, min(self.timeout or guard.left(), guard.left()))
            super().connect()  # the TLS handshake included
            guard.add(self.sock)

    class HttpHandler(urllib.request.HTTPHandler):
        def http_open(self, req: Any) -> Any:
            return self.do_open(Http, req)

    class HttpsHandler(urllib.request.HTTPSHandler):
        def https_open(self, req: Any) -> Any:
            return self.do_open(Https, req)

    class Redirects(urllib.request.HTTPRedirectHandler):
        max_redirections = 3

        def redirect_request(self, req, fp, code, msg, headers, newurl):
            if urllib.parse.urlsplit(newurl).scheme not in _SCHEMES:
                raise FetchError(f"{req.full_url}: redirect to a non-http(s) URL refused")
            if guard.left() <= 0:
                raise FetchError(f"{req.full_url}: no time left to follow a redirect")
            return super().redirect_request(req, fp, code, msg, headers, newurl)

    return urllib.request.build_opener(
        urllib.request.ProxyHandler({}), HttpHandler(), HttpsHandler(), Redirects()
    )


class HttpFetcher:
    """urllib with a total deadline per request and a response size cap."""

    def __init__(self, user_agent: str = "pam_svmm") -> None:
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

        check_url(url)
        if not timeout > 0:  # nan too
            raise FetchError(f"{url}: no time left for the request")
        headers = {"User-Agent": self._user_agent}
        if body is not None:
            headers["Content-Type"] = content_type
        req = urllib.request.Request(url, data=body, headers=headers)  # noqa: S310 (checked)
        try:
            with _Guard(time.monotonic() + timeout) as guard:
                try:
                    with _build_opener(guard).open(req, timeout=timeout) as resp:
                        length = resp.headers.get("Content-Length")
                        if length and length.isdigit() and int(length) > max_bytes:
                            raise FetchError(
                                f"{url}: response of {length[:20]} bytes exceeds {max_bytes}"
                            )
                        return self._read(url, resp, max_bytes, guard, timeout)
                except Exception:
                    if guard.expired or guard.left() <= 0:
                        # whatever the shut socket made http.client say
                        raise FetchError(f"{url}: timed out after {timeout:g}s") from None
                    raise
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
    def _read(url: str, resp: Any, max_bytes: int, guard: _Guard, timeout: float) -> bytes:
        # read1: what has arrived (read(n) waits for all n bytes, one trickled byte at a
        # time); the guard ends a read still blocked at the deadline.
        chunks: list[bytes] = []
        size = 0
        while True:
            if guard.left() <= 0:
                raise FetchError(f"{url}: timed out after {timeout:g}s")
            chunk = resp.read1(min(_CHUNK, max_bytes + 1 - size))
            if not chunk:
                if guard.expired:
                    raise FetchError(f"{url}: timed out after {timeout:g}s")
                return b"".join(chunks)
            chunks.append(chunk)
            size += len(chunk)
            if size > max_bytes:
                raise FetchError(f"{url}: response exceeds {max_bytes} bytes")
