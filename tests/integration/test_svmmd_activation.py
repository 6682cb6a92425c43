"""svmmd started the way systemd starts it: socket activation (systemd-socket-activate passes
the listening socket as fd 3 with LISTEN_FDS/LISTEN_PID, as svmmd.socket would), a client
call answered over it; and a PKCS#11 module that does not load leaves svmmd serving, with
the missing card watch logged and audited."""

from __future__ import annotations

import configparser
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from pam_svmm.adapters.launcher_client import call
from pam_svmm.config import LauncherConfig

ROOT = Path(__file__).resolve().parents[2]
ACTIVATE = shutil.which("systemd-socket-activate")

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(ACTIVATE is None, reason="systemd-socket-activate not installed"),
    pytest.mark.skipif(os.geteuid() != 0, reason="svmmd runs as root"),
]

CONFIG = """
[pkcs11]
module = "{base}/no-such-pkcs11-module.so"
[audit]
path = "{base}/audit/audit.jsonl"
syslog = false
[session]
allowlist_dir = "{base}/allowlist"
state_dir = "{base}/sessions"
[launcher]
socket = "{base}/sock/launcher.sock"
run_dir = "{base}/vms"
registry_dir = "{base}/registry"
"""


@pytest.fixture
def base() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="svmmd-sa-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_socket_activated_svmmd_serves_without_a_card_watch(base: Path) -> None:
    (base / "svmm.toml").write_text(CONFIG.format(base=base))
    sock = base / "sock" / "launcher.sock"
    sock.parent.mkdir(mode=0o755)
    daemon = subprocess.Popen(
        [ACTIVATE, "-l", str(sock), sys.executable, "-m", "pam_svmm.daemon.server",
         "--config", str(base / "svmm.toml")],
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while not sock.exists():  # systemd-socket-activate binds before it execs svmmd
            assert time.monotonic() < deadline and daemon.poll() is None
            time.sleep(0.05)
        reply = call(sock, {"op": "list"}, timeout=20)  # the first connection starts svmmd
        assert reply["ok"] and reply["data"]["allowlist"] == "no_allowlist", reply
    finally:
        daemon.send_signal(signal.SIGTERM)  # it exec'd svmmd: this pid is svmmd's
        out, _ = daemon.communicate(timeout=10)
    text = out.decode()
    assert "Execing" in text and "card removal is not watched" in text
    assert daemon.returncode == 0, text
    events = [json.loads(x) for x in (base / "audit" / "audit.jsonl").read_text().splitlines()]
    assert [(e["event"], e["reason"], e["outcome"]) for e in events] == [
        ("card_watch", "card_watch_unavailable", "error"),
        ("vm_list", "ok", "success"),
    ]
    assert "no-such-pkcs11-module.so" in events[0]["detail"]


def test_the_units_agree_with_the_configuration() -> None:
    units = ROOT / "config" / "systemd"
    socket_unit = configparser.ConfigParser(strict=False, interpolation=None)
    socket_unit.read(units / "svmmd.socket")
    assert socket_unit["Socket"]["ListenStream"] == str(LauncherConfig().socket)
    assert socket_unit["Socket"]["SocketMode"] == "0666"
    service = configparser.ConfigParser(strict=False, interpolation=None)
    service.read(units / "svmmd.service")
    # The console script pyproject.toml declares, in the venv the PAM shim uses by default.
    assert service["Service"]["ExecStart"] == "/opt/svmm/venv/bin/svmmd"
    scripts = tomllib.loads((units.parents[1] / "pyproject.toml").read_text())["project"]
    assert scripts["scripts"]["svmmd"] == "pam_svmm.daemon.server:main"
    assert "svmmd.socket" in service["Unit"]["Requires"]
