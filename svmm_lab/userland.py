"""A Python for the lab's unprivileged processes, wherever the checkout lives.

The demo and the tests run clients as other users (`svmm vm` as alice or nobody). A checkout
in a folder only root may enter (/root, a `mktemp -d` folder) hides its .venv and its package
from them. So the lab copies what such a client imports, the package and its installed
requirements, into one folder every user may read and run Debian's /usr/bin/python3 (the
interpreter the venv was made from, so compiled wheels match) on it. The copy is made once per
process, root-owned, mode 0755, and removed at exit.
"""

from __future__ import annotations

import atexit
import functools
import importlib.metadata as md
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

SYSTEM_PYTHON = "/usr/bin/python3"
PACKAGE = Path(__file__).resolve().parents[1] / "pam_svmm"  # the product, next to this lab


@dataclass(frozen=True)
class Userland:
    python: str
    site: Path

    def env(self, **extra: str) -> dict[str, str]:
        """The environment for a client: only the copy on sys.path, a plain PATH."""
        return {
            "PYTHONPATH": str(self.site),
            "PYTHONNOUSERSITE": "1",
            "PATH": "/usr/bin:/bin",
            **extra,
        }

    def argv(self, *args: str) -> list[str]:
        return [self.python, "-s", *args]


def _requirements(dist: md.Distribution) -> list[str]:
    names = []
    for req in dist.requires or []:
        if "extra ==" in req:
            continue  # optional features (tests) are not a client's
        names.append(re.split(r"[\s\[<>=!~;(]", req.strip(), maxsplit=1)[0])
    return names


def _closure(root: str) -> list[md.Distribution]:
    seen: dict[str, md.Distribution] = {}
    todo = [root]
    while todo:
        name = re.sub(r"[-_.]+", "-", todo.pop()).lower()
        if name in seen:
            continue
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            continue  # a requirement not installed: the client's import will say so
        seen[name] = dist
        todo.extend(_requirements(dist))
    return list(seen.values())


def _copy_distribution(dist: md.Distribution, site: Path) -> None:
    for f in dist.files or []:
        if f.parts[0].endswith((".dist-info", ".egg-info")) or f.suffix == ".pth":
            continue  # metadata, and the editable install's pointer back into the checkout
        if ".." in f.parts:
            continue  # console scripts in ../../bin
        src = Path(str(dist.locate_file(f)))
        if not src.is_file():
            continue
        dst = site / f
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)


@functools.cache
def userland() -> Userland:
    """The reachable copy, made on first use (a few hundred milliseconds)."""
    top = Path(tempfile.mkdtemp(prefix="svmm-userland-", dir="/tmp"))
    atexit.register(shutil.rmtree, top, True)
    site = top / "site"
    shutil.copytree(PACKAGE, site / "pam_svmm", ignore=shutil.ignore_patterns("*.c"))
    for dist in _closure("pam_svmm"):
        if dist.metadata["Name"].lower().replace("_", "-") != "pam-svmm":
            _copy_distribution(dist, site)
    for d, _dirs, files in os.walk(top):
        os.chmod(d, 0o755)  # noqa: S103 - read and run by every user; written by root only
        for name in files:
            os.chmod(os.path.join(d, name), 0o644)
    return Userland(SYSTEM_PYTHON, site)
