"""Compile the lab's small C helpers (pinguard, the PAM client), cached by source hash."""

from __future__ import annotations

import hashlib
import os
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path


def build_c(
    source: Path,
    out_dir: str | os.PathLike[str],
    *,
    suffix: str,
    flags: Sequence[str] = (),
    libs: Sequence[str] = (),
    cc: str = "gcc",
) -> Path:
    """Compile ``source`` into ``out_dir``; the output name carries the source hash, so a
    changed source is rebuilt and an unchanged one is reused."""
    digest = hashlib.sha256(source.read_bytes() + " ".join(flags).encode()).hexdigest()[:16]
    out = Path(out_dir) / f"{source.stem}-{digest}{suffix}"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    # Build to a temporary name and rename, so a concurrent build never sees half a file.
    fd, tmp = tempfile.mkstemp(prefix=f".{source.stem}-", suffix=suffix, dir=out.parent)
    os.close(fd)
    try:
        proc = subprocess.run(
            [cc, "-O2", "-Wall", "-Wextra", "-Werror", *flags, "-o", tmp, str(source), *libs],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"building {source.name} failed:\n{proc.stderr}")
        os.chmod(tmp, 0o755)  # noqa: S103 - an executable the lab runs
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out
