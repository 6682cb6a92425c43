"""The audit log: one chained JSON line per decision, never through a symlink, never
interleaved; sealed with a root-only key."""

from __future__ import annotations

import datetime as dt
import json
import multiprocessing
import os
from pathlib import Path

import pytest

from pam_svmm.adapters.audit_log import (
    AuditLog,
    AuditWriteError,
    SealKeyError,
    head_path,
    load_seal_key,
)
from pam_svmm.domain import audit_chain
from pam_svmm.domain.audit_chain import Tamper
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


# --- the chain, the seals, the head ---------------------------------------------------------


def sealed_log(tmp_path: Path, every: int = 10) -> AuditLog:
    return AuditLog(
        tmp_path / "log" / "audit.jsonl",
        syslog_mirror=False,
        seal_key=tmp_path / "etc" / "seal.key",
        seal_every=every,
    )


def verify(log: AuditLog, every: int | None = None) -> audit_chain.VerifyResult:
    assert log.seal_key is not None
    key = load_seal_key(log.seal_key)
    head = head_path(log.path).read_bytes() if head_path(log.path).exists() else None
    return audit_chain.verify(
        audit_chain.split_lines(log.path.read_bytes()), key, head, seal_every=every
    )


def test_records_are_chained_and_sealed_and_the_head_follows(tmp_path: Path) -> None:
    log = sealed_log(tmp_path, every=3)
    for i in range(7):
        log.write(record(i))
    lines = [json.loads(line) for line in log.path.read_text().splitlines()]
    assert [d["seq"] for d in lines] == list(range(1, 10))
    assert [d["event"] for d in lines] == ["auth"] * 3 + ["seal"] + ["auth"] * 3 + ["seal", "auth"]
    result = verify(log, every=3)
    assert result.ok, result.first_problem
    assert (result.records, result.seals, result.last_seq) == (7, 2, 9)
    head = head_path(log.path)
    assert json.loads(head.read_text())["seq"] == 9
    assert oct(head.stat().st_mode & 0o777) == "0o600"
    assert not [p for p in head.parent.iterdir() if p.name.endswith(".tmp")]


def test_without_a_key_the_chain_is_written_but_no_seal_or_head(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, syslog_mirror=False)
    for i in range(3):
        log.write(record(i))
    lines = audit_chain.split_lines(path.read_bytes())
    assert [json.loads(line)["seq"] for line in lines] == [1, 2, 3]
    assert audit_chain.verify(lines, None, None).ok
    assert not head_path(path).exists()


def test_long_records_chain_correctly(tmp_path: Path) -> None:
    # Lines longer than the chunk the writer reads back from the end of the file.
    log = sealed_log(tmp_path)
    for i in range(5):
        log.write(record(i, detail="y" * (20_000 + i)))
    assert verify(log).ok


def test_an_edit_is_found_by_verification(tmp_path: Path) -> None:
    log = sealed_log(tmp_path, every=4)
    for i in range(10):
        log.write(record(i))
    data = log.path.read_bytes()
    log.path.write_bytes(data.replace(b'"user3"', b'"userX"'))
    problem = verify(log).first_problem
    assert problem is not None
    assert (problem.seq, problem.line_no, problem.kind) == (4, 4, Tamper.EDITED)


def test_a_torn_line_is_closed_off_and_noted_as_a_gap(tmp_path: Path) -> None:
    log = sealed_log(tmp_path)
    for i in range(3):
        log.write(record(i))
    with open(log.path, "ab") as f:
        f.write(b'{"event":"auth","us')  # a write that failed half way
    log.write(record(3))
    log.write(record(4))
    lines = log.path.read_bytes().splitlines(keepends=True)
    assert lines[3] == b'{"event":"auth","us' + audit_chain.TORN_CLOSE  # kept, closed off
    gap = json.loads(lines[4])
    assert gap["event"] == audit_chain.GAP_EVENT and gap["seq"] == 4
    assert gap["prev"] == audit_chain.line_hash(lines[2])  # chained to the last whole line
    assert [json.loads(line)["seq"] for line in lines[5:]] == [5, 6]  # the seq continues
    result = verify(log)
    assert result.ok, result.first_problem
    assert result.records == 5 and result.gaps == (audit_chain.Gap(4, 1, len(lines[3]), 4),)


