"""What the launcher does when the card that opened VMs is pulled out, or put back.

The configured action (``launcher.card_removal``) applies to every VM the card opened:

* ``pause``: pause the VM (its volumes are the handle's business: a handle that holds
  volume keys closes them in ``pause()``);
* ``stop``: stop the VM;
* ``lock``: leave the VMs running; only the audit record (and a ``lock`` action the caller
  may use to lock the user's sessions).

Fail closed: a VM whose pause fails is stopped instead; one that cannot be stopped either is
reported with ``ok=False`` (audited as an error) and stays pending: ``retry()`` (svmmd's
sweeper calls it every few seconds) stops it again until it is gone, and audits that once.

Re-inserting the card resumes nothing by itself: ``on_inserted`` answers ``await_pin`` for
the VMs the card had opened, and the launcher resumes them after a fresh PIN login with that
card. Every decision, including "nothing to do", is one audit record per VM (or per card
when it opened none) through the ``audit`` callback (``AuditLog.write`` fits).
"""

from __future__ import annotations

import datetime as dt
import enum
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from ..adapters.card_watch import CardEvent, CardEventKind
from ..domain.audit_record import AuditRecord, CardFacts, Outcome
from ..errors import ConfigError, SvmmError

CONFIG_KEY = "launcher.card_removal"


class RemovalAction(enum.Enum):
    PAUSE = "pause"
    STOP = "stop"
    LOCK = "lock"

    @classmethod
    def parse(cls, value: object, key: str = CONFIG_KEY) -> RemovalAction:
        if isinstance(value, enum.Enum):
            value = value.value
        try:
            return cls(value)
        except ValueError:
            choices = "|".join(a.value for a in cls)
            raise ConfigError(key, f"{value!r} is not one of {choices}") from None


class ActionKind(enum.Enum):
    PAUSE = "pause"
    STOP = "stop"
    LOCK = "lock"
    AWAIT_PIN = "await_pin"  # re-insertion: resume only after a fresh PIN login
    NONE = "none"  # nothing opened by this card


class VmHandle(Protocol):
    """A running VM as the launcher's registry hands it out."""

    @property
    def vm_id(self) -> str: ...

    @property
    def user(self) -> str: ...

    def pause(self) -> None: ...

    def stop(self) -> None: ...


class VmRegistry(Protocol):
    def vms_opened_by(self, card_serial: str) -> list[Any]:
        """The running VMs (``VmHandle``) started in sessions opened with this card."""
        ...


@dataclass(frozen=True)
class Action:
    """One decision: what was done (or is awaited) for one VM of a card."""

    kind: ActionKind
    card_serial: str
    vm_id: str = ""
    user: str = ""
    ok: bool = True
    reason: str = ""  # stable token, as in the audit record
    detail: str = ""


# A VM whose stop failed at card removal is stopped again after RETRY_FIRST seconds, then
# after twice as long each time, never more than RETRY_MAX apart.
RETRY_FIRST = 5.0
RETRY_MAX = 300.0


@dataclass
class _Pending:
    user: str
    first: str  # the first failure, as audited
    wait: float  # seconds until the next try after this one fails
    due: float  # monotonic time of the next try


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _describe(error: Exception) -> str:
    return error.message if isinstance(error, SvmmError) else type(error).__name__


