"""Watch the PKCS#11 slots for cards being pulled out or put back, by token serial.

The watcher polls ``Pkcs11Module.tokens()`` (C_GetSlotList + C_GetTokenInfo) every
``interval`` seconds and compares the serials present with the previous poll. It does not
use C_WaitForSlotEvent: the blocking form has no timeout (only C_Finalize, from another
thread, can end it, which would tear the module down under every other user of it); the
non-blocking form is optional in PKCS#11 and where it exists it only reports slots whose
state the module itself tracks (SoftHSM2 answers CKR_NO_EVENT forever; pinguard's simulated
removal produces no event either); and some modules only notice new readers when the slot
list is re-read. Polling keeps ``stop()`` prompt and each step bounded by one round of slot calls.

Failures are not removals. A poll that raises (a TokenError or NoCard from the slot list
itself, or anything else the module throws) leaves the known state unchanged and is
reported through ``on_error``; a card missing from a *successful* poll is a removal. Only
when polls keep failing (``fail_closed_after`` in a row) are the watched cards reported
removed with reason ``unobservable``: the host cannot tell whether the card is still there,
and a card it cannot see must not keep VMs open (fail closed). The next successful poll
reports the cards it sees as inserted again.

Use it with a callback (run in the watcher thread)::

    watch = CardWatch(module, interval=0.5, on_event=policy.handle)
    watch.watch(token.serial)        # the card that opened a session; assumed present
    watch.start()
    ...
    watch.stop()

or as an iterator (no callback given: events are queued)::

    with CardWatch(module, interval=0.5) as watch:
        for event in watch.events():
            ...

``poll()`` runs one step synchronously (no thread), for callers with their own loop.

PKCS#11 modules initialised without locking callbacks must not be called from two threads
at once: pass the lock that guards the shared ``Pkcs11Module`` as ``lock``, and every poll
runs under it. A module call that hangs cannot be interrupted from Python; ``stop()`` then
returns after its timeout with the (daemon) thread still inside the call.
"""

from __future__ import annotations

import contextlib
import enum
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

from ..errors import ConfigError
from .token import TokenInfo

DEFAULT_INTERVAL = 1.0
MIN_INTERVAL = 0.05
MAX_INTERVAL = 60.0
DEFAULT_FAIL_CLOSED_AFTER = 5


class TokenLister(Protocol):
    """What the watcher needs from ``Pkcs11Module``."""

    def tokens(self) -> list[TokenInfo]: ...


class CardEventKind(enum.Enum):
    REMOVED = "removed"
    INSERTED = "inserted"


@dataclass(frozen=True)
class CardEvent:
    kind: CardEventKind
    serial: str  # token serial (C_GetTokenInfo serialNumber, padding cut)
    reason: str  # removed | inserted | unobservable
    token: TokenInfo | None = None  # the token as last seen (None if never seen)
    time: float = 0.0  # time.monotonic() of the poll that saw it


def _interval_problem(value: object) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "must be a number of seconds"
    if not MIN_INTERVAL <= value <= MAX_INTERVAL:
        return f"must be between {MIN_INTERVAL:g} and {MAX_INTERVAL:g} seconds"
    return None


def check_interval(value: object, key: str = "launcher.card_poll_interval") -> float:
    """A poll interval within [MIN_INTERVAL, MAX_INTERVAL]; ConfigError naming ``key``."""
    problem = _interval_problem(value)
    if problem is not None:
        raise ConfigError(key, problem)
    return float(value)  # type: ignore[arg-type]


