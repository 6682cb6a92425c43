"""systemd-logind: which session a process belongs to, and locking a session.

A pulled card locks the sessions it opened, as pam_pkcs11's card event manager and SSSD do:
``loginctl lock-session ID`` asks logind to send the session's Lock signal, which the
session's screen locker (GNOME, KDE, light-locker, physlock...) acts on. A process belongs to
the session whose scope (``session-ID.scope``) holds it in the cgroup tree (what
sd_pid_get_session() reads).
"""

from __future__ import annotations

import re
import subprocess

from ..errors import SvmmError

LOGINCTL = "/usr/bin/loginctl"
LOCK_TIMEOUT = 5.0  # seconds for loginctl to answer
# logind's session ids: decimal for logins, "c" and a number for other sessions.
_SESSION_ID = re.compile(r"[A-Za-z0-9]{1,32}")
_SCOPE = re.compile(r"/session-([A-Za-z0-9]{1,32})\.scope(?:/|$)")


class LockFailed(SvmmError):
    reason = "session_lock_failed"


def valid_session_id(text: object) -> str | None:
    """``text`` if it has the shape of a logind session id, else None."""
    return text if isinstance(text, str) and _SESSION_ID.fullmatch(text) else None


def session_of_pid(pid: int, proc: str = "/proc") -> str | None:
    """The logind session ``pid`` belongs to (None: none, or the process is gone)."""
    try:
        with open(f"{proc}/{int(pid)}/cgroup", encoding="ascii", errors="replace") as f:
            text = f.read(65536)
    except (OSError, ValueError):
        return None
    for line in text.splitlines():
        path = line.split(":", 2)[-1]
        if m := _SCOPE.search(path):
            return m.group(1)
    return None


def lock_session(session_id: str, *, loginctl: str = LOGINCTL) -> None:
    """Ask logind to lock ``session_id``; LockFailed says why it did not."""
    if valid_session_id(session_id) is None:
        raise LockFailed(f"not a logind session id: {session_id!r}")
    try:
        done = subprocess.run(
            [loginctl, "lock-session", session_id],
            capture_output=True,
            timeout=LOCK_TIMEOUT,
            env={"PATH": "/usr/bin:/bin", "LC_ALL": "C", "SYSTEMD_PAGER": "cat"},
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise LockFailed(f"loginctl lock-session {session_id}: {type(e).__name__}") from None
    if done.returncode != 0:
        said = done.stderr.decode("utf-8", "replace").strip()[:200]
        raise LockFailed(
            f"loginctl lock-session {session_id}: exit {done.returncode}: {said}".rstrip(": ")
        )
