"""svmmd's side of a pulled card (Launcher.on_card_event, retry_card_actions): every step
is done whatever became of the one before, and a VM a removal could not stop is stopped
again until it is gone."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from pam_svmm.adapters import logind
from pam_svmm.adapters.allowlist_store import SessionRecords
from pam_svmm.adapters.audit_log import AuditLog, AuditWriteError
from pam_svmm.adapters.card_watch import CardEvent, CardEventKind
from pam_svmm.adapters.processes import start_time
from pam_svmm.services.card_removal import CardRemovalPolicy
from pam_svmm.services.launcher import Launcher
from tests.unit.fakes import FakeRegistry, FakeVm
from tests.unit.launcher_fixtures import (
    ALICE_UID,
    BOB_UID,
    CARD,
    HOST,
    audit_records,
    make_launcher,
)

SERIAL = "1f2e"  # the token serial the keys were released with


def _held(base: Path, vm: FakeVm, ticks: Callable[[], float] = lambda: 0.0) -> Launcher:
    """A launcher holding alice's key for one volume, whose card opened ``vm``."""
    launcher = make_launcher(base)
    reply = launcher.hold_keys(
        uid=ALICE_UID, user="alice", session="tty1:1", card_fingerprint=CARD.fingerprint,
        card_serial=SERIAL, keys={"secret-data": bytearray(b"k" * 32)},
    )  # fmt: skip
    assert reply.ok, reply
    launcher.card_policy = CardRemovalPolicy(
        "pause", FakeRegistry({SERIAL: [vm]}), launcher.audit.write, host=HOST, monotonic=ticks
    )
    return launcher


def _pull_and_close(launcher: Launcher) -> None:
    """The card of SERIAL pulled out; then the launcher stops (wiping what it holds)."""
    try:
        launcher.on_card_event(CardEvent(CardEventKind.REMOVED, SERIAL, "removed"))
    finally:
        launcher.close()


