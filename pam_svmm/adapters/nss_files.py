"""Writes the NSS bridge's passwd and group files for libnss-extrausers.

libnss-extrausers reads /var/lib/extrausers/{passwd,group,shadow}; every process on the host
parses them, so they are written like any root file under /var (invariant 5):

* the folder is opened once without following symlinks and everything else goes through that
  descriptor (openat/renameat), so the path cannot be swapped mid-write; the folder and its
  ancestors must be root-owned and not writable by group or others;
* each file is written to a temporary name in the same folder, fsynced, given its final owner
  and mode (0644 root:root), and only when every temporary is complete are they renamed into
  place (group before passwd, so a new account's group exists when the account appears); a
  failure before the renames leaves the old files untouched;
* an exclusive lock on the folder serialises concurrent syncs.

No shadow file is written: the passwd password field is ``*``, which pam_unix treats as
"not shadowed", so its account phase needs no shadow entry for `su`, `login` or `sudo`.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import secrets
import stat
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from ..errors import SvmmError

FILE_MODE = 0o644
DIR_MODE = 0o755
TMP_PREFIX = ".svmm-tmp-"
NAMES = ("group", "passwd")  # rename order


class NssWriteError(SvmmError):
    """The NSS bridge's files could not be written safely."""

    reason = "nss_write_failed"


@dataclass(frozen=True)
class FileStatus:
    name: str
    exists: bool
    entries: int = 0
    age: float | None = None  # seconds since last modification
    text: str = ""


def _check_owner_mode(path: Path, st: os.stat_result, *, owner: int) -> None:
    if stat.S_ISLNK(st.st_mode):
        raise NssWriteError(f"{path} is a symbolic link; refusing to write through it")
    if not stat.S_ISDIR(st.st_mode):
        raise NssWriteError(f"{path} is not a directory")
    if st.st_uid != owner:
        raise NssWriteError(f"{path} is owned by uid {st.st_uid}, not {owner}; refusing")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise NssWriteError(
            f"{path} is writable by group or others (mode {stat.S_IMODE(st.st_mode):04o}); refusing"
        )


def _check_ancestors(path: Path, *, owner: int) -> None:
    # A user who can rename an ancestor could redirect the folder; a sticky root-owned
    # ancestor like /tmp is fine (others cannot rename what they do not own).
    for parent in path.parents:
        st = parent.lstat()
        if stat.S_ISLNK(st.st_mode):
            st = parent.stat()  # e.g. /var -> /srv/var: what matters is who controls the target
        writable = st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
        sticky = st.st_mode & stat.S_ISVTX
        if st.st_uid not in (0, owner) or (writable and not sticky):
            raise NssWriteError(
                f"{parent} (above {path}) can be changed by other users; refusing to write there"
            )


@contextlib.contextmanager
def _open_dir(directory: Path, *, owner: int, create: bool) -> Iterator[int]:
    directory = Path(os.path.abspath(directory))
    try:
        _check_ancestors(directory, owner=owner)
        if create:
            with contextlib.suppress(FileExistsError):
                os.mkdir(directory, DIR_MODE)
                os.chmod(directory, DIR_MODE)  # despite the umask
        _check_owner_mode(directory, directory.lstat(), owner=owner)
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except NssWriteError:
        raise
    except OSError as e:
        raise NssWriteError(f"cannot open {directory}: {e.strerror}") from None
    try:
        _check_owner_mode(directory, os.fstat(fd), owner=owner)  # what we actually opened
        yield fd
    finally:
        os.close(fd)


def write_files(
    directory: Path,
    files: Mapping[str, str],
    *,
    owner: int = 0,
) -> None:
    """Replace ``directory/NAME`` with each text, all of them or none (see module doc).

    ``owner`` is the uid the folder and its ancestors must belong to (root in production;
    tests running unprivileged pass their own uid)."""
    for name in files:
        if name not in NAMES:
            raise NssWriteError(f"unexpected NSS file name {name!r}")
    order = [n for n in NAMES if n in files]
    with _open_dir(directory, owner=owner, create=True) as dfd:
        try:
            fcntl.flock(dfd, fcntl.LOCK_EX)
        except OSError as e:
            raise NssWriteError(f"cannot lock {directory}: {e.strerror}") from None
        _remove_stale_temps(dfd)
        temps: dict[str, str] = {}
        try:
            for name in order:
                temps[name] = _write_temp(dfd, directory, name, files[name])
            for name in order:
                os.rename(temps[name], name, src_dir_fd=dfd, dst_dir_fd=dfd)
                del temps[name]
            os.fsync(dfd)
        except OSError as e:
            raise NssWriteError(f"cannot write NSS files in {directory}: {e.strerror}") from None
        finally:
            for tmp in temps.values():
                with contextlib.suppress(OSError):
                    os.unlink(tmp, dir_fd=dfd)


def _write_temp(dfd: int, directory: Path, name: str, text: str) -> str:
    tmp = f"{TMP_PREFIX}{name}-{secrets.token_hex(8)}"
    data = text.encode("utf-8")
    fd = os.open(
        tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dfd
    )
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        if os.geteuid() == 0:
            os.fchown(fd, 0, 0)
        os.fchmod(fd, FILE_MODE)
        os.fsync(fd)
    except OSError:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dfd)
        raise
    os.close(fd)
    return tmp


def _remove_stale_temps(dfd: int) -> None:
    # Left by a sync that died between writing and renaming (we hold the lock now).
    for entry in os.listdir(dfd):
        if entry.startswith(TMP_PREFIX):
            with contextlib.suppress(OSError):
                os.unlink(entry, dir_fd=dfd)


def read_text(path: Path) -> str:
    """A local account file (/etc/passwd, /etc/group) as text."""
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise NssWriteError(f"cannot read {path}: {e.strerror}") from None


def status(directory: Path, *, now: float | None = None) -> list[FileStatus]:
    """What is in the folder now: per file, whether it exists, its entries and age."""
    now = time.time() if now is None else now
    out = []
    for name in ("passwd", "group"):
        path = directory / name
        try:
            st = path.lstat()
            if not stat.S_ISREG(st.st_mode):
                raise NssWriteError(f"{path} is not a regular file")
            text = path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            out.append(FileStatus(name, exists=False))
            continue
        except OSError as e:
            raise NssWriteError(f"cannot read {path}: {e.strerror}") from None
        entries = sum(1 for line in text.splitlines() if line.strip() and line[0] != "#")
        out.append(FileStatus(name, True, entries, max(0.0, now - st.st_mtime), text))
    return out
