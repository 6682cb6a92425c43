"""Drive the real PAM stack from the lab and the tests.

Two PAM applications, both run as separate processes with pam_wrapper preloaded so PAM reads
the lab's service files instead of /etc/pam.d:

* ``pamclient.c``, built on first use: authenticate, acct_mgmt, setcred, and a JSON report of
  each code, every message the modules showed and the final PAM_USER; in session mode
  (``start_session``) it then opens a PAM session and holds it until told to close it;
* ``pamtester``, Debian's generic PAM test application, for whole-process runs.

The PIN always goes on stdin, never in argv. python-pam cannot be the client here: it would
load pam_python (and so a second Python runtime) into a Python process, which crashes.
"""

from __future__ import annotations

import json
import os
import select
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .cbuild import build_c

PAM_WRAPPER_LIB = Path("/usr/lib/x86_64-linux-gnu/libpam_wrapper.so")
SOURCE = Path(__file__).with_name("pamclient.c")

# The PAM codes the tests and the demo talk about (Linux-PAM values).
CODE_NAMES = {
    0: "PAM_SUCCESS",
    3: "PAM_SERVICE_ERR",
    4: "PAM_SYSTEM_ERR",
    6: "PAM_PERM_DENIED",
    7: "PAM_AUTH_ERR",
    9: "PAM_AUTHINFO_UNAVAIL",
    10: "PAM_USER_UNKNOWN",
    11: "PAM_MAXTRIES",
    19: "PAM_CONV_ERR",
    14: "PAM_SESSION_ERR",
    25: "PAM_IGNORE",
}
PAM_ERROR_MSG = 3
PAM_TEXT_INFO = 4