def test_a_line_that_is_not_a_chain_line_is_still_reported(tmp_path: Path) -> None:
    log = sealed_log(tmp_path)
    for i in range(3):
        log.write(record(i))
    with open(log.path, "ab") as f:
        f.write(b'{"event":"auth","us\n')  # whole, but no record: an edit, not a torn write
    log.write(record(3))
    problem = verify(log).first_problem
    assert problem is not None
    assert (problem.line_no, problem.kind) == (4, Tamper.MALFORMED)


def test_legacy_records_stay_readable_before_the_chain(tmp_path: Path) -> None:
    log = sealed_log(tmp_path)
    log.path.parent.mkdir(mode=0o700)
    log.path.write_text(record(0).to_json() + "\n" + record(1).to_json() + "\n")
    log.write(record(2))
    result = verify(log)
    assert result.ok and result.legacy == 2 and result.records == 1


def test_a_planted_symlink_at_the_head_is_replaced_not_followed(tmp_path: Path) -> None:
    log = sealed_log(tmp_path)
    log.write(record(0))
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    head = head_path(log.path)
    head.unlink()
    head.symlink_to(victim)
    log.write(record(1))
    assert victim.read_text() == "precious\n"
    assert not head.is_symlink()
    assert verify(log).ok


def _sealed_writer(path: str, key: str, worker: int) -> None:
    log = AuditLog(Path(path), syslog_mirror=False, seal_key=Path(key), seal_every=10)
    for i in range(50):
        log.write(record(worker * 1000 + i, detail="x" * 500))


def test_concurrent_sealed_writers_leave_an_intact_chain_with_every_record(
    tmp_path: Path,
) -> None:
    # 16 processes, 50 records each; the key does not exist yet, so they also race to make it.
    path, key = tmp_path / "log" / "audit.jsonl", tmp_path / "etc" / "seal.key"
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_sealed_writer, args=(str(path), str(key), w)) for w in range(16)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
        assert p.exitcode == 0
    lines = audit_chain.split_lines(path.read_bytes())
    result = audit_chain.verify(
        lines, load_seal_key(key), head_path(path).read_bytes(), seal_every=10
    )
    assert result.ok, result.first_problem
    assert (result.records, result.seals) == (800, 80)
    users = sorted(
        d["user"] for d in map(json.loads, lines) if d["event"] != audit_chain.SEAL_EVENT
    )
    assert users == sorted(f"user{w * 1000 + i}" for w in range(16) for i in range(50))


# --- the seal key ---------------------------------------------------------------------------


def test_the_key_is_created_root_only_on_first_use_and_then_reused(tmp_path: Path) -> None:
    log = sealed_log(tmp_path)
    assert log.seal_key is not None and not log.seal_key.exists()
    log.write(record(0))
    st = log.seal_key.stat()
    assert oct(st.st_mode & 0o777) == "0o600"
    assert st.st_uid == os.geteuid()
    key = log.seal_key.read_bytes()
    assert len(key) == 32 and key != b"\0" * 32
    sealed_log(tmp_path).write(record(1))
    assert log.seal_key.read_bytes() == key
    assert not [p for p in log.seal_key.parent.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o602])
def test_a_key_others_can_reach_is_refused(tmp_path: Path, mode: int) -> None:
    log = sealed_log(tmp_path)
    assert log.seal_key is not None
    log.seal_key.parent.mkdir()
    log.seal_key.write_bytes(os.urandom(32))
    log.seal_key.chmod(mode)
    with pytest.raises(SealKeyError) as e:
        log.write(record(0))
    assert str(log.seal_key) in e.value.message and f"{mode:04o}" in e.value.message
    assert isinstance(e.value, AuditWriteError)
    assert not log.path.exists()  # nothing written unsealed


def test_a_key_owned_by_someone_else_is_refused(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to give the key away")
    key = tmp_path / "seal.key"
    key.write_bytes(os.urandom(32))
    key.chmod(0o600)
    os.chown(key, 65534, 65534)
    with pytest.raises(SealKeyError, match="owned by uid 65534"):
        load_seal_key(key)


def test_a_symlinked_short_or_missing_key_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "real.key"
    real.write_bytes(os.urandom(32))
    real.chmod(0o600)
    link = tmp_path / "link.key"
    link.symlink_to(real)
    with pytest.raises(SealKeyError, match="symlink"):
        load_seal_key(link)
    short = tmp_path / "short.key"
    short.write_bytes(b"x" * 16)
    short.chmod(0o600)
    with pytest.raises(SealKeyError, match="shorter"):
        load_seal_key(short)
    with pytest.raises(SealKeyError, match="does not exist"):
        load_seal_key(tmp_path / "none.key")
