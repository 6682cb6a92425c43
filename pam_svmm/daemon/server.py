"""svmmd's transport: a Unix stream socket, one thread per connection, JSON lines.

Each line is one request of the "svmm-launcher/1" protocol (documented in
services/launcher.py) and gets one reply line. The caller's uid is read once per connection
from the kernel (SO_PEERCRED), never from what the caller sends. The socket is systemd's
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

from ..adapters.private_dir import open_private_dir
from ..adapters.token import Pkcs11Module
from ..services.launcher import MAX_REQUEST_BYTES, Launcher, Reply

SD_LISTEN_FDS_START = 3
SOCKET_MODE = 0o666
_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
log = logging.getLogger(__name__)


def peer_uid(sock: socket.socket) -> int:
    """The uid of the process at the other end, as the kernel recorded it at connect()."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    _pid, uid, _gid = _PEERCRED.unpack(raw)
    return uid


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
        uid = peer_uid(self.request)
        while True:
            try:
                line = self.rfile.readline(MAX_REQUEST_BYTES + 2)
            except (TimeoutError, OSError):
                return
            if not line:
                return
            if not line.endswith(b"\n"):
                reply = Reply(False, "bad_request", "request line too long or unterminated")
                self.wfile.write(reply.to_json())
                return
            try:
                reply = self.server.launcher.handle(uid, line.rstrip(b"\r\n"))
            except Exception:  # a bug: logged, and the answer is a refusal, never a success
                log.exception("request by uid %d failed", uid)
                reply = Reply(False, "internal_error", "the launcher failed; see its log")
            try:
                self.wfile.write(reply.to_json())
            except OSError:
                return


class LauncherServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    block_on_close = False

    def __init__(self, launcher: Launcher, sock: socket.socket) -> None:
        super().__init__("", _Handler, bind_and_activate=False)
        self.socket.close()
        self.socket = sock
        self.launcher = launcher


def serve(launcher: Launcher, sock: socket.socket) -> LauncherServer:
    """A server over ``sock`` (not yet serving: call serve_forever, e.g. in a thread)."""
    return LauncherServer(launcher, sock)


@contextlib.contextmanager
def serving(launcher: Launcher, sock: socket.socket) -> Iterator[LauncherServer]:
    """Serve ``sock`` from a thread until the block ends (the lab and the tests run svmmd's
    service this way, in their own process, to reach a VM's single QMP connection)."""
    import threading

    server = serve(launcher, sock)
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
    module = _card_module(config.pkcs11.module)
    if module is not None:
        # Watches the cards that hold keys or started VMs (reattached ones included).
        launcher.start_card_watch(module)
    sock = systemd_socket() or bind_socket(config.launcher.socket)
    server = serve(launcher, sock)

    def _stop(_sig: int, _frame: object) -> None:
        # VMs keep running; the next svmmd reattaches through the registry.
        import threading

        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        server.serve_forever()
    finally:
        server.server_close()
        launcher.stop_card_watch()
        launcher.registry.detach()
        launcher.close()  # held volume keys are wiped; a new svmmd gets them at the next login
        if module is not None:
            module.close()
    return 0


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
