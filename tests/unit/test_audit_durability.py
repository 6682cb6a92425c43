"""Audit writes are all or nothing (invariant 8): a write that fails (ENOSPC, EIO, short)
raises AuditWriteError and leaves the file as it was or with a torn tail; the next write
notes the torn tail in a gap record and the chain verifies again; a failed head update
never turns a written record into a failure; a decision that could not be audited is
refused (local accounts: "could not decide"), or with disk_full_action = "allow" stands."""

from __future__ import annotations

import datetime as dt
import errno
import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pam_svmm import config as config_mod
from pam_svmm.adapters import audit_log
from pam_svmm.adapters.audit_log import AuditLog, AuditWriteError, head_path, load_seal_key
from pam_svmm.cli.main import main
from pam_svmm.domain import audit_chain
from pam_svmm.domain.audit_chain import Tamper
from pam_svmm.domain.audit_record import AuditRecord, CardFacts, Outcome
from pam_svmm.errors import ConfigError, PinIncorrect, PinTries
from pam_svmm.pam import entry, shim
from pam_svmm.services.auth import LoginResult
from pam_svmm.services.login import LoginService
from tests.unit import cli_schemas
from tests.unit.fakes import FakePamh

T = dt.datetime(2026, 12, 3, 8, 0, tzinfo=dt.UTC)
REAL_WRITE = os.write


def record(i: int, outcome: Outcome = Outcome.FAILURE) -> AuditRecord:
    return AuditRecord(
        event="auth",
        outcome=outcome,
        reason="ok" if outcome is Outcome.SUCCESS else "pin_incorrect",
        time=T,
        host="h",
        service="login",
        user=f"user{i}",
        card=CardFacts(fingerprint="cd" * 32),
    )


def sealed(tmp_path: Path, every: int = 10, **kw: Any) -> AuditLog:
    return AuditLog(
        tmp_path / "log" / "audit.jsonl",
        syslog_mirror=False,
        seal_key=tmp_path / "etc" / "seal.key",
        seal_every=every,
        **kw,
    )


def verify(log: AuditLog, every: int | None = None) -> audit_chain.VerifyResult:
    assert log.seal_key is not None
    head = head_path(log.path).read_bytes() if head_path(log.path).exists() else None
    lines = audit_chain.split_lines(log.path.read_bytes())
    return audit_chain.verify(lines, load_seal_key(log.seal_key), head, seal_every=every)


