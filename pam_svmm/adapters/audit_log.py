"""Writes audit records: an append-only, hash-chained JSON-lines file and a syslog mirror.

One record is one `write(2)` on an O_APPEND descriptor under an exclusive flock, so
concurrent logins never interleave or lose lines. Under that lock the writer reads only the
last line (seeking back from the end), gives the record the next ``seq`` and the hash of that
line as ``prev`` (see domain/audit_chain.py), appends a seal after every ``seal_every``
records in the same write, then replaces the head file (``<log>.head``: last seq, hash, MAC)
atomically. The log and the head are opened without following symlinks and created 0600 in
a 0700 directory. Without a seal key the chain is written but neither seals nor a head.

The seal key is a root-only file (0600, owned by root or by us); one that group or others
can read is refused. A missing key is created with 32 random bytes, published with link(2)
so that concurrent first writers agree on one key and nobody reads a half-written one.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import secrets
import stat
import syslog
from pathlib import Path

from ..domain import audit_chain
from ..domain.audit_record import AuditRecord
from ..errors import SvmmError

KEY_BYTES = 32
_TAIL_CHUNK = 8192


class AuditWriteError(SvmmError):
    """The audit trail could not be written."""

    reason = "audit_write_failed"


class SealKeyError(AuditWriteError):
    """The audit seal key is missing, unreadable or not root-only."""

    reason = "audit_seal_key"


def head_path(log_path: Path) -> Path:
    return log_path.with_name(log_path.name + ".head")


class AuditLog:
    def __init__(
        self,
        path: Path,
        *,
        syslog_mirror: bool = True,
        seal_key: Path | None = None,
        seal_every: int = 100,
    ) -> None:
        if seal_every < 1:
            raise ValueError("seal_every must be at least 1")
        self.path = path
        self.syslog_mirror = syslog_mirror
        self.seal_key = seal_key
        self.seal_every = seal_every
        self._key: bytes | None = None

    def write(self, record: AuditRecord) -> None:
        key = self._load_key()
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(
                self.path,
                os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o600,
            )
        except OSError as e:
            raise AuditWriteError(f"cannot open audit log {self.path}: {e.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            seq, last_hash, seal = self._append(fd, record, key)
        except OSError as e:
            raise AuditWriteError(f"cannot write audit log {self.path}: {e.strerror}") from None
        finally:
            os.close(fd)  # releases the lock
        if self.syslog_mirror:
            self._mirror(record, seq, last_hash if seal else "")

    def _append(self, fd: int, record: AuditRecord, key: bytes | None) -> tuple[int, str, bool]:
        """Under the lock: the record (and a seal when due) in one write, then the head."""
        size = os.fstat(fd).st_size
        last = _last_line(fd, size) if size else None
        # A torn last line (a failed write) is closed off so it cannot swallow ours.
        prefix = b"\n" if last is not None and not last.endswith(b"\n") else b""
        if prefix:
            last = last + prefix if last is not None else None
        unchained = last is not None and audit_chain.chain_fields(last) is None
        seq, prev = audit_chain.next_link(last, self._head_seq() if unchained else 0)
        fields = record.to_dict()
        line = audit_chain.chain_line(fields, seq, prev)
        data, last_seq, last_line = prefix + line, seq, line
        sealed = False
        if key is not None and audit_chain.is_seal_seq(seq + 1, self.seal_every):
            last_line = audit_chain.seal_line(
                seq + 1, audit_chain.line_hash(line), key, fields["time"]
            )
            data, last_seq, sealed = data + last_line, seq + 1, True
        written = os.write(fd, data)
        if written != len(data):
            raise AuditWriteError(f"short write to audit log {self.path}")
        last_hash = audit_chain.line_hash(last_line)
        if key is not None:
            os.fdatasync(fd)  # the head must never say more than the disk holds
            self._write_head(audit_chain.head_bytes(last_seq, last_hash, key))
        return seq, last_hash, sealed

    # --- the head ---------------------------------------------------------------------------

    def _head_seq(self) -> int:
        try:
            fd = os.open(head_path(self.path), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return 0
        try:
            head = audit_chain.parse_head(os.read(fd, 4096))
        finally:
            os.close(fd)
        return head.seq if head else 0

    def _write_head(self, data: bytes) -> None:
        target = head_path(self.path)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        fd = os.open(
            tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
        )
        try:
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, target)  # rename replaces a planted symlink, never follows it
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        dfd = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

    # --- the key ----------------------------------------------------------------------------

    def _load_key(self) -> bytes | None:
        if self.seal_key is None:
            return None
        if self._key is None:
            self._key = load_seal_key(self.seal_key, create=True)
        return self._key

    def _mirror(self, record: AuditRecord, seq: int, seal_hash: str) -> None:
        # The mirror leaves the host: seq numbers and seal hashes let an auditor notice a log
        # (and head) rolled back to an older state, which the local chain cannot show.
        syslog.openlog("svmm", syslog.LOG_PID, syslog.LOG_AUTHPRIV)
        priority = syslog.LOG_INFO if record.outcome.value == "success" else syslog.LOG_NOTICE
        syslog.syslog(priority, f"{record.syslog_line()} seq={seq}")
        if seal_hash:
            syslog.syslog(syslog.LOG_INFO, f"event=seal seq={seq + 1} hash={seal_hash}")


def _last_line(fd: int, size: int) -> bytes:
    """The file's last line (with its newline, if it has one), reading back from the end."""
    end = size
    buf = b""
    while end > 0:
        start = max(0, end - _TAIL_CHUNK)
        buf = os.pread(fd, end - start, start) + buf
        end = start
        cut = buf.rfind(b"\n", 0, len(buf) - 1)
        if cut >= 0:
            return buf[cut + 1 :]
    return buf


def load_seal_key(path: Path, *, create: bool = False) -> bytes:
    """The seal key from its root-only file; with ``create``, made on first use if missing.

    Raises SealKeyError naming the file if it is missing (without ``create``), not a regular
    file, readable or writable by group or others, owned by someone else, or too short.
    """
    for _ in range(3):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            if not create:
                raise SealKeyError(f"audit seal key {path} does not exist") from None
            _create_key(path)
            continue
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise SealKeyError(f"audit seal key {path} is a symlink; refused") from None
            raise SealKeyError(f"cannot read audit seal key {path}: {e.strerror}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise SealKeyError(f"audit seal key {path} is not a regular file")
            if st.st_uid not in (0, os.geteuid()):
                raise SealKeyError(
                    f"audit seal key {path} is owned by uid {st.st_uid}; it must be root's"
                )
            if st.st_mode & 0o077:
                raise SealKeyError(
                    f"audit seal key {path} has mode {stat.S_IMODE(st.st_mode):04o}; group and "
                    "others must have no access (chmod 0600)"
                )
            key = os.read(fd, 4096)
        finally:
            os.close(fd)
        if len(key) < KEY_BYTES:
            raise SealKeyError(f"audit seal key {path} is shorter than {KEY_BYTES} bytes")
        return key
    raise SealKeyError(f"audit seal key {path} keeps disappearing")


def _create_key(path: Path) -> None:
    """A fresh key, complete on disk before it appears at ``path`` (link fails if one won)."""
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        fd = os.open(
            tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
        )
        try:
            try:
                os.write(fd, secrets.token_bytes(KEY_BYTES))
                os.fsync(fd)
            finally:
                os.close(fd)
            # Another writer may have created it first: then use theirs.
            with contextlib.suppress(FileExistsError):
                os.link(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
    except OSError as e:
        raise SealKeyError(f"cannot create audit seal key {path}: {e.strerror}") from None
