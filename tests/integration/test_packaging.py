"""pyproject.toml builds without the build backend's deprecation warnings: the license is an
SPDX expression (PEP 639), with a setuptools that reads it. tools/run's editable_mode=compat
is deliberate (pam_python imports the package from the checkout); its warning is setuptools'
about that mode, not about this file, and is the one warning left."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def test_the_license_is_an_spdx_expression_setuptools_reads() -> None:
    doc = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert doc["project"]["license"] == "Apache-2.0"
    requires = doc["build-system"]["requires"]
    assert any(re.fullmatch(r"setuptools>=(\d+).*", r) and int(r.split(">=")[1].split(".")[0])
               >= 77 for r in requires), requires  # fmt: skip


def test_an_editable_install_warns_about_nothing_pyproject_says(tmp_path: Path) -> None:
    """What tools/run does (pip install -e . --config-settings editable_mode=compat), built
    from a copy of the tracked files into a throwaway target (the venv is not touched)."""
    src = tmp_path / "src"
    src.mkdir()
    files = subprocess.run(["git", "-C", str(REPO), "ls-files", "-z"], capture_output=True,
                           check=True).stdout.decode().split("\0")  # fmt: skip
    for name in filter(None, files):
        if (REPO / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            (src / name).write_bytes((REPO / name).read_bytes())
    (src / "pyproject.toml").write_bytes((REPO / "pyproject.toml").read_bytes())  # as edited
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    p = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install",
         "-v", "--no-deps", "-e", str(src), "--config-settings", "editable_mode=compat"],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-3000:]
    warnings = set(re.findall(r"(\w*Warning): (.*)", out))
    assert warnings == {("BuildBackendWarning", "Compat editable installs")}, warnings
