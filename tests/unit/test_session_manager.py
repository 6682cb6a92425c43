"""The session manager: allowlist content from the policy, refcount over sessions, rollback on
partial failure, and parallel sessions of one user (real files, a stub policy source)."""

from __future__ import annotations

import datetime as dt
import json
import multiprocessing
import os
import stat
import subprocess
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from pam_svmm.adapters import allowlist_store
from pam_svmm.config import Config, SessionConfig
from pam_svmm.domain.audit_record import CardFacts
from pam_svmm.domain.policy import CompiledPolicy, load_policy
from pam_svmm.errors import PolicyUnavailable, SessionFailed
from pam_svmm.services.session import SessionManager, SessionSubject
from tests.unit.fakes import POLICY, StubPolicy

NOW = dt.datetime(2026, 3, 1, 9, 0, tzinfo=dt.UTC)
CARD = CardFacts(fingerprint="ab" * 32, serial="1f2e")
ALICE = SessionSubject("alice", 10001, ("vm-users",), CARD, "card")


def _manager(tmp_path: Path, compiled: CompiledPolicy | None = None) -> SessionManager:
    cfg = replace(
        Config(),
        session=SessionConfig(
            allowlist_dir=tmp_path / "run" / "allowlist",
            state_dir=tmp_path / "run" / "sessions",
            allowlist_ttl=3600,
        ),
    )
    policy = compiled if compiled is not None else load_policy(POLICY.read_bytes())
    return SessionManager(cfg, policy=StubPolicy(policy))


@pytest.fixture
def manager(tmp_path: Path) -> SessionManager:
    return _manager(tmp_path)


def _doc(m: SessionManager, uid: int = 10001) -> dict[str, Any] | None:
    p = m.store.path(uid)
    return json.loads(p.read_text()) if p.exists() else None


def _records(m: SessionManager) -> list[str]:
    return sorted(os.listdir(m.records.folder)) if m.records.folder.exists() else []


def test_open_writes_the_allowlist_from_the_policy(manager: SessionManager) -> None:
    opened = manager.open(ALICE, "tty1:1:aa", now=NOW, facts={"pid": 1})
    doc = _doc(manager)
    assert doc == opened.allowlist.to_dict()
    assert doc is not None
    assert doc["user"] == "alice" and doc["uid"] == 10001 and doc["roles"] == ["vm-users"]
    assert doc["card"] == {"fingerprint": "ab" * 32, "serial": "1f2e"} and doc["method"] == "card"
    assert doc["sessions"] == ["tty1:1:aa"] and doc["host"] == "lab-host"
    assert doc["policy_version"] == 1
    assert doc["issued_at"] == "2026-03-01T09:00:00+00:00"
    assert doc["expires_at"] == "2026-03-01T10:00:00+00:00"
    # vm-users: vm-web; alice herself: bank-a (boot: its volume is listed)
    assert doc["vms"] == {
        "bank-a": {"permissions": ["boot", "console"], "volumes": ["bank-a-data"]},
        "vm-web": {"permissions": ["boot", "console", "network:dmz"], "volumes": ["web-disk"]},
    }
    path = manager.store.path(10001)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644 and opened.path == path
    assert opened.sessions == 1


def test_sessions_are_refcounted_and_the_last_close_removes(manager: SessionManager) -> None:
    manager.open(ALICE, "s1", now=NOW, facts={"pid": 1})
    manager.open(ALICE, "s2", now=NOW + dt.timedelta(minutes=5), facts={"pid": os.getpid()})
    doc = _doc(manager)
    assert doc is not None and doc["sessions"] == ["s1", "s2"]
    assert doc["issued_at"] == "2026-03-01T09:05:00+00:00"  # the second open refreshed it
    closed = manager.close("alice", "s1")
    assert closed is not None and closed.remaining == 1
    doc = _doc(manager)
    assert doc is not None and doc["sessions"] == ["s2"] and doc["vms"]
    closed = manager.close("alice", "s2")
    assert closed is not None and closed.remaining == 0
    assert _doc(manager) is None
    assert _records(manager) == []  # record and lock file gone
    assert manager.close("alice", "s2") is None  # closed already


def test_close_of_an_unknown_session_or_another_users_changes_nothing(
    manager: SessionManager,
) -> None:
    manager.open(ALICE, "s1", now=NOW, facts={"pid": 1})
    assert manager.close("alice", "nope") is None
    assert manager.close("bob", "s1") is None
    assert manager.close("alice", "s1", pid=99) is None  # opened by another process
    doc = _doc(manager)
    assert doc is not None and doc["sessions"] == ["s1"]


