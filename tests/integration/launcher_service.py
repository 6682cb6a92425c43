"""svmmd served from a thread of the test process, for the integration tests that talk to it
through its socket: the ``base`` folder and ``service`` fixtures (a Launcher on the launcher
fixtures' policy, `nobody` holding an allowlist and a live session), ``Running`` and ``ask``
(requests from a separate process as another uid)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pam_svmm.adapters.allowlist_store import AllowlistStore
from pam_svmm.daemon.server import LauncherServer, bind_socket, serve
from pam_svmm.services.launcher import Launcher
from svmm_lab.userland import userland
from tests.unit.launcher_fixtures import LocalPolicy, allowlist_bytes, live_session, make_launcher

NOBODY = 65534
QEMU = shutil.which("qemu-system-x86_64")

CLIENT = """
import json, socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
f = s.makefile("rwb")
for line in sys.stdin.buffer:
    f.write(line); f.flush()
    sys.stdout.write(f.readline().decode())
"""


@pytest.fixture
def base() -> Iterator[Path]:
    # Not under pytest's tmp_path: its 0700 parents would keep `nobody` from the socket.
    d = Path(tempfile.mkdtemp(prefix="svmmd-", dir="/tmp"))
    os.chmod(d, 0o755)  # noqa: S103 - root's folder, readable so nobody reaches the socket
    yield d
    shutil.rmtree(d, ignore_errors=True)


class Running:
    def __init__(self, launcher: Launcher, sock: socket.socket) -> None:
        self.launcher = launcher
        self.server: LauncherServer = serve(launcher, sock)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture
def service(base: Path) -> Iterator[Running]:
    policy = LocalPolicy()
    launcher = make_launcher(base, policy)
    AllowlistStore(launcher.config.session.allowlist_dir).write_bytes(
        NOBODY, allowlist_bytes(policy, user="nobody", uid=NOBODY)
    )
    live_session(launcher.config.session.state_dir, NOBODY, "nobody")
    running = Running(launcher, bind_socket(launcher.config.launcher.socket))
    yield running
    running.close()
    for vm in list(launcher.registry.running()):
        launcher.registry.stop(vm, quit_timeout=2, term_timeout=2, kill_timeout=2)


def ask(sock: Path, *requests: dict[str, Any], user: int | None = NOBODY) -> list[dict[str, Any]]:
    """Requests sent by a separate process running as ``user`` over one connection."""
    lines = "".join(json.dumps({"version": "svmm-launcher/1", **r}) + "\n" for r in requests)
    out = subprocess.run(
        userland().argv("-c", CLIENT, str(sock)),
        input=lines.encode(), capture_output=True, check=True, timeout=60, env=userland().env(),
        user=user, group=user, extra_groups=[] if user is not None else None,
    )  # fmt: skip
    return [json.loads(x) for x in out.stdout.decode().splitlines()]
