"""The lab's revocation services: `openssl ocsp` as the OCSP responder, a tiny CRL server.

Both are context managers with a ``url``; ``stop()`` puts one "down" (connections are
refused) and ``start()`` brings it back. The CRL server has a ``delay`` (seconds to sleep
before answering) for timeout tests. For tests and the demo only, never the login path.
"""

from __future__ import annotations

import contextlib
import http.server
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Self

LOOPBACK = "127.0.0.1"


def free_port() -> int:
    """A TCP port free on all interfaces right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return int(s.getsockname()[1])


def wait_listening(
    port: int,
    *,
    timeout: float = 10.0,
    alive: Callable[[], bool] | None = None,
    probe: Callable[[], object] | None = None,
) -> None:
    """Return once 127.0.0.1:``port`` answers (``alive()`` False: give up).

    ``probe`` replaces the bare connect: it must raise OSError while the service is not up.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            if probe is not None:
                probe()
            else:
                with socket.create_connection((LOOPBACK, port), timeout=0.5):
                    pass
            return
        except OSError:
            pass
        if alive is not None and not alive():
            raise RuntimeError(f"the service for port {port} exited before listening")
        if time.monotonic() > deadline:
            raise RuntimeError(f"nothing listens on {LOOPBACK}:{port} after {timeout:g}s")
        time.sleep(0.05)


class _Service:
    def start(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


CLONE_NEWNET = 0x40000000


def _enter_netns(path: str) -> None:
    """Move the calling thread (only it) into the network namespace at ``path``."""
    import ctypes
    import os

    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns {path}: {os.strerror(err)}")
    finally:
        os.close(fd)


class _LoopbackForwarder:
    """127.0.0.1:``port`` here, relayed to 127.0.0.1:``port`` in another network namespace.

    OpenSSL 3.0's responder has no bind address: it listens on every interface. So it runs
    in a network namespace of its own, which has only a loopback, and this relays the host's
    loopback to it (each connection's thread enters that namespace to connect). The backend
    connection is opened only once the client sent bytes: the responder spins forever on a
    connection closed before a request (see OcspResponder)."""

    def __init__(self, port: int, netns: str) -> None:
        import os

        self.port = port
        self.netns = netns
        self._own_netns = os.stat("/proc/self/ns/net").st_ino
        self._listener: socket.socket | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind((LOOPBACK, self.port))
        ls.listen(64)
        self._listener = ls
        self._thread = threading.Thread(target=self._accept, args=(ls,), daemon=True)
        self._thread.start()

    def stop(self) -> None:
        ls, self._listener = self._listener, None
        if ls is not None:
            with contextlib.suppress(OSError):
                ls.shutdown(socket.SHUT_RDWR)
            ls.close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _accept(self, ls: socket.socket) -> None:
        while True:
            try:
                client, _ = ls.accept()
            except OSError:
                return  # stopped
            threading.Thread(target=self._relay, args=(client,), daemon=True).start()

    def _relay(self, client: socket.socket) -> None:
        import select

        with client:
            client.settimeout(10)
            try:
                first = client.recv(65536)
            except OSError:
                return
            if not first:
                return
            import os

            with contextlib.suppress(OSError):
                if os.stat(self.netns).st_ino == self._own_netns:
                    return  # the responder is not in its namespace yet: never relay to us
            _enter_netns(self.netns)
            try:
                backend = socket.create_connection((LOOPBACK, self.port), timeout=10)
            except OSError:
                return
            with backend:
                backend.sendall(first)
                peers = {client: backend, backend: client}
                while peers:
                    ready, _, _ = select.select(list(peers), [], [], 30)
                    if not ready:
                        return
                    for s in ready:
                        data = s.recv(65536)
                        if not data:
                            with contextlib.suppress(OSError):
                                peers[s].shutdown(socket.SHUT_WR)
                            peers.pop(s)
                            continue
                        peers[s].sendall(data)


class OcspResponder(_Service):
    """``openssl ocsp`` answering for the LabCA intermediate from its ``index.txt``, reached
    on 127.0.0.1 only: it runs in a network namespace of its own (``_LoopbackForwarder``).

    openssl (3.0) re-reads index.txt when it changed, but checks only after serving a request,
    before waiting for the next: the first request after a change is still answered from the
    old index. Call ``reload()`` after publishing (the integration tests check both).

    Beware: OpenSSL 3.0's responder spins forever (one core, no more answers) after a client
    connects and closes without sending a request, so readiness is probed with a real OCSP
    request, never a bare connect.
    """

    def __init__(self, ca_folder: Path, port: int | None = None, *, next_update_minutes: int = 60):
        self.folder = Path(ca_folder)
        self.port = port or free_port()
        self.next_update_minutes = next_update_minutes
        self._proc: subprocess.Popen[bytes] | None = None
        self._forwarder: _LoopbackForwarder | None = None
        self._log = self.folder / f"ocsp-{self.port}.log"

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}/"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def argv(self) -> list[str]:
        f = self.folder
        return [
            "openssl",
            "ocsp",
            "-index",
            str(f / "index.txt"),
            "-port",
            str(self.port),
            "-rsigner",
            str(f / "ocsp.pem"),
            "-rkey",
            str(f / "ocsp.key"),
            "-CA",
            str(f / "intermediate.pem"),
            "-nmin",
            str(self.next_update_minutes),
            "-ignore_err",  # a malformed request must not end the responder
        ]

    def start(self) -> None:
        if self.running:
            return
        import shutil

        ip = shutil.which("ip", path="/usr/sbin:/usr/bin:/sbin:/bin") or "ip"
        # A network namespace with only "lo", up; "$@" is the responder (no shell splicing).
        netns = ["unshare", "--net", "--", "/bin/sh", "-c",
                 'set -e; "$0" link set lo up; exec "$@"', ip]  # fmt: skip
        with open(self._log, "ab") as log:
            self._proc = subprocess.Popen(
                [*netns, *self.argv()],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        self._forwarder = _LoopbackForwarder(self.port, f"/proc/{self._proc.pid}/ns/net")
        self._forwarder.start()
        try:
            wait_listening(self.port, alive=lambda: self.running, probe=self._probe)
        except RuntimeError as e:
            self.stop()
            tail = self._log.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"openssl ocsp did not start: {e}\n{tail}") from None

    def reload(self) -> None:
        """Make the responder pick up a changed index.txt before the next request."""
        self._probe()

    def _probe(self) -> None:
        """One real request (about the responder's own certificate)."""
        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.x509 import ocsp

        load = x509.load_pem_x509_certificate
        req = (
            ocsp.OCSPRequestBuilder()
            .add_certificate(
                load((self.folder / "ocsp.pem").read_bytes()),
                load((self.folder / "intermediate.pem").read_bytes()),
                hashes.SHA1(),  # noqa: S303 (CertID hash, not a signature)
            )
            .build()
            .public_bytes(serialization.Encoding.DER)
        )
        request = urllib.request.Request(  # noqa: S310 (fixed http loopback URL)
            self.url, data=req, headers={"Content-Type": "application/ocsp-request"}
        )
        with urllib.request.urlopen(request, timeout=2) as resp:  # noqa: S310
            ocsp.load_der_ocsp_response(resp.read())

    def stop(self) -> None:
        forwarder, self._forwarder = self._forwarder, None
        if forwarder is not None:
            forwarder.stop()
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)


