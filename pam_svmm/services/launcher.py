"""The launcher: who may start, stop or look at which VM, decided again at every request.

The protocol ("svmm-launcher/1", JSON lines over a Unix socket; transport in daemon/server.py):

    request  {"version": "svmm-launcher/1", "op": "list"|"start"|"stop"|"status", "vm": "name"}
    reply    {"version": "svmm-launcher/1", "ok": true|false, "reason": "<token>",
              "message": "<for people>", "data": {...}}

A request carries no identity: the caller's uid is the kernel's (SO_PEERCRED), and a request
with any other key (a "uid", a "user") is refused as ``bad_request``. ``vm`` is required for
start, stop and status. Reason tokens: ``ok``; ``bad_request``, ``unsupported_version``,
``vm_name_invalid``; ``no_allowlist``, ``allowlist_tampered``, ``allowlist_invalid``,
``allowlist_uid_mismatch``, ``allowlist_expired``, ``allowlist_host_mismatch``,
``allowlist_unreadable``, ``not_in_allowlist``; the policy's own tokens
(``conflict_of_interest``, ``unknown_vm``, ``no_grant``, ...); ``policy_unavailable``;
``vm_already_running``, ``vm_in_use``, ``vm_not_running``, ``not_owner``,
``volume_key_unavailable``; ``vm_start_failed``, ``qmp_failed``, ``vm_failed``,
``audit_write_failed``, ``internal_error``.

Start: the caller's allowlist (``<allowlist_dir>/<uid>.json``, root-owned 0644, read by
AllowlistStore, parsed strictly) must name the caller's uid, this host, be unexpired and list
``boot`` on the VM; the policy decision point is asked again with the VMs the caller runs
(the Chinese Wall); a VM whose volumes need keys the service does not hold is refused.
Stop and status: the VM's owner (or root). Every request is audited (vm_start, vm_stop,
vm_status, vm_list, vm_deny) with user, uid, VM, the card fingerprint and the reason.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import pwd
import threading
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..adapters.allowlist_store import AllowlistStore
from ..adapters.audit_log import AuditLog
from ..adapters.qemu import NAME_PATTERN, Machine, RunAs, VmSpec, detect_accel
from ..adapters.vm_registry import VmRecord, VmRegistry
from ..config import Config
from ..domain import policy as pdp
from ..domain.allowlist import Allowlist, CardRef, parse_allowlist
from ..domain.audit_record import AuditRecord, CardFacts, Outcome
from ..errors import (
    AllowlistInvalid,
    ConfigError,
    LauncherRefused,
    PolicyUnavailable,
    SessionFailed,
    SvmmError,
    VmError,
    VolumeError,
)

PROTOCOL = "svmm-launcher/1"
OPS = ("list", "start", "stop", "status")
MAX_REQUEST_BYTES = 4096
SERVICE = "svmmd"
log = logging.getLogger(__name__)


class PolicyDecider(Protocol):
    """What the launcher needs of PolicyService."""

    @property
    def host(self) -> str: ...

    def decide(
        self, user: str, roles: Collection[str], vm_id: str, action: str, running: Collection[str]
    ) -> pdp.Decision: ...


# --- the protocol ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    op: str
    vm: str = ""


@dataclass(frozen=True)
class Reply:
    ok: bool
    reason: str
    message: str
    data: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> bytes:
        doc = {
            "version": PROTOCOL,
            "ok": self.ok,
            "reason": self.reason,
            "message": self.message,
            "data": dict(self.data),
        }
        return (json.dumps(doc, sort_keys=True, separators=(",", ":")) + "\n").encode()


def _refuse(reason: str, message: str) -> LauncherRefused:
    return LauncherRefused(message, reason=reason)


def parse_request(line: bytes) -> Request:
    """A request from one JSON line; LauncherRefused(bad_request, ...) otherwise."""
    if len(line) > MAX_REQUEST_BYTES:
        raise _refuse("bad_request", f"request longer than {MAX_REQUEST_BYTES} bytes")
    try:
        doc = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise _refuse("bad_request", "request is not a JSON object") from None
    if not isinstance(doc, dict):
        raise _refuse("bad_request", "request is not a JSON object")
    if doc.get("version") != PROTOCOL:
        raise _refuse("unsupported_version", f"version must be {PROTOCOL!r}")
    extra = sorted(set(doc) - {"version", "op", "vm"})
    if extra:
        # Above all "uid"/"user": who asks is the kernel's answer, never the request's.
        raise _refuse("bad_request", f"unknown request key {extra[0]!r}")
    op = doc.get("op")
    if op not in OPS:
        raise _refuse("bad_request", f"op must be one of {', '.join(OPS)}")
    vm = doc.get("vm", "")
    if not isinstance(vm, str):
        raise _refuse("vm_name_invalid", "vm must be a string")
    if op != "list" and not vm:
        raise _refuse("bad_request", f"{op} needs a vm")
    if vm:
        check_vm_name(vm)
    return Request(op, vm)


def check_vm_name(vm: str) -> str:
    # QEMU's name rule (lower case, no ',' or '='), which is stricter than the policy's.
    if not NAME_PATTERN.fullmatch(vm):
        shown = vm[:40].encode("unicode_escape").decode("ascii")
        raise _refuse("vm_name_invalid", f"{shown!r} is not a valid VM name")
    return vm


# --- the pure decisions ----------------------------------------------------------------------


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str
    message: str
    vm: str = ""
    user: str = ""
    roles: tuple[str, ...] = ()
    card: CardRef | None = None
    volumes: tuple[str, ...] = ()

    def __bool__(self) -> bool:
        raise TypeError("use Decision.allowed, not the Decision itself")


def check_allowlist(data: bytes | None, uid: int, *, now: dt.datetime, host: str) -> Allowlist:
    """The caller's allowlist, if it is one we can trust for ``uid`` at ``now`` on ``host``
    (the file checks, owner and mode, are the store's); LauncherRefused otherwise."""
    if data is None:
        raise _refuse("no_allowlist", f"no VM allowlist for uid {uid}: log in with a card first")
    try:
        allowlist = parse_allowlist(data)
    except AllowlistInvalid as e:
        raise _refuse("allowlist_invalid", e.message) from None
    if allowlist.uid != uid:
        raise _refuse(
            "allowlist_uid_mismatch", f"the allowlist for uid {uid} names uid {allowlist.uid}"
        )
    if not allowlist.valid_at(now):
        raise _refuse("allowlist_expired", f"the allowlist for uid {uid} is not valid now")
    if allowlist.host != host:
        raise _refuse(
            "allowlist_host_mismatch", f"the allowlist is for host {allowlist.host!r}, not {host!r}"
        )
    return allowlist


def decide_start(
    uid: int,
    vm: str,
    allowlist: Allowlist,
    policy: PolicyDecider,
    running: Mapping[str, VmRecord],
    *,
    now: dt.datetime,
    keys_held: Collection[str] = (),
) -> Decision:
    """May ``uid`` (whose checked allowlist this is) boot ``vm`` now?"""

    def deny(reason: str, message: str) -> Decision:
        return Decision(False, reason, message, vm, allowlist.user, allowlist.roles, allowlist.card)

    check_vm_name(vm)
    if not allowlist.permits(vm, pdp.BOOT, now=now):
        return deny("not_in_allowlist", f"{allowlist.user} may not boot {vm} (allowlist)")
    current = running.get(vm)
    if current is not None:
        if current.uid == uid:
            return deny("vm_already_running", f"{vm} is already running")
        return deny("vm_in_use", f"{vm} is running for another user")
    mine = sorted(r.vm for r in running.values() if r.uid == uid)
    try:
        d = policy.decide(allowlist.user, allowlist.roles, vm, pdp.BOOT, mine)
    except PolicyUnavailable as e:
        return deny("policy_unavailable", e.message)
    if not d.allowed:
        return deny(d.reason, d.rule)
    volumes = allowlist.vms[vm].volumes
    missing = [v for v in volumes if v not in keys_held]
    if missing:
        return deny(
            "volume_key_unavailable",
            f"{vm} needs the key of volume {missing[0]}, which the launcher does not hold",
        )
    return Decision(
        True, "ok", d.rule, vm, allowlist.user, allowlist.roles, allowlist.card, volumes
    )


def decide_control(uid: int, vm: str, running: Mapping[str, VmRecord]) -> Decision:
    """May ``uid`` stop or look at ``vm``? Its owner and root may."""
    check_vm_name(vm)
    record = running.get(vm)
    if record is None:
        return Decision(False, "vm_not_running", f"{vm} is not running", vm)
    card = CardRef(record.card_fingerprint, record.card_serial) if record.card_fingerprint else None
    if uid not in (0, record.uid):
        return Decision(False, "not_owner", f"{vm} is not yours", vm, record.user, card=card)
    return Decision(True, "ok", "", vm, record.user, card=card)


# --- the service ----------------------------------------------------------------------------


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"#{uid}"


class Launcher:
    """Handles one request of a caller whose uid the transport learned from the kernel."""

    def __init__(
        self,
        config: Config,
        *,
        policy: PolicyDecider,
        audit: AuditLog,
        registry: VmRegistry | None = None,
        store: AllowlistStore | None = None,
        now: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
    ) -> None:
        self.config = config
        self.policy = policy
        self.audit = audit
        self.registry = registry or VmRegistry(config.launcher.registry_dir)
        self.store = store or AllowlistStore(config.session.allowlist_dir)
        self.now = now
        self._lock = threading.Lock()  # a decision and its action are one step

    def handle(self, uid: int, line: bytes) -> Reply:
        try:
            request = parse_request(line)
        except LauncherRefused as e:
            return self._audited("vm_deny", Outcome.FAILURE, Decision(False, e.reason, e.message),
                                 uid, "request")  # fmt: skip
        try:
            if request.op == "list":
                return self._list(uid)
            if request.op == "start":
                return self._start(uid, request.vm)
            return self._control(uid, request.op, request.vm)
        except SvmmError as e:
            # The audit itself failed (or a check raised): nothing was done after it.
            log.error("request %s by uid %d: %s", request.op, uid, e.message)
            return Reply(False, e.reason, e.message)

    # --- the operations

    def _allowlist(self, uid: int, now: dt.datetime) -> Allowlist:
        try:
            data = self.store.read_bytes(uid)
        except SessionFailed as e:
            # allowlist_tampered: not root's 0644 regular file; else it could not be read.
            reason = e.reason if e.reason != "session_failed" else "allowlist_unreadable"
            raise _refuse(reason, e.message) from None
        except ConfigError as e:
            raise _refuse("allowlist_unreadable", e.message) from None
        return check_allowlist(data, uid, now=now, host=self.policy.host)

    def _list(self, uid: int) -> Reply:
        now = self.now()
        running = self.registry.running()
        mine = sorted(vm for vm, r in running.items() if uid in (0, r.uid))
        allowed: list[dict[str, Any]] = []
        note, user, card = "ok", _user_name(uid), None
        try:
            allowlist = self._allowlist(uid, now)
        except LauncherRefused as e:
            note = e.reason
        else:
            user, card = allowlist.user, allowlist.card
            for vm, a in sorted(allowlist.vms.items()):
                allowed.append(
                    {"vm": vm, "permissions": list(a.permissions), "running": vm in mine}
                )
        decision = Decision(True, "ok", f"allowlist: {note}", "", user, card=card)
        data = {"allowed": allowed, "running": mine, "allowlist": note}
        return self._audited("vm_list", Outcome.SUCCESS, decision, uid, "list", data)

    def _start(self, uid: int, vm: str) -> Reply:
        with self._lock:
            now = self.now()
            try:
                allowlist = self._allowlist(uid, now)
            except LauncherRefused as e:
                d = Decision(False, e.reason, e.message, vm, _user_name(uid))
                return self._audited("vm_deny", Outcome.FAILURE, d, uid, "start")
            d = decide_start(uid, vm, allowlist, self.policy, self.registry.running(), now=now)
            if not d.allowed:
                outcome = Outcome.UNDECIDED if d.reason == "policy_unavailable" else Outcome.FAILURE
                return self._audited("vm_deny", outcome, d, uid, "start")
            lc = self.config.launcher
            run_as = RunAs(lc.vm_user)
            try:
                record = self.registry.launch(
                    VmSpec(vm, machine=Machine.NONE, accel=detect_accel(run_as)),
                    {},
                    uid=uid,
                    user=d.user,
                    run_dir=lc.run_dir / vm,
                    run_as=run_as,
                    ready_timeout=lc.start_timeout,
                    card_fingerprint=d.card.fingerprint if d.card else "",
                    card_serial=d.card.serial if d.card else "",
                    now=now,
                )
            except (VmError, VolumeError) as e:
                failed = Decision(False, e.reason, e.message, vm, d.user, d.roles, d.card)
                return self._audited("vm_start", Outcome.ERROR, failed, uid, "start")
            try:
                return self._audited(
                    "vm_start", Outcome.SUCCESS, d, uid, "start", {"vm": vm, "pid": record.pid}
                )
            except SvmmError:
                # Unaudited VMs do not run.
                self._stop(vm)
                raise

    def _control(self, uid: int, op: str, vm: str) -> Reply:
        with self._lock:
            d = decide_control(uid, vm, self.registry.running())
            if not d.allowed:
                return self._audited("vm_deny", Outcome.FAILURE, d, uid, op)
            handle = self.registry.get(vm)
            if handle is None:  # ended between the two looks
                gone = Decision(False, "vm_not_running", f"{vm} is not running", vm, d.user)
                return self._audited("vm_deny", Outcome.FAILURE, gone, uid, op)
            record = handle.record
            try:
                if op == "stop":
                    how = self._stop(vm)
                    data: dict[str, Any] = {"vm": vm, "how": how}
                else:
                    data = {
                        "vm": vm,
                        "owner": record.user,
                        "pid": record.pid,
                        "started_at": record.started_at,
                        **handle.status(),
                    }
            except VmError as e:
                failed = Decision(False, e.reason, e.message, vm, d.user, card=d.card)
                return self._audited(f"vm_{op}", Outcome.ERROR, failed, uid, op)
            return self._audited(f"vm_{op}", Outcome.SUCCESS, d, uid, op, data)

    def _stop(self, vm: str) -> str:
        lc = self.config.launcher
        return self.registry.stop(
            vm,
            quit_timeout=lc.quit_timeout,
            term_timeout=lc.term_timeout,
            kill_timeout=lc.kill_timeout,
        )

    # --- audit

    def _audited(
        self,
        event: str,
        outcome: Outcome,
        d: Decision,
        uid: int,
        op: str,
        data: Mapping[str, Any] | None = None,
    ) -> Reply:
        card = CardFacts(fingerprint=d.card.fingerprint, serial=d.card.serial) if d.card else None
        detail = f"uid={uid}; op={op}" + (f"; {d.message}" if d.message else "")
        self.audit.write(
            AuditRecord(
                event=event,
                outcome=outcome,
                reason=d.reason,
                time=self.now(),
                host=self.policy.host,
                service=SERVICE,
                user=d.user or _user_name(uid),
                roles=d.roles,
                card=card or CardFacts(),
                vm=d.vm,
                detail=detail[:1000],
            )
        )
        ok = outcome is Outcome.SUCCESS
        return Reply(ok, d.reason, d.message if not ok else (d.message or "ok"), data or {})