class CardWatch:
    """Polls ``module`` for the tokens present; reports removals and insertions.

    ``serials``: the token serials to report on (more with ``watch``); None reports on
    every token. Watched serials are assumed present when added, so a card pulled before
    the first poll is still reported removed.
    """

    def __init__(
        self,
        module: TokenLister,
        *,
        interval: float = DEFAULT_INTERVAL,
        serials: Iterable[str] | None = None,
        on_event: Callable[[CardEvent], object] | None = None,
        on_error: Callable[[Exception], object] | None = None,
        fail_closed_after: int | None = DEFAULT_FAIL_CLOSED_AFTER,
        lock: AbstractContextManager[Any] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        problem = _interval_problem(interval)
        if problem is not None:
            raise ValueError(f"interval {problem}")
        self.interval = float(interval)
        if fail_closed_after is not None and fail_closed_after < 1:
            raise ValueError("fail_closed_after must be at least 1 (or None: never)")
        self._module = module
        self._on_event = on_event
        self._on_error = on_error
        self._fail_closed_after = fail_closed_after
        self._poll_lock: AbstractContextManager[Any] = lock or threading.Lock()
        self._clock = clock
        self._state = threading.Lock()  # guards the fields below
        self._watched: set[str] | None = None if serials is None else set(serials)
        self._present: dict[str, TokenInfo | None] | None = (
            None if serials is None else dict.fromkeys(self._watched or ())
        )
        self._failures = 0
        self._blind = False  # reported "unobservable" and not yet seen again
        self._queue: queue.SimpleQueue[CardEvent] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_error: Exception | None = None

    @classmethod
    def from_config(cls, config: Any, module: TokenLister, **kwargs: Any) -> CardWatch:
        """Take ``card_poll_interval`` from ``config.launcher`` when that section has it."""
        launcher = getattr(config, "launcher", None)
        value = getattr(launcher, "card_poll_interval", None)
        if value is not None:
            kwargs["interval"] = check_interval(value)
        return cls(module, **kwargs)

    # --- what to watch -------------------------------------------------------------------------

    def watch(self, serial: str) -> None:
        """Report on ``serial`` from now on; it is assumed present until a poll says otherwise."""
        serial = serial.rstrip(" ")
        with self._state:
            if self._watched is None:
                return  # already reporting on every token
            if serial not in self._watched:
                self._watched.add(serial)
                if self._present is not None:
                    self._present.setdefault(serial, None)

    def unwatch(self, serial: str) -> None:
        serial = serial.rstrip(" ")
        with self._state:
            if self._watched is not None:
                self._watched.discard(serial)
                if self._present is not None:
                    self._present.pop(serial, None)

    @property
    def failures(self) -> int:
        """Consecutive failed polls (0 after a successful one)."""
        return self._failures

    # --- one step ------------------------------------------------------------------------------

    def poll(self) -> list[CardEvent]:
        """Poll once; return (and deliver) the events it produced."""
        try:
            with self._poll_lock:
                found = self._module.tokens()
        except Exception as e:  # any failure is "could not see": see _failed
            return self._failed(e)
        now = self._clock()
        seen = {t.serial: t for t in found}
        events: list[CardEvent] = []
        with self._state:
            self._failures = 0
            self._blind = False
            if self._present is None:  # first successful poll: the baseline, no events
                self._present = {s: t for s, t in seen.items() if self._reported(s)}
            else:
                for serial, token in list(self._present.items()):
                    if serial not in seen:
                        events.append(
                            CardEvent(CardEventKind.REMOVED, serial, "removed", token, now)
                        )
                        del self._present[serial]
                    else:
                        self._present[serial] = seen[serial]
                for serial, token in seen.items():
                    if serial not in self._present and self._reported(serial):
                        events.append(
                            CardEvent(CardEventKind.INSERTED, serial, "inserted", token, now)
                        )
                        self._present[serial] = token
                # Watched cards absent now and not "present" before stay absent silently:
                # they were reported removed already.
        self._deliver(events)
        return events

    def _reported(self, serial: str) -> bool:
        return self._watched is None or serial in self._watched

    def _failed(self, error: Exception) -> list[CardEvent]:
        """A poll that raised: "could not see", never "gone". This includes NoCard and
        TokenError from C_GetSlotList itself (tokens() already skips a single token that
        vanishes while it is being read, which a later poll then reports as removed), and
        anything else the module throws: the state stays as last seen."""
        self.last_error = error
        now = self._clock()
        events: list[CardEvent] = []
        with self._state:
            self._failures += 1
            limit = self._fail_closed_after
            if limit is not None and self._failures >= limit and not self._blind:
                self._blind = True
                for serial, token in (self._present or {}).items():
                    events.append(
                        CardEvent(CardEventKind.REMOVED, serial, "unobservable", token, now)
                    )
                if self._present is not None:
                    self._present.clear()
        self._report(error)
        self._deliver(events)
        return events

    def _report(self, error: Exception) -> None:
        if self._on_error is None:
            return
        # A broken error sink must not stop the watch.
        with contextlib.suppress(Exception):
            self._on_error(error)

    def _deliver(self, events: list[CardEvent]) -> None:
        for event in events:
            if self._on_event is None:
                self._queue.put(event)
                continue
            try:
                self._on_event(event)
            except Exception as e:  # the watch goes on; the error sink hears of it
                self._report(e)

    # --- the thread ----------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("the card watch is already running")
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="svmm-card-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            started = self._clock()
            self.poll()
            # A bounded wait that stop() cuts short.
            self._stop.wait(max(0.0, self.interval - (self._clock() - started)))

    def stop(self, timeout: float = 2.0) -> bool:
        """Stop the thread; True when it ended within ``timeout`` seconds."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is None:
            return True
        thread.join(timeout)
        return not thread.is_alive()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def __enter__(self) -> CardWatch:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def events(self, timeout: float | None = None) -> Iterator[CardEvent]:
        """Queued events (only when no ``on_event`` was given) until stopped, or until
        ``timeout`` seconds pass without one."""
        if self._on_event is not None:
            raise RuntimeError("events go to on_event; there is nothing to iterate")
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            step = min(self.interval, 0.1)
            if deadline is not None:
                step = min(step, deadline - time.monotonic())
                if step <= 0:
                    return
            try:
                yield self._queue.get(timeout=step)
            except queue.Empty:
                if self._stop.is_set() and self._queue.empty():
                    return
