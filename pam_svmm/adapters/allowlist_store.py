"""The per-user VM allowlists under /run and the session records that refcount them.

Invariant 5 for the files the launcher trusts: ``<allowlist_dir>/<uid>.json`` is root:root
0644 in a root-owned 0755 folder whose parents nobody else can write, and it is only ever
replaced whole: a temp file made O_EXCL|O_NOFOLLOW next to it (relative to the folder's
descriptor, so a renamed or swapped path is never followed), fchmod/fchown, fsync, renameat,
fsync of the folder. rename(2) replaces a symlink or a stranger's file planted at the target
instead of writing through it; a planted temp name only costs another random name.

``SessionRecords`` keeps, per uid, which sessions are open (``<state_dir>/<uid>.json``, in a
root-only 0700 folder), changed only under an exclusive flock of ``<uid>.lock``, so that
sessions of one user opening and closing at once see each other (the refcount).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import secrets
import stat
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..domain.bounded import loads_json
from ..errors import InputMalformed, SessionFailed
from .private_dir import open_private_dir

ALLOWLIST_MODE = 0o644
ALLOWLIST_DIR_MODE = 0o755
STATE_FORMAT = "svmm-sessions/1"
MAX_FILE_BYTES = 4 << 20  # an allowlist or a user's session records; far above real ones
_TEMP_TRIES = 8
log = logging.getLogger(__name__)


def _temp_name(final: str) -> str:
    """A fresh temp name beside ``final`` (a function, so tests can plant a file on it)."""
    return f".{final}.{secrets.token_hex(8)}.tmp"


def _owner_ok(uid: int) -> bool:
    # root's, or the test runner's own when the suite does not run as root
    return uid in (0, os.geteuid())


def _encode(document: Mapping[str, Any]) -> bytes:
    return (json.dumps(document, sort_keys=True, indent=1, ensure_ascii=True) + "\n").encode()


def _fail(what: str, path: Path, e: OSError, reason: str = "session_failed") -> SessionFailed:
    return SessionFailed(f"cannot {what} {path}: {e.strerror or e}", reason=reason)


def replace_file(dir_fd: int, name: str, data: bytes, *, mode: int, shown: Path) -> None:
    """Atomically make ``name`` (in the folder ``dir_fd``) hold ``data``, root-owned, ``mode``.

    ``shown`` is the path used in error messages."""
    fd = -1
    temp = ""
    for _ in range(_TEMP_TRIES):
        temp = _temp_name(name)
        try:
            fd = os.open(
                temp,
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o600,
                dir_fd=dir_fd,
            )
            break
        except FileExistsError:
            continue  # someone's file (or symlink) is there: never touch it, take another name
        except OSError as e:
            raise _fail("create a temp file for", shown, e) from None
    else:
        raise SessionFailed(f"cannot create a temp file for {shown}: every name was taken")
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fchmod(fd, mode)
            if os.geteuid() == 0:
                os.fchown(fd, 0, 0)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(temp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        temp = ""
        os.fsync(dir_fd)
    except OSError as e:
        raise _fail("write", shown, e) from None
    finally:
        if temp:
            with contextlib.suppress(OSError):
                os.unlink(temp, dir_fd=dir_fd)


def read_file(dir_fd: int, name: str, *, mode: int, shown: Path) -> bytes | None:
    """The bytes of ``name`` if it is a root-owned regular file of exactly ``mode``; None if
    there is none; SessionFailed (reason ``allowlist_tampered``) for anything else."""
    try:
        fd = os.open(
            name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=dir_fd
        )
    except FileNotFoundError:
        return None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise SessionFailed(f"{shown} is a symlink", reason="allowlist_tampered") from None
        raise _fail("read", shown, e) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SessionFailed(f"{shown} is not a regular file", reason="allowlist_tampered")
        if not _owner_ok(st.st_uid) or stat.S_IMODE(st.st_mode) != mode:
            raise SessionFailed(
                f"{shown} has owner uid {st.st_uid} and mode {stat.S_IMODE(st.st_mode):o}, "
                f"not root and {mode:o}",
                reason="allowlist_tampered",
            )
        chunks = []
        size = 0
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
            size += len(chunk)
            if size > MAX_FILE_BYTES:
                raise SessionFailed(
                    f"{shown} is larger than {MAX_FILE_BYTES} bytes", reason="allowlist_tampered"
                )
        return b"".join(chunks)
    except OSError as e:
        raise _fail("read", shown, e) from None
    finally:
        os.close(fd)


def remove_file(dir_fd: int, name: str, *, shown: Path) -> bool:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return False
    except OSError as e:
        raise _fail("remove", shown, e) from None
    with contextlib.suppress(OSError):
        os.fsync(dir_fd)
    return True


class AllowlistStore:
    """Writes, reads and removes ``<folder>/<uid>.json``."""

    def __init__(self, folder: Path, *, key: str = "session.allowlist_dir") -> None:
        self.folder = folder
        self.key = key

    def path(self, uid: int) -> Path:
        return self.folder / self._name(uid)

    @staticmethod
    def _name(uid: int) -> str:
        if not isinstance(uid, int) or isinstance(uid, bool) or uid < 0:
            raise SessionFailed(f"invalid uid {uid!r}")
        return f"{uid}.json"

    @contextlib.contextmanager
    def _dir(self) -> Iterator[int]:
        # ConfigError naming the key (and the path) when the folder or a parent is unsafe.
        fd = open_private_dir(
            self.folder, key=self.key, private=False, check_parents=True, mode=ALLOWLIST_DIR_MODE
        )
        try:
            yield fd
        finally:
            os.close(fd)

    def write(self, uid: int, document: Mapping[str, Any]) -> None:
        self.write_bytes(uid, _encode(document))

    def write_bytes(self, uid: int, data: bytes) -> None:
        name = self._name(uid)
        with self._dir() as fd:
            replace_file(fd, name, data, mode=ALLOWLIST_MODE, shown=self.path(uid))

    def read_bytes(self, uid: int) -> bytes | None:
        name = self._name(uid)
        with self._dir() as fd:
            return read_file(fd, name, mode=ALLOWLIST_MODE, shown=self.path(uid))

    def read(self, uid: int) -> dict[str, Any] | None:
        data = self.read_bytes(uid)
        if data is None:
            return None
        try:
            doc = loads_json(data, max_bytes=MAX_FILE_BYTES, what=str(self.path(uid)))
        except InputMalformed as e:
            raise SessionFailed(e.message, reason="allowlist_tampered") from None
        if not isinstance(doc, dict):
            raise SessionFailed(
                f"{self.path(uid)} is not a JSON object", reason="allowlist_tampered"
            )
        return doc

    def remove(self, uid: int) -> bool:
        name = self._name(uid)
        with self._dir() as fd:
            return remove_file(fd, name, shown=self.path(uid))


# --- the refcount ------------------------------------------------------------------------


@dataclass
class UserSessions:
    """One user's open sessions, as read under the lock; ``sessions`` maps id -> facts."""

    uid: int
    sessions: dict[str, dict[str, Any]] = field(default_factory=dict)
    user: str = ""

    def to_document(self) -> dict[str, Any]:
        return {
            "format": STATE_FORMAT,
            "uid": self.uid,
            "user": self.user,
            "sessions": self.sessions,
        }


