"""The audit trail on a real full filesystem (a 64 KiB tmpfs): writes that do not fit fail
with AuditWriteError, leaving the log as it was or with a torn tail; once there is room
again the next record notes the torn tail, and the real `svmm audit verify` passes and
shows the gap. A login whose record does not fit is never answered or recorded as a
success, and root still gets "could not decide" (so pam_unix asks for the password)."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pam_svmm import config as config_mod
from pam_svmm.adapters.audit_log import AuditLog, AuditWriteError, head_path
from pam_svmm.domain import audit_chain
from pam_svmm.domain.audit_record import AuditRecord, CardFacts, Outcome
from pam_svmm.errors import PinIncorrect, PinTries
from pam_svmm.pam import entry, shim
from pam_svmm.services.auth import LoginResult
from pam_svmm.services.login import LoginService

pytestmark = pytest.mark.integration

T = dt.datetime(2026, 12, 3, 9, 0, tzinfo=dt.UTC)
PAGE = 4096  # tmpfs allocates whole pages: a write that needs one more, when none is left,
# writes what fits in the last page (a short write) and the next one gets ENOSPC


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    where = tmp_path / "fs"
    where.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k,mode=0700", "tmpfs", str(where)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"this host does not let us mount a tmpfs: {mounted.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True)


def record(i: int) -> AuditRecord:
    return AuditRecord(
        event="auth",
        outcome=Outcome.FAILURE,
        reason="pin_incorrect",
        time=T,
        host="h",
        service="login",
        user=f"user{i}",
        card=CardFacts(fingerprint="ab" * 32),
        detail="d" * (i % 37),  # lines of many lengths: page boundaries fall anywhere
    )


def fill(path: Path) -> None:
    """A file that takes every page left."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        while os.write(fd, b"\0" * PAGE) == PAGE:
            pass
    except OSError:
        pass
    finally:
        os.close(fd)


def free_a_page(path: Path) -> None:
    size = path.stat().st_size
    os.truncate(path, max(0, size - size % PAGE - PAGE))


def svmm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pam_svmm.cli.main", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def tear(log: AuditLog, filler: Path, start: int) -> int:
    """Write records on the full filesystem until one (or its seal) is torn; the number of
    the next record."""
    for i in range(start, start + 400):
        before = log.path.stat().st_size
        failed = False
        try:
            log.write(record(i))
        except AuditWriteError:
            failed = True
        if not log.path.read_bytes().endswith(b"\n"):
            return i + 1
        if failed:  # all or nothing: the log is as it was (it ended on a page boundary)
            assert log.path.stat().st_size == before
            free_a_page(filler)
    raise AssertionError("no write was torn")


def test_a_full_disk_tears_a_write_and_verify_then_shows_the_gap(
    small_fs: Path, tmp_path: Path
) -> None:
    log = AuditLog(
        small_fs / "audit" / "audit.jsonl",
        syslog_mirror=False,
        seal_key=tmp_path / "seal.key",  # off the small filesystem: made on first use
        seal_every=5,
    )
    for i in range(3):
        log.write(record(i))
    filler = small_fs / "filler"
    fill(filler)
    i = tear(log, filler, 3)

    # Still full: another attempt fails and changes nothing.
    data, head = log.path.read_bytes(), head_path(log.path).read_bytes()
    with pytest.raises(AuditWriteError):
        log.write(record(i))
    assert log.path.read_bytes() == data and head_path(log.path).read_bytes() == head
    args = ["audit", "verify", "--path", str(log.path), "--key", str(log.seal_key)]
    torn = svmm(*args)
    assert torn.returncode == 1 and "cut off" in torn.stderr, torn.stderr

    filler.unlink()  # room again
    log.write(record(i + 1))
    log.write(record(i + 2))
    ok = svmm(*args)
    assert ok.returncode == 0, ok.stderr
    assert "intact" in ok.stdout and "gap:" in ok.stdout and "of a failed write" in ok.stdout
    doc = json.loads(svmm(*args, "--json").stdout)
    assert doc["intact"] and len(doc["gaps"]) == 1
    gap = doc["gaps"][0]
    lines = audit_chain.split_lines(log.path.read_bytes())
    first, after = gap["line"] - 1, gap["line"] - 1 + gap["lines"]
    region = b"".join(lines[first:after])
    assert region.endswith(audit_chain.TORN_CLOSE) and gap["bytes"] == len(region)
    events = [json.loads(x)["event"] for x in lines[after : after + 2]]
    assert audit_chain.GAP_EVENT in events  # right after it, or after a seal in its slot