def test_a_pulled_card_pauses_its_vms_even_when_nothing_can_be_audited(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A full disk under the audit log must not keep a pulled card's VM running: the key
    drop's record failing used to end the event before the VMs got their action."""
    vm = FakeVm("secret")
    launcher = _held(tmp_path, vm)
    try:

        def disk_full(self: AuditLog, record: object) -> None:
            raise AuditWriteError("audit log: No space left on device")

        monkeypatch.setattr(AuditLog, "_write", disk_full)
        with (
            caplog.at_level(logging.ERROR, logger="pam_svmm.services.launcher"),
            pytest.raises(AuditWriteError),
        ):
            launcher.on_card_event(CardEvent(CardEventKind.REMOVED, SERIAL, "removed"))
        assert vm.calls == ["pause"]
        assert launcher.keys.card_serials() == set()  # wiped all the same
        # The card_removed record failed first (raised); the key_drop's is logged, not lost.
        assert f"card {SERIAL} removed: audit log: No space left" in caplog.text
    finally:
        launcher.close()


def test_a_vm_whose_stop_failed_is_stopped_by_the_next_sweep(tmp_path: Path) -> None:
    vm = FakeVm("secret", fail=frozenset({"pause", "stop"}))
    now = [0.0]
    launcher = _held(tmp_path, vm, lambda: now[0])
    try:
        launcher.on_card_event(CardEvent(CardEventKind.REMOVED, SERIAL, "removed"))
        now[0] = 5.0
        assert launcher.retry_card_actions() == []  # still failing: kept, logged
        vm.fail = frozenset()
        now[0] = 15.0
        assert launcher.retry_card_actions() == ["secret"]
        assert vm.calls == ["pause", "stop", "stop", "stop"]
        removed = [r for r in audit_records(tmp_path) if r["event"] == "card_removed"]
        assert [(r["vm"], r["reason"], r["outcome"]) for r in removed] == [
            ("secret", "stop_failed", "error"),
            ("secret", "stopped_on_retry", "success"),
        ]
        assert launcher.retry_card_actions() == []
    finally:
        launcher.close()


def test_key_records_name_the_token_serial_as_the_token_serial(tmp_path: Path) -> None:
    """One name per meaning: a held key's card is known by its token's serial, which used
    to be written into card.serial, the field that holds the certificate's serial."""
    launcher = _held(tmp_path, FakeVm("secret"))
    _pull_and_close(launcher)
    keys = [r for r in audit_records(tmp_path) if r["event"] in ("key_hold", "key_drop")]
    assert [r["event"] for r in keys] == ["key_hold", "key_drop"]
    for r in keys:
        assert r["card"]["token_serial"] == SERIAL and r["card"]["serial"] == "", r["card"]
        assert r["card"]["fingerprint"] == CARD.fingerprint


# --- pulling a card locks the logind sessions it opened ------------------------------------


def _card_session(base: Path, uid: int, user: str, sid: str, token: str, logind: str) -> None:
    """A live session record as pam_sm_open_session writes one after a card login."""
    with SessionRecords(base / "sessions").locked(uid) as held:
        state = held.load()
        state.user = user
        state.sessions[sid] = {
            "pid": os.getpid(),
            "pid_start": start_time(os.getpid()),
            "logind_session": logind,
            "token_serial": token,
            "card_fingerprint": CARD.fingerprint,
        }
        held.save(state)


def test_a_pulled_card_locks_the_logind_sessions_it_opened(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    locked: list[str] = []
    monkeypatch.setattr(logind, "lock_session", locked.append)
    launcher = _held(tmp_path, FakeVm("secret"))
    _card_session(tmp_path, ALICE_UID, "alice", "tty1:1", SERIAL, "7")
    _card_session(tmp_path, ALICE_UID, "alice", "pts1:2", SERIAL, "")  # found by its pid
    _card_session(tmp_path, BOB_UID, "bob", "tty2:1", "other-card", "9")
    monkeypatch.setattr(logind, "session_of_pid", lambda pid: "8")
    try:
        launcher.refresh_session_cards()
        assert launcher._session_cards == {SERIAL, "other-card"}  # both watched
        launcher.on_card_event(CardEvent(CardEventKind.REMOVED, SERIAL, "removed"))
    finally:
        launcher.close()
    assert sorted(locked) == ["7", "8"]  # bob's session, of another card, stays
    locks = [r for r in audit_records(tmp_path) if r["event"] == "session_lock"]
    assert [(r["user"], r["outcome"], r["reason"]) for r in locks] == [
        ("alice", "success", "locked")
    ] * 2
    assert {r["card"]["token_serial"] for r in locks} == {SERIAL}
    assert all(r["card"]["fingerprint"] == CARD.fingerprint for r in locks)
    assert "logind session 7" in " ".join(r["detail"] for r in locks)


def test_a_session_logind_cannot_lock_is_an_error_record_and_the_vms_still_pause(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(session_id: str) -> None:
        raise logind.LockFailed(f"loginctl lock-session {session_id}: exit 1: no such session")

    monkeypatch.setattr(logind, "lock_session", refuse)
    monkeypatch.setattr(logind, "session_of_pid", lambda pid: None)
    vm = FakeVm("secret")
    launcher = _held(tmp_path, vm)
    _card_session(tmp_path, ALICE_UID, "alice", "tty1:1", SERIAL, "7")
    _card_session(tmp_path, ALICE_UID, "alice", "tty1:2", SERIAL, "")
    _pull_and_close(launcher)
    assert vm.calls == ["pause"]
    locks = [r for r in audit_records(tmp_path) if r["event"] == "session_lock"]
    assert sorted((r["outcome"], r["reason"]) for r in locks) == [
        ("error", "no_logind_session"),
        ("error", "session_lock_failed"),
    ]


def test_locking_sessions_can_be_switched_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    locked: list[str] = []
    monkeypatch.setattr(logind, "lock_session", locked.append)
    launcher = _held(tmp_path, FakeVm("secret"))
    launcher.config = replace(
        launcher.config,
        launcher=replace(launcher.config.launcher, card_removal_locks_sessions=False),
    )
    _card_session(tmp_path, ALICE_UID, "alice", "tty1:1", SERIAL, "7")
    try:
        launcher.refresh_session_cards()
        assert launcher._session_cards == set()
        launcher.on_card_event(CardEvent(CardEventKind.REMOVED, SERIAL, "removed"))
    finally:
        launcher.close()
    assert locked == []


def test_every_card_event_first_tells_svmmd_s_logins_even_if_a_listener_fails(
    tmp_path: Path,
) -> None:
    """svmmd's card helper started ahead for the next login saw the reader before the event
    (a swapped card is "removed" to it, after the PIN): the PAM responder tells its services."""
    from pam_svmm.daemon.pam_responder import PamResponder
    from pam_svmm.pam import entry

    launcher = make_launcher(tmp_path)
    calls: list[str] = []

    def broken() -> None:
        calls.append("broken")
        raise RuntimeError("a listener that fails")

    class Svc:
        def card_changed(self) -> None:
            calls.append("told")

    launcher.card_listeners.append(broken)
    PamResponder(None, launcher=launcher)  # registers itself
    saved = dict(entry._services)
    entry._services.clear()
    entry._services[("x", 0)] = Svc()
    try:
        for kind in (CardEventKind.REMOVED, CardEventKind.INSERTED):
            with pytest.raises(RuntimeError):
                launcher.on_card_event(CardEvent(kind, SERIAL, kind.value))
    finally:
        entry._services.clear()
        entry._services.update(saved)
        launcher.close()
    assert calls == ["broken", "told"] * 2
