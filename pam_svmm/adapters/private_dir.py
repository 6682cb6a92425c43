"""Root's private folders (caches, state): opened so that no user can redirect them.

One place for the rule invariant 5 asks of every folder root writes in: created 0700 if
missing, opened without following a symlink, owned by root (or the running user, for tests),
and neither it nor (optionally) any parent writable by others, unless the parent is sticky
like /tmp. Callers then work relative to the returned descriptor.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
from collections.abc import Sequence
from pathlib import Path

from ..errors import ConfigError


def open_private_dir(
    path: Path,
    *,
    key: str,
    private: bool = True,
    check_parents: bool = False,
    mode: int | None = None,
) -> int:
    """An O_DIRECTORY descriptor for ``path``; ConfigError (naming ``key``) if unsafe.

    A missing folder is created with ``mode`` (default 0700; with ``private=False`` e.g.
    0755, for a folder others read). ``private``: group and others may not even read an
    existing one; otherwise they may read but not write it (an admin's 0755 is accepted).
    ``check_parents``: no parent may be writable by others either.
    """
    if mode is None:
        mode = 0o700
    if (private and mode & 0o077) or mode & 0o022:
        raise ValueError(f"mode {mode:o} is not a safe mode for {path}")
    created = False
    try:
        os.makedirs(path.parent, exist_ok=True)
        try:
            os.mkdir(path, mode)
            created = True
        except FileExistsError:
            pass
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        if created:
            os.fchmod(fd, mode)  # the umask may have taken bits the readers need
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            raise ConfigError(key, f"{path} is a symlink or not a directory") from None
        raise ConfigError(key, f"{path}: {e.strerror}") from None
    try:
        check_dir(path, os.fstat(fd), key=key, private=private)
        if check_parents:
            for parent in Path(os.path.realpath(path.parent)).joinpath("x").parents:
                check_dir(parent, os.stat(parent), key=key, private=False, sticky_ok=True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def check_dir(
    path: Path, st: os.stat_result, *, key: str, private: bool, sticky_ok: bool = False
) -> None:
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(key, f"{path} is not a directory")
    if st.st_uid not in (0, os.geteuid()):
        raise ConfigError(key, f"{path} is owned by uid {st.st_uid}, not root")
    mode = stat.S_IMODE(st.st_mode)
    if private and mode & 0o077:
        raise ConfigError(
            key, f"{path} is accessible by group or others (mode {mode:o}); it must be 0700"
        )
    if mode & 0o022 and not (sticky_ok and st.st_mode & stat.S_ISVTX):
        raise ConfigError(key, f"{path} is writable by group or others (mode {mode:o})")


def replace_file(
    dir_fd: int, name: str, data: bytes | Sequence[bytes], *, mode: int = 0o600
) -> None:
    """Atomically replace ``name`` in the folder ``dir_fd`` with ``data``.

    A fresh temporary file (O_EXCL|O_NOFOLLOW, a random name, ``mode``) is written, fsynced
    and renamed over ``name``; rename(2) replaces a symlink or a stranger's file planted at
    ``name`` itself and never writes through it. The folder is fsynced. Raises OSError; on
    failure the temporary file is removed and ``name`` is untouched.
    """
    parts = [data] if isinstance(data, bytes | bytearray | memoryview) else list(data)
    tmp = f".{name}.{os.getpid()}.{secrets.token_hex(6)}.tmp"
    fd = os.open(
        tmp,
        os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
        mode,
        dir_fd=dir_fd,
    )
    try:
        try:
            os.fchmod(fd, mode)
            for part in parts:
                view = memoryview(part)
                while view:
                    view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        os.fsync(dir_fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dir_fd)
        raise
