"""The PAM session entry points: they never raise into pam_python, every failure is
PAM_SESSION_ERR (never a success), accounts the module knows nothing about are ignored, and a
session id from the PAM environment closes only a session this process opened."""

from __future__ import annotations

import datetime as dt
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from pam_svmm.config import Config, PolicyConfig, SessionConfig
from pam_svmm.domain.audit_record import CardFacts
from pam_svmm.domain.identity import Identity, PosixAccount
from pam_svmm.domain.policy import load_policy
from pam_svmm.errors import PolicyUnavailable
from pam_svmm.pam import entry
from pam_svmm.services.auth import LoginResult
from pam_svmm.services.session import SessionManager
from tests.unit.fakes import POLICY, FakePamh, StubPolicy

NOW = dt.datetime(2026, 3, 1, 9, 0, tzinfo=dt.UTC)


class FakeService:
    """The LoginService parts the session entry uses; audit records are kept."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.records: list[tuple[str, str, str, str]] = []
        self.now = lambda: NOW

    def host_name(self) -> str:
        return "lab-host"

    def audit_policy_loads(self, service: str = "") -> None:
        pass

    def _identity_by_name(self, name: str) -> Identity | None:
        return None

    def audit_event(
        self, event: str, request: Any, attempt: Any, outcome: Any, reason: str, detail: str = ""
    ) -> None:
        self.records.append((event, outcome.value, reason, detail))


@pytest.fixture
def world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[FakeService, SessionManager]:
    cfg = replace(
        Config(),
        policy=PolicyConfig(enabled=True),
        session=SessionConfig(
            allowlist_dir=tmp_path / "allowlist", state_dir=tmp_path / "sessions"
        ),
    )
    svc = FakeService(cfg)
    manager = SessionManager(cfg, policy=StubPolicy(load_policy(POLICY.read_bytes())))
    monkeypatch.setattr(entry, "_service", lambda args, **_: svc)
    monkeypatch.setattr(entry, "_session_manager", lambda s: manager)
    entry._logins.clear()
    entry._sessions.clear()
    ident = Identity("uid=alice", PosixAccount("alice", 10001, 10001), roles=("vm-users",))
    entry._logins["alice"] = LoginResult(
        "alice", "upn", CardFacts(fingerprint="cd" * 32, serial="01"), (), identity=ident
    )
    return svc, manager


def test_open_and_close_through_the_entry(world: tuple[FakeService, SessionManager]) -> None:
    svc, manager = world
    pamh = FakePamh()
    assert entry.pam_sm_open_session(pamh, 0, ["shim"]) == 0
    sid = pamh.env[entry.SESSION_ENV]
    assert sid.startswith(f"tty1:{os.getpid()}:") and len(sid.rsplit(":", 1)[1]) == 16
    doc = manager.store.read(10001)
    assert doc is not None and doc["sessions"] == [sid] and "vm-web" in doc["vms"]
    assert entry.pam_sm_close_session(pamh, 0, ["shim"]) == 0
    assert manager.store.read(10001) is None
    assert [r[:3] for r in svc.records] == [
        ("session_open", "success", "allowlist_written"),
        ("session_close", "success", "allowlist_removed"),
    ]


def test_no_policy_configured_is_ignored(world: tuple[FakeService, SessionManager]) -> None:
    svc, manager = world
    svc.config = replace(svc.config, policy=PolicyConfig(enabled=False))
    pamh = FakePamh()
    assert entry.pam_sm_open_session(pamh, 0, ["shim"]) == FakePamh.PAM_IGNORE
    assert entry.pam_sm_close_session(pamh, 0, ["shim"]) == FakePamh.PAM_IGNORE
    assert svc.records == [] and not manager.store.folder.exists()


def test_unknown_account_is_ignored_silently(world: tuple[FakeService, SessionManager]) -> None:
    svc, manager = world
    pamh = FakePamh("root")
    assert entry.pam_sm_open_session(pamh, 0, ["shim"]) == FakePamh.PAM_IGNORE
    assert entry.pam_sm_close_session(pamh, 0, ["shim"]) == FakePamh.PAM_IGNORE
    assert svc.records == [] and not manager.store.folder.exists()


def test_failure_is_a_session_error_and_audited(
    world: tuple[FakeService, SessionManager],
) -> None:
    svc, manager = world
    manager.policy = StubPolicy(None)
    pamh = FakePamh()
    assert entry.pam_sm_open_session(pamh, 0, ["shim"]) == FakePamh.PAM_SESSION_ERR
    assert entry.SESSION_ENV not in pamh.env
    assert [r[:3] for r in svc.records] == [("session_open", "undecided", "policy_unavailable")]


@pytest.mark.parametrize("boom", [RuntimeError("bug"), PolicyUnavailable("x"), KeyError("k")])
def test_nothing_raises_into_pam_python(
    world: tuple[FakeService, SessionManager], monkeypatch: pytest.MonkeyPatch, boom: Exception
) -> None:
    def broken(*a: Any, **k: Any) -> Any:
        raise boom

    monkeypatch.setattr(entry, "_session_subject", broken)
    assert entry.pam_sm_open_session(FakePamh(), 0, ["shim"]) == FakePamh.PAM_SESSION_ERR
    entry._sessions["alice"] = ["x"]
    monkeypatch.setattr(entry, "_service", broken)
    assert entry.pam_sm_close_session(FakePamh(), 0, ["shim"]) == FakePamh.PAM_SESSION_ERR


def test_a_session_id_planted_in_the_pam_environment_closes_nothing(
    world: tuple[FakeService, SessionManager],
) -> None:
    svc, manager = world
    # alice's other session, opened by another process (pid 1)
    from pam_svmm.services.session import SessionSubject

    other = SessionSubject("alice", 10001, ("vm-users",), None, "password")
    manager.open(other, "tty2:1:0000000000000000", now=NOW, facts={"pid": 1})
    pamh = FakePamh()
    pamh.env[entry.SESSION_ENV] = "tty2:1:0000000000000000"  # e.g. from ~/.pam_environment
    assert entry.pam_sm_close_session(pamh, 0, ["shim"]) == FakePamh.PAM_SESSION_ERR
    doc = manager.store.read(10001)
    assert doc is not None and doc["sessions"] == ["tty2:1:0000000000000000"]
    assert svc.records[-1][:3] == ("session_close", "error", "session_unknown")
