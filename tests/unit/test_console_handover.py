"""svmmd hands a console over only once QEMU has taken the connection (it accepts in its main
loop), so a second request meanwhile is told "console_busy" instead of queueing in QEMU's
listen backlog behind the first (a stand-in QMP that lags like QEMU may)."""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

from pam_svmm.services.launcher import _console_taken


class LaggingQmp:
    def __init__(self, lag: int) -> None:
        self.lag = lag  # query-chardev answers "disconnected" this many more times
        self.asked = 0

    def execute(self, command: str, arguments: Any = None, **_: Any) -> Any:
        assert command == "query-chardev"
        self.asked += 1
        name = "disconnected:unix:/run/x" if self.asked <= self.lag else "unix:/run/x,server"
        return [{"label": "monitor", "filename": "unix"}, {"label": "console", "filename": name}]


def test_waits_until_qemu_has_taken_the_connection() -> None:
    qmp = LaggingQmp(lag=3)
    assert _console_taken(SimpleNamespace(qmp=qmp), deadline=time.monotonic() + 5)
    assert qmp.asked == 4  # it asked again until QEMU said connected


def test_gives_up_at_the_deadline() -> None:
    qmp = LaggingQmp(lag=10**9)
    t0 = time.monotonic()
    assert not _console_taken(SimpleNamespace(qmp=qmp), deadline=t0 + 0.2)
    assert qmp.asked > 1
