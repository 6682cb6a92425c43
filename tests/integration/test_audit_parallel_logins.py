"""100 logins at once through the real PAM stack (each its own pamtester process) leave one
intact, sealed audit chain with every record; `svmm audit verify` passes, and after a one-byte
edit names the record."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from pam_svmm.adapters.audit_log import head_path
from svmm_lab.lab import Lab

pytestmark = [pytest.mark.integration, pytest.mark.slow]

LOGINS = 100
USERS = ("alice", "bob", "carol")  # RSA, P-256, P-384 cards
PIN = "123456"
SEAL_EVERY = 16


def svmm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pam_svmm.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_parallel_logins_leave_an_intact_chain(lab: Lab, tmp_path: Path) -> None:
    # A service of its own: the chain holds only this test's records, and the key is ours.
    audit, key = tmp_path / "audit" / "audit.jsonl", tmp_path / "seal.key"
    service = lab.variant(
        "audit-parallel",
        f'[audit]\npath = "{audit}"\nsyslog = false\nseal_key = "{key}"\n'
        f"seal_every = {SEAL_EVERY}\n",
    )
    users = [USERS[i % len(USERS)] for i in range(LOGINS)]
    readers = [lab.insert(u) for u in users]  # Lab.insert is not thread-safe; login is

    started = time.monotonic()
    with ThreadPoolExecutor(max_workers=8) as pool:
        reports = list(
            pool.map(
                lambda ru: lab.pamtester(ru[0], pin=PIN, user=ru[1], service=service),
                zip(readers, users, strict=True),
            )
        )
    elapsed = time.monotonic() - started
    assert all(r.returncode == 0 for r in reports), [r.stderr for r in reports if r.returncode][:3]

    lines = audit.read_bytes().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["seq"] for r in records] == list(range(1, len(records) + 1))
    events = [r for r in records if r["event"] != "seal"]
    for event in ("auth", "account"):
        got = sorted(r["user"] for r in events if r["event"] == event)
        assert got == sorted(users), event
    assert all(r["outcome"] == "success" for r in events)
    assert len(events) == 2 * LOGINS
    assert len(records) - len(events) == 2 * LOGINS // SEAL_EVERY  # the seals
    assert oct(key.stat().st_mode & 0o777) == "0o600"

    p = svmm("audit", "verify", "--path", str(audit), "--key", str(key))
    assert p.returncode == 0, p.stderr
    assert f"intact: {2 * LOGINS} records, {2 * LOGINS // SEAL_EVERY} seals" in p.stdout

    # One byte of one record changed (bob becomes bbb): verify names that record.
    victim = next(i for i, r in enumerate(records[100:-1], 100) if r.get("user") == "bob")
    data = bytearray(audit.read_bytes())
    offset = sum(len(line) + 1 for line in lines[:victim]) + lines[victim].index(b'"user":"bob"')
    data[offset + len('"user":"b')] = ord("b")
    audit.write_bytes(bytes(data))
    p = svmm("audit", "verify", "--path", str(audit), "--key", str(key))
    assert p.returncode == 1
    seq = records[victim]["seq"]
    assert f"seq {seq}, line {victim + 1}: edited" in p.stderr, p.stderr
    assert head_path(audit).exists()
    print(f"{LOGINS} parallel logins in {elapsed:.1f}s")
