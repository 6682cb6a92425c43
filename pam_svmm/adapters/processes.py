"""Is that process still the one we knew? A pid and its start time (from the kernel).

A pid alone is not an identity: pids are reused. Session records, svmmd's PAM transactions
and the VM registry all keep the start time beside the pid (/proc/PID/stat field 22, clock
ticks since boot) and ask here whether the process behind them is alive (invariant 12).
"""

from __future__ import annotations


def start_time(pid: int) -> int | None:
    """The start time of ``pid``; None when it is gone or a zombie."""
    try:
        with open(f"/proc/{int(pid)}/stat", "rb") as f:
            text = f.read().decode("ascii", "replace")
    except (OSError, ValueError):
        return None
    fields = text[text.rindex(")") + 2 :].split()  # the name may hold spaces and ')'
    if len(fields) < 20 or fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def _is_pid(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value < 1 << 22


def alive(pid: object, started: object = None) -> bool:
    """``pid`` runs and, when ``started`` (an int) is known, is the same process. Anything
    that is not a pid is not alive (a record without one proves no session)."""
    if not _is_pid(pid):
        return False
    now = start_time(pid)  # type: ignore[arg-type]
    if now is None:
        return False
    if isinstance(started, int) and not isinstance(started, bool):
        return now == started
    return True
