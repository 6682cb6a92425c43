"""The `svmm` entry point itself: --version, a closed pipe, the exit-code table."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from pam_svmm.cli.main import main

ROOT = Path(__file__).resolve().parents[2]


def test_version_is_the_distributions(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    want = importlib.metadata.version("pam_svmm")
    assert capsys.readouterr().out == f"svmm {want}\n"
    # The installed metadata and the source agree (an editable install of this checkout).
    assert want == tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def test_version_without_installed_metadata_falls_back_to_pyproject(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from pam_svmm.cli import main as main_mod

    def missing(name: str) -> str:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    want = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert main_mod.version() == want


def test_a_reader_that_stops_early_ends_the_command_quietly(tmp_path: Path) -> None:
    """`svmm audit show | head -1`: the reader closes the pipe after one line."""
    path = tmp_path / "audit.jsonl"
    # `show` reads records, it does not verify them: far more lines than a pipe buffer holds.
    record = {"event": "auth", "outcome": "success", "reason": "ok", "user": "alice"}
    path.write_text("".join(json.dumps({"seq": i, **record}) + "\n" for i in range(5000)))
    read_fd, write_fd = os.pipe()
    p = subprocess.Popen(
        [sys.executable, "-m", "pam_svmm.cli.main", "audit", "show", "--path", str(path)],
        stdout=write_fd,
        stderr=subprocess.PIPE,
        cwd=ROOT,
    )
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as reader:
        assert reader.readline().startswith(b"SEQ")
    # closed: the command's next write fails with EPIPE
    _, err = p.communicate(timeout=60)
    assert err == b"", err.decode()
    assert p.returncode == 141  # 128 + SIGPIPE, what a shell reports for `yes | head -1`


def test_doctor_help_documents_its_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["doctor", "--help"])
    out = capsys.readouterr().out
    assert "exit status:" in out
    for code, meaning in (("0", "no check failed"), ("1", "FAIL"), ("2", "could not run")):
        assert any(line.split()[:1] == [code] and meaning in line for line in out.splitlines())
    assert "--json" in out and "--root" not in out  # --root is for tests