class CardRemovalPolicy:
    """Applies the configured ``action`` to the VMs a removed card opened; thread-safe."""

    def __init__(
        self,
        action: RemovalAction | str,
        registry: VmRegistry,
        audit: Callable[[AuditRecord], object],
        *,
        host: str = "",
        service: str = "svmmd",
        clock: Callable[[], dt.datetime] = _now,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.action = RemovalAction.parse(action, "action")
        self._registry = registry
        self._audit = audit
        self._host = host
        self._service = service
        self._clock = clock
        self._monotonic = monotonic
        self._lock = threading.Lock()
        # card serial -> VM ids acted on at removal, until the card comes back
        self._removed: dict[str, tuple[str, ...]] = {}
        # (card serial, VM id) of the VMs whose stop failed -> who, why, and when to stop it
        # again: retry() does until it is gone
        self._pending: dict[tuple[str, str], _Pending] = {}

    @classmethod
    def from_config(
        cls,
        config: Any,
        registry: VmRegistry,
        audit: Callable[[AuditRecord], object],
        *,
        default: RemovalAction | str = RemovalAction.PAUSE,
        **kwargs: Any,
    ) -> CardRemovalPolicy:
        """Take ``card_removal`` from ``config.launcher`` when that section has it."""
        value = getattr(getattr(config, "launcher", None), "card_removal", None)
        action = RemovalAction.parse(value) if value is not None else default
        return cls(action, registry, audit, **kwargs)

    def removed_cards(self) -> frozenset[str]:
        """Cards pulled out and not yet put back."""
        with self._lock:
            return frozenset(self._removed)

    def pending(self) -> frozenset[tuple[str, str]]:
        """(card serial, VM id) of the VMs a removal could not stop yet."""
        with self._lock:
            return frozenset(self._pending)

    def handle(self, event: CardEvent) -> list[Action]:
        """``on_removed`` or ``on_inserted`` for a watcher event (fits ``on_event``)."""
        if event.kind is CardEventKind.REMOVED:
            return self.on_removed(event.serial, cause=event.reason)
        return self.on_inserted(event.serial)

    # --- removal ---------------------------------------------------------------------------

    def on_removed(self, serial: str, *, cause: str = "removed") -> list[Action]:
        with self._lock:
            vms = list(self._registry.vms_opened_by(serial))
            actions = [self._apply(serial, vm) for vm in vms]
            if not actions:
                actions = [Action(ActionKind.NONE, serial, reason="no_vms")]
            self._removed[serial] = tuple(a.vm_id for a in actions if a.vm_id)
            for a in actions:
                if not a.ok:
                    due = self._monotonic() + RETRY_FIRST
                    self._pending[(serial, a.vm_id)] = _Pending(a.user, a.detail, RETRY_FIRST, due)
        self._write("card_removed", actions, f"card {cause}; configured action {self.action.value}")
        return actions

    def retry(self) -> list[Action]:
        """Stop again the VMs a removal could not stop, each when it is due (5 s after the
        failure, then twice as long each time, at most 5 min: a QEMU that cannot be stopped
        must not keep the launcher busy with it). One that is stopped now, or gone
        meanwhile, is audited once (``card_removed``, ``stopped_on_retry``); one that still
        resists stays pending, logged by the caller, not audited again (bounded records)."""
        done: list[Action] = []
        with self._lock:
            now = self._monotonic()
            for key in sorted(k for k, p in self._pending.items() if p.due <= now):
                serial, vm_id = key
                pending = self._pending[key]
                first = f"first failure: {pending.first}"
                vm = next(
                    (v for v in self._registry.vms_opened_by(serial) if str(v.vm_id) == vm_id),
                    None,
                )
                if vm is None:  # stopped by someone else, or exited: it no longer runs
                    action = Action(ActionKind.STOP, serial, vm_id, pending.user,
                                    reason="stopped_on_retry", detail=f"gone; {first}")  # fmt: skip
                else:
                    action = self._stop(serial, vm, "stopped_on_retry", first)
                    if not action.ok:
                        pending.wait = min(pending.wait * 2, RETRY_MAX)
                        pending.due = self._monotonic() + pending.wait
                        continue
                del self._pending[key]
                done.append(action)
        if done:
            self._write("card_removed", done, "card removed; a failed stop retried")
        return done

    def _apply(self, serial: str, vm: Any) -> Action:
        vm_id, user = str(vm.vm_id), str(vm.user)
        if self.action is RemovalAction.LOCK:
            return Action(ActionKind.LOCK, serial, vm_id, user, reason="locked")
        if self.action is RemovalAction.PAUSE:
            try:
                vm.pause()
            except Exception as e:  # any failure: fall back to stopping it
                return self._stop(serial, vm, "pause_failed_stopped", f"pause: {_describe(e)}")
            return Action(ActionKind.PAUSE, serial, vm_id, user, reason="paused")
        return self._stop(serial, vm, "stopped", "")

    def _stop(self, serial: str, vm: Any, reason: str, detail: str) -> Action:
        vm_id, user = str(vm.vm_id), str(vm.user)
        try:
            vm.stop()
        except Exception as e:  # reported, not raised: the other VMs still get their action
            detail = "; ".join(d for d in (detail, f"stop: {_describe(e)}") if d)
            return Action(ActionKind.STOP, serial, vm_id, user, False, "stop_failed", detail)
        return Action(ActionKind.STOP, serial, vm_id, user, reason=reason, detail=detail)

    # --- re-insertion ----------------------------------------------------------------------

    def on_inserted(self, serial: str) -> list[Action]:
        with self._lock:
            acted_on = self._removed.pop(serial, None)
            if acted_on is None:
                actions = [Action(ActionKind.NONE, serial, reason="not_removed")]
            else:
                running = {str(vm.vm_id): vm for vm in self._registry.vms_opened_by(serial)}
                actions = [
                    Action(
                        ActionKind.AWAIT_PIN,
                        serial,
                        vm_id,
                        str(running[vm_id].user),
                        reason="await_pin",
                    )
                    for vm_id in acted_on
                    if vm_id in running
                ] or [Action(ActionKind.AWAIT_PIN, serial, reason="await_pin")]
        self._write("card_inserted", actions, "card inserted; resume needs a PIN login")
        return actions

    # --- audit -----------------------------------------------------------------------------

    def _write(self, event: str, actions: list[Action], summary: str) -> None:
        """One record per action; an audit failure is raised after all are attempted."""
        failure: Exception | None = None
        now = self._clock()
        for a in actions:
            record = AuditRecord(
                event=event,
                outcome=Outcome.SUCCESS if a.ok else Outcome.ERROR,
                reason=a.reason,
                time=now,
                host=self._host,
                service=self._service,
                user=a.user,
                card=CardFacts(token_serial=a.card_serial),
                vm=a.vm_id,
                detail="; ".join(d for d in (summary, a.detail) if d),
            )
            try:
                self._audit(record)
            except Exception as e:  # keep writing the others
                failure = failure or e
        if failure is not None:
            raise failure
