"""The PAM entry fails closed: whatever goes wrong below it, the answer is never PAM_SUCCESS,
and it never raises into pam_python (invariant 1)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from pam_svmm import errors
from pam_svmm.domain.audit_record import CardFacts
from pam_svmm.pam import entry, shim
from pam_svmm.services.auth import LoginResult
from tests.unit.fakes import FakePamh


@dataclass
class FakeService:
    error: BaseException | None = None
    result_user: str = "alice"
    calls: list[Any] = field(default_factory=list)

    def close_early(self) -> None:
        self.calls.append(("close_early",))

    def host_name(self) -> str:
        return "host"

    def account(self, request: Any, result: LoginResult | None) -> bool:
        self.calls.append(("account", request.pam_user))
        return result is not None

    def password_allowed(self, service: str) -> bool:
        return False

    def card_login(self, request: Any, prompter: Any) -> LoginResult:
        self.calls.append(request)
        if self.error is not None:
            raise self.error
        return LoginResult(self.result_user, "upn", CardFacts(), ())


@pytest.fixture
def service(monkeypatch: pytest.MonkeyPatch) -> FakeService:
    svc = FakeService()
    monkeypatch.setattr(entry, "_service", lambda args, **_: svc)
    entry._logins.clear()
    return svc


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (RuntimeError("bug"), FakePamh.PAM_SYSTEM_ERR),
        (KeyError("bug"), FakePamh.PAM_SYSTEM_ERR),
        (TimeoutError(), FakePamh.PAM_SYSTEM_ERR),
        (errors.LoginTimeout("slow"), FakePamh.PAM_AUTHINFO_UNAVAIL),
        (errors.NoCard("none"), FakePamh.PAM_AUTHINFO_UNAVAIL),
        (errors.CertificateRevoked("revoked"), FakePamh.PAM_AUTH_ERR),
        (errors.PinLocked("locked"), FakePamh.PAM_MAXTRIES),
        (errors.ConfigError("k", "bad"), FakePamh.PAM_AUTH_ERR),  # alice: not a local account
    ],
)
def test_failures_map_to_their_code_and_never_raise(
    service: FakeService, error: BaseException, code: int
) -> None:
    service.error = error
    pamh = FakePamh(tty="tty1")
    assert entry.pam_sm_authenticate(pamh, 0, ["shim.py"]) == code
    assert pamh.user == "alice"  # PAM_USER untouched on failure
    assert entry.pam_sm_acct_mgmt(pamh, 0, ["shim.py"]) == FakePamh.PAM_IGNORE


@pytest.mark.parametrize(
    ("user", "auth", "account", "session"),
    [
        ("root", 9, 25, 25),  # root's password still works: "could not decide", ignored
        (None, 9, 25, 25),  # no user yet: the next module asks for one
        ("localuser", 9, 25, 25),  # in /etc/passwd: never blocked by this module
        ("alice", 7, 9, 14),  # a directory user gets no login from a broken config
    ],
)
def test_a_broken_configuration_never_locks_local_accounts_out(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch, user: str | None, auth: int, account: int,
    session: int,
) -> None:  # fmt: skip
    """Invariant 15's truth table, with the configuration file missing (an unedited host)."""
    passwd = tmp_path / "passwd"
    passwd.write_text("root:x:0:0::/root:/bin/sh\nlocaluser:x:1000:1000::/home/l:/bin/sh\n")
    monkeypatch.setattr(shim, "LOCAL_PASSWD", str(passwd))
    logged: list[str] = []
    monkeypatch.setattr(entry.syslog, "syslog", lambda _prio, text: logged.append(text))
    entry._services.clear()
    argv = ["shim.py", f"config={tmp_path}/missing.toml"]
    pamh = FakePamh(user=user, tty="tty1")
    pamh.PAM_SESSION_ERR = 14  # type: ignore[attr-defined]
    assert entry.pam_sm_authenticate(pamh, 0, argv) == auth
    assert entry.BROKEN in pamh.said  # the person is told
    assert any("file not found" in t for t in logged)  # syslog names the problem
    assert entry.pam_sm_acct_mgmt(pamh, 0, argv) == account
    assert entry.pam_sm_open_session(pamh, 0, argv) == session
    entry._sessions[user or ""] = ["tty1:1:ab"]
    try:
        assert entry.pam_sm_close_session(pamh, 0, argv) == session
    finally:
        entry._sessions.clear()


def test_success_sets_pam_user_from_the_card(service: FakeService) -> None:
    service.result_user = "bob"
    pamh = FakePamh(user=None, tty="tty1")
    assert entry.pam_sm_authenticate(pamh, 0, ["shim.py"]) == FakePamh.PAM_SUCCESS
    assert pamh.user == "bob"
    assert service.calls[0].pam_user is None
    assert entry.pam_sm_acct_mgmt(pamh, 0, ["shim.py"]) == FakePamh.PAM_SUCCESS
    assert entry.pam_sm_setcred(pamh, 0, ["shim.py"]) == FakePamh.PAM_SUCCESS


def test_acct_mgmt_ignores_users_it_did_not_authenticate(service: FakeService) -> None:
    assert entry.pam_sm_acct_mgmt(FakePamh("carol"), 0, ["shim.py"]) == FakePamh.PAM_IGNORE
    assert entry.pam_sm_setcred(FakePamh("carol"), 0, ["shim.py"]) == FakePamh.PAM_IGNORE


def test_a_broken_handle_is_still_a_system_error(service: FakeService) -> None:
    class Broken(FakePamh):
        @property
        def service(self) -> str:  # type: ignore[override]
            raise RuntimeError("pam_get_item failed")

        @service.setter
        def service(self, value: str) -> None:
            pass

    assert entry.pam_sm_authenticate(Broken(), 0, ["shim.py"]) == FakePamh.PAM_SYSTEM_ERR
