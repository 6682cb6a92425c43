"""The audit log: one JSON line per decision, never through a symlink, never interleaved."""

from __future__ import annotations

import datetime as dt
import json
import multiprocessing
import os
from pathlib import Path

import pytest

from pam_svmm.adapters.audit_log import AuditLog, AuditWriteError
from pam_svmm.domain.audit_record import AuditRecord, CardFacts, Outcome

T = dt.datetime(2026, 11, 27, 12, 0, tzinfo=dt.UTC)


def record(i: int = 0, detail: str = "") -> AuditRecord:
    return AuditRecord(
        event="auth",
        outcome=Outcome.FAILURE,
        reason="pin_incorrect",
        time=T,
        host="h",
        service="login",
        user=f"user{i}",
        card=CardFacts(fingerprint="ab" * 32),
        detail=detail,
    )


def test_record_is_one_line_with_the_fixed_fields(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "audit" / "audit.jsonl", syslog_mirror=False)
    log.write(record(detail="line\nbreak"))
    lines = (tmp_path / "audit" / "audit.jsonl").read_text().splitlines()
    assert len(lines) == 1
    rec = json.loads(lines[0])
    assert {"user", "card", "host", "service", "vm", "outcome", "reason", "time"} <= rec.keys()
    assert rec["card"]["fingerprint"] == "ab" * 32
    assert oct((tmp_path / "audit" / "audit.jsonl").stat().st_mode & 0o777) == "0o600"
    assert oct((tmp_path / "audit").stat().st_mode & 0o777) == "0o700"


def test_a_planted_symlink_is_not_followed(tmp_path: Path) -> None:
    target = tmp_path / "victim"
    target.write_text("precious\n")
    (tmp_path / "audit.jsonl").symlink_to(target)
    with pytest.raises(AuditWriteError):
        AuditLog(tmp_path / "audit.jsonl", syslog_mirror=False).write(record())
    assert target.read_text() == "precious\n"


def _writer(path: str, worker: int) -> None:
    log = AuditLog(Path(path), syslog_mirror=False)
    for i in range(50):
        log.write(record(worker * 1000 + i, detail="x" * 3000))


def test_concurrent_writers_never_interleave_or_lose_records(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(str(path), w)) for w in range(8)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
        assert p.exitcode == 0
    users = sorted(json.loads(line)["user"] for line in path.read_text().splitlines())
    assert users == sorted(f"user{w * 1000 + i}" for w in range(8) for i in range(50))
    assert os.path.getsize(path) > 8 * 50 * 3000
