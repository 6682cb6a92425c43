"""svmmd's transport: a Unix stream socket, a bounded pool of workers, JSON lines.

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
import faulthandler
import logging
import os
import queue
import select
import selectors
import signal
import socket
import stat
import struct
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from ..adapters.card_helper import WatchHelper
from ..adapters.private_dir import open_private_dir
from ..config import Config
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
# The pool: a fixed number of threads serve requests; a connection waiting for its client
# costs a descriptor and no thread (it is watched with epoll), and goes after IDLE_TIMEOUT.
WORKERS = 32
QUEUE_ROOT = MAX_ROOT  # ready connections waiting for a worker: root's (the logins) ...
QUEUE_USERS = 64  # ... and everyone else's, apart so users cannot crowd the logins out
IDLE_TIMEOUT = 300.0  # seconds a connection may stay silent between requests
PAM_IO_TIMEOUT = 300.0  # a PAM call waits this long for each answer from its client
SEND_TIMEOUT = 10.0  # a reply its client does not read is dropped after this
BACKLOG = 128  # connections the kernel holds until the watcher accepts them
REFUSALS = 1024  # "busy" answers waiting to be sent; past that, closed unanswered
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
        sock.listen(BACKLOG)
    except BaseException:
        sock.close()
        raise
    finally:
        os.close(dir_fd)
    return sock


class _Conn:
    """One accepted connection: the kernel's word on who is at the other end, and what it
    sent that no request has used yet."""

    def __init__(self, sock: socket.socket, pid: int, uid: int) -> None:
        self.sock, self.pid, self.uid = sock, pid, uid
        self.buf = bytearray()
        self.closed = False
        self.kind = ""  # "", "pam" or "lines": decided by the connection's first byte
        self.last = time.monotonic()


class _Reader:
    """``read`` for a PAM Channel: first what the selector's worker already read."""

    def __init__(self, conn: _Conn) -> None:
        self._c = conn

    def read(self, size: int = -1, /) -> bytes:
        if self._c.buf:
            n = len(self._c.buf) if size < 0 else size
            out = bytes(self._c.buf[:n])
            del self._c.buf[:n]
            return out
        return self._c.sock.recv(size if size > 0 else 65536)


class _Writer:
    def __init__(self, conn: _Conn) -> None:
        self._c = conn

    def write(self, data: bytes, /) -> int:
        self._c.sock.sendall(data)
        return len(data)

    def flush(self) -> None:
        return None


class _WorkQueue:
    """Connections with a request ready, waiting for a worker. Root's (the PAM calls of the
    PAM applications) and everyone else's have separate capacities, so users cannot fill
    the queue that logins wait in."""

    def __init__(self, root_capacity: int, user_capacity: int) -> None:
        self._cond = threading.Condition()
        self._items: deque[_Conn | None] = deque()
        self._capacity = {True: root_capacity, False: user_capacity}
        self._count = {True: 0, False: 0}

    def put(self, conn: _Conn) -> bool:
        """False: full for this kind of caller (the caller answers "busy")."""
        root = conn.uid == 0
        with self._cond:
            if self._count[root] >= self._capacity[root]:
                return False
            self._count[root] += 1
            self._items.append(conn)
            self._cond.notify()
            return True

    def get(self) -> _Conn | None:
        """The next connection; None: the worker should stop."""
        with self._cond:
            while not self._items:
                self._cond.wait()
            conn = self._items.popleft()
            if conn is not None:
                self._count[conn.uid == 0] -= 1
            return conn

    def stop(self, workers: int) -> None:
        with self._cond:
            self._items.extend([None] * workers)
            self._cond.notify_all()


