"""Root trusts a file only if nobody but root can change it (invariant 10, sshd's StrictModes).

The configuration names what a root login believes: the trust anchors, the PKCS#11 module it
dlopen()s, the directory's CA and bind secret, the audit seal key. If any of those files, or
any directory above one, is writable by another user, that user decides who logs in. So:
the file and every directory on its path, as written and after resolving symlinks, must be
owned by root and writable by neither group nor others. A directory with the sticky bit set
(/tmp) is allowed above: others may not rename or remove root's entries in it.

A missing file is not this module's business (its reader says "not found"), but the
directories above it are checked all the same: a user who may create it there could.
Standard library only; no other product module is imported.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from pathlib import Path


def problem(path: Path) -> str | None:
    """Why root must not trust ``path`` (None: it may)."""
    given = Path(os.path.abspath(path))
    real = Path(os.path.realpath(given))
    for part in dict.fromkeys([given, *given.parents, real, *real.parents]):
        try:
            st = os.stat(part)
        except FileNotFoundError:
            continue
        except OSError as e:
            return f"{part} cannot be checked: {e.strerror}"
        if st.st_uid != 0:
            return f"{part} is owned by uid {st.st_uid}, not root"
        writable = st.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
        if writable and not (stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX):
            who = "its group" if writable == stat.S_IWGRP else "others"
            return f"{part} is writable by {who} (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def first_problem(paths: Iterable[tuple[str, Path]]) -> tuple[str, str] | None:
    """(what, why) for the first of ``paths`` root must not trust."""
    for what, path in paths:
        why = problem(path)
        if why is not None:
            return what, why
    return None