def is_uid_text(text: str) -> bool:
    """``text`` names a uid (a record's or an allowlist's file stem): ASCII digits that fit
    a uid_t ("²".isdigit() is true; int() of 5000 digits raises)."""
    return text.isascii() and text.isdigit() and len(text) <= 10 and int(text) < 2**32 - 1


def _u63(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**63


def _strs(v: object) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


# The fields of a session entry that the product reads (services/session.py, launcher.py,
# dmcrypt.py), and what each must be. An entry that breaks them (a fault, an edit) is
# skipped with a logged reason: it proves no session, and no reader meets a list where it
# expects a dict or a pid too big for a pid_t.
_ENTRY_CHECKS: dict[str, Any] = {
    "pid": _u63,
    "pid_start": lambda v: v is None or _u63(v),
    "uid": _u63,
    "user": lambda v: isinstance(v, str),
    "token_serial": lambda v: isinstance(v, str),
    "card_removed": lambda v: isinstance(v, bool),
    "volumes": _strs,
    "suspended": _strs,
    "deferred": _strs,
}


def entry_problem(entry: object) -> str:
    """ "" when a session entry has the shape its readers expect, else what is wrong."""
    if not isinstance(entry, dict):
        return f"is a {type(entry).__name__}, not an object"
    for name, ok in _ENTRY_CHECKS.items():
        if name in entry and not ok(entry[name]):
            return f"{name} is malformed"
    return ""


def parse_sessions(data: bytes | None, uid: int, shown: Path) -> UserSessions:
    """A user's session record from its bytes (None: no record). SessionFailed when the
    document is not a record of ``uid``; entries of the wrong shape are skipped, logged."""
    if data is None:
        return UserSessions(uid)
    try:
        doc = loads_json(data, max_bytes=MAX_FILE_BYTES, what=str(shown))
    except InputMalformed as e:
        raise SessionFailed(f"{shown} is damaged: {e.message}") from None
    if not isinstance(doc, dict) or doc.get("format") != STATE_FORMAT or doc.get("uid") != uid:
        raise SessionFailed(f"{shown} is damaged: wrong format or uid")
    sessions, user = doc.get("sessions"), doc.get("user", "")
    if not isinstance(sessions, dict) or not isinstance(user, str):
        raise SessionFailed(f"{shown} is damaged: sessions is not an object")
    kept: dict[str, dict[str, Any]] = {}
    for sid, entry in sessions.items():
        problem = entry_problem(entry)
        if problem:
            log.warning("%s: session %.64r skipped: %s", shown, sid, problem)
            continue
        kept[sid] = entry
    return UserSessions(uid, kept, user)


class SessionRecords:
    """The open sessions of each user, under ``<state_dir>`` (root-only)."""

    def __init__(self, folder: Path, *, key: str = "session.state_dir") -> None:
        self.folder = folder
        self.key = key

    @contextlib.contextmanager
    def locked(self, uid: int) -> Iterator[_Locked]:
        """Hold the user's lock; the yielded handle reads and saves (or drops) their record."""
        if not isinstance(uid, int) or isinstance(uid, bool) or uid < 0:
            raise SessionFailed(f"invalid uid {uid!r}")
        dir_fd = open_private_dir(self.folder, key=self.key, private=True, check_parents=True)
        try:
            lock_fd = self._lock(dir_fd, f"{uid}.lock")
            try:
                handle = _Locked(self, dir_fd, lock_fd, uid)
                yield handle
                if handle.dropped:
                    # No record left: the lock file goes too, still held (see _lock).
                    with contextlib.suppress(OSError):
                        os.unlink(f"{uid}.lock", dir_fd=dir_fd)
            finally:
                os.close(lock_fd)  # releases the flock
        finally:
            os.close(dir_fd)

    def find(self, user: str, session_id: str) -> int | None:
        """The uid whose record has ``session_id`` open for ``user`` (read without the lock:
        the caller checks again under it)."""
        dir_fd = open_private_dir(self.folder, key=self.key, private=True, check_parents=True)
        try:
            for name in sorted(os.listdir(dir_fd)):
                stem, _dot, ext = name.partition(".")
                if ext != "json" or not is_uid_text(stem):
                    continue
                uid = int(stem)
                try:
                    data = read_file(dir_fd, name, mode=0o600, shown=self.folder / name)
                    state = parse_sessions(data, uid, self.folder / name)
                except SessionFailed:
                    continue
                if state.user == user and session_id in state.sessions:
                    return uid
            return None
        finally:
            os.close(dir_fd)

    def _lock(self, dir_fd: int, name: str) -> int:
        # The last close unlinks the lock file while holding it; a waiter that then gets the
        # old inode's lock sees that and starts over on the new one.
        while True:
            try:
                fd = os.open(
                    name,
                    os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                    0o600,
                    dir_fd=dir_fd,
                )
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError as e:
                raise _fail("lock", self.folder / name, e) from None
            try:
                on_disk = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            except FileNotFoundError:
                os.close(fd)
                continue
            held = os.fstat(fd)
            if (on_disk.st_dev, on_disk.st_ino) == (held.st_dev, held.st_ino):
                return fd
            os.close(fd)


class _Locked:
    def __init__(self, records: SessionRecords, dir_fd: int, lock_fd: int, uid: int) -> None:
        self.records = records
        self.dir_fd = dir_fd
        self.lock_fd = lock_fd
        self.uid = uid
        self.dropped = False

    @property
    def _name(self) -> str:
        return f"{self.uid}.json"

    @property
    def _shown(self) -> Path:
        return self.records.folder / self._name

    def load(self) -> UserSessions:
        data = read_file(self.dir_fd, self._name, mode=0o600, shown=self._shown)
        return parse_sessions(data, self.uid, self._shown)

    def save(self, state: UserSessions) -> None:
        if not state.sessions:
            self.drop()
            return
        replace_file(
            self.dir_fd, self._name, _encode(state.to_document()), mode=0o600, shown=self._shown
        )

    def drop(self) -> None:
        """Forget the user's record (the last session closed); the lock file goes when the
        lock is let go without an error."""
        remove_file(self.dir_fd, self._name, shown=self._shown)
        self.dropped = True