# --- a login on the full filesystem -------------------------------------------------------


class Pamh:
    PAM_SUCCESS, PAM_SYSTEM_ERR, PAM_AUTH_ERR, PAM_AUTHINFO_UNAVAIL = 0, 4, 7, 9
    PAM_SESSION_ERR, PAM_CRED_ERR, PAM_IGNORE, PAM_ERROR_MSG = 14, 17, 25, 3

    class exception(Exception):  # pam_python calls it so
        pam_result = 19

    class Message:
        def __init__(self, style: int, msg: str) -> None:
            self.msg_style, self.msg = style, msg

    def __init__(self, user: str) -> None:
        self.user, self.service, self.tty, self.rhost = user, "login", "tty1", ""

    def conversation(self, message: Any) -> None:
        return None


class Card:
    """The card pipeline's answer, without a card: accepted, or a wrong PIN."""

    def __init__(self, user: str, error: BaseException | None) -> None:
        self.user, self.error = user, error

    def authenticate(self, request: Any, prompter: Any, attempt: Any, **kw: Any) -> LoginResult:
        attempt.user = self.user
        if self.error is not None:
            raise self.error
        return LoginResult(self.user, "upn", CardFacts(fingerprint="ef" * 32), ())


@pytest.mark.parametrize(("user", "code"), [("root", 9), ("alice", 7)])
@pytest.mark.parametrize(
    "error", [None, PinIncorrect(PinTries.UNKNOWN)], ids=["accepted", "refused"]
)
def test_a_login_on_a_full_disk_is_never_a_success(
    small_fs: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    user: str,
    code: int,
    error: BaseException | None,
) -> None:
    passwd = tmp_path / "passwd"
    passwd.write_text("root:x:0:0::/root:/bin/sh\n")
    monkeypatch.setattr(shim, "LOCAL_PASSWD", str(passwd))
    cfg = config_mod.parse(
        {
            "audit": {
                "path": str(small_fs / "audit" / "audit.jsonl"),
                "seal_key": str(tmp_path / "seal.key"),
                "syslog": False,
            }
        }
    )
    svc = LoginService(cfg, now=lambda: T)
    card = Card(user, error)
    svc.authenticator = lambda *a, **k: card  # type: ignore[method-assign]
    svc.login_module = lambda: None  # type: ignore[attr-defined]  # no PKCS#11 module here
    monkeypatch.setattr(entry, "_service", lambda args, **_: svc)
    svc.audit.write(record(0))
    filler = small_fs / "filler"
    fill(filler)
    answers = []
    for _ in range(200):  # fill the log's last page with logins; the one that tears counts
        entry._logins.clear()
        answers.append(entry.pam_sm_authenticate(Pamh(user), 0, ["shim.py"]))
        if not svc.audit.path.read_bytes().endswith(b"\n"):
            break
    else:
        raise AssertionError("no login's record was torn")
    assert answers[-1] == code  # root: "could not decide"; a directory user: refused
    filler.unlink()
    svc.audit.write(record(1))
    ok = svmm("audit", "verify", "--path", str(svc.audit.path), "--key", str(tmp_path / "seal.key"))
    assert ok.returncode == 0 and "gap:" in ok.stdout, ok.stderr
    recs = [audit_chain.parse_line(x) for x in audit_chain.split_lines(svc.audit.path.read_bytes())]
    logins = [d for d in recs if d is not None and d.get("event") == "auth" and d["user"] == user]
    # Every login that was recorded was answered as recorded; the torn one is no record.
    assert len(logins) == len(answers) - 1
    wanted = "success" if error is None else "failure"
    assert all(d["outcome"] == wanted for d in logins)
    assert answers[:-1] == [0 if error is None else 7] * (len(answers) - 1)