class LauncherServer:
    """svmmd's transport. One thread watches the listening socket and every idle
    connection (epoll); a fixed pool of ``workers`` threads serves connections that have a
    request ready, taken from a bounded queue. An idle connection costs a descriptor, no
    thread, and is closed after ``idle_timeout``. A PAM call keeps its worker until it ends
    (the conversation waits for the person at the keyboard); a launcher connection goes
    back to the watcher after each complete request line, so a slow or silent client never
    holds a worker. Full queue: the answer is "busy" (audited), never a silent drop.

    svmmd's own connections to itself (the PAM responder's open_session hands volume keys
    to the launcher over this socket) are served on threads of their own, at most
    ``workers`` of them: they must not wait in the queue behind the very calls that make
    them, or a full pool would deadlock."""

    def __init__(
        self,
        launcher: Launcher,
        sock: socket.socket,
        pam: PamResponder | None = None,
        *,
        workers: int = WORKERS,
        idle_timeout: float = IDLE_TIMEOUT,
        queue_root: int = QUEUE_ROOT,
        queue_users: int = QUEUE_USERS,
    ) -> None:
        self.socket = sock
        self.launcher = launcher
        self.pam = pam
        self.workers = workers
        self.idle_timeout = idle_timeout
        self._limits = threading.Lock()
        self._by_uid: dict[int, int] = {}
        self._busy_audited: dict[int, float] = {}
        self._buckets: dict[int, tuple[float, float]] = {}  # uid -> (tokens, when)
        self._queue = _WorkQueue(queue_root, queue_users)
        self._self_slots = threading.BoundedSemaphore(workers)
        self._returned: deque[_Conn] = deque()  # from workers, for the watcher to watch again
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._stop = threading.Event()
        self._stopped = threading.Event()
        self._stopped.set()  # not serving yet
        self._idle: dict[int, _Conn] = {}  # fd -> connection; the watcher thread's alone
        self._refusals: queue.Queue[tuple[socket.socket, int, str] | None] = queue.Queue(REFUSALS)
        self._busy_notes: queue.Queue[tuple[int, str] | None] = queue.Queue(REFUSALS)
        self._auditor: threading.Thread | None = None

    # --- budgets --------------------------------------------------------------------------

    def admit_request(self, uid: int, now: float | None = None) -> bool:
        """A token bucket per uid: REQUEST_BURST at once, REQUESTS_PER_SECOND after."""
        if uid == 0:
            return True
        now = time.monotonic() if now is None else now
        with self._limits:
            tokens, when = self._buckets.get(uid, (float(REQUEST_BURST), now))
            tokens = min(float(REQUEST_BURST), tokens + (now - when) * REQUESTS_PER_SECOND)
            ok = tokens >= 1.0
            self._buckets[uid] = (tokens - 1.0 if ok else tokens, now)
            return ok

    def verify_request(self, request: Any, client_address: Any = None) -> bool:
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
                return True
        self._busy(request, uid, f"{mine} connections held; more refused for a while")
        return False

    def _busy(self, sock: socket.socket, uid: int, why: str) -> None:
        """Answer "busy" and close, on the refuser thread: the watcher never waits for a
        client or the audit log. Past REFUSALS waiting, closed unanswered."""
        try:
            self._refusals.put_nowait((sock, uid, why))
        except queue.Full:
            with contextlib.suppress(OSError):
                sock.close()

    def _refuser(self) -> None:
        while (item := self._refusals.get()) is not None:
            sock, uid, why = item
            reply = Reply(False, "busy", f"svmmd is busy: {why}")
            with contextlib.suppress(OSError):
                sock.settimeout(0.5)
                sock.sendall(reply.to_json())
            with contextlib.suppress(OSError):
                sock.close()
            self.note_busy(uid, why)

    def note_busy(self, uid: int, why: str) -> None:
        """Audit a "busy" answer, at most once per uid per BUSY_AUDIT_EVERY, on the auditor
        thread: an audit write (fsyncs) never delays the answers."""
        now = time.monotonic()
        with self._limits:
            last = self._busy_audited.get(uid)
            if last is not None and now - last < BUSY_AUDIT_EVERY:
                return
            self._busy_audited[uid] = now
        if self._auditor is None:  # not serving (tests): at once
            self.launcher.audit_busy(uid, why)
            return
        with contextlib.suppress(queue.Full):  # one per uid a minute: full is a flood
            self._busy_notes.put_nowait((uid, why))

    def _audit_busy(self) -> None:
        while (item := self._busy_notes.get()) is not None:
            try:
                self.launcher.audit_busy(*item)
            except Exception:  # a bug: logged; the service goes on
                log.exception("auditing busy for uid %d failed", item[0])

    def _close(self, conn: _Conn) -> None:
        """Close an admitted connection and give its uid the slot back (once)."""
        if self._release(conn):
            with contextlib.suppress(OSError):
                conn.sock.close()

    def _release(self, conn: _Conn) -> bool:
        """Give the connection's slot back to its uid; False if that was done already."""
        with self._limits:
            if conn.closed:
                return False
            conn.closed = True
            left = self._by_uid.get(conn.uid, 1) - 1
            if left > 0:
                self._by_uid[conn.uid] = left
            else:
                self._by_uid.pop(conn.uid, None)
            return True

    # --- the watcher ----------------------------------------------------------------------

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        """Serve until ``shutdown``: the workers, and this thread watching the sockets."""
        self._stopped.clear()
        self.socket.setblocking(False)
        threads = [
            threading.Thread(target=self._worker, name=f"svmmd-worker-{i}", daemon=True)
            for i in range(self.workers)
        ]
        threads.append(threading.Thread(target=self._refuser, name="svmmd-busy", daemon=True))
        self._auditor = threading.Thread(target=self._audit_busy, name="svmmd-audit", daemon=True)
        threads.append(self._auditor)
        for t in threads:
            t.start()
        sel = selectors.DefaultSelector()
        try:
            sel.register(self.socket, selectors.EVENT_READ, None)
            sel.register(self._wake_r, selectors.EVENT_READ, None)
            while not self._stop.is_set():
                for key, _events in sel.select(timeout=poll_interval):
                    if key.fileobj is self.socket:
                        self._accept(sel)
                    elif key.fileobj is self._wake_r:
                        with contextlib.suppress(OSError):
                            while self._wake_r.recv(4096):
                                pass
                    else:
                        self._ready(sel, key.data)
                self._watch_returned(sel)
                self._close_idle(sel)
        finally:
            self._queue.stop(self.workers)
            self._refusals.put(None)
            self._busy_notes.put(None)
            for conn in list(self._idle.values()):
                self._close(conn)
            self._idle.clear()
            sel.close()
            self._stopped.set()

    def shutdown(self) -> None:
        """Stop serve_forever and wait until it has; calls in progress finish on their own."""
        self._stop.set()
        self._wake()
        self._stopped.wait()

    def server_close(self) -> None:
        with contextlib.suppress(OSError):
            self.socket.close()
        for s in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                s.close()

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")

    def _accept(self, sel: selectors.BaseSelector) -> None:
        for _ in range(64):  # then look at the others again
            try:
                sock, _addr = self.socket.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # EMFILE and the like: back off instead of spinning
                log.warning("accept failed: %s", e)
                time.sleep(0.05)
                return
            sock.settimeout(SEND_TIMEOUT)  # reads use MSG_DONTWAIT; a send may wait this long
            if not self.verify_request(sock):
                continue  # answered and closed by the refuser
            try:
                pid, uid = peer_cred(sock)
            except OSError:
                sock.close()
                continue
            conn = _Conn(sock, pid, uid)
            if pid == os.getpid() and self._self_slots.acquire(blocking=False):
                threading.Thread(target=self._serve_own, args=(conn,), daemon=True).start()
                continue
            self._watch(sel, conn)

    def _watch(self, sel: selectors.BaseSelector, conn: _Conn) -> None:
        self._idle[conn.sock.fileno()] = conn
        sel.register(conn.sock, selectors.EVENT_READ, conn)

    def _ready(self, sel: selectors.BaseSelector, conn: _Conn) -> None:
        """A watched connection has something to read: to a worker, or "busy"."""
        sel.unregister(conn.sock)
        del self._idle[conn.sock.fileno()]
        if not self._queue.put(conn):
            self._release(conn)  # its slot; the refuser answers and closes the socket
            self._busy(conn.sock, conn.uid, "every worker is busy and the queue is full")

    def _watch_returned(self, sel: selectors.BaseSelector) -> None:
        while self._returned:
            conn = self._returned.popleft()
            self._watch(sel, conn)

    def _close_idle(self, sel: selectors.BaseSelector) -> None:
        cutoff = time.monotonic() - self.idle_timeout
        for fd, conn in list(self._idle.items()):
            if conn.last < cutoff:
                sel.unregister(conn.sock)
                del self._idle[fd]
                self._close(conn)

    # --- the workers ----------------------------------------------------------------------

    def _worker(self) -> None:
        while True:
            conn = self._queue.get()
            if conn is None:
                return
            if self._serve(conn):
                self._returned.append(conn)
                self._wake()
                if self._stop.is_set():  # the watcher may be gone: nobody would watch it
                    with contextlib.suppress(ValueError):
                        self._returned.remove(conn)
                        self._close(conn)

    def _serve_own(self, conn: _Conn) -> None:
        """svmmd's own connection, on this thread to its end (blocking reads)."""
        try:
            while True:
                ready, _, _ = select.select([conn.sock], [], [], self.idle_timeout)
                if not ready or not self._serve(conn):
                    break
        finally:
            self._self_slots.release()
            self._close(conn)

    def _serve(self, conn: _Conn) -> bool:
        """Use what ``conn`` has sent. True: keep watching it; False: it was closed."""
        try:
            keep = self._serve_unguarded(conn)
        except Exception:  # a bug: logged; this connection ends, the service goes on
            log.exception("connection of uid %d failed", conn.uid)
            keep = False
        if not keep:
            self._close(conn)
        return keep

    def _serve_unguarded(self, conn: _Conn) -> bool:
        try:
            data = conn.sock.recv(65536, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return True
        except OSError:
            return False
        conn.last = time.monotonic()
        if not data:
            if conn.kind == "lines" and conn.buf:  # a last line without its newline
                self._send(conn, Reply(False, "bad_request", "request line unterminated"))
            return False
        conn.buf += data
        if not conn.kind:
            conn.kind = "pam" if conn.buf[:1] == PAM_MAGIC[:1] else "lines"  # no JSON so
        if conn.kind == "pam":
            if len(conn.buf) < len(PAM_MAGIC):
                return True  # the rest of MAGIC when it comes, without holding a worker
            self._pam(conn)
            return False
        return self._lines(conn)

    def _lines(self, conn: _Conn) -> bool:
        """Every complete request line in the buffer, each with its reply."""
        limit = MAX_REQUEST_BYTES + 2
        while True:
            end = conn.buf.find(b"\n", 0, limit)
            if end < 0:
                if len(conn.buf) >= limit:
                    self._send(conn, Reply(False, "bad_request", "request line too long"))
                    return False
                return True
            line = bytes(conn.buf[: end + 1])
            del conn.buf[: end + 1]
            if not self._request(conn, line):
                return False

    def _request(self, conn: _Conn, line: bytes) -> bool:
        if not self.admit_request(conn.uid):
            self.note_busy(conn.uid, "request rate limit reached")
            return self._send(
                conn, Reply(False, "busy", "too many requests: try again in a moment")
            )
        try:
            reply = self.launcher.handle(conn.uid, line.rstrip(b"\r\n"))
        except Exception:  # a bug: logged, and the answer is a refusal, never a success
            log.exception("request by uid %d failed", conn.uid)
            reply = Reply(False, "internal_error", "the launcher failed; see its log")
        return self._send(conn, reply)

    def _send(self, conn: _Conn, reply: Reply) -> bool:
        try:
            if reply.fds:
                # One sendmsg: the descriptors ride on the reply line's first byte.
                socket.send_fds(conn.sock, [reply.to_json()], list(reply.fds))
            else:
                conn.sock.sendall(reply.to_json())
        except OSError:
            return False
        finally:
            for fd in reply.fds:
                os.close(fd)  # the caller has its own now
        return True

    def _pam(self, conn: _Conn) -> None:
        """A PAM call (daemon/pam_responder.py) owns the rest of the connection."""
        conn.sock.settimeout(PAM_IO_TIMEOUT)
        channel = Channel(_Reader(conn), _Writer(conn))
        magic = bytes(conn.buf[: len(PAM_MAGIC)])
        del conn.buf[: len(PAM_MAGIC)]
        with contextlib.suppress(ProtocolError):
            if magic != PAM_MAGIC:
                channel.send({"unavailable": "not a svmm-pam/1 client"})
                return
            if self.pam is None:
                channel.send({"unavailable": "this svmmd does not answer PAM calls"})
                return
            try:
                self.pam.serve(conn.uid, conn.pid, channel)
            except ProtocolError:
                raise
            except Exception:  # a bug: logged; the client sees no result and fails closed
                log.exception("PAM call by pid %d failed", conn.pid)


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
    module = _card_module(config)
    if module is None:
        launcher.audit_card_watch_unavailable(config.pkcs11.module)
    else:
        # Watches the cards that hold keys or started VMs (reattached ones included).
        launcher.start_card_watch(module)
    sock = systemd_socket() or bind_socket(config.launcher.socket)
    # The fast login path: PAM calls run here, against the loaded module, CRL indexes,
    # directory connection and policy (daemon/pam_responder.py).
    pam = PamResponder(args.config, launcher=launcher)
    server = serve(launcher, sock, pam)

    def _stop(_sig: int, _frame: object) -> None:
        # VMs keep running; the next svmmd reattaches through the registry.
        threading.Thread(target=server.shutdown, daemon=True).start()

    def _reload(_sig: int, _frame: object) -> None:
        threading.Thread(target=launcher.check_policy, kwargs={"force": True},
                         daemon=True).start()  # fmt: skip

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGHUP, _reload)  # ask the policy source again now
    # Every thread's stack to the log on SIGUSR1: what a stuck worker waits for.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
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