def test_users_are_counted_separately(manager: SessionManager) -> None:
    bob = SessionSubject("bob", 10002, ("vm-admins",), None, "password")
    manager.open(ALICE, "a1", now=NOW)
    manager.open(bob, "b1", now=NOW)
    bdoc = _doc(manager, 10002)
    assert bdoc is not None and bdoc["card"] is None and bdoc["method"] == "password"
    assert sorted(bdoc["vms"]) == ["vm-db", "vm-web"]
    manager.close("alice", "a1")
    assert _doc(manager) is None and _doc(manager, 10002) is not None


def test_sessions_of_a_process_that_is_gone_are_dropped(manager: SessionManager) -> None:
    dead_pid = _pid_of_finished_child()
    manager.open(ALICE, "crashed", now=NOW, facts={"pid": dead_pid})
    opened = manager.open(ALICE, "s2", now=NOW, facts={"pid": os.getpid()})
    assert opened.pruned == ("crashed",) and opened.sessions == 1
    doc = _doc(manager)
    assert doc is not None and doc["sessions"] == ["s2"]
    closed = manager.close("alice", "s2")
    assert closed is not None and closed.remaining == 0 and _doc(manager) is None


def _pid_of_finished_child() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_no_policy_writes_nothing(tmp_path: Path) -> None:
    m = _manager(tmp_path)
    m.policy = StubPolicy(None)
    with pytest.raises(PolicyUnavailable):
        m.open(ALICE, "s1", now=NOW)
    assert _doc(m) is None and _records(m) == []


def test_record_failure_rolls_back_a_first_allowlist(
    manager: SessionManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(self: Any, state: Any) -> None:
        raise SessionFailed("disk full")

    monkeypatch.setattr(allowlist_store._Locked, "save", broken)
    with pytest.raises(SessionFailed, match="disk full"):
        manager.open(ALICE, "s1", now=NOW)
    assert _doc(manager) is None
    assert [n for n in _records(manager) if n.endswith(".json")] == []


def test_record_failure_puts_the_previous_allowlist_back(
    manager: SessionManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    manager.open(ALICE, "s1", now=NOW)
    before = manager.store.path(10001).read_bytes()

    def broken(self: Any, state: Any) -> None:
        raise SessionFailed("disk full")

    monkeypatch.setattr(allowlist_store._Locked, "save", broken)
    with pytest.raises(SessionFailed):
        manager.open(ALICE, "s2", now=NOW + dt.timedelta(minutes=1))
    with pytest.raises(SessionFailed):
        manager.close("alice", "s1")  # the last close cannot drop the record: keep the file
    assert manager.store.path(10001).read_bytes() == before
    monkeypatch.undo()
    with manager.records.locked(10001) as held:
        assert list(held.load().sessions) == ["s1"]


def test_allowlist_failure_leaves_the_record_alone(
    manager: SessionManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    manager.open(ALICE, "s1", now=NOW)

    def broken(self: Any, uid: int, data: bytes) -> None:
        raise SessionFailed("cannot write")

    monkeypatch.setattr(allowlist_store.AllowlistStore, "write_bytes", broken)
    with pytest.raises(SessionFailed):
        manager.open(ALICE, "s2", now=NOW)
    monkeypatch.undo()
    with manager.records.locked(10001) as held:
        assert list(held.load().sessions) == ["s1"]
    doc = _doc(manager)
    assert doc is not None and doc["sessions"] == ["s1"]


def _session_worker(args: tuple[str, str, int]) -> None:
    root, name, rounds = args
    m = _manager(Path(root))
    for i in range(rounds):
        sid = f"{name}-{i}"
        m.open(ALICE, sid, now=NOW, facts={"pid": os.getpid()})
        doc = _doc(m)
        assert doc is not None and sid in doc["sessions"]
        assert m.close("alice", sid, pid=os.getpid()) is not None


def _open_worker(args: tuple[str, str]) -> None:
    root, sid = args
    # The pool worker that opens it stays alive meanwhile: the session is live.
    _manager(Path(root)).open(ALICE, sid, now=NOW, facts={"pid": os.getpid()})


def _close_worker(args: tuple[str, str]) -> bool:
    root, sid = args
    return _manager(Path(root)).close("alice", sid) is not None


def test_parallel_sessions_of_one_user(tmp_path: Path) -> None:
    root = str(tmp_path)
    m = _manager(tmp_path)
    with multiprocessing.get_context("fork").Pool(8) as pool:
        pool.map(_session_worker, [(root, f"p{n}", 10) for n in range(8)])
        assert _doc(m) is None and _records(m) == []
        sids = [f"s{n:02d}" for n in range(12)]
        pool.map(_open_worker, [(root, s) for s in sids])
        doc = _doc(m)
        assert doc is not None and doc["sessions"] == sids
        # all but one close at once: the file stays, naming only the survivor
        assert all(pool.map(_close_worker, [(root, s) for s in sids[1:]]))
        doc = _doc(m)
        assert doc is not None and doc["sessions"] == sids[:1]
        assert pool.map(_close_worker, [(root, sids[0])]) == [True]
    assert _doc(m) is None and _records(m) == []
