"""svmmd's transport: a Unix stream socket, one thread per connection, JSON lines.

Each line is one request of the "svmm-launcher/1" protocol (documented in
services/launcher.py) and gets one reply line; a connection that starts with the PAM
client's MAGIC (pam/shim.py) belongs to the PAM responder (daemon/pam_responder.py) instead. The
caller's uid is read once per connection from the kernel (SO_PEERCRED), never from what
the caller sends. The socket is systemd's
(socket activation: LISTEN_PID/LISTEN_FDS, fd 3) or our own, made 0666 in a root-owned 0755
folder so any local user can ask and none can replace it.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import socket
import socketserver
import stat
import struct
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from ..adapters.private_dir import open_private_dir
from ..adapters.token import Pkcs11Module
from ..pam.shim import MAGIC as PAM_MAGIC
from ..services.launcher import MAX_REQUEST_BYTES, Launcher, Reply
from .pam_responder import Channel, PamResponder, ProtocolError

SD_LISTEN_FDS_START = 3
SOCKET_MODE = 0o666
# What one local user can hold of svmmd (invariant 14): connections, so threads and
# descriptors. Root's PAM applications have a budget of their own that no user can spend.
MAX_PER_UID = 16
MAX_USERS_TOTAL = 256
MAX_ROOT = 128
BUSY_AUDIT_EVERY = 60.0  # seconds: at most one "busy" record per uid so often
# Launcher requests of one user (every one is audited, with fsyncs): a burst, then a steady
# rate; past it the answer is "busy", unaudited but for BUSY_AUDIT_EVERY. Root is not limited.
REQUEST_BURST = 30
REQUESTS_PER_SECOND = 2.0
_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid

log = logging.getLogger(__name__)


def peer_cred(sock: socket.socket) -> tuple[int, int]:
    """(pid, uid) of the process at the other end, as the kernel recorded them at connect()."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    pid, uid, _gid = _PEERCRED.unpack(raw)
    return pid, uid


def peer_uid(sock: socket.socket) -> int:
    """The uid of the process at the other end, as the kernel recorded it at connect()."""
    return peer_cred(sock)[1]


def systemd_socket(environ: dict[str, str] | None = None) -> socket.socket | None:
    """The listening socket systemd passed us, if it was for this process."""
    env = os.environ if environ is None else environ
    if env.get("LISTEN_PID") != str(os.getpid()) or env.get("LISTEN_FDS") != "1":
        return None
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)  # not for our children
    sock = socket.socket(fileno=SD_LISTEN_FDS_START)
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        sock.detach()
        raise OSError("the socket systemd passed is not a unix stream socket")
    os.set_inheritable(SD_LISTEN_FDS_START, False)
    return sock


def bind_socket(path: Path, *, key: str = "launcher.socket") -> socket.socket:
    """Our own listening socket at ``path``: the folder is root-owned 0755 (created so), the
    socket 0666; a stale socket there is replaced, anything else is refused."""
    dir_fd = open_private_dir(path.parent, key=key, private=False, check_parents=True, mode=0o755)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        with contextlib.suppress(FileNotFoundError):
            st = os.stat(path.name, dir_fd=dir_fd, follow_symlinks=False)
            if not stat.S_ISSOCK(st.st_mode):
                raise OSError(f"{path} exists and is not a socket")
            os.unlink(path.name, dir_fd=dir_fd)
        sock.bind(str(path))
        os.chmod(path.name, SOCKET_MODE, dir_fd=dir_fd, follow_symlinks=False)
        sock.listen(16)
    except BaseException:
        sock.close()
        raise
    finally:
        os.close(dir_fd)
    return sock


