"""A cryptsetup that records what it saw: the key tests of tests/integration/test_luks.py and
test_volumes.py run the product through it and search its argv and environment for keys."""

from __future__ import annotations

import shutil
from pathlib import Path


def cryptsetup_spy(tmp_path: Path) -> tuple[Path, Path]:
    """A cryptsetup wrapper that saves its own /proc cmdline and environ, then execs the real
    one (same argv, same environment: what it saw is what cryptsetup sees)."""
    log = tmp_path / "spy"
    log.mkdir()
    real = shutil.which("cryptsetup")
    script = tmp_path / "cryptsetup-spy"
    script.write_text(
        "#!/bin/sh\n"
        f'cat /proc/$$/cmdline > "{log}/$$.cmdline"\n'
        f'cat /proc/$$/environ > "{log}/$$.environ"\n'
        f'exec "{real}" "$@"\n'
    )
    script.chmod(0o700)
    return script, log
