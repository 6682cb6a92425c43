"""Faults for one user at a time: an OCSP responder and a directory that stall one request.

svmmd serves many logins at once; these stand between it and the real lab responders so a
test or a benchmark can make ONE login's request hang while everyone else's are answered:

* ``StallingOcspProxy``: an HTTP front for the lab's `openssl ocsp`; while armed, a request
  about the certificate with ``stall_serial`` is accepted and never answered (the socket
  stays open until ``stop``); every other request is relayed.
* ``StallingTcpProxy``: a TCP relay (for slapd: StartTLS passes through untouched); once
  armed, the first connection that sends anything has that and all it sends after held
  back for ever (a directory that accepts a request and never answers); the others relay.

Both set ``stalled`` (an Event) when they hold a request, so a caller can start the other
logins exactly while one is hung.
"""

from __future__ import annotations

import contextlib
import http.server
import select
import socket
import threading
import urllib.request
from pathlib import Path
from typing import Any, Self

from .responders import free_port


def _serial_der(serial: int) -> bytes:
    """The content octets of the DER INTEGER ``serial`` (as an OCSP request carries it)."""
    return serial.to_bytes(serial.bit_length() // 8 + 1, "big")


class StallingOcspProxy:
    def __init__(self, upstream: str, stall_serial: int, port: int | None = None) -> None:
        self.upstream = upstream
        self.port = port or free_port()
        self.needle = _serial_der(stall_serial)
        self.armed = False
        self.stalled = threading.Event()
        self.relayed = 0
        self._release = threading.Event()
        self._server: http.server.ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def arm(self) -> None:
        """The next request about the stall serial is held (until ``release``)."""
        self.stalled.clear()
        self.armed = True

    def start(self) -> Self:
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if proxy.armed and proxy.needle in body:
                    release = proxy._release
                    proxy.stalled.set()
                    release.wait()  # accepted, never answered (until released)
                    return
                kind = {"Content-Type": "application/ocsp-request"}
                req = urllib.request.Request(proxy.upstream, data=body, headers=kind)  # noqa: S310
                with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310 - lab URL
                    answer = resp.read()
                proxy.relayed += 1
                self.send_response(200)
                self.send_header("Content-Type", "application/ocsp-response")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, format: str, *args: object) -> None:
                return None

        server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        server.daemon_threads = True
        self._server = server
        threading.Thread(target=server.serve_forever, daemon=True).start()
        return self

    def release(self) -> None:
        """Disarm, and end the held requests (closed unanswered)."""
        self.armed = False
        release, self._release = self._release, threading.Event()
        release.set()

    def stop(self) -> None:
        self._release.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class StallingTcpProxy:
    def __init__(self, upstream_host: str, upstream_port: int, port: int | None = None) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.port = port or free_port()
        self.stalled = threading.Event()
        self._armed = False
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._socks: list[socket.socket] = []
        self._held: list[socket.socket] = []  # the clients whose requests are held
        self._listener: socket.socket | None = None

    @property
    def uri(self) -> str:
        return f"ldap://127.0.0.1:{self.port}"

    def arm(self) -> None:
        """The next connection that sends a request is held (and stays so)."""
        with self._lock:
            self.stalled.clear()
            self._armed = True

    def start(self) -> Self:
        ls = socket.create_server(("127.0.0.1", self.port), backlog=256)
        self._listener = ls
        threading.Thread(target=self._accept, args=(ls,), daemon=True).start()
        return self

    def _accept(self, ls: socket.socket) -> None:
        while not self._stop.is_set():
            try:
                client, _ = ls.accept()
            except OSError:
                return
            threading.Thread(target=self._relay, args=(client,), daemon=True).start()

    def _take_stall(self) -> bool:
        with self._lock:
            if not self._armed:
                return False
            self._armed = False
            self.stalled.set()
            return True

    def _relay(self, client: socket.socket) -> None:
        try:
            server = socket.create_connection(self.upstream, timeout=5)
        except OSError:
            client.close()
            return
        self._socks += [client, server]
        try:
            self._pump(client, server)
        except OSError:
            pass
        finally:
            for s in (client, server):
                s.close()

    def _pump(self, client: socket.socket, server: socket.socket) -> None:
        held = False
        while not self._stop.is_set():
            ready, _, _ = select.select([client, server], [], [], 0.5)
            for s in ready:
                data = s.recv(65536)
                if not data:
                    return
                if s is client:
                    if not held and self._take_stall():
                        held = True
                        self._held.append(client)
                    if not held:
                        server.sendall(data)
                else:
                    client.sendall(data)

    def release(self) -> None:
        """Disarm, and close the held connections (their client sees the server go)."""
        with self._lock:
            self._armed = False
            held, self._held = self._held, []
        for s in held:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def stop(self) -> None:
        self._stop.set()
        for s in [self._listener, *self._socks]:
            if s is not None:
                with contextlib.suppress(OSError):
                    s.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def fronted_variant(
    lab: Any,
    slapd: Any,
    ocsp: StallingOcspProxy,
    ldap: StallingTcpProxy,
    socket_dir: Path,
    *,
    name: str = "par",
    search_timeout: float = 15.0,
    fetch_timeout: float = 10.0,
    login_timeout: float = 60.0,
    methods: tuple[str, ...] = ("ocsp", "crl"),
) -> tuple[str, Path]:
    """A lab PAM service (daemon=required) whose svmmd asks OCSP through ``ocsp`` and the
    directory through ``ldap``; the full login with a signed policy (allowlist written at
    open_session), no volumes. Returns (service, its TOML for svmmd)."""
    repo = Path(__file__).resolve().parents[1]
    service = f"svmm-{name}"
    policy = (repo / "config" / "policy.example.toml").read_bytes()
    policy = policy.replace(b'"svmm-login"]', f'"svmm-login", "{service}"]'.encode())
    bundle = lab.write_policy(policy, lab.folder / f"policy-{name}.bundle")
    directory = lab.directory_overrides(slapd).replace(slapd.uri, ldap.uri)
    directory = directory.replace(
        "search_timeout = 3",
        f"search_timeout = {search_timeout:g}\ntotal_timeout = {max(15.0, search_timeout):g}",
    )
    # A held request on a new connection is StartTLS: it waits connect_timeout.
    directory = directory.replace("connect_timeout = 2", f"connect_timeout = {search_timeout:g}")
    launcher = lab.launcher_overrides(socket_dir).split("\n[volumes]")[0]
    revocation = f"""
[revocation]
end_entity = "require"
ca = "require"
methods = [{", ".join(f'"{m}"' for m in methods)}]
cache_dir = "{lab.cache_dir}"
fetch_timeout = {fetch_timeout:g}
ocsp_responder = "{ocsp.url}"
ocsp_reuse = 0

[auth]
host_name = "lab-host"
login_timeout = {login_timeout:g}
"""
    overrides = (
        directory
        + lab.policy_overrides(bundle, state=lab.folder / f"policy-state-{name}")
        + launcher
        + "\n[volumes]\nenabled = false\n"
        + revocation
    )
    sock = socket_dir / "launcher.sock"
    lab.variant(name, overrides, args=f"daemon=required socket={sock}")
    return service, lab.folder / f"{service}.toml"
