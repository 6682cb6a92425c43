"""A graceful stop: the ACPI power button first, for a running guest only, then quit,
SIGTERM, SIGKILL (a stand-in QMP; the process is a real one that exits, or does not)."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

from pam_svmm.adapters.vm_registry import VmHandle, VmRecord


class Qmp:
    """Answers query-status with ``status``; on system_powerdown the 'guest' shuts down
    (the process is told to exit) when ``obeys``."""

    def __init__(self, process: subprocess.Popen[bytes], status: str, *, obeys: bool) -> None:
        self.process, self.state, self.obeys = process, status, obeys
        self.commands: list[str] = []

    def execute(self, command: str, arguments: Any = None, *, timeout: float | None = None) -> Any:
        self.commands.append(command)
        if command == "query-status":
            return {"status": self.state, "running": self.state == "running"}
        if command == "system_powerdown" and self.obeys:
            self.process.stdin.close()  # type: ignore[union-attr]
        if command == "quit":
            self.process.kill()
        return {}

    def close(self) -> None:
        pass


def handle(status: str, *, obeys: bool) -> tuple[VmHandle, Qmp]:
    # A 'guest' that runs until its stdin closes (the power button, when it obeys).
    p = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE
    )
    rec = VmRecord("vm-web", 10001, "alice", p.pid, 0, "/nonexistent/qmp.sock", "/nonexistent")
    qmp = Qmp(p, status, obeys=obeys)
    return VmHandle(rec, qmp, p), qmp  # type: ignore[arg-type]


def test_a_running_guest_that_obeys_the_power_button_ends_so() -> None:
    h, qmp = handle("running", obeys=True)
    assert h.powerdown(10) is True
    assert qmp.commands == ["query-status", "system_powerdown"]
    assert h.stop(quit_timeout=1, term_timeout=1, kill_timeout=1) == "exited"


def test_a_guest_that_ignores_it_is_quit_after_the_timeout() -> None:
    h, qmp = handle("running", obeys=False)
    assert h.powerdown(0.3) is False
    assert h.stop(quit_timeout=5, term_timeout=1, kill_timeout=1) == "quit"
    assert qmp.commands == ["query-status", "system_powerdown", "quit"]


def test_a_paused_or_held_guest_gets_no_power_button() -> None:
    for status in ("paused", "prelaunch"):
        h, qmp = handle(status, obeys=True)
        assert h.powerdown(10) is False  # nobody could answer it: no waiting
        assert "system_powerdown" not in qmp.commands
        h.stop(quit_timeout=5, term_timeout=1, kill_timeout=1)