def failing_write(
    path: Path, keep: Callable[[bytes], int], *, raise_after: bool = True
) -> Callable[[int, bytes], int]:
    """os.write that, on the audit log only, writes ``keep(data)`` bytes and then, if that
    is not all, raises ENOSPC (``raise_after``) or returns the short count."""

    def write(fd: int, data: bytes) -> int:
        try:
            ours = os.path.samefile(f"/proc/self/fd/{fd}", path)
        except OSError:
            ours = False
        if not ours:
            return REAL_WRITE(fd, data)
        n = REAL_WRITE(fd, data[: keep(data)])
        if raise_after and n < len(data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return n

    return write


def users(log: AuditLog) -> list[str]:
    """The users of the whole records in the log (what `svmm audit show` lists)."""
    out = []
    for line in audit_chain.split_lines(log.path.read_bytes()):
        d = audit_chain.parse_line(line)
        if d is not None and "user" in d:
            out.append(d["user"])
    return out


# --- the writer ---------------------------------------------------------------------------


@pytest.mark.parametrize("raise_after", [True, False], ids=["enospc", "short_write"])
def test_a_write_torn_half_way_fails_and_the_next_record_notes_the_gap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, raise_after: bool
) -> None:
    log = sealed(tmp_path)
    for i in range(3):
        log.write(record(i))
    before = log.path.read_bytes()
    head_before = head_path(log.path).read_bytes()
    with monkeypatch.context() as m:
        m.setattr(
            os, "write", failing_write(log.path, lambda d: len(d) // 2, raise_after=raise_after)
        )
        with pytest.raises(AuditWriteError):
            log.write(record(3))
    after = log.path.read_bytes()
    assert after.startswith(before) and len(after) > len(before)  # nothing removed, a tail
    assert not after.endswith(b"\n")  # the torn half: no record
    assert head_path(log.path).read_bytes() == head_before  # the head never says more
    fragment = after[len(before) :]

    log.write(record(4))
    result = verify(log, every=10)
    assert result.ok, result.first_problem
    assert result.records == 4 and len(result.gaps) == 1
    gap_line = audit_chain.split_lines(log.path.read_bytes())[4]
    gap = json.loads(gap_line)
    torn = fragment + audit_chain.TORN_CLOSE
    assert gap["event"] == audit_chain.GAP_EVENT and gap["seq"] == 4
    assert gap["torn_bytes"] == len(torn)
    assert gap["torn_sha256"] == hashlib.sha256(torn).hexdigest()
    assert gap["prev"] == audit_chain.line_hash(audit_chain.split_lines(before)[-1])
    assert users(log) == ["user0", "user1", "user2", "user4"]


def test_a_write_one_byte_short_is_no_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # All of the JSON but its newline: closed off as a newline would make it a whole record,
    # of a decision that was refused. Closed off as torn it never parses.
    log = sealed(tmp_path)
    log.write(record(0))
    with monkeypatch.context() as m:
        m.setattr(os, "write", failing_write(log.path, lambda d: len(d) - 1, raise_after=False))
        with pytest.raises(AuditWriteError, match="short write"):
            log.write(record(1, Outcome.SUCCESS))
    log.write(record(2))
    result = verify(log)
    assert result.ok, result.first_problem
    assert result.records == 2 and len(result.gaps) == 1
    assert users(log) == ["user0", "user2"]
    assert b'"outcome":"success"' in log.path.read_bytes()  # kept: evidence, never a record


def test_failures_in_a_row_are_one_gap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    log = sealed(tmp_path)
    log.write(record(0))
    with monkeypatch.context() as m:
        m.setattr(os, "write", failing_write(log.path, lambda d: 40))
        for i in (1, 2, 3):  # the 2nd and 3rd tear the closing mark and the gap record
            with pytest.raises(AuditWriteError):
                log.write(record(i))
    log.write(record(4))
    result = verify(log)
    assert result.ok, result.first_problem
    assert result.records == 2 and len(result.gaps) == 1 and result.gaps[0].lines == 3
    assert users(log) == ["user0", "user4"]


def test_a_torn_seal_leaves_the_record_standing_and_is_sealed_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = sealed(tmp_path, every=3)
    log.write(record(0))
    log.write(record(1))

    def tear_the_seal(data: bytes) -> int:
        at = data.find(b'{"event":"seal"')
        return len(data) if at < 0 else at + 20

    with monkeypatch.context() as m:
        m.setattr(os, "write", failing_write(log.path, tear_the_seal))
        log.write(record(2))  # the record is whole and on disk: it stands
    assert users(log) == ["user0", "user1", "user2"]
    log.write(record(3))
    lines = [audit_chain.parse_line(x) for x in audit_chain.split_lines(log.path.read_bytes())]
    events = [d["event"] if d else None for d in lines]
    assert events == ["auth", "auth", "auth", None, "seal", audit_chain.GAP_EVENT, "auth"]
    result = verify(log, every=3)
    assert result.ok, result.first_problem
    assert (result.records, result.seals, len(result.gaps)) == (4, 1, 1)


def test_a_failed_head_update_does_not_fail_a_written_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = sealed(tmp_path)
    log.write(record(0))
    alarms: list[str] = []
    monkeypatch.setattr(audit_log, "_alarm", lambda prio, text: alarms.append(text), raising=False)

    def no_space(self: AuditLog, data: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(AuditLog, "_write_head", no_space)
        log.write(record(1, Outcome.SUCCESS))  # on disk: the decision stands
    assert users(log) == ["user0", "user1"]
    assert any("not renewed" in a for a in alarms)
    problem = verify(log).first_problem  # until the next write, the head is behind
    assert problem is not None and problem.kind is Tamper.INSERTED
    log.write(record(2))
    assert verify(log).ok


def test_a_failed_fdatasync_fails_and_says_the_decision_was_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = sealed(tmp_path)
    log.write(record(0))
    real = os.fdatasync
    calls = []

    def eio_once(fd: int) -> None:
        calls.append(fd)
        if len(calls) == 1:
            raise OSError(errno.EIO, "Input/output error")
        real(fd)

    with monkeypatch.context() as m:
        m.setattr(os, "fdatasync", eio_once)
        with pytest.raises(AuditWriteError):
            log.write(record(1, Outcome.SUCCESS))
    last = json.loads(audit_chain.split_lines(log.path.read_bytes())[-1])
    assert last["event"] == "audit_write_failed" and "seq 2" in last["detail"]
    log.write(record(2))
    assert verify(log).ok


# --- what a gap cannot hide -----------------------------------------------------------------


def test_the_writer_never_notes_records_cut_away_under_it(tmp_path: Path) -> None:
    # Whoever turns the last records into "torn" junk gets no gap record from the writer:
    # the head says they were written.
    log = sealed(tmp_path)
    for i in range(5):
        log.write(record(i))
    lines = audit_chain.split_lines(log.path.read_bytes())
    log.path.write_bytes(b"".join(lines[:3]) + b"junk" + audit_chain.TORN_CLOSE + b"more")
    log.write(record(5))
    assert audit_chain.GAP_EVENT.encode() not in log.path.read_bytes()
    assert not verify(log).ok


def _forged(lines: list[bytes], at: int) -> list[bytes]:
    """Record ``at`` replaced by junk and a gap record naming it, as an attacker without the
    key can: chained to the line before, with that line's seq + 1."""
    junk = b'{"event":"auth","user":"x' + audit_chain.TORN_CLOSE
    before = json.loads(lines[at - 1])
    gap = audit_chain.gap_line(
        junk, before["seq"], before["seq"] + 1, audit_chain.line_hash(lines[at - 1]), "t", "h"
    )
    return [*lines[:at], junk, gap, *lines[at + 1 :]]


@pytest.mark.parametrize("at", [2, 4], ids=["in_the_middle", "the_last_record"])
def test_a_forged_gap_hiding_a_deleted_record_is_found(tmp_path: Path, at: int) -> None:
    log = sealed(tmp_path, every=100)
    for i in range(5):
        log.write(record(i))
    lines = _forged(audit_chain.split_lines(log.path.read_bytes()), at)
    log.path.write_bytes(b"".join(lines))
    problem = verify(log).first_problem
    assert problem is not None  # the next line's prev, or the head, no longer matches


def test_verify_accepts_only_a_gap_record_that_names_the_torn_bytes(tmp_path: Path) -> None:
    log = sealed(tmp_path)
    log.write(record(0))
    with open(log.path, "ab") as f:
        f.write(b'{"event":"auth","us')
    log.write(record(1))
    good = log.path.read_bytes()
    assert verify(log).ok
    # One byte of the torn fragment changed: its hash is no longer the gap record's.
    log.path.write_bytes(good.replace(b'"us ~torn', b'"uX ~torn'))
    problem = verify(log).first_problem
    assert problem is not None and problem.line_no == 2
    # A gap record with no torn bytes before it.
    lines = audit_chain.split_lines(good)
    log.path.write_bytes(lines[0] + b"".join(lines[2:]))
    problem = verify(log).first_problem
    assert problem is not None and problem.kind is Tamper.INSERTED


def test_records_may_not_claim_the_gap_event(tmp_path: Path) -> None:
    log = sealed(tmp_path)
    with pytest.raises(ValueError, match="reserved"):
        audit_chain.chain_line({"event": audit_chain.GAP_EVENT}, 1, audit_chain.ZERO_HASH)
    rec = AuditRecord(
        event=audit_chain.GAP_EVENT, outcome=Outcome.ERROR, reason="x", time=T, host="h"
    )
    with pytest.raises(ValueError, match="reserved"):
        log.write(rec)


# --- disk_full_action -----------------------------------------------------------------------


def test_disk_full_action_is_read_from_the_configuration() -> None:
    assert config_mod.parse({}).audit.disk_full_action is config_mod.DiskFullAction.REFUSE
    cfg = config_mod.parse({"audit": {"disk_full_action": "allow"}})
    assert cfg.audit.disk_full_action is config_mod.DiskFullAction.ALLOW
    with pytest.raises(ConfigError) as e:
        config_mod.parse({"audit": {"disk_full_action": "ignore"}})
    assert e.value.key == "audit.disk_full_action"


@pytest.mark.parametrize("action", list(config_mod.DiskFullAction))
def test_disk_full_action_decides_whether_an_unwritten_record_raises(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, action: config_mod.DiskFullAction
) -> None:
    log = sealed(tmp_path, disk_full_action=action)
    log.write(record(0))
    alarms: list[tuple[int, str]] = []
    monkeypatch.setattr(
        audit_log, "_alarm", lambda prio, text: alarms.append((prio, text)), raising=False
    )
    monkeypatch.setattr(os, "write", failing_write(log.path, lambda d: 0))
    if action is config_mod.DiskFullAction.REFUSE:
        with pytest.raises(AuditWriteError):
            log.write(record(1, Outcome.SUCCESS))
        assert "the decision is refused" in alarms[-1][1]
    else:
        log.write(record(1, Outcome.SUCCESS))  # the decision stands, loudly
        prio, text = alarms[-1]
        assert prio == audit_log.syslog.LOG_ALERT and "NOT written" in text
        assert "user=user1" in text


# --- the callers: never a success for a refusal, never root locked out -----------------------


class StubAuthenticator:
    def __init__(self, user: str, error: BaseException | None) -> None:
        self.user, self.error = user, error

    def authenticate(self, request: Any, prompter: Any, attempt: Any, **kw: Any) -> LoginResult:
        attempt.user = self.user
        if self.error is not None:
            raise self.error
        return LoginResult(self.user, "upn", CardFacts(fingerprint="ef" * 32), ())


def login_service(
    tmp_path: Path, user: str, error: BaseException | None, action: str = "refuse"
) -> LoginService:
    cfg = config_mod.parse(
        {
            "audit": {
                "path": str(tmp_path / "log" / "audit.jsonl"),
                "seal_key": str(tmp_path / "etc" / "seal.key"),
                "syslog": False,
                "disk_full_action": action,
            }
        }
    )
    svc = LoginService(cfg, now=lambda: T)
    stub = StubAuthenticator(user, error)
    svc.authenticator = lambda *a, **k: stub  # type: ignore[method-assign]
    svc.login_module = lambda: None  # type: ignore[attr-defined]  # no PKCS#11 module here
    return svc


def authenticate(monkeypatch: pytest.MonkeyPatch, svc: LoginService, user: str) -> int:
    monkeypatch.setattr(entry, "_service", lambda args, **_: svc)
    entry._logins.clear()
    return entry.pam_sm_authenticate(FakePamh(user, tty="tty1"), 0, ["shim.py"])


def outcomes(svc: LoginService) -> list[str]:
    return [
        d["outcome"]
        for d in map(audit_chain.parse_line, audit_chain.split_lines(svc.audit.path.read_bytes()))
        if d is not None and d.get("event") == "auth"
    ]


WRONG_PIN = PinIncorrect(PinTries.UNKNOWN)
# shim.broken's table: a local account gets "could not decide" (pam_unix still asks root's
# password), a directory user a refusal.
TABLE = [("root", FakePamh.PAM_AUTHINFO_UNAVAIL), ("alice", FakePamh.PAM_AUTH_ERR)]


@pytest.fixture
def passwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "passwd"
    f.write_text("root:x:0:0::/root:/bin/sh\n")
    monkeypatch.setattr(shim, "LOCAL_PASSWD", str(f))


@pytest.mark.usefixtures("passwd")
@pytest.mark.parametrize(("user", "code"), TABLE)
@pytest.mark.parametrize("error", [None, WRONG_PIN], ids=["accepted", "refused"])
def test_a_login_whose_record_cannot_be_written_is_never_a_success(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, user: str, code: int, error: Any
) -> None:
    svc = login_service(tmp_path, user, error)
    svc.audit.write(record(0))
    with monkeypatch.context() as m:
        m.setattr(os, "write", failing_write(svc.audit.path, lambda d: len(d) // 3))
        assert authenticate(monkeypatch, svc, user) == code
    svc.audit.write(record(1))  # space again: the torn tail is noted
    assert verify(svc.audit).ok
    assert outcomes(svc) == ["failure", "failure"]  # records 0 and 1: nothing of the login


@pytest.mark.usefixtures("passwd")
@pytest.mark.parametrize(
    ("error", "code", "outcome"),
    [(None, FakePamh.PAM_SUCCESS, "success"), (WRONG_PIN, FakePamh.PAM_AUTH_ERR, "failure")],
    ids=["accepted", "refused"],
)
def test_a_failed_head_update_never_flips_the_outcome(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: Any, code: int, outcome: str
) -> None:
    svc = login_service(tmp_path, "alice", error)

    def no_space(self: AuditLog, data: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(AuditLog, "_write_head", no_space)
    assert authenticate(monkeypatch, svc, "alice") == code  # what the record says
    assert outcomes(svc) == [outcome]


@pytest.mark.usefixtures("passwd")
@pytest.mark.parametrize(
    ("error", "code"),
    [(None, FakePamh.PAM_SUCCESS), (WRONG_PIN, FakePamh.PAM_AUTH_ERR)],
    ids=["accepted", "refused"],
)
def test_disk_full_action_allow_lets_the_decision_stand(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: Any, code: int
) -> None:
    svc = login_service(tmp_path, "alice", error, action="allow")
    alarms: list[str] = []
    monkeypatch.setattr(audit_log, "_alarm", lambda prio, text: alarms.append(text), raising=False)
    monkeypatch.setattr(os, "write", failing_write(svc.audit.path, lambda d: 0))
    assert authenticate(monkeypatch, svc, "alice") == code
    assert any("NOT written" in a and "user=alice" in a for a in alarms)


# --- svmm audit verify / show ----------------------------------------------------------------


def test_svmm_audit_verify_passes_and_names_the_gap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    log = sealed(tmp_path)
    log.write(record(0))
    with monkeypatch.context() as m:
        m.setattr(os, "write", failing_write(log.path, lambda d: 50))
        with pytest.raises(AuditWriteError):
            log.write(record(1))
    log.write(record(2))
    args = ["audit", "verify", "--path", str(log.path), "--key", str(log.seal_key)]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "intact: 2 records" in out and "gap: 57 bytes of a failed write at line 2" in out
    assert main([*args, "--json"]) == 0
    doc = cli_schemas.parse(capsys.readouterr().out, cli_schemas.AUDIT_VERIFY)
    assert doc["gaps"] == [
        {"line": 2, "lines": 1, "bytes": 50 + len(audit_chain.TORN_CLOSE), "seq": 2}
    ]
    assert main(["audit", "show", "--path", str(log.path)]) == 0
    shown = capsys.readouterr()
    assert "line 2 of" in shown.err and "failed write" in shown.err
    assert audit_chain.GAP_EVENT in shown.out and "user1" not in shown.out