class _CrlHandler(http.server.BaseHTTPRequestHandler):
    server: _CrlHttpServer

    def do_GET(self) -> None:
        srv = self.server
        if srv.delay and srv.stopping.wait(srv.delay):
            return  # shutting down: drop the connection
        name = self.path.split("?", 1)[0].lstrip("/")
        # Only *.crl files directly in the folder: no paths, no dot files.
        path = srv.folder / name
        if "/" in name or name.startswith(".") or not name.endswith(".crl") or not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        self.send_response(200)
        self.send_header("Content-Type", "application/pkix-crl")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        pass


class _CrlHttpServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, folder: Path, port: int) -> None:
        self.folder = folder
        self.delay = 0.0
        self.stopping = threading.Event()
        super().__init__((LOOPBACK, port), _CrlHandler)


class CrlServer(_Service):
    """Serves the CA folder's ``*.crl`` files on 127.0.0.1 from a thread."""

    def __init__(self, folder: Path, port: int | None = None, *, delay: float = 0.0):
        self.folder = Path(folder)
        self.port = port or free_port()
        self._delay = delay
        self._server: _CrlHttpServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def delay(self) -> float:
        return self._delay

    @delay.setter
    def delay(self, seconds: float) -> None:
        """Slow mode: sleep this long before answering each request (0: answer at once)."""
        self._delay = seconds
        if self._server is not None:
            self._server.delay = seconds

    @property
    def running(self) -> bool:
        return self._server is not None

    def start(self) -> None:
        if self._server is not None:
            return
        server = _CrlHttpServer(self.folder, self.port)
        server.delay = self._delay
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},
            daemon=True,
            name=f"crl-server-{self.port}",
        )
        self._thread.start()
        wait_listening(self.port)

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.stopping.set()  # wakes sleeping (slow-mode) handlers
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            with contextlib.suppress(RuntimeError):
                self._thread.join(timeout=5)
            self._thread = None