def pam_env(service_dir: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment that makes a process use the lab's PAM service files."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PAM_WRAPPER", "LD_PRELOAD"))}
    env.update(
        {
            "LD_PRELOAD": str(PAM_WRAPPER_LIB),
            "PAM_WRAPPER": "1",
            "PAM_WRAPPER_SERVICE_DIR": str(service_dir),
        }
    )
    env.update(extra or {})
    return env


@dataclass(frozen=True)
class PamReport:
    code: int
    step: str  # the PAM call that gave ``code`` (authenticate, acct_mgmt, setcred)
    reason: str  # pam_strerror
    messages: tuple[str, ...]  # info and error messages (prompts excluded)
    prompts: tuple[str, ...]
    user: str  # PAM_USER at the end
    session_open: int | None = None  # pam_open_session's code (session mode, once called)
    session_close: int | None = None  # pam_close_session's code

    @property
    def name(self) -> str:
        return CODE_NAMES.get(self.code, str(self.code))

    @property
    def ok(self) -> bool:
        return self.code == 0


def build_client(out_dir: Path) -> Path:
    return build_c(SOURCE, out_dir, suffix="", libs=("-lpam",))


def run_client(
    client: Path,
    service_dir: Path,
    service: str,
    user: str,
    pin: str,
    *,
    env: dict[str, str] | None = None,
    timeout: float = 60,
) -> PamReport:
    proc = subprocess.run(
        [str(client), service, user],
        input=pin + "\n",
        capture_output=True,
        text=True,
        env=pam_env(service_dir, env),
        timeout=timeout,
        check=False,
    )
    return _report(proc.stdout, proc.returncode, proc.stderr)


def _report(stdout: str, returncode: int | None, stderr: str) -> PamReport:
    lines = [ln for ln in stdout.splitlines() if ln.startswith(('{"messages"', '{"step"'))]
    if returncode != 0 or not lines:
        raise RuntimeError(f"PAM client failed ({returncode}): {stderr[-2000:]}")
    data = json.loads(lines[-1])
    msgs = data.get("messages", [])

    def code(name: str) -> int | None:
        value = data.get(name, -1)
        return None if value == -1 else int(value)

    return PamReport(
        code=int(data["code"]),
        step=str(data.get("step", "")),
        reason=str(data.get("reason", "")),
        messages=tuple(m["text"] for m in msgs if m["style"] in (PAM_ERROR_MSG, PAM_TEXT_INFO)),
        prompts=tuple(m["text"] for m in msgs if m["style"] not in (PAM_ERROR_MSG, PAM_TEXT_INFO)),
        user=str(data.get("user", "")),
        session_open=code("session_open"),
        session_close=code("session_close"),
    )


class PamSession:
    """A PAM client process that logged in and holds its PAM session open until ``close()``.

    ``opened`` is pam_open_session's code (None: the login failed before it; ``report`` then
    holds the final report already)."""

    def __init__(
        self, proc: subprocess.Popen[bytes], stderr: Any, timeout: float, *, pause: bool = False
    ) -> None:
        self.proc = proc
        self._stderr = stderr
        self._out = b""
        self.opened: int | None = None
        self.authenticated: int | None = None
        self.report: PamReport | None = None
        self.pid = proc.pid
        if pause:
            line = self._wait_for('{"authenticated"', timeout)
            if line is not None:
                self.authenticated = int(json.loads(line)["authenticated"])
            return
        self._open(timeout)

    def resume(self, *, timeout: float = 60) -> None:
        """Pause mode: go on to pam_open_session; returns once it answered."""
        assert self.proc.stdin is not None and self.report is None
        self.proc.stdin.write(b"\n")
        self.proc.stdin.flush()
        self._open(timeout)

    def _open(self, timeout: float) -> None:
        line = self._wait_for('{"session_open"', timeout)
        if line is not None:
            self.opened = int(json.loads(line)["session_open"])

    def _wait_for(self, prefix: str, timeout: float) -> str | None:
        """The first stdout line starting with ``prefix``; None when the client ended first
        (its report is then in ``report``)."""
        deadline = time.monotonic() + timeout
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while True:
            for line in self._out.decode(errors="replace").splitlines():
                if line.startswith(prefix):
                    self._out = self._out.replace(line.encode(), b"", 1)
                    return line
            left = deadline - time.monotonic()
            if left <= 0:
                self._kill()
                raise RuntimeError(f"PAM client: no {prefix}...}} line in time")
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                continue
            chunk = os.read(fd, 65536)
            if not chunk:  # the login failed: the process wrote its report and ended
                self._finish(timeout)
                return None
            self._out += chunk

    @property
    def ok(self) -> bool:
        return self.opened == 0

    def close(self, *, timeout: float = 60, signal: int | None = None) -> PamReport:
        """End the session (a line on stdin, or ``signal``); the final report."""
        if self.report is not None:
            return self.report
        if signal is not None:
            self.proc.send_signal(signal)
        else:
            assert self.proc.stdin is not None
            self.proc.stdin.write(b"\n")
            self.proc.stdin.flush()
        return self._finish(timeout)

    def _finish(self, timeout: float) -> PamReport:
        try:
            out, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._kill()
            raise
        self._out += out or b""
        self._stderr.seek(0)
        err = self._stderr.read().decode(errors="replace")
        self._stderr.close()
        self.report = _report(self._out.decode(errors="replace"), self.proc.returncode, err)
        return self.report

    def _kill(self) -> None:
        self.proc.kill()
        self.proc.wait()

    def __enter__(self) -> PamSession:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.report is None:
            if exc[0] is None:
                self.close()
            else:
                self._kill()


def start_session(
    client: Path,
    service_dir: Path,
    service: str,
    user: str,
    pin: str,
    *,
    env: dict[str, str] | None = None,
    timeout: float = 60,
    pause: bool = False,
) -> PamSession:
    """Log in and open a PAM session in a new client process; returns once it is open
    (``pause``: once authenticated, before the session; ``PamSession.resume`` opens it)."""
    # stderr to a file: a chatty module must not block the client on a full pipe
    stderr = tempfile.TemporaryFile()  # noqa: SIM115 - PamSession closes it
    proc = subprocess.Popen(
        [str(client), service, user, "pause" if pause else "session"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=stderr,
        env=pam_env(service_dir, env),
    )
    assert proc.stdin is not None
    proc.stdin.write(pin.encode() + b"\n")
    proc.stdin.flush()
    return PamSession(proc, stderr, timeout, pause=pause)
