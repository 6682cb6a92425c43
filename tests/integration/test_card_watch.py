"""The card watcher against real SoftHSM2 tokens behind pinguard (its ``removed`` marker
pulls a card out of an already-loaded module, as a reader would)."""

from __future__ import annotations

import threading
import time

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from pam_svmm.adapters.card_watch import CardEvent, CardEventKind, CardWatch
from pam_svmm.adapters.token import Pkcs11Module, TokenInfo
from pam_svmm.errors import NoCard, TokenError
from tests.integration.softhsm import pinguard_so, self_signed, softhsm  # noqa: F401

pytestmark = pytest.mark.integration

INTERVAL = 0.2


@pytest.fixture
def cards(softhsm):  # noqa: F811
    module = softhsm.open()
    tokens = {}
    for name in ("alice", "bob"):
        key = ec.generate_private_key(ec.SECP256R1())
        tokens[name] = softhsm.provision(module, name, key, self_signed(key, name))
    return module, tokens


class Recorder:
    """on_event sink that lets a test wait for an event."""

    def __init__(self) -> None:
        self.events: list[tuple[float, CardEvent]] = []
        self.cond = threading.Condition()

    def __call__(self, event: CardEvent) -> None:
        with self.cond:
            self.events.append((time.monotonic(), event))
            self.cond.notify_all()

    def wait_for(self, kind: CardEventKind, serial: str, timeout: float = 3.0) -> float:
        """The time the event arrived; fails the test if it does not within ``timeout``."""
        with self.cond:
            ok = self.cond.wait_for(
                lambda: any(e.kind is kind and e.serial == serial for _, e in self.events), timeout
            )
            assert ok, f"no {kind.value} event for {serial}: {self.events}"
            return next(t for t, e in self.events if e.kind is kind and e.serial == serial)

    def kinds(self) -> list[tuple[str, str, str]]:
        with self.cond:
            return [(e.kind.value, e.serial, e.reason) for _, e in self.events]


class Flaky:
    """The real module, whose slot list fails on demand (as a module or reader can)."""

    def __init__(self, module: Pkcs11Module) -> None:
        self.module = module
        self.fail_next = 0  # -1: fail until changed
        self.error: Exception = TokenError("PKCS#11 call failed: CKR_DEVICE_ERROR")
        self.calls = 0

    def tokens(self) -> list[TokenInfo]:
        self.calls += 1
        if self.fail_next:
            self.fail_next -= 1 if self.fail_next > 0 else 0
            raise self.error
        return self.module.tokens()