class _Handler(socketserver.StreamRequestHandler):
    server: LauncherServer
    timeout = 300.0  # an idle client does not keep a thread for ever

    def handle(self) -> None:
        pid, uid = peer_cred(self.request)
        try:
            head = self.rfile.read(1)
        except (TimeoutError, OSError):
            return
        if head == PAM_MAGIC[:1]:  # no JSON request starts so
            self._pam(pid, uid)
            return
        while True:
            try:
                line = head + self.rfile.readline(MAX_REQUEST_BYTES + 2)
            except (TimeoutError, OSError):
                return
            head = b""
            if not line:
                return
            if not line.endswith(b"\n"):
                reply = Reply(False, "bad_request", "request line too long or unterminated")
                self.wfile.write(reply.to_json())
                return
            if not self.server.admit_request(uid):
                reply = Reply(False, "busy", "too many requests: try again in a moment")
                self.server.note_busy(uid, "request rate limit reached")
                try:
                    self.wfile.write(reply.to_json())
                except OSError:
                    return
                continue
            try:
                reply = self.server.launcher.handle(uid, line.rstrip(b"\r\n"))
            except Exception:  # a bug: logged, and the answer is a refusal, never a success
                log.exception("request by uid %d failed", uid)
                reply = Reply(False, "internal_error", "the launcher failed; see its log")
            try:
                if reply.fds:
                    # One sendmsg: the descriptors ride on the reply line's first byte.
                    socket.send_fds(self.request, [reply.to_json()], list(reply.fds))
                else:
                    self.wfile.write(reply.to_json())
            except OSError:
                return
            finally:
                for fd in reply.fds:
                    os.close(fd)  # the caller has its own now

    def _pam(self, pid: int, uid: int) -> None:
        """A PAM call (daemon/pam_responder.py) owns the rest of the connection."""
        channel = Channel(self.rfile, self.wfile)
        responder = self.server.pam
        try:
            magic = self.rfile.read(len(PAM_MAGIC) - 1)
        except (TimeoutError, OSError):
            return
        with contextlib.suppress(ProtocolError):
            if magic != PAM_MAGIC[1:]:
                channel.send({"unavailable": "not a svmm-pam/1 client"})
                return
            if responder is None:
                channel.send({"unavailable": "this svmmd does not answer PAM calls"})
                return
            try:
                responder.serve(uid, pid, channel)
            except ProtocolError:
                raise
            except Exception:  # a bug: logged; the client sees no result and fails closed
                log.exception("PAM call by pid %d failed", pid)


class LauncherServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    block_on_close = False

    def __init__(
        self, launcher: Launcher, sock: socket.socket, pam: PamResponder | None = None
    ) -> None:
        import threading

        super().__init__("", _Handler, bind_and_activate=False)
        self.socket.close()
        self.socket = sock
        self.launcher = launcher
        self.pam = pam
        self._limits = threading.Lock()
        self._by_uid: dict[int, int] = {}
        self._counted: dict[int, int] = {}  # id(connection) -> uid, for the ones admitted
        self._busy_audited: dict[int, float] = {}
        self._buckets: dict[int, tuple[float, float]] = {}  # uid -> (tokens, when)

    def admit_request(self, uid: int, now: float | None = None) -> bool:
        """A token bucket per uid: REQUEST_BURST at once, REQUESTS_PER_SECOND after."""
        if uid == 0:
            return True
        import time

        now = time.monotonic() if now is None else now
        with self._limits:
            tokens, when = self._buckets.get(uid, (float(REQUEST_BURST), now))
            tokens = min(float(REQUEST_BURST), tokens + (now - when) * REQUESTS_PER_SECOND)
            ok = tokens >= 1.0
            self._buckets[uid] = (tokens - 1.0 if ok else tokens, now)
            return ok

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """Admit a connection within its uid's budget; else answer "busy" and close."""
        try:
            _pid, uid = peer_cred(request)
        except OSError:
            return False
        with self._limits:
            mine = self._by_uid.get(uid, 0)
            users = sum(n for u, n in self._by_uid.items() if u != 0)
            limit = MAX_ROOT if uid == 0 else MAX_PER_UID
            over = mine >= limit or (uid != 0 and users >= MAX_USERS_TOTAL)
            if not over:
                self._by_uid[uid] = mine + 1
                self._counted[id(request)] = uid
                return True
        self._busy(request, uid, mine)
        return False

    def _busy(self, request: Any, uid: int, held: int) -> None:
        reply = Reply(False, "busy", f"svmmd is busy: uid {uid} holds {held} connections")
        with contextlib.suppress(OSError):
            request.settimeout(0.5)
            request.sendall(reply.to_json())
        self.note_busy(uid, f"{held} connections held; more refused for a while")

    def note_busy(self, uid: int, why: str) -> None:
        """Audit a "busy" answer, at most once per uid per BUSY_AUDIT_EVERY."""
        import time

        now = time.monotonic()
        with self._limits:
            last = self._busy_audited.get(uid)
            if last is not None and now - last < BUSY_AUDIT_EVERY:
                return
            self._busy_audited[uid] = now
        self.launcher.audit_busy(uid, why)

    def shutdown_request(self, request: Any) -> None:
        with self._limits:
            uid = self._counted.pop(id(request), None)
            if uid is not None:
                left = self._by_uid.get(uid, 1) - 1
                if left > 0:
                    self._by_uid[uid] = left
                else:
                    self._by_uid.pop(uid, None)
        super().shutdown_request(request)


