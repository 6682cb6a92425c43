"""What the end-to-end volume tests share (tests/integration/test_volume_session.py,
test_card_removal_launcher.py): the ``socket_dir`` fixture svmmd listens in, ``vm`` (`svmm vm
--json` run as a user against it) and ``records`` (the audit records of one event since a
point)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from svmm_lab.lab import Lab
from svmm_lab.userland import userland

ROOT = Path(__file__).resolve().parents[2]
ALICE_UID = 10001  # config/ldap/example-org.ldif


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="svmm-lab-", dir="/tmp"))
    os.chmod(d, 0o755)  # noqa: S103 - root's folder; every user reaches the socket in it
    yield d
    shutil.rmtree(d, ignore_errors=True)


def vm(socket_dir: Path, *args: str, uid: int = ALICE_UID) -> tuple[int, dict[str, Any]]:
    p = subprocess.run(
        userland().argv("-m", "pam_svmm.cli.main", "vm", "--socket",
                        str(socket_dir / "launcher.sock"), "--json", *args),
        capture_output=True, text=True, timeout=120, check=False,
        user=uid, group=uid, extra_groups=[], env=userland().env(), cwd="/",
    )  # fmt: skip
    return p.returncode, json.loads(p.stdout) if p.stdout.strip() else {"stderr": p.stderr}


def records(lab: Lab, since: int, event: str) -> list[dict[str, Any]]:
    return [r for r in lab.audit_records()[since:] if r["event"] == event]
