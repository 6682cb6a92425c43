"""Writes audit records: an append-only JSON-lines file and a syslog mirror (LOG_AUTHPRIV).

One record is one `write(2)` on an O_APPEND descriptor under an exclusive flock, so
concurrent logins never interleave or lose lines. The file is opened without following
symlinks and created 0600 in a 0700 directory.
"""

from __future__ import annotations

import fcntl
import os
import syslog
from pathlib import Path

from ..domain.audit_record import AuditRecord
from ..errors import SvmmError


class AuditWriteError(SvmmError):
    """The audit trail could not be written."""

    reason = "audit_write_failed"


class AuditLog:
    def __init__(self, path: Path, *, syslog_mirror: bool = True) -> None:
        self.path = path
        self.syslog_mirror = syslog_mirror

    def write(self, record: AuditRecord) -> None:
        line = (record.to_json() + "\n").encode("ascii")
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(
                self.path,
                os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o600,
            )
        except OSError as e:
            raise AuditWriteError(f"cannot open audit log {self.path}: {e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            written = os.write(fd, line)
            if written != len(line):
                raise AuditWriteError(f"short write to audit log {self.path}")
        except OSError as e:
            raise AuditWriteError(f"cannot write audit log {self.path}: {e.strerror}") from None
        finally:
            os.close(fd)
        if self.syslog_mirror:
            syslog.openlog("svmm", syslog.LOG_PID, syslog.LOG_AUTHPRIV)
            priority = syslog.LOG_INFO if record.outcome.value == "success" else syslog.LOG_NOTICE
            syslog.syslog(priority, record.syslog_line())
