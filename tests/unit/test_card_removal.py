"""The card-removal policy with fake VM handles: what it does to VMs, what it audits."""

from __future__ import annotations

import datetime as dt
import itertools
from types import SimpleNamespace

import pytest

from pam_svmm.adapters.card_watch import CardEvent, CardEventKind
from pam_svmm.domain.audit_record import AuditRecord, Outcome
from pam_svmm.errors import ConfigError
from pam_svmm.services.card_removal import (
    ActionKind,
    CardRemovalPolicy,
    RemovalAction,
)
from tests.unit.fakes import FakeRegistry, FakeVm

NOW = dt.datetime(2025, 1, 2, 3, 4, 5, tzinfo=dt.UTC)


class Ticks:
    """The monotonic clock retries run on; tests move it."""

    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def make(
    action: str, registry: FakeRegistry, ticks: Ticks | None = None
) -> tuple[CardRemovalPolicy, list[AuditRecord]]:
    records: list[AuditRecord] = []
    policy = CardRemovalPolicy(
        action, registry, records.append, host="h1", clock=lambda: NOW, monotonic=ticks or Ticks()
    )
    return policy, records


@pytest.fixture
def vms() -> tuple[FakeVm, FakeVm, FakeVm]:
    return FakeVm("work"), FakeVm("mail"), FakeVm("other", user="bob")


@pytest.fixture
def registry(vms) -> FakeRegistry:
    a, b, c = vms
    return FakeRegistry({"CARD1": [a, b], "CARD2": [c]})


@pytest.mark.parametrize(
    ("action", "call", "kind", "reason"),
    [
        ("pause", "pause", ActionKind.PAUSE, "paused"),
        ("stop", "stop", ActionKind.STOP, "stopped"),
    ],
)
def test_removal_acts_on_the_cards_vms_only(vms, registry, action, call, kind, reason):
    policy, records = make(action, registry)
    actions = policy.on_removed("CARD1")

    a, b, other = vms
    assert a.calls == [call] and b.calls == [call]
    assert other.calls == []  # opened by another card
    assert [(x.kind, x.vm_id, x.ok, x.reason) for x in actions] == [
        (kind, "work", True, reason),
        (kind, "mail", True, reason),
    ]
    assert [(r.event, r.vm, r.user, r.card.token_serial, r.outcome, r.reason) for r in records] == [
        ("card_removed", "work", "alice", "CARD1", Outcome.SUCCESS, reason),
        ("card_removed", "mail", "alice", "CARD1", Outcome.SUCCESS, reason),
    ]
    assert all(r.host == "h1" and r.time == NOW for r in records)


def test_lock_touches_no_vm_and_audits(vms, registry):
    policy, records = make("lock", registry)
    actions = policy.on_removed("CARD1")

    assert all(vm.calls == [] for vm in vms)
    assert {(x.kind, x.vm_id) for x in actions} == {
        (ActionKind.LOCK, "work"),
        (ActionKind.LOCK, "mail"),
    }
    assert [(r.vm, r.reason) for r in records] == [("work", "locked"), ("mail", "locked")]


def test_card_without_vms_is_audited(registry):
    policy, records = make("stop", registry)
    (action,) = policy.on_removed("NOPE")
    assert (action.kind, action.reason) == (ActionKind.NONE, "no_vms")
    assert [(r.event, r.card.token_serial, r.reason) for r in records] == [
        ("card_removed", "NOPE", "no_vms")
    ]


def test_failed_pause_falls_back_to_stop(registry, vms):
    a, b, _ = vms
    a.fail = frozenset({"pause"})
    policy, records = make("pause", registry)
    actions = policy.on_removed("CARD1")

    assert a.calls == ["pause", "stop"] and b.calls == ["pause"]
    assert (actions[0].kind, actions[0].ok, actions[0].reason) == (
        ActionKind.STOP,
        True,
        "pause_failed_stopped",
    )
    assert "QMP stop failed" in records[0].detail


def test_failed_stop_is_reported_and_the_rest_still_acted_on(registry, vms):
    a, b, _ = vms
    a.fail = frozenset({"pause", "stop"})
    policy, records = make("pause", registry)
    actions = policy.on_removed("CARD1")

    assert (actions[0].ok, actions[0].reason) == (False, "stop_failed")
    assert records[0].outcome is Outcome.ERROR
    assert "RuntimeError" in records[0].detail
    assert b.calls == ["pause"] and actions[1].ok


@pytest.mark.parametrize("action", ["pause", "lock"])
def test_reinsertion_awaits_a_pin_and_resumes_nothing(registry, vms, action):
    policy, records = make(action, registry)
    policy.on_removed("CARD1")
    assert policy.removed_cards() == {"CARD1"}
    records.clear()
    before = [list(vm.calls) for vm in vms]

    actions = policy.on_inserted("CARD1")

    assert [(x.kind, x.vm_id) for x in actions] == [
        (ActionKind.AWAIT_PIN, "work"),
        (ActionKind.AWAIT_PIN, "mail"),
    ]
    assert [vm.calls for vm in vms] == before  # no resume, no call at all
    assert [(r.event, r.reason, r.vm) for r in records] == [
        ("card_inserted", "await_pin", "work"),
        ("card_inserted", "await_pin", "mail"),
    ]
    assert policy.removed_cards() == frozenset()


