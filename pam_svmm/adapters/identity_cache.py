"""The offline identity cache: the last good identity per user, for logins while the
directory is unreachable.

Layout of the cache folder (root-only: 0700, files 0600, owned by root or us)::

    u-<user>.json         {"version", "stored_at", "fingerprints": [...], "identity": {...}}
    f-<sha256 hex>.json   {"version", "stored_at", "name"}   certificate -> user

No secrets are stored: the identity (DN, POSIX account, roles, groups, state) and the
public certificates. An entry older than ``max_age`` seconds is never returned and is
deleted when seen; ``store`` also sweeps every stale file. A certificate maps to a user
offline only if *both* its index file and the user's file are fresh and the user's file
lists that fingerprint. ``max_age`` 0 disables the cache (nothing stored or returned).

Files are written atomically (temporary file, fsync, rename) relative to a descriptor of
the folder, opened with O_NOFOLLOW: a planted symlink is never followed, only replaced.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import json
import os
import re
import stat
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from ..domain.bounded import loads_json
from ..domain.identity import AccountState, AccountStatus, Identity, PosixAccount, PosixGroup
from ..domain.mapping import is_valid_username
from ..errors import ConfigError
from .private_dir import open_private_dir, replace_file

FORMAT_VERSION = 1
SOURCE = "offline-cache"
# A stored_at this far in the future (a clock set back since) counts as stale.
CLOCK_SKEW = dt.timedelta(minutes=5)
_MAX_FILE = 1 << 20
_FINGERPRINT = re.compile(r"[0-9a-f]{64}")
_CONFIG_KEY = "directory.cache_dir"
SWEEP_INTERVAL = 60.0  # seconds between full sweeps of stale entries
# An unchanged identity is stored again (with a new stamp) once its entry is this old: a
# resident service logging the same person in again and again does not rewrite it each time.
REWRITE_AFTER = dt.timedelta(seconds=60)


class IdentityCache:
    def __init__(self, folder: Path, max_age: float) -> None:
        self.folder = folder
        self.max_age = dt.timedelta(seconds=max_age)

    @property
    def enabled(self) -> bool:
        return self.max_age > dt.timedelta(0)

    # --- public API -----------------------------------------------------------------------

    def store(self, identity: Identity, *, fingerprints: Sequence[str], now: dt.datetime) -> None:
        """Remember ``identity`` (and which certificates map to it) as of ``now``."""
        if not self.enabled:
            return
        name = _checked_name(identity.name)
        fps = [_checked_fingerprint(fp) for fp in fingerprints]
        with self._dir() as dir_fd:
            self._maybe_sweep(dir_fd, now)
            old = self._read(dir_fd, _user_file(name), now)
            known = old.get("fingerprints", []) if old else []
            merged = list(dict.fromkeys([*fps, *(f for f in known if isinstance(f, str))]))
            dump = _dump(identity)
            files = (*map(_fp_file, fps), _user_file(name))
            unchanged = old is not None and old.get("identity") == dump and merged == known
            if unchanged and all(self._recent(dir_fd, f, now) for f in files):
                return  # the same answer, stored moments ago: no rewrite (and fsync)
            stamp = now.isoformat()
            for fp in fps:
                self._write(dir_fd, _fp_file(fp), {"stored_at": stamp, "name": name})
            self._write(
                dir_fd,
                _user_file(name),
                {"stored_at": stamp, "fingerprints": merged, "identity": dump},
            )

    def _recent(self, dir_fd: int, name: str, now: dt.datetime) -> bool:
        """Stored within REWRITE_AFTER (and fresh): rewriting it would change only the stamp.
        Skipping that only ever makes the offline window end sooner, never later."""
        entry = self._read(dir_fd, name, now)
        if entry is None:
            return False
        at = dt.datetime.fromisoformat(entry["stored_at"])
        return now - at <= min(REWRITE_AFTER, self.max_age / 10)

    def by_fingerprint(self, fingerprint: str, *, now: dt.datetime) -> Identity | None:
        if not self.enabled:
            return None
        fp = _checked_fingerprint(fingerprint)
        with self._dir() as dir_fd:
            # A hit reads only its two files. A miss (the offline path, the directory is
            # down anyway) also sweeps, so no stale entry outlives the question.
            index = self._read(dir_fd, _fp_file(fp), now)
            if index is None or not is_valid_username(index.get("name")):
                self._sweep(dir_fd, now)
                return None
            entry = self._read(dir_fd, _user_file(index["name"]), now)
            if entry is None or fp not in entry.get("fingerprints", ()):
                return None
            identity = _load_entry(entry, index)
            return identity if identity is not None and identity.name == index["name"] else None

    def by_name(self, name: str, *, now: dt.datetime) -> Identity | None:
        if not self.enabled or not is_valid_username(name):
            return None
        with self._dir() as dir_fd:
            entry = self._read(dir_fd, _user_file(name), now)
            if entry is None:
                self._sweep(dir_fd, now)
            identity = None if entry is None else _load_entry(entry)
            return identity if identity is not None and identity.name == name else None

    def prune(self, *, now: dt.datetime) -> int:
        """Delete every stale or unreadable entry; returns how many files were removed."""
        with self._dir() as dir_fd:
            return self._sweep(dir_fd, now)

    # --- files ----------------------------------------------------------------------------

    @contextlib.contextmanager
    def _dir(self) -> Iterator[int]:
        fd = open_private_dir(self.folder, key=_CONFIG_KEY)
        try:
            yield fd
        finally:
            os.close(fd)

    def _fresh(self, stored_at: Any, now: dt.datetime) -> bool:
        if not isinstance(stored_at, str):
            return False
        try:
            at = dt.datetime.fromisoformat(stored_at)
        except ValueError:
            return False
        if at.tzinfo is None:
            return False
        return now - self.max_age <= at <= now + CLOCK_SKEW

    def _read(self, dir_fd: int, name: str, now: dt.datetime) -> dict[str, Any] | None:
        """A fresh entry, or None; a stale or malformed one is deleted."""
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
        except OSError:  # absent, or a planted symlink (ELOOP): never followed
            return None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid not in (0, os.geteuid()):
                return None
            if st.st_mode & 0o077 or st.st_size > _MAX_FILE:
                return None
            with os.fdopen(os.dup(fd), "rb") as f:
                value = loads_json(f.read(_MAX_FILE), max_bytes=_MAX_FILE, what=name)
        except (OSError, ValueError):
            value = None
        finally:
            os.close(fd)
        if (
            not isinstance(value, dict)
            or value.get("version") != FORMAT_VERSION
            or not self._fresh(value.get("stored_at"), now)
        ):
            _unlink(dir_fd, name)
            return None
        return value

    def _maybe_sweep(self, dir_fd: int, now: dt.datetime) -> None:
        """Sweep the whole folder at most once a minute: a login must not pay for reading
        every cached user, but stale entries must not linger on disk either."""
        marker = ".swept"
        try:
            last = os.stat(marker, dir_fd=dir_fd, follow_symlinks=False).st_mtime
        except OSError:
            last = 0.0
        if now.timestamp() - last < SWEEP_INTERVAL:
            return
        self._sweep(dir_fd, now)
        fd = os.open(
            marker, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dir_fd
        )
        try:
            os.utime(fd, (now.timestamp(), now.timestamp()))
        finally:
            os.close(fd)

    def _sweep(self, dir_fd: int, now: dt.datetime) -> int:
        removed = 0
        for name in os.listdir(dir_fd):
            if name.startswith(".") and name.endswith(".tmp"):
                continue  # another writer's file in flight
            if not (name.startswith(("u-", "f-")) and name.endswith(".json")):
                continue
            try:
                st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISLNK(st.st_mode):
                _unlink(dir_fd, name)  # never ours: remove it so it cannot confuse anyone
                removed += 1
                continue
            if self._read(dir_fd, name, now) is None:
                removed += 1
        return removed

    def _write(self, dir_fd: int, name: str, value: dict[str, Any]) -> None:
        data = json.dumps({"version": FORMAT_VERSION, **value}, sort_keys=True).encode()
        try:
            replace_file(dir_fd, name, data)
        except OSError as e:
            raise ConfigError(
                _CONFIG_KEY, f"cannot write {self.folder}/{name}: {e.strerror}"
            ) from e


# --- helpers ------------------------------------------------------------------------------


def _unlink(dir_fd: int, name: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(name, dir_fd=dir_fd)


def _checked_name(name: str) -> str:
    if not is_valid_username(name):
        raise ValueError(f"{name!r} is not a valid user name")
    return name


def _checked_fingerprint(fp: str) -> str:
    if not isinstance(fp, str) or not _FINGERPRINT.fullmatch(fp):
        raise ValueError(f"{fp!r} is not a lowercase SHA-256 hex fingerprint")
    return fp


def _user_file(name: str) -> str:
    return f"u-{name}.json"


def _fp_file(fp: str) -> str:
    return f"f-{fp}.json"


def _dump(identity: Identity) -> dict[str, Any]:
    a = identity.account
    return {
        "dn": identity.dn,
        "account": {
            "name": a.name,
            "uid": a.uid,
            "gid": a.gid,
            "gecos": a.gecos,
            "home": a.home,
            "shell": a.shell,
        },
        "roles": list(identity.roles),
        "groups": [
            {"name": g.name, "gid": g.gid, "members": list(g.members)} for g in identity.groups
        ],
        "state": {"status": identity.state.status.value, "reason": identity.state.reason},
        "certificates": [base64.b64encode(c).decode() for c in identity.certificates],
    }


def _load_entry(entry: dict[str, Any], *others: dict[str, Any]) -> Identity | None:
    """The stored identity; None if the file does not have the expected shape."""
    try:
        raw = entry["identity"]
        acc = raw["account"]
        account = PosixAccount(
            name=_str(acc["name"]),
            uid=_int(acc["uid"]),
            gid=_int(acc["gid"]),
            gecos=_str(acc["gecos"]),
            home=_str(acc["home"]),
            shell=_str(acc["shell"]),
        )
        groups = tuple(
            PosixGroup(
                name=_str(g["name"]),
                gid=_int(g["gid"]),
                members=tuple(_str(m) for m in g["members"]),
            )
            for g in raw["groups"]
        )
        state = AccountState(
            status=AccountStatus(raw["state"]["status"]), reason=_str(raw["state"]["reason"])
        )
        stamps = [dt.datetime.fromisoformat(e["stored_at"]) for e in (entry, *others)]
        return Identity(
            dn=_str(raw["dn"]),
            account=account,
            roles=tuple(_str(r) for r in raw["roles"]),
            groups=groups,
            state=state,
            certificates=tuple(
                base64.b64decode(_str(c), validate=True) for c in raw["certificates"]
            ),
            source=SOURCE,
            # The oldest of the facts used: what the audit trail reports as the data's age.
            fetched_at=min(stamps),
        )
    except (KeyError, TypeError, ValueError):
        return None


def _str(v: Any) -> str:
    if not isinstance(v, str):
        raise TypeError("expected a string")
    return v


def _int(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError("expected an integer")
    return v