def wait_until(predicate, timeout: float = 3.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_removal_and_reinsertion_of_a_watched_card(cards, softhsm):  # noqa: F811
    module, tokens = cards
    alice, bob = tokens["alice"], tokens["bob"]
    rec = Recorder()
    watch = CardWatch(module, interval=INTERVAL, serials=[alice.serial], on_event=rec)
    watch.start()
    try:
        time.sleep(2 * INTERVAL)  # a few quiet polls: nothing to report
        assert rec.kinds() == []

        pulled = time.monotonic()
        softhsm.set_removed(alice)
        softhsm.set_removed(bob)  # not watched: never reported
        seen = rec.wait_for(CardEventKind.REMOVED, alice.serial)
        assert seen - pulled <= 2 * INTERVAL + 0.15

        softhsm.set_removed(alice, False)
        back = time.monotonic()
        seen = rec.wait_for(CardEventKind.INSERTED, alice.serial)
        assert seen - back <= 2 * INTERVAL + 0.15
        time.sleep(2 * INTERVAL)
    finally:
        assert watch.stop()
    assert rec.kinds() == [
        ("removed", alice.serial, "removed"),
        ("inserted", alice.serial, "inserted"),
    ]
    (_, inserted) = rec.events[1]
    assert inserted.token is not None and inserted.token.label == "alice"


def test_watched_card_absent_at_start_is_reported_removed(cards, softhsm):  # noqa: F811
    module, tokens = cards
    softhsm.set_removed(tokens["alice"])
    watch = CardWatch(module, interval=INTERVAL, serials=[])
    watch.watch(tokens["alice"].serial)  # the card that opened the session
    (event,) = watch.poll()
    assert (event.kind, event.serial, event.token) == (
        CardEventKind.REMOVED,
        tokens["alice"].serial,
        None,
    )
    assert watch.poll() == []


def test_iterator_reports_any_token(cards, softhsm):  # noqa: F811
    module, tokens = cards
    bob = tokens["bob"]
    with CardWatch(module, interval=INTERVAL) as watch:
        time.sleep(INTERVAL)  # the first poll sets the baseline
        softhsm.set_removed(bob)
        events = watch.events(timeout=3)
        first = next(events)
        softhsm.set_removed(bob, False)
        second = next(events)
    assert (first.kind, first.serial) == (CardEventKind.REMOVED, bob.serial)
    assert (second.kind, second.serial) == (CardEventKind.INSERTED, bob.serial)
    assert list(watch.events(timeout=0.3)) == []  # stopped and drained


@pytest.mark.parametrize(
    "error", [TokenError("PKCS#11 call failed: CKR_DEVICE_ERROR"), NoCard("CKR_DEVICE_REMOVED")]
)
def test_transient_slot_list_errors_are_not_removals(cards, softhsm, error):  # noqa: F811
    module, tokens = cards
    alice = tokens["alice"]
    flaky = Flaky(module)
    flaky.error = error
    errors: list[Exception] = []
    watch = CardWatch(
        flaky, interval=0.05, serials=[alice.serial], on_error=errors.append, fail_closed_after=5
    )
    assert watch.poll() == []
    flaky.fail_next = 4
    for _ in range(4):
        assert watch.poll() == []
    assert watch.failures == 4 and errors == [error] * 4
    assert watch.poll() == []  # the card is still there
    assert watch.failures == 0

    # A real removal during a run of errors is seen by the first poll that works.
    flaky.fail_next = 2
    softhsm.set_removed(alice)
    assert watch.poll() == [] and watch.poll() == []
    (event,) = watch.poll()
    assert (event.kind, event.reason) == (CardEventKind.REMOVED, "removed")


def test_a_module_that_keeps_failing_fails_closed(cards, softhsm):  # noqa: F811
    module, tokens = cards
    alice = tokens["alice"]
    flaky = Flaky(module)
    watch = CardWatch(flaky, interval=0.05, serials=[alice.serial], fail_closed_after=3)
    assert watch.poll() == []
    flaky.fail_next = -1
    assert watch.poll() == [] and watch.poll() == []
    (event,) = watch.poll()
    assert (event.kind, event.serial, event.reason) == (
        CardEventKind.REMOVED,
        alice.serial,
        "unobservable",
    )
    assert watch.poll() == []  # reported once
    flaky.fail_next = 0
    (event,) = watch.poll()  # seen again: inserted (the policy asks for a PIN)
    assert (event.kind, event.serial) == (CardEventKind.INSERTED, alice.serial)


def test_a_failing_callback_does_not_stop_the_watch(cards, softhsm):  # noqa: F811
    module, tokens = cards
    bob = tokens["bob"]
    errors: list[Exception] = []
    calls: list[CardEvent] = []

    def sink(event: CardEvent) -> None:
        calls.append(event)
        raise RuntimeError("sink broke")

    watch = CardWatch(
        module, interval=0.05, serials=[bob.serial], on_event=sink, on_error=errors.append
    )
    softhsm.set_removed(bob)
    watch.poll()
    softhsm.set_removed(bob, False)
    watch.poll()
    assert [e.kind for e in calls] == [CardEventKind.REMOVED, CardEventKind.INSERTED]
    assert [str(e) for e in errors] == ["sink broke", "sink broke"]


def test_stop_is_prompt_with_a_long_interval(cards):
    module, _ = cards
    watch = CardWatch(module, interval=30.0)
    watch.start()
    wait_until(lambda: watch.running)
    time.sleep(0.1)  # inside the 30 s wait
    started = time.monotonic()
    assert watch.stop(timeout=2.0)
    assert time.monotonic() - started < 0.5
    assert not watch.running