def test_reinsertion_after_stop_awaits_a_pin_for_the_card(registry):
    policy, _ = make("stop", registry)
    policy.on_removed("CARD1")
    registry.by_card["CARD1"] = []  # stopped VMs leave the registry
    (action,) = policy.on_inserted("CARD1")
    assert (action.kind, action.vm_id, action.card_serial) == (ActionKind.AWAIT_PIN, "", "CARD1")


def test_insertion_of_a_card_never_removed_changes_nothing(registry, vms):
    policy, records = make("pause", registry)
    (action,) = policy.on_inserted("CARD1")
    assert (action.kind, action.reason) == (ActionKind.NONE, "not_removed")
    assert [r.reason for r in records] == ["not_removed"]
    assert all(vm.calls == [] for vm in vms)


def test_handle_dispatches_watcher_events(registry, vms):
    policy, records = make("pause", registry)
    policy.handle(CardEvent(CardEventKind.REMOVED, "CARD2", "unobservable"))
    assert vms[2].calls == ["pause"]
    assert "card unobservable" in records[0].detail
    (action,) = policy.handle(CardEvent(CardEventKind.INSERTED, "CARD2", "inserted"))
    assert action.kind is ActionKind.AWAIT_PIN


def test_audit_failure_is_raised_after_every_record_was_attempted(registry):
    seen: list[AuditRecord] = []

    def audit(record: AuditRecord) -> None:
        seen.append(record)
        raise OSError("disk full")

    policy = CardRemovalPolicy("pause", registry, audit, clock=lambda: NOW)
    with pytest.raises(OSError):
        policy.on_removed("CARD1")
    assert len(seen) == 2


def test_action_from_config():
    registry = FakeRegistry()
    cfg = SimpleNamespace(launcher=SimpleNamespace(card_removal="stop"))
    assert CardRemovalPolicy.from_config(cfg, registry, print).action is RemovalAction.STOP
    assert CardRemovalPolicy.from_config(object(), registry, print).action is RemovalAction.PAUSE
    bad = SimpleNamespace(launcher=SimpleNamespace(card_removal="hibernate"))
    with pytest.raises(ConfigError) as exc:
        CardRemovalPolicy.from_config(bad, registry, print)
    assert exc.value.key == "launcher.card_removal"
    with pytest.raises(ConfigError):
        CardRemovalPolicy("reboot", registry, print)


def unstoppable(
    action: str, registry: FakeRegistry, vm: FakeVm
) -> tuple[CardRemovalPolicy, list[AuditRecord], Ticks]:
    """CARD1 pulled while ``vm`` (one of its VMs) resists both pause and stop."""
    vm.fail = frozenset({"pause", "stop"})
    ticks = Ticks()
    policy, records = make(action, registry, ticks)
    policy.on_removed("CARD1")
    return policy, records, ticks


def test_a_failed_stop_is_retried_until_the_vm_is_stopped(registry, vms):
    a, b, _ = vms
    policy, records, ticks = unstoppable("pause", registry, a)
    assert policy.pending() == {("CARD1", "work")}
    assert policy.retry() == [] and a.calls == ["pause", "stop"]  # not due yet
    ticks.t += 5
    assert policy.retry() == [] and a.calls == ["pause", "stop", "stop"]
    assert len(records) == 2  # a stop that fails again is not audited again
    a.fail = frozenset()
    ticks.t += 9  # the next try is 10 s after the last failure
    assert policy.retry() == [] and a.calls == ["pause", "stop", "stop"]
    ticks.t += 1
    done = policy.retry()
    assert [(x.vm_id, x.reason, x.ok, x.user) for x in done] == [
        ("work", "stopped_on_retry", True, "alice")
    ]
    assert policy.pending() == frozenset() and policy.retry() == []
    assert [(r.event, r.vm, r.reason, r.outcome) for r in records[2:]] == [
        ("card_removed", "work", "stopped_on_retry", Outcome.SUCCESS)
    ]
    assert "first failure: pause: QMP stop failed; stop: RuntimeError" in records[2].detail
    assert b.calls == ["pause"]


def test_a_vm_that_cannot_be_stopped_is_tried_ever_less_often(registry, vms):
    """Each stop attempt holds the launcher for its timeouts: a QEMU that never stops must
    not take the launcher's whole time."""
    a, _, _ = vms
    policy, _, ticks = unstoppable("pause", registry, a)
    tries = []
    for _ in range(3600):  # an hour, polled every second
        ticks.t += 1
        before = a.calls.count("stop")
        policy.retry()
        if a.calls.count("stop") > before:
            tries.append(ticks.t - 100)
    gaps = [b - a_ for a_, b in itertools.pairwise(tries)]
    assert tries[:3] == [5, 15, 35] and max(gaps) == 300 and len(tries) < 20


def test_a_pending_vm_that_is_gone_is_done_and_audited_once(registry, vms):
    a, _, _ = vms
    policy, records, ticks = unstoppable("stop", registry, a)
    registry.by_card["CARD1"].remove(a)  # it exited, or a user's stop took it down
    ticks.t += 5
    assert [(x.vm_id, x.reason) for x in policy.retry()] == [("work", "stopped_on_retry")]
    assert "gone" in records[-1].detail and policy.pending() == frozenset()


def test_a_pending_stop_survives_the_card_coming_back(registry, vms):
    a, _, _ = vms
    a.fail = frozenset({"pause", "stop"})
    policy, _ = make("pause", registry)
    policy.on_removed("CARD1")
    policy.on_inserted("CARD1")
    assert policy.pending() == {("CARD1", "work")}