SWEEP_EVERY = 5.0  # seconds between looks for dead sessions, a changed policy bundle and
# a pulled card's VMs that are still to be stopped


def _start_sweeper(launcher: Launcher, every: float = SWEEP_EVERY) -> Any:
    """Sweep now, then every ``every`` seconds in a thread; set the returned event to stop."""
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
            try:
                stopped = launcher.retry_card_actions()  # a pulled card's VM whose stop failed
            except Exception:  # a bug: logged; a VM leaves the pending set only once stopped
                log.exception("retrying a pulled card's VM actions failed")
            else:
                if stopped:
                    log.info("VMs of a pulled card stopped on retry: %s", ", ".join(stopped))
            if stop.wait(every):
                return

    threading.Thread(target=sweep, name="svmmd-sweep", daemon=True).start()
    return stop


def _card_module(config: Config) -> WatchHelper | None:
    """What the card watch polls: the PKCS#11 module in a card helper of its own (never in
    svmmd, which holds every session's keys), started again after a failure. None (logged)
    when it cannot be loaded: the service still stops VMs on request, but card removal
    goes unnoticed."""
    from ..errors import SvmmError

    p = config.pkcs11
    try:
        return WatchHelper(p.module, pass_environment=p.pass_environment, user=p.helper_user)
    except SvmmError as e:
        log.error("card removal is not watched: %s", e.message)
        return None


if __name__ == "__main__":
    sys.exit(main())
