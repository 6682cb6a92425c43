"""Writes audit records: an append-only, hash-chained JSON-lines file and a syslog mirror.

One record is one `write(2)` on an O_APPEND descriptor under an exclusive flock, so
concurrent logins never interleave or lose lines. Under that lock the writer reads only the
end of the file (seeking back), gives the record the next ``seq`` and the hash of the last
line as ``prev`` (see domain/audit_chain.py), appends a seal after every ``seal_every``
records (a write of its own), fdatasyncs, then replaces the head file (``<log>.head``: last
seq, hash, MAC) atomically. The log and the head are opened without following symlinks and
created 0600 in a 0700 directory. Without a seal key the chain is written but neither seals
nor a head.

All or nothing: a record stands when its line is whole and fdatasync said so; then
``write`` returns (a head that could not be renewed changes nothing: the record is on
disk, and the next write renews the head). Anything less (ENOSPC, EIO, a short write) is
AuditWriteError, and the file is as it was or ends in a torn fragment: the record is the
last line of its write, so it is never left whole by a failure. (A failed fdatasync leaves
the line whole: the writer then appends, if it can, a record saying its decision was
refused.) The next writer finds a torn tail, removes nothing, closes it off and notes it in
a gap record chained to the last whole line (domain/audit_chain.py). Whether a decision
that could not be audited stands is ``disk_full_action``'s: REFUSE (raise) or ALLOW (an
alert to syslog, and ``write`` returns).

The seal key is a root-only file (0600, owned by root or by us); one that group or others
can read is refused. A missing key is created with 32 random bytes, published with link(2)
so that concurrent first writers agree on one key and nobody reads a half-written one.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import hmac
import os
import secrets
import stat
import syslog
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ..domain import audit_chain
from ..domain.audit_record import AuditRecord
from ..domain.settings import DiskFullAction
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
        disk_full_action: DiskFullAction = DiskFullAction.REFUSE,
    ) -> None:
        if seal_every < 1:
            raise ValueError("seal_every must be at least 1")
        self.path = path
        self.syslog_mirror = syslog_mirror
        self.seal_key = seal_key
        self.seal_every = seal_every
        self.disk_full_action = disk_full_action
        self._key: bytes | None = None

    def write(self, record: AuditRecord) -> None:
        """Append ``record``: when this returns, its line is whole and on disk.

        AuditWriteError when it is not (the file is then as it was, or ends in a torn tail
        the next write notes), unless ``disk_full_action`` is ALLOW: then the decision
        stands, and the failure goes to syslog as an alert. A failed head update after the
        line is on disk is no failure: the record stands (and the next write renews the head).
        """
        try:
            self._write(record)
        except AuditWriteError as e:
            if self.disk_full_action is DiskFullAction.ALLOW:
                _alarm(
                    syslog.LOG_ALERT,
                    f"audit record NOT written, the decision stands (disk_full_action = allow): "
                    f"{e.message}: {record.syslog_line()}",
                )
                return
            _alarm(
                syslog.LOG_ERR,
                f"audit record not written, the decision is refused: {e.message}: "
                f"{record.syslog_line()}",
            )
            raise

    def _write(self, record: AuditRecord) -> None:
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
            done = self._append(fd, record, key)
        except OSError as e:
            raise AuditWriteError(f"cannot write audit log {self.path}: {e.strerror}") from None
        finally:
            os.close(fd)  # releases the lock
        if self.syslog_mirror:
            self._mirror(record, done)

    def _append(self, fd: int, record: AuditRecord, key: bytes | None) -> _Appended:
        """Under the lock: [a torn tail's gap record and] the record in one write, the seal
        when due in a second one, fdatasync, then the head. The record is the last line of
        the first write, so a short write never leaves it whole."""
        size = os.fstat(fd).st_size
        tail = _read_tail(fd, size)
        fields = record.to_dict()
        time = str(fields["time"])
        close = audit_chain.TORN_CLOSE if tail.open else b""
        gap: tuple[int, int, str] | None = None
        if tail.torn and self._note_gap(tail, key):
            chain = _Chain(*audit_chain.next_link(tail.whole), key, self.seal_every, time)
            torn = os.pread(fd, size - tail.end, tail.end) + close
            after = chain.seq - 1
            host = str(fields.get("host", ""))
            chain.add(lambda seq, prev: audit_chain.gap_line(torn, after, seq, prev, time, host))
            gap = (chain.seq - 1, len(torn), hashlib.sha256(torn).hexdigest())
        else:
            if tail.torn:
                _alarm(
                    syslog.LOG_WARNING,
                    f"audit log {self.path}: its last lines are no torn write the head file "
                    "allows; svmm audit verify reports them",
                )
            # The last line as it stands (closed off if torn) is hashed: the chain binds it.
            last = _last_line(fd, size) + close if tail.torn else tail.whole
            unchained = last is not None and audit_chain.chain_fields(last) is None
            start = audit_chain.next_link(last, self._head_seq() if unchained else 0)
            chain = _Chain(*start, key, self.seal_every, time)
        seq = chain.add(lambda s, prev: audit_chain.chain_line(fields, s, prev))
        _write_exactly(fd, close + chain.data(), self.path)
        end_seq, end_hash = seq, chain.prev
        seal_hash = ""
        if key is not None and audit_chain.is_seal_seq(chain.seq, self.seal_every):
            seal = audit_chain.seal_line(chain.seq, chain.prev, key, time)
            if _write_quietly(fd, seal):  # else torn or missing: the next write seals again
                end_seq, end_hash = chain.seq, audit_chain.line_hash(seal)
                seal_hash = end_hash
        try:
            os.fdatasync(fd)  # the head must never say more than the disk holds
        except OSError as e:
            if self.disk_full_action is DiskFullAction.REFUSE:
                self._unconfirmed(fd, seq, end_seq + 1, end_hash, key, time)
            raise AuditWriteError(
                f"audit log {self.path}: record seq {seq} is not confirmed on disk: {e.strerror}"
            ) from None
        if key is not None:
            self._renew_head(end_seq, end_hash, key)
        return _Appended(seq, seal_hash, gap)

    def _note_gap(self, tail: _Tail, key: bytes | None) -> bool:
        """Whether the torn region after ``tail.whole`` is one to note. With a key, the head
        must not know of a record after that line: else the region may be records cut
        away, which the writer must never bless."""
        if tail.size - tail.end > audit_chain.MAX_TORN_BYTES:
            return False
        fields = audit_chain.chain_fields(tail.whole) if tail.whole is not None else None
        if tail.whole is not None and fields is None:
            return False  # after a line that is no chain line: verify reports that line
        if key is None:
            return True  # no head to ask (the chain alone cannot tell: domain/audit_chain.py)
        whole_seq = fields[0] if fields else 0
        head = self._head(key)
        if head is None or head.seq < whole_seq:
            # No head, or one a failed head update left behind: nothing was committed after
            # the whole line. (Whoever can delete the head can cut records anyway: the
            # syslog mirror is the evidence for that, as the module docstring says.)
            return True
        if head.seq > whole_seq:
            return False
        return tail.whole is None or hmac.compare_digest(
            head.hash, audit_chain.line_hash(tail.whole)
        )

    def _unconfirmed(
        self, fd: int, seq: int, next_seq: int, prev: str, key: bytes | None, time: str
    ) -> None:
        """After a failed fdatasync the record's line is whole in the file but not known to
        be on disk, and its decision is refused: say so in the chain, if the disk lets us."""
        chain = _Chain(next_seq, prev, key, self.seal_every, time)
        note = {
            "event": "audit_write_failed",
            "outcome": "error",
            "reason": "audit_sync_failed",
            "time": time,
            "detail": f"the record at seq {seq} was not confirmed on disk: its decision was "
            "refused, whatever it says",
        }
        chain.add(lambda s, prev: audit_chain.chain_line(note, s, prev))
        if _write_quietly(fd, chain.data()):
            with contextlib.suppress(OSError):
                os.fdatasync(fd)

    def _renew_head(self, seq: int, last_hash: str, key: bytes) -> None:
        """The head now names the line just written. If that fails the record still stands
        (it is on disk); verify reports the records past the head until the next write."""
        try:
            self._write_head(audit_chain.head_bytes(seq, last_hash, key))
        except OSError as e:
            _alarm(
                syslog.LOG_ERR,
                f"audit head {head_path(self.path)} not renewed ({e.strerror}): it ends before "
                f"seq {seq}, which is on disk; the next record renews it",
            )

    # --- the head ---------------------------------------------------------------------------

    def _head_seq(self) -> int:
        head = self._read_head()
        return head.seq if head else 0

    def _head(self, key: bytes) -> audit_chain.Head | None:
        """The head file, if there is one and its MAC verifies."""
        head = self._read_head()
        return head if head is not None and audit_chain.head_mac_ok(head, key) else None

    def _read_head(self) -> audit_chain.Head | None:
        try:
            fd = os.open(head_path(self.path), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            return audit_chain.parse_head(os.read(fd, 4096))
        finally:
            os.close(fd)

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

    def _mirror(self, record: AuditRecord, done: _Appended) -> None:
        # The mirror leaves the host: seq numbers and seal hashes let an auditor notice a log
        # (and head) rolled back to an older state, which the local chain cannot show.
        syslog.openlog("svmm", syslog.LOG_PID, syslog.LOG_AUTHPRIV)
        if done.gap is not None:
            gap_seq, size, digest = done.gap
            syslog.syslog(
                syslog.LOG_WARNING,
                f"event={audit_chain.GAP_EVENT} seq={gap_seq} torn_bytes={size} "
                f"torn_sha256={digest}",
            )
        priority = syslog.LOG_INFO if record.outcome.value == "success" else syslog.LOG_NOTICE
        syslog.syslog(priority, f"{record.syslog_line()} seq={done.seq}")
        if done.seal_hash:
            syslog.syslog(syslog.LOG_INFO, f"event=seal seq={done.seq + 1} hash={done.seal_hash}")


@dataclass(frozen=True)
class _Appended:
    seq: int  # the record's
    seal_hash: str  # the seal written after it, if one was
    gap: tuple[int, int, str] | None  # the torn region noted before it: gap seq, bytes, sha256


@dataclass(frozen=True)
class _Tail:
    """The end of the log: a torn region from ``end`` to ``size`` (none: equal), and the last
    whole line before it."""

    end: int
    size: int
    whole: bytes | None  # None: nothing before the region
    open: bool  # the file does not end with a newline: a fragment not closed yet

    @property
    def torn(self) -> bool:
        return self.end < self.size


def _read_tail(fd: int, size: int) -> _Tail:
    """Back from the end: the fragment a failed write left (no newline), the fragments
    earlier writers closed (TORN_CLOSE), then the last whole line."""
    end = size
    line = _last_line(fd, end) if end else None
    is_open = line is not None and not line.endswith(b"\n")
    while line is not None and size - end <= audit_chain.MAX_TORN_BYTES:
        if line.endswith(b"\n") and not line.endswith(audit_chain.TORN_CLOSE):
            break
        end -= len(line)
        line = _last_line(fd, end) if end else None
    return _Tail(end, size, line, is_open)


class _Chain:
    """The lines to append after a line: each new line gets the next seq and its hash as
    ``prev``; a seal takes its slot when one comes up (a seal an earlier write lost)."""

    def __init__(self, seq: int, prev: str, key: bytes | None, seal_every: int, time: str) -> None:
        self.seq, self.prev = seq, prev  # for the next line
        self._key, self._every, self._time = key, seal_every, time
        self._lines: list[bytes] = []

    def add(self, make: Callable[[int, str], bytes]) -> int:
        """Append ``make(seq, prev)``, after a seal if its slot is due; the seq it got."""
        if self._key is not None and audit_chain.is_seal_seq(self.seq, self._every):
            self._put(audit_chain.seal_line(self.seq, self.prev, self._key, self._time))
        seq = self.seq
        self._put(make(seq, self.prev))
        return seq

    def _put(self, line: bytes) -> None:
        self._lines.append(line)
        self.seq, self.prev = self.seq + 1, audit_chain.line_hash(line)

    def data(self) -> bytes:
        return b"".join(self._lines)


def _write_exactly(fd: int, data: bytes, path: Path) -> None:
    """One write(2) of ``data``; a short one is a failure (what it wrote is a torn tail)."""
    written = os.write(fd, data)
    if written != len(data):
        raise AuditWriteError(
            f"short write to audit log {path}: {written} of {len(data)} bytes (disk full?)"
        )


def _write_quietly(fd: int, data: bytes) -> bool:
    """A write whose failure changes no outcome: whether all of ``data`` was written."""
    try:
        return os.write(fd, data) == len(data)
    except OSError:
        return False


def _alarm(priority: int, text: str) -> None:
    """The audit trail's own trouble, to syslog whatever ``syslog_mirror`` says."""
    syslog.openlog("svmm", syslog.LOG_PID, syslog.LOG_AUTHPRIV)
    syslog.syslog(priority, text)


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