def serve(
    launcher: Launcher, sock: socket.socket, pam: PamResponder | None = None
) -> LauncherServer:
    """A server over ``sock`` (not yet serving: call serve_forever, e.g. in a thread).
    ``pam``: answer PAM calls too (the fast login path)."""
    return LauncherServer(launcher, sock, pam)


@contextlib.contextmanager
def serving(
    launcher: Launcher, sock: socket.socket, pam: PamResponder | None = None
) -> Iterator[LauncherServer]:
    """Serve ``sock`` from a thread until the block ends (the lab and the tests run svmmd's
    service this way, in their own process, to reach a VM's single QMP connection)."""
    import threading

    server = serve(launcher, sock, pam)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def main(argv: Sequence[str] | None = None) -> int:
    """svmmd: load the configuration, find the VMs already running, serve until SIGTERM."""
    from ..config import load

    parser = argparse.ArgumentParser(prog="svmmd", description="pam_svmm's VM launcher service")
    parser.add_argument("--config", help="configuration file")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="svmmd: %(levelname)s %(message)s")
    config = load(args.config)
    launcher = Launcher.from_config(config)
    found = launcher.registry.reattach()
    if found:
        log.info("reattached to running VMs: %s", ", ".join(found))
    # Reconcile with the sessions that are alive, now and every few seconds after: a grant
    # whose login process died goes, with its keys (invariant 12).
    sweeper = _start_sweeper(launcher)
    module = _card_module(config.pkcs11.module)
    if module is None:
        launcher.audit_card_watch_unavailable(config.pkcs11.module)
    else:
        # Watches the cards that hold keys or started VMs (reattached ones included).
        launcher.start_card_watch(module)
    sock = systemd_socket() or bind_socket(config.launcher.socket)
    # The fast login path: PAM calls run here, against the loaded module, CRL indexes,
    # directory connection and policy (daemon/pam_responder.py).
    pam = PamResponder(args.config)
    server = serve(launcher, sock, pam)

    def _stop(_sig: int, _frame: object) -> None:
        # VMs keep running; the next svmmd reattaches through the registry.
        import threading

        threading.Thread(target=server.shutdown, daemon=True).start()

    def _reload(_sig: int, _frame: object) -> None:
        import threading

        threading.Thread(target=launcher.check_policy, kwargs={"force": True},
                         daemon=True).start()  # fmt: skip

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGHUP, _reload)  # ask the policy source again now
    try:
        server.serve_forever()
    finally:
        sweeper.set()
        server.server_close()
        pam.close()
        launcher.stop_card_watch()
        launcher.registry.detach()
        launcher.close()  # held volume keys are wiped; a new svmmd gets them at the next login
        if module is not None:
            module.close()
    return 0


SWEEP_EVERY = 5.0  # seconds between looks for dead sessions and a changed policy bundle


def _start_sweeper(launcher: Launcher, every: float = SWEEP_EVERY) -> Any:
    """Sweep now, then every ``every`` seconds in a thread; set the returned event to stop."""
    import threading

    stop = threading.Event()

    def sweep() -> None:
        while True:
            try:
                gone = launcher.sweep_sessions()
            except Exception:  # a bug: logged; the start path checks liveness itself too
                log.exception("session sweep failed")
            else:
                if gone:
                    log.info("sessions lost (process gone) for uid %s", ", ".join(map(str, gone)))
            try:
                launcher.check_policy()  # a new signed bundle takes effect within `every`
            except Exception:
                log.exception("policy check failed")
            if stop.wait(every):
                return

    threading.Thread(target=sweep, name="svmmd-sweep", daemon=True).start()
    return stop


def _card_module(path: str) -> Pkcs11Module | None:
    """The PKCS#11 module the card watch polls; None (logged) when it cannot be loaded:
    the service still stops VMs on request, but card removal goes unnoticed."""
    from ..errors import SvmmError

    try:
        return Pkcs11Module(path)
    except SvmmError as e:
        log.error("card removal is not watched: %s", e.message)
        return None


if __name__ == "__main__":
    sys.exit(main())
