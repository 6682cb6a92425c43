"""The launcher: who may start, stop or look at which VM, decided again at every request.

The protocol ("svmm-launcher/1", JSON lines over a Unix socket; transport in daemon/server.py;
a request line is at most 64 KiB):

    request  {"version": "svmm-launcher/1",
              "op": "list"|"start"|"stop"|"status"|"resume"|"console", "vm": "name"}
    reply    {"version": "svmm-launcher/1", "ok": true|false, "reason": "<token>",
              "message": "<for people>", "data": {...}}

A VM request carries no identity: the caller's uid is the kernel's (SO_PEERCRED), and such a
request with any other key (a "uid", a "user") is refused as ``bad_request``. ``vm`` is
required for start, stop, status, resume and console. ``list`` data: ``allowed`` (vm,
permissions, running), ``running``, ``allowlist`` (ok or why not), ``volumes_open`` (dm-crypt
mode: the mappings the caller's sessions opened), ``keys_held`` (the names of
the volumes whose keys the service holds for the caller; never a key). ``start`` data:
``vm``, ``pid``, ``volumes``, ``usb`` (``vvvv:pppp``), ``networks`` (names).

Devices (start): QEMU gets exactly the ``usb:VID:PID`` and ``network:NAME`` permissions the
caller's allowlist lists on the VM and the policy still grants at the start (type
enforcement, device assignment; one it refuses now is left out, named ``denied=`` in the
audit). USB: one ``qemu-xhci`` controller, one ``usb-host,vendorid=0x..,productid=0x..`` per
device (QEMU attaches it when such a device is plugged in; the VM account needs access to
its /dev/bus/usb node, e.g. by a udev rule). Networks: a ``virtio-net-pci`` per network on
the backend ``[launcher.networks.NAME]`` defines: ``kind = "user"`` (QEMU's user stack,
``restrict=on`` unless ``restrict = false``) or ``kind = "bridge"`` (svmmd makes a tap,
attaches it to ``bridge`` and passes QEMU its descriptor; the tap goes when QEMU exits). A
granted network the host does not define refuses the start (``network_undefined``); a
bridge that is missing fails it (``network_unavailable``). A VM with devices runs on
``-machine q35`` (still ``-nodefaults``, held with ``-S``), one without on ``-machine none``.

Console: ``console`` gives the VM's owner (or root) its serial console when the owner's
allowlist lists ``console`` on it and the policy grants it again now (``not_in_allowlist``,
the policy's token, ``not_owner``, ``vm_not_running`` otherwise). QEMU listens on a socket
svmmd made in the VM's private run folder (``-chardev socket,id=console``; an
``isa-serial`` on it when there is a machine); svmmd connects and passes the connection with
the reply (SCM_RIGHTS, one descriptor, on the reply line's first byte). Reply data ``vm``,
``escape`` ("^]", what `svmm vm console` leaves on). One client at a time:
``console_busy`` while another holds it (QMP ``query-chardev``; svmmd replies only once QEMU
has taken the connection, so two requests cannot both get one); ``console_unavailable``.
Audited ``vm_console``.

Volume keys (root only: the PAM module hands over what the card released, and takes it back):

    {"version": "svmm-launcher/1", "op": "hold_keys", "uid": 1000, "user": "alice",
     "session": "<session id>", "card_fingerprint": "<sha256 hex>", "card_serial": "<hex>",
     "volumes": [{"name": "<volume>", "passphrase": "<the LUKS passphrase>"}, ...]}
    {"version": "svmm-launcher/1", "op": "drop_keys", "uid": 1000, "session": "<id>" | null,
     "session_closed": false}

These two ops are the only ones that name a uid, and they are accepted only from a peer whose
SO_PEERCRED uid is 0; anyone else gets ``not_permitted`` (audited as ``key_deny``) before the
rest of the request is read. Volume names follow the VM name rule (``volume_name_invalid``);
a passphrase is the LUKS passphrase itself as a JSON string: UTF-8 text without NUL (QEMU's
LUKS secret must be text), 1 to 512 bytes; 1 to 16 volumes per request. ``session`` is
1-64 of ``[A-Za-z0-9._:@-]``; ``drop_keys`` with ``"session": null`` drops every session of
the uid. The keys live in svmmd's memory only (services/key_store.py), per uid, per session,
per volume: wiped on drop, on replacement and when the service stops; a volume held by two
sessions of a user stays usable until both dropped it. Replies: ``hold_keys`` data ``uid``,
``session``, ``held`` (names); ``drop_keys`` data ``uid``, ``dropped``, ``held`` (what other
sessions still hold).

Last logout: ``drop_keys`` with ``"session_closed": true`` (the PAM session close sends it;
it needs a session) also means "this session has ended": svmmd then reads the user's
session records (``<session.state_dir>/<uid>.json``, the allowlist's refcount; sessions
whose opening process is gone do not count), and when none is left applies
``launcher.on_last_logout`` to every VM the uid runs: ``stop`` (graceful stop: volumes
closed), ``pause`` (as card removal pauses: below) or ``keep``. Audited ``last_logout`` per
VM (``stopped``, ``paused``, ``pause_failed_stopped``, ``kept``; ``no_vms``;
``session_state_unreadable``: nothing done). Data ``last_logout``: ``last``
(true|false|null), ``action``, ``vms`` (vm -> reason).

Audited per volume: ``key_hold`` / ``key_drop`` with the user, the card (fingerprint,
serial) and ``volume=<name>`` in the detail, never a key.

Card removal (svmmd watches the token serial of every card whose session holds keys, or
that started a running VM; ``start_card_watch``): when that card leaves its reader, every key
its sessions hold is wiped (``key_drop``, reason ``card_removed``) and its VMs get the
configured ``launcher.card_removal`` action (pause: QMP ``stop``; stop; lock: nothing),
audited ``card_removed`` per VM (services/card_removal.py). Pausing closes what can be
closed of the volumes while the VM stays resumable: in the ``vmm`` volume mode every QEMU
``secret`` object (the LUKS passphrases) is deleted (QMP ``object-del``; QEMU 7.2 allows it
while the LUKS node is open, which no longer needs it), audited ``volume_close``
(``secrets_removed``, naming them). Honestly: QEMU's LUKS driver keeps each volume's master
key in the paused process's memory until the VM stops; only ``stop`` closes the volumes
fully. A pause that fails is a stop. Putting the card back resumes
nothing (``card_inserted``, ``await_pin``): the user logs in again with the card (which hands
the keys over again) and asks ``resume``: the VM's owner (or root) may resume a paused VM
(or one still held in ``prelaunch``, as ``start`` leaves it) when the owner's allowlist
still lets them boot it, the keys of its volumes are held again and a
session of the card that started it holds keys (``card_login_required`` otherwise); QMP
``cont``, audited ``vm_resume``. ``resume`` data: ``vm``, ``status``.

Reason tokens: ``ok``; ``bad_request``, ``unsupported_version``, ``vm_name_invalid``,
``volume_name_invalid``, ``not_permitted``; ``no_allowlist``, ``allowlist_tampered``,
``allowlist_invalid``, ``allowlist_uid_mismatch``, ``allowlist_expired``,
``allowlist_host_mismatch``, ``allowlist_unreadable``, ``not_in_allowlist``; the policy's own
tokens (``conflict_of_interest``, ``unknown_vm``, ``no_grant``, ...); ``policy_unavailable``;
``vm_already_running``, ``vm_in_use``, ``vm_not_running``, ``vm_not_paused``,
``card_login_required``, ``not_owner``,
``volume_key_unavailable``, ``volume_image_invalid``; ``network_undefined``,
``network_unavailable``, ``console_busy``, ``console_unavailable``; ``volume_key_refused``
(QEMU's LUKS driver refused the held key), ``vm_start_failed``, ``qmp_failed``,
``vm_failed``, ``volume_failed``, ``audit_write_failed``, ``internal_error``.

svmmd whose PKCS#11 module does not load serves on without a card watch: logged, and
audited once (``card_watch``, ``card_watch_unavailable``).

Start: the caller's allowlist (``<allowlist_dir>/<uid>.json``, root-owned 0644, read by
AllowlistStore, parsed strictly) must name the caller's uid, this host, be unexpired and list
``boot`` on the VM; the policy decision point is asked again with the VMs the caller runs
(the Chinese Wall); a VM whose volumes need keys the service does not hold for the caller's
uid (from any of their sessions) is refused (``volume_key_unavailable`` naming the volume).
Each volume NAME is the LUKS1 image ``<volumes.dir>/NAME.img``: a regular file (not a
symlink), root's, not group/world-writable, in a root-owned folder no one else can write
(``volume_image_invalid``). svmmd opens it and QEMU gets the descriptor, the key through a
pipe (adapters/qemu.py), block node NAME. The keys stay held after the start (a restart
needs them) until the session drops them. Stop and status: the VM's owner (or root). Every
request is audited (vm_start with ``volumes=...``, ``usb=...``, ``networks=...``, vm_stop,
vm_status, vm_list, vm_console, vm_deny, key_hold, key_drop, key_deny, last_logout,
volume_close) with user, uid, VM, the card fingerprint and the reason.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import pwd
import re
import stat
import threading
import time
from collections.abc import Callable, Collection, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ..adapters.allowlist_store import AllowlistStore, is_uid_text
from ..adapters.audit_log import AuditLog
from ..adapters.card_watch import CardEvent, CardEventKind, CardWatch, TokenLister
from ..adapters.qemu import (
    CONSOLE_ID,
    NAME_PATTERN,
    LuksDisk,
    Machine,
    NetKind,
    Nic,
    RawDisk,
    RunAs,
    UsbHost,
    VmSpec,
    detect_accel,
    mac_for,
)
from ..adapters.vm_registry import VmRecord, VmRegistry
from ..config import Config, LastLogoutAction, NetworkKind, VolumeMode
from ..domain import policy as pdp
from ..domain.allowlist import Allowlist, CardRef, parse_allowlist
from ..domain.audit_record import AuditRecord, CardFacts, Outcome
from ..domain.bounded import loads_json
from ..errors import (
    AllowlistInvalid,
    ConfigError,
    InputMalformed,
    LauncherRefused,
    PolicyUnavailable,
    SessionFailed,
    SvmmError,
    VmError,
    VolumeError,
)
from .card_removal import CardRemovalPolicy
from .key_store import KeyStore, wipe

PROTOCOL = "svmm-launcher/1"
VM_OPS = ("list", "start", "stop", "status", "resume", "console")
KEY_OPS = ("hold_keys", "drop_keys")  # root's only (the PAM module)
ADMIN_OPS = ("policy_reload",)  # root's only (`svmm policy reload`)
OPS = VM_OPS + KEY_OPS + ADMIN_OPS
MAX_REQUEST_BYTES = 65536  # 16 passphrases of 512 bytes, however JSON escapes them
MAX_VOLUMES = 16
MAX_PASSPHRASE_BYTES = 512
# What a session id, a user name, a card fingerprint or serial may look like in a request.
SESSION_PATTERN = re.compile(r"[A-Za-z0-9._:@-]{1,64}")  # PAM: "<tty>:<pid>:<hex>"
USER_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._@-]{0,63}")
HEX_PATTERN = re.compile(r"[0-9A-Fa-f:]{0,128}")
SERIAL_PATTERN = re.compile(r"[0-9A-Za-z:._-]{0,128}")  # a certificate or token serial
SERVICE = "svmmd"
RESUMABLE = ("paused", "prelaunch")  # QMP run states "cont" may leave
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
    # hold_keys / drop_keys only (root's): whose keys, from which session and card
    uid: int | None = None
    user: str = ""
    session: str | None = None
    card_fingerprint: str = ""
    card_serial: str = ""
    keys: Mapping[str, bytearray] = field(default_factory=dict, repr=False)
    session_closed: bool = False  # drop_keys: the session itself closed (last-logout check)

    def wipe(self) -> None:
        for buf in self.keys.values():
            wipe(buf)


@dataclass(frozen=True)
class Reply:
    ok: bool
    reason: str
    message: str
    data: Mapping[str, Any] = field(default_factory=dict)
    # Descriptors sent with the reply line (SCM_RIGHTS; "console"); the transport closes them.
    fds: tuple[int, ...] = field(default=(), compare=False, repr=False)

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


def parse_request(line: bytes, peer_uid: int | None = None) -> Request:
    """A request from one JSON line; LauncherRefused(bad_request, ...) otherwise. Key ops are
    refused (``not_permitted``) before anything else of theirs is read unless ``peer_uid``
    is 0."""
    if len(line) > MAX_REQUEST_BYTES:
        raise _refuse("bad_request", f"request longer than {MAX_REQUEST_BYTES} bytes")
    try:
        doc = loads_json(line, max_bytes=MAX_REQUEST_BYTES, what="request")
    except InputMalformed as e:
        raise _refuse("bad_request", e.message) from None
    if not isinstance(doc, dict):
        raise _refuse("bad_request", "request is not a JSON object")
    if doc.get("version") != PROTOCOL:
        raise _refuse("unsupported_version", f"version must be {PROTOCOL!r}")
    op = doc.get("op")
    if op in KEY_OPS:
        if peer_uid != 0:
            raise _refuse("not_permitted", f"{op} is root's (the PAM module's) only")
        return _parse_key_request(op, doc)
    if op in ADMIN_OPS and peer_uid != 0:
        raise _refuse("not_permitted", f"{op} is root's only")
    extra = sorted(set(doc) - {"version", "op", "vm"})
    if extra:
        # Above all "uid"/"user": who asks is the kernel's answer, never the request's.
        raise _refuse("bad_request", f"unknown request key {extra[0]!r}")
    if op not in OPS:
        raise _refuse("bad_request", f"op must be one of {', '.join(OPS)}")
    vm = doc.get("vm", "")
    if not isinstance(vm, str):
        raise _refuse("vm_name_invalid", "vm must be a string")
    if op not in ("list", *ADMIN_OPS) and not vm:
        raise _refuse("bad_request", f"{op} needs a vm")
    if vm:
        check_vm_name(vm)
    return Request(op, vm)


def _text(doc: Mapping[str, Any], key: str, pattern: re.Pattern[str]) -> str:
    v = doc.get(key)
    if not isinstance(v, str) or not pattern.fullmatch(v):
        raise _refuse("bad_request", f"{key} is missing or malformed")
    return v


def _parse_key_request(op: str, doc: Mapping[str, Any]) -> Request:
    if op == "drop_keys":
        allowed = {"version", "op", "uid", "session", "session_closed"}
    else:
        allowed = {"version", "op", "uid", "user", "session", "card_fingerprint",
                   "card_serial", "volumes"}  # fmt: skip
    extra = sorted(set(doc) - allowed)
    if extra:
        raise _refuse("bad_request", f"unknown request key {extra[0]!r}")
    uid = doc.get("uid")
    if isinstance(uid, bool) or not isinstance(uid, int) or not 0 <= uid < 2**32 - 1:
        raise _refuse("bad_request", "uid must be a non-negative integer")
    if op == "drop_keys":
        session = None if doc.get("session") is None else _text(doc, "session", SESSION_PATTERN)
        closed = doc.get("session_closed", False)
        if not isinstance(closed, bool) or (closed and session is None):
            raise _refuse("bad_request", "session_closed must be true or false, with a session")
        return Request(op, uid=uid, session=session, session_closed=closed)
    user = _text(doc, "user", USER_PATTERN)
    session = _text(doc, "session", SESSION_PATTERN)
    fingerprint = _text(doc, "card_fingerprint", HEX_PATTERN).lower()
    serial = _text(doc, "card_serial", SERIAL_PATTERN)
    volumes = doc.get("volumes")
    if not isinstance(volumes, list) or not 0 < len(volumes) <= MAX_VOLUMES:
        raise _refuse("bad_request", f"volumes must be a list of 1 to {MAX_VOLUMES} entries")
    keys: dict[str, bytearray] = {}
    try:
        for entry in volumes:
            if not isinstance(entry, dict) or set(entry) != {"name", "passphrase"}:
                raise _refuse("bad_request", 'each volume is {"name", "passphrase"}')
            name = check_volume_name(entry["name"])
            if name in keys:
                raise _refuse("bad_request", f"volume {name} is given twice")
            keys[name] = _passphrase(name, entry["passphrase"])
    except BaseException:
        for buf in keys.values():
            wipe(buf)
        raise
    return Request(op, uid=uid, user=user, session=session, card_fingerprint=fingerprint,
                   card_serial=serial, keys=keys)  # fmt: skip


def checked_key_request(
    uid: int,
    user: str,
    session: str,
    card_fingerprint: str,
    card_serial: str,
    keys: Mapping[str, bytearray],
) -> Request:
    """A ``hold_keys`` Request from values (svmmd's own responder), held to the rules the
    socket's JSON form is: the same names, sizes and patterns."""
    doc = {"user": user, "session": session, "card_fingerprint": card_fingerprint,
           "card_serial": card_serial}  # fmt: skip
    if isinstance(uid, bool) or not isinstance(uid, int) or not 0 <= uid < 2**32 - 1:
        raise _refuse("bad_request", "uid must be a non-negative integer")
    if not 0 < len(keys) <= MAX_VOLUMES:
        raise _refuse("bad_request", f"volumes must be 1 to {MAX_VOLUMES} entries")
    for name, buf in keys.items():
        check_volume_name(name)
        if not isinstance(buf, bytearray) or not buf or 0 in buf:
            raise _refuse("bad_request", f"volume {name}: passphrase must be non-empty, no NUL")
    return Request(
        "hold_keys",
        uid=uid,
        user=_text(doc, "user", USER_PATTERN),
        session=_text(doc, "session", SESSION_PATTERN),
        card_fingerprint=_text(doc, "card_fingerprint", HEX_PATTERN).lower(),
        card_serial=_text(doc, "card_serial", SERIAL_PATTERN),
        keys=dict(keys),
    )


def _passphrase(name: str, text: object) -> bytearray:
    """Volume ``name``'s passphrase as a buffer the launcher can wipe; messages never quote
    it. It is text: QEMU's LUKS driver takes the secret as a C string it checks for UTF-8."""
    if not isinstance(text, str) or not text or "\0" in text:
        raise _refuse(
            "bad_request", f"volume {name}: passphrase must be non-empty text without NUL"
        )
    try:
        buf = bytearray(text, "utf-8")
    except UnicodeEncodeError:  # lone surrogates from a JSON \ud800 escape
        raise _refuse("bad_request", f"volume {name}: passphrase is not valid UTF-8") from None
    if len(buf) > MAX_PASSPHRASE_BYTES:
        wipe(buf)
        raise _refuse(
            "bad_request", f"volume {name}: passphrase longer than {MAX_PASSPHRASE_BYTES} bytes"
        )
    return buf


def check_vm_name(vm: str) -> str:
    # QEMU's name rule (lower case, no ',' or '='), which is stricter than the policy's.
    if not NAME_PATTERN.fullmatch(vm):
        shown = vm[:40].encode("unicode_escape").decode("ascii")
        raise _refuse("vm_name_invalid", f"{shown!r} is not a valid VM name")
    return vm


def check_volume_name(name: object) -> str:
    # Volume names become QEMU node names and file names: the same strict rule as VM names.
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        shown = str(name)[:40].encode("unicode_escape").decode("ascii")
        raise _refuse("volume_name_invalid", f"{shown!r} is not a valid volume name")
    return name


# --- the pure decisions ----------------------------------------------------------------------


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str
    message: str
    vm: str = ""
    user: str = ""
    roles: tuple[str, ...] = ()
    # CardRef: the allowlist's card (certificate fingerprint and serial); CardFacts: a held
    # key's card, known by certificate fingerprint and token serial
    card: CardRef | CardFacts | None = None
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


@dataclass(frozen=True)
class Devices:
    """The passthrough a start gives: USB ids ("vvvv:pppp") and network names."""

    usb: tuple[str, ...] = ()
    networks: tuple[str, ...] = ()
    denied: tuple[str, ...] = ()  # "perm (reason)": in the allowlist, refused by the policy now

    def detail(self) -> str:
        parts = [f"usb={','.join(self.usb)}" if self.usb else "",
                 f"networks={','.join(self.networks)}" if self.networks else "",
                 f"denied={','.join(self.denied)}" if self.denied else ""]  # fmt: skip
        return "; ".join(p for p in parts if p)


def decide_devices(
    vm: str,
    allowlist: Allowlist,
    policy: PolicyDecider,
    mine: Collection[str],
    host_networks: Collection[str],
) -> Devices:
    """Exactly the ``usb:`` and ``network:`` permissions the caller's allowlist lists on
    ``vm`` that the policy still grants now (type enforcement, device assignment: a device
    it refuses now is left out and named in ``denied``). A granted network the host does
    not define (``[launcher.networks.NAME]``) refuses the start: ``network_undefined``."""
    usb: list[str] = []
    nets: list[str] = []
    denied: list[str] = []
    for perm in allowlist.vms[vm].permissions:
        kind, _, arg = perm.partition(":")
        if kind not in ("usb", "network"):
            continue
        try:
            d = policy.decide(allowlist.user, allowlist.roles, vm, perm, mine)
        except PolicyUnavailable as e:
            raise _refuse("policy_unavailable", e.message) from None
        if not d.allowed:
            denied.append(f"{perm} ({d.reason})")
        elif kind == "usb":
            usb.append(arg)
        elif arg not in host_networks:
            raise _refuse(
                "network_undefined",
                f"network {arg} is granted on {vm} but this host does not define it "
                f"([launcher.networks.{arg}])",
            )
        else:
            nets.append(arg)
    return Devices(tuple(usb), tuple(nets), tuple(denied))


def decide_console(
    uid: int,
    vm: str,
    running: Mapping[str, VmRecord],
    allowlist: Allowlist | None,
    policy: PolicyDecider,
    *,
    now: dt.datetime,
) -> Decision:
    """May ``uid`` have ``vm``'s serial console? Its owner, when their allowlist lists
    ``console`` on it and the policy grants it again now; root (who needs no allowlist)."""
    base = decide_control(uid, vm, running)
    if not base.allowed or uid == 0:
        return base
    if allowlist is None:  # the caller passes None only for root
        return Decision(False, "no_allowlist", "no allowlist", vm, base.user, card=base.card)

    def deny(reason: str, message: str) -> Decision:
        return Decision(False, reason, message, vm, allowlist.user, allowlist.roles, allowlist.card)

    if not allowlist.permits(vm, pdp.CONSOLE, now=now):
        return deny("not_in_allowlist", f"{allowlist.user} may not use {vm}'s console (allowlist)")
    mine = sorted(r.vm for r in running.values() if r.uid == uid)
    try:
        d = policy.decide(allowlist.user, allowlist.roles, vm, pdp.CONSOLE, mine)
    except PolicyUnavailable as e:
        return deny("policy_unavailable", e.message)
    if not d.allowed:
        return deny(d.reason, d.rule)
    return Decision(True, "ok", d.rule, vm, allowlist.user, allowlist.roles, allowlist.card)


def live_sessions(state_dir: Path, uid: int) -> int:
    """How many sessions of ``uid`` the session records (the allowlist's refcount,
    adapters/allowlist_store.py) hold whose opening process is alive; read without the
    user's lock (records are replaced atomically). SessionFailed when unreadable."""
    from ..adapters.allowlist_store import parse_sessions, read_file
    from ..adapters.private_dir import open_private_dir

    dir_fd = open_private_dir(state_dir, key="session.state_dir", private=True,
                              check_parents=True)  # fmt: skip
    shown = state_dir / f"{uid}.json"
    try:
        data = read_file(dir_fd, f"{uid}.json", mode=0o600, shown=shown)
    finally:
        os.close(dir_fd)
    state = parse_sessions(data, uid, shown)  # malformed entries skipped, logged
    from .session import session_alive

    return sum(1 for record in state.sessions.values() if session_alive(record))


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


def volume_image(folder: Path, name: str) -> Path:
    """``<folder>/<name>.img``, if it is a regular file owned by root, not a symlink, not
    writable by group or others, in a root-owned folder only root can write to (so what QEMU
    is given, by a descriptor root opens, is what was checked); LauncherRefused otherwise."""
    check_volume_name(name)
    path = folder / f"{name}.img"
    try:
        dst = os.stat(folder)
        st = os.lstat(path)
    except FileNotFoundError:
        raise _refuse("volume_image_invalid", f"volume {name}: no image {path}") from None
    except OSError as e:
        raise _refuse("volume_image_invalid", f"volume {name}: {path}: {e.strerror}") from None
    if dst.st_uid != 0 or dst.st_mode & 0o022:
        raise _refuse(
            "volume_image_invalid",
            f"volume {name}: {folder} must be root's and not group/world-writable",
        )
    if not stat.S_ISREG(st.st_mode):
        raise _refuse("volume_image_invalid", f"volume {name}: {path} is not a regular file")
    if st.st_uid != 0 or st.st_mode & 0o022:
        raise _refuse(
            "volume_image_invalid",
            f"volume {name}: {path} must be root's and not group/world-writable",
        )
    return path


# --- the service ----------------------------------------------------------------------------


def _card_of(record: VmRecord) -> CardRef | None:
    if not record.card_fingerprint:
        return None
    return CardRef(record.card_fingerprint, record.card_serial)


def _key_card(fingerprint: str, token_serial: str) -> CardFacts | None:
    """The card a held key came from, as its records name it: the certificate's fingerprint
    and the token's serial (a key's card is known by the token it was released from; the
    certificate serial field stays for certificates)."""
    return CardFacts(fingerprint=fingerprint, token_serial=token_serial) if fingerprint else None


def _attempt(failures: list[Exception], step: Callable[..., object], *args: Any, **kw: Any) -> None:
    """Run one step of a card event; a failure is kept for later, the next step still runs.
    Catch-all on purpose: a pulled card's next step (pause the VMs, suspend the volumes,
    lock the sessions) must not depend on the last one's audit record or a bug in it; the
    caller logs every failure and raises the first, so none reads as a success."""
    try:
        step(*args, **kw)
    except Exception as e:
        failures.append(e)


def _shown(error: Exception) -> str:
    if isinstance(error, SvmmError):
        return error.message
    return f"internal error {type(error).__name__}"


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"#{uid}"


class CardVm:
    """A running VM as CardRemovalPolicy sees it: pause is QMP ``stop``; stop is the
    launcher's graceful stop with the configured timeouts."""

    def __init__(self, launcher: Launcher, record: VmRecord) -> None:
        self._launcher = launcher
        self.record = record

    @property
    def vm_id(self) -> str:
        return self.record.vm

    @property
    def user(self) -> str:
        return self.record.user

    def pause(self) -> None:
        self._launcher._pause(self.record, "card_removed")

    def stop(self) -> None:
        self._launcher._stop(self.record.vm, graceful=False)


class CardVms:
    """The registry view CardRemovalPolicy needs: the VMs a card (token serial) opened."""

    def __init__(self, launcher: Launcher) -> None:
        self._launcher = launcher

    def vms_opened_by(self, card_serial: str) -> list[CardVm]:
        serial = card_serial.rstrip(" ")
        if not serial:
            return []
        running = self._launcher.registry.running()
        return [CardVm(self._launcher, r) for _, r in sorted(running.items())
                if r.token_serial == serial]  # fmt: skip


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
        keys: KeyStore | None = None,
        now: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
    ) -> None:
        self.config = config
        self.policy = policy
        self.audit = audit
        self.registry = registry or VmRegistry(config.launcher.registry_dir)
        self.store = store or AllowlistStore(config.session.allowlist_dir)
        self.keys = keys or KeyStore()
        self.now = now
        # A decision and its action are one step; reentrant: a start that finds its grant dead
        # forgets it (forget_dead_sessions applies on_session_lost under the same lock).
        self._lock = threading.RLock()
        self.card_policy = CardRemovalPolicy.from_config(
            config, CardVms(self), self.audit.write, host=policy.host, service=SERVICE
        )
        self._watch: CardWatch | None = None
        # Called first at each card event (svmmd: drop the card helper started ahead).
        self.card_listeners: list[Callable[[], object]] = []
        self._watched: set[str] = set()
        # Token serials of the cards that opened live sessions (card_removal_locks_sessions):
        # watched too, so pulling one locks its sessions; refreshed by sweep_sessions.
        self._session_cards: set[str] = set()
        self._watch_lock = threading.Lock()
        # volumes.mode = "dm-crypt": the mappings PAM sessions opened (services/dmcrypt.py)
        self.dmcrypt: Any = None
        if config.volumes.enabled and config.volumes.mode is VolumeMode.DMCRYPT:
            from .dmcrypt import DmcryptVolumes

            self.dmcrypt = DmcryptVolumes(config, now=now)

    @classmethod
    def from_config(cls, config: Config, *, syslog_mirror: bool | None = None) -> Launcher:
        """svmmd's wiring: the policy service and the audit trail the configuration names."""
        from ..adapters.audit_log import AuditLog
        from .policy import PolicyService

        ac = config.audit
        audit = AuditLog(
            ac.path,
            syslog_mirror=ac.syslog if syslog_mirror is None else syslog_mirror,
            seal_key=ac.seal_key,
            seal_every=ac.seal_every,
            disk_full_action=ac.disk_full_action,
        )
        return cls(config, policy=PolicyService(config), audit=audit)

    def close(self) -> None:
        """Service stop: the card watch ends; every held key is wiped (VMs keep running)."""
        self.stop_card_watch()
        self.keys.close()

    # --- card removal

    def start_card_watch(
        self,
        module: TokenLister,
        *,
        interval: float | None = None,
        lock: AbstractContextManager[Any] | None = None,
    ) -> CardWatch:
        """Poll ``module`` (a Pkcs11Module) every ``interval`` seconds (default
        ``launcher.card_poll_interval``) for the cards that hold keys or started VMs; their
        removal and re-insertion go to ``on_card_event``. ``lock``: the one guarding
        ``module`` if anything else calls it."""
        if self._watch is not None:
            raise RuntimeError("the card watch is already running")
        watch = CardWatch(
            module,
            interval=interval if interval is not None else self.config.launcher.card_poll_interval,
            serials=(),
            on_event=self.on_card_event,
            on_error=self._card_watch_error,
            lock=lock,
        )
        with self._watch_lock:
            self._watch, self._watched = watch, set()
        self._sync_watch()
        watch.start()
        return watch

    def stop_card_watch(self, timeout: float = 2.0) -> bool:
        """Stop the watcher (if any); True when its thread ended."""
        with self._watch_lock:
            watch, self._watch = self._watch, None
            self._watched = set()
        return True if watch is None else watch.stop(timeout)

    def audit_busy(self, uid: int, detail: str) -> None:
        """A connection refused over its uid's budget (server.py rate-limits these)."""
        d = Decision(False, "busy", detail, user=_user_name(uid))
        try:
            self._audited("connection", Outcome.FAILURE, d, uid, "connect")
        except SvmmError as e:
            log.error("busy: %s", e.message)

    def audit_card_watch_unavailable(self, module: str) -> None:
        """svmmd serves on without a card watch (the PKCS#11 module did not load): card
        removal goes unnoticed until it is fixed; on record, once per start."""
        why = f"PKCS#11 module {module} did not load: card removal is not watched"
        d = Decision(False, "card_watch_unavailable", why)
        try:
            self._audited("card_watch", Outcome.ERROR, d, 0, "start")
        except SvmmError as e:
            log.error("card watch: %s", e.message)

    def _card_watch_error(self, error: Exception) -> None:
        shown = error.message if isinstance(error, SvmmError) else type(error).__name__
        log.warning("card watch: %s", shown)

    def _sync_watch(self) -> None:
        """Watch exactly the cards whose sessions hold keys or that started a running VM."""
        with self._watch_lock:
            watch = self._watch
            if watch is None:
                return
            wanted = self.keys.card_serials()
            wanted |= {r.token_serial for r in self.registry.running().values() if r.token_serial}
            wanted |= self._dmcrypt_card_serials()
            wanted |= self._session_cards
            for serial in sorted(wanted - self._watched):
                watch.watch(serial)
            for serial in sorted(self._watched - wanted):
                watch.unwatch(serial)
            self._watched = wanted

    def on_card_event(self, event: CardEvent) -> None:
        """A watched card left its reader (or came back). Removal: the keys its sessions
        hold are wiped first (nothing can start or resume without a new login), then its VMs
        get the configured action, then its dm-crypt mappings are suspended. Each step is
        done whatever became of the one before: an audit record that cannot be written
        (a full disk) never leaves a VM running; the first failure is raised at the end.
        Re-insertion resumes nothing (await a PIN login)."""
        failures: list[Exception] = []
        for listener in list(self.card_listeners):
            # svmmd's logins: a card helper started ahead saw the reader before this event.
            _attempt(failures, listener)
        with self._lock:
            try:
                if event.kind is CardEventKind.REMOVED:
                    dropped = self.keys.drop_card(event.serial)
                    _attempt(failures, self.card_policy.handle, event)
                    _attempt(failures, self._dmcrypt_card_removed, event)  # after the pause
                    _attempt(failures, self._lock_card_sessions, event)
                    for k in dropped:
                        card = _key_card(k.card_fingerprint, k.card_serial)
                        d = Decision(False, "card_removed", f"volume={k.volume}", user=k.user,
                                     card=card)  # fmt: skip
                        why = f"session={k.session}; card {event.reason}"
                        _attempt(failures, self._audited, "key_drop", Outcome.SUCCESS, d, 0,
                                 "card_watch", detail=why)  # fmt: skip
                else:
                    self.card_policy.handle(event)
            finally:
                self._sync_watch()
        # Every step ran; none of these undoes what the others did. Each is logged (a
        # record that could not be written, a bug), the first raised for the card watch.
        for e in failures[1:]:
            log.error("card %s %s: %s", event.serial, event.reason, _shown(e))
        if failures:
            raise failures[0]

    def retry_card_actions(self) -> list[str]:
        """Stop again the VMs a pulled card could not stop (svmmd's sweeper, every few
        seconds): the IDs of those stopped now. One that still resists is logged."""
        with self._lock:
            try:
                done = self.card_policy.retry()
            finally:
                self._sync_watch()
        for serial, vm_id in sorted(self.card_policy.pending()):
            log.error("VM %s of pulled card %s still runs: its stop failed again", vm_id, serial)
        return [a.vm_id for a in done]

    def handle(self, uid: int, line: bytes) -> Reply:
        try:
            request = parse_request(line, uid)
        except LauncherRefused as e:
            event = "key_deny" if e.reason == "not_permitted" else "vm_deny"
            return self._audited(event, Outcome.FAILURE, Decision(False, e.reason, e.message),
                                 uid, "request")  # fmt: skip
        try:
            if request.op == "hold_keys":
                return self._hold(uid, request)
            if request.op == "drop_keys":
                return self._drop(uid, request)
            if request.op == "list":
                return self._list(uid)
            if request.op == "policy_reload":
                load = self.check_policy(force=True)
                event = load.event.value if load is not None else "none"
                return Reply(True, "ok", f"policy reloaded: {event}", {"event": event})
            if request.op == "start":
                return self._start(uid, request.vm)
            if request.op == "resume":
                return self._resume(uid, request.vm)
            if request.op == "console":
                return self._console(uid, request.vm)
            return self._control(uid, request.op, request.vm)
        except SvmmError as e:
            # The audit itself failed (or a check raised): nothing was done after it.
            log.error("request %s by uid %d: %s", request.op, uid, e.message)
            return Reply(False, e.reason, e.message)
        finally:
            request.wipe()  # held keys are the store's own copies

    # --- the keys (root only: parse_request refused anyone else)

    def hold_keys(
        self,
        *,
        uid: int,
        user: str,
        session: str,
        card_fingerprint: str,
        card_serial: str,
        keys: Mapping[str, bytearray],
    ) -> Reply:
        """``hold_keys`` from svmmd's own PAM responder: the keys stay bytearrays inside this
        process (the socket's JSON form is for a PAM module in another process), checked as
        a request from the socket is. The caller wipes ``keys``; the store keeps copies."""
        try:
            request = checked_key_request(uid, user, session, card_fingerprint, card_serial, keys)
            return self._hold(0, request, via="svmmd's PAM responder")
        except SvmmError as e:
            return Reply(False, e.reason, e.message)

    def _hold(self, peer: int, r: Request, *, via: str = "socket") -> Reply:
        if peer != 0 or r.uid is None or r.session is None:  # parse_request saw to it
            raise _refuse("not_permitted", "hold_keys is root's only")
        card = _key_card(r.card_fingerprint, r.card_serial)
        # Audited first: a key whose hold is not on record is not held.
        for name in sorted(r.keys):
            d = Decision(True, "ok", f"volume={name}", user=r.user, card=card)
            self._audited("key_hold", Outcome.SUCCESS, d, peer, "hold_keys",
                          detail=f"for uid={r.uid}; session={r.session}; via {via}")  # fmt: skip
        copies = {name: bytearray(buf) for name, buf in r.keys.items()}
        self.keys.hold(r.uid, r.session, copies, user=r.user,
                       card_fingerprint=r.card_fingerprint, card_serial=r.card_serial)  # fmt: skip
        self._sync_watch()
        data = {"uid": r.uid, "session": r.session, "held": sorted(self.keys.held(r.uid))}
        return Reply(True, "ok", f"holding {len(copies)} key(s)", data)

    def _drop(self, peer: int, r: Request) -> Reply:
        if peer != 0 or r.uid is None:
            raise _refuse("not_permitted", "drop_keys is root's only")
        dropped = self.keys.drop(r.uid, r.session)  # wiped before anything else can fail
        self._sync_watch()
        which = f"session={r.session}" if r.session is not None else "all sessions"
        for k in dropped:
            card = _key_card(k.card_fingerprint, k.card_serial)
            d = Decision(True, "ok", f"volume={k.volume}", user=k.user, card=card)
            self._audited("key_drop", Outcome.SUCCESS, d, peer, "drop_keys",
                          detail=f"for uid={r.uid}; session={k.session}")  # fmt: skip
        if not dropped:
            d = Decision(True, "ok", "no keys held", user=_user_name(r.uid))
            self._audited("key_drop", Outcome.SUCCESS, d, peer, "drop_keys",
                          detail=f"for uid={r.uid}; {which}")  # fmt: skip
        data: dict[str, Any] = {
            "uid": r.uid,
            "dropped": sorted({k.volume for k in dropped}),
            "held": sorted(self.keys.held(r.uid)),  # what other sessions still hold
        }
        if r.session_closed:
            data["last_logout"] = self._after_session_close(r.uid, r.session or "")
        return Reply(True, "ok", f"dropped {len(dropped)} key(s) of {which}", data)

    def _after_session_close(self, uid: int, session: str, *, lost: bool = False) -> dict[str, Any]:
        """A session of ``uid`` closed (``lost``: its process died without closing it): if
        it was their last one (the session records, not the request, say so), their VMs get
        ``launcher.on_last_logout`` (``on_session_lost``); audited per VM (``last_logout``:
        stopped, paused, kept, or why nothing was done)."""
        lc = self.config.launcher
        action = lc.on_session_lost if lost else lc.on_last_logout
        setting = "on_session_lost" if lost else "on_last_logout"
        user = _user_name(uid)
        why = f"for uid={uid}; session={session}; {setting}={action.value}"
        try:
            remaining = live_sessions(self.config.session.state_dir, uid)
        except (SessionFailed, ConfigError) as e:
            # Cannot tell: nothing is done (a wrong "last" would stop a user's work).
            d = Decision(False, "session_state_unreadable", e.message, user=user)
            self._audited("last_logout", Outcome.ERROR, d, 0, "drop_keys", detail=why)
            return {"last": None, "action": action.value, "vms": {}}
        if remaining:
            return {"last": False, "action": action.value, "vms": {}}
        done: dict[str, str] = {}
        with self._lock:
            mine = [r for r in self.registry.running().values() if r.uid == uid]
            for record in sorted(mine, key=lambda r: r.vm):
                card = _card_of(record)
                outcome, reason, note = self._apply(action, record, "last_logout")
                done[record.vm] = reason
                d = Decision(outcome is Outcome.SUCCESS, reason, note, record.vm, record.user,
                             card=card)  # fmt: skip
                self._audited("last_logout", outcome, d, 0, "drop_keys", detail=why)
        if not done:
            d = Decision(True, "no_vms", "no running VMs", user=user)
            self._audited("last_logout", Outcome.SUCCESS, d, 0, "drop_keys", detail=why)
        return {"last": True, "action": action.value, "vms": done}

    def _apply(
        self, action: LastLogoutAction, record: VmRecord, cause: str
    ) -> tuple[Outcome, str, str]:
        """Stop, pause or keep ``record``'s VM (under _lock): (outcome, reason, note). A pause
        that fails stops the VM instead (fail closed, as for card removal)."""
        try:
            if action is LastLogoutAction.STOP:
                return Outcome.SUCCESS, "stopped", f"how={self._stop(record.vm)}"
            if action is LastLogoutAction.PAUSE:
                return Outcome.SUCCESS, "paused", self._pause(record, cause)
        except SvmmError as e:
            note = e.message
            if action is LastLogoutAction.PAUSE:
                try:
                    note += f"; stopped instead (how={self._stop(record.vm)})"
                    return Outcome.SUCCESS, "pause_failed_stopped", note
                except SvmmError as e2:
                    note += f"; stop: {e2.message}"
            return Outcome.ERROR, e.reason, note
        return Outcome.SUCCESS, "kept", ""

    def _pause(self, record: VmRecord, cause: str) -> str:
        """Pause ``record``'s VM (QMP ``stop``) and, in the VMM volume mode, close what can
        be closed of its volumes while it stays resumable: every ``secret`` object (the
        LUKS passphrases QEMU read at start) is deleted (QMP ``object-del``; QEMU 7.2
        allows it while the LUKS node is open: the node no longer needs it). What stays:
        QEMU's LUKS driver keeps the volume master keys in the paused process's memory
        until the VM is stopped (``stop`` closes the volumes fully). Audited
        ``volume_close`` with what was done. Returns that as text; VmError when any step
        fails (the caller then stops the VM instead)."""
        vm = record.vm
        handle = self.registry.get(vm)
        if handle is None:
            raise VmError(f"VM {vm} is not running", reason="vm_not_running")
        handle.qmp.execute("stop")
        if self.config.volumes.mode is not VolumeMode.VMM:
            return "paused"
        try:
            objects = handle.qmp.execute("qom-list", {"path": "/objects"})
        except VmError as e:
            if "DeviceNotFound" not in e.message:
                raise
            objects = []  # QEMU makes /objects with the first object: there is none
        secrets = sorted(
            str(o.get("name")) for o in objects or []
            if isinstance(o, dict) and o.get("type") == "child<secret>"
        )  # fmt: skip
        for secret in secrets:
            handle.qmp.execute("object-del", {"id": secret})
        note = (
            f"paused; secrets removed from QEMU: {','.join(secrets) or 'none'}; the LUKS "
            "master keys stay in the paused QEMU's memory until the VM stops"
        )
        d = Decision(True, "secrets_removed", note, vm, record.user, card=_card_of(record))
        self._audited("volume_close", Outcome.SUCCESS, d, 0, cause)
        return note

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
        allowlist = check_allowlist(data, uid, now=now, host=self.policy.host)
        # A grant lives only as long as its session (invariant 12): the PAM application
        # that opened it must still run. Its death (a crash, SIGKILL, svmmd killed during
        # open_session) leaves the allowlist behind; it is no grant.
        if not self._has_live_session(uid):
            self.forget_dead_sessions(uid)
            raise _refuse(
                "no_live_session",
                f"no live login of uid {uid} stands behind its allowlist: log in again",
            )
        return allowlist

    def _has_live_session(self, uid: int) -> bool:
        try:
            return live_sessions(self.config.session.state_dir, uid) > 0
        except (SessionFailed, ConfigError):
            return False  # cannot tell: no grant

    def forget_dead_sessions(self, uid: int) -> bool:
        """If no live session of ``uid`` remains: remove its allowlist and the records of
        its dead sessions, drop every key they held, audited ``session_lost``. Under the
        user's session lock, so a login opening a session meanwhile is never undone.
        True when something was forgotten."""
        from ..adapters.allowlist_store import SessionRecords
        from .session import session_alive

        records = SessionRecords(self.config.session.state_dir)
        try:
            with records.locked(uid) as held:
                state = held.load()
                if any(session_alive(r) for r in state.sessions.values()):
                    return False
                gone = sorted(state.sessions)
                user = state.user or _user_name(uid)
                had_allowlist = self.store.read_bytes(uid) is not None
                if not gone and not had_allowlist:
                    return False
                self.store.remove(uid)
                state.sessions.clear()
                held.save(state)
        except (SessionFailed, ConfigError) as e:
            log.error("forgetting the dead sessions of uid %d: %s", uid, e.message)
            return False
        dropped = self.keys.drop(uid)
        self._sync_watch()  # their cards need no watching for these keys any more
        detail = (f"sessions {', '.join(gone) or '(none recorded)'} gone with their process; "
                  f"allowlist removed; {len(dropped)} key(s) dropped")  # fmt: skip
        try:
            # Each key on record as it left memory, as a logout or a pulled card has them:
            # every key_hold has its key_drop.
            for k in dropped:
                card = _key_card(k.card_fingerprint, k.card_serial)
                kd = Decision(False, "session_lost", f"volume={k.volume}", user=k.user,
                              card=card)  # fmt: skip
                why = f"for uid={uid}; session={k.session}; its process is gone"
                self._audited("key_drop", Outcome.SUCCESS, kd, 0, "sweep", detail=why)
            d = Decision(False, "session_lost", detail, user=user)
            self._audited("session_lost", Outcome.SUCCESS, d, 0, "sweep")
        except SvmmError as e:
            log.error("session_lost: %s", e.message)
        self._after_session_close(uid, ",".join(gone) or "none", lost=True)
        return True

    def check_policy(self, *, force: bool = False) -> Any:
        """A new signed policy takes effect here at once: when the bundle file changed (svmmd
        looks every few seconds), or on request (``force``: SIGHUP, `svmm policy reload`),
        load it, audit the load, and if a new version was accepted apply
        ``launcher.on_grant_revoked`` to running VMs it no longer lets their owner boot.
        The PolicyLoad, or None when nothing was asked."""
        from ..adapters.policy_store import LoadEvent

        changed = getattr(self.policy, "changed", None)
        if changed is None or not (force or changed()):
            return None
        with self._lock:
            load = self.policy.load()  # type: ignore[attr-defined]
            try:
                self.audit.write(self.policy.audit_record(load, service=SERVICE))  # type: ignore[attr-defined]
            except SvmmError as e:
                log.error("policy_load: %s", e.message)
            if load.event is LoadEvent.ACCEPTED:
                self._enforce_policy()
        return load

    def _enforce_policy(self) -> None:
        """Running VMs the policy in force no longer lets their owner boot (under _lock)."""
        from ..domain.allowlist import parse_allowlist

        action = self.config.launcher.on_grant_revoked
        running = self.registry.running()
        for record in sorted(running.values(), key=lambda r: r.vm):
            try:
                data = self.store.read_bytes(record.uid)
                allowlist = parse_allowlist(data) if data is not None else None
            except SvmmError:
                allowlist = None
            if allowlist is None:
                continue  # no live grant to judge by: the session rules apply
            others = [v for v, r in running.items() if r.uid == record.uid and v != record.vm]
            try:
                d = self.policy.decide(allowlist.user, allowlist.roles, record.vm, pdp.BOOT,
                                       others)  # fmt: skip
            except PolicyUnavailable:
                continue
            if d.allowed:
                continue
            outcome, reason, note = self._apply(action, record, "grant_revoked")
            why = f"the policy now says {d.reason} ({d.rule}); on_grant_revoked={action.value}"
            dec = Decision(outcome is Outcome.SUCCESS, reason, f"{why}; {note}", record.vm,
                           record.user, card=_card_of(record))  # fmt: skip
            self._audited("grant_revoked", outcome, dec, 0, "policy_reload")

    def sweep_sessions(self) -> list[int]:
        """Every uid with an allowlist or session records but no live session: forgotten
        (svmmd runs this at start and then every few seconds). The uids forgotten."""
        for record in self.registry.take_unfinished():
            # A start the previous svmmd did not live to answer: its QEMU was stopped.
            d = Decision(False, "start_unfinished", f"vm={record.vm}; pid={record.pid}",
                         record.vm, record.user, card=_card_of(record))  # fmt: skip
            try:
                self._audited("vm_stop", Outcome.SUCCESS, d, 0, "reattach",
                              detail="QEMU of a start svmmd did not finish, killed")  # fmt: skip
            except SvmmError as e:  # the QEMU is gone either way; the log says what is missing
                log.error("vm_stop of %s's unfinished start not audited: %s", record.vm,
                          e.message)  # fmt: skip
        found: set[int] = set()
        for folder in (self.config.session.allowlist_dir, self.config.session.state_dir):
            try:
                names = os.listdir(folder)
            except OSError:
                continue
            found |= {int(s) for n in names if is_uid_text(s := n.split(".")[0])}
        gone = [uid for uid in sorted(found) if self.forget_dead_sessions(uid)]
        self.refresh_session_cards()
        return gone

    def card_sessions(
        self, serial: str | None = None
    ) -> list[tuple[int, str, str, dict[str, Any]]]:
        """(uid, user, session id, record) of every live session opened with a card: the
        one of token serial ``serial``, or any."""
        from ..adapters.allowlist_store import SessionRecords
        from .session import session_alive

        records = SessionRecords(self.config.session.state_dir)
        try:
            names = os.listdir(self.config.session.state_dir)
        except OSError:
            return []
        out = []
        for uid in sorted({int(s) for n in names if is_uid_text(s := n.split(".")[0])}):
            try:
                with records.locked(uid) as held:
                    state = held.load()
            except (SessionFailed, ConfigError) as e:
                log.error("reading the sessions of uid %d: %s", uid, e.message)
                continue
            for sid, record in sorted(state.sessions.items()):
                token = record.get("token_serial")
                if token and (serial is None or token == serial) and session_alive(record):
                    out.append((uid, state.user or _user_name(uid), sid, record))
        return out

    def refresh_session_cards(self) -> None:
        """Watch the cards of live sessions, so that pulling one locks its sessions."""
        if not self.config.launcher.card_removal_locks_sessions:
            return
        cards = {str(r["token_serial"]) for _u, _n, _s, r in self.card_sessions()}
        if cards != self._session_cards:
            self._session_cards = cards
            self._sync_watch()

    def _lock_card_sessions(self, event: CardEvent) -> None:
        """Card removal: lock every logind session the card opened (loginctl), audited
        ``session_lock`` for each; a session logind does not know of is an error record."""
        from ..adapters import logind

        if not self.config.launcher.card_removal_locks_sessions:
            return
        failure: SvmmError | None = None
        for uid, user, sid, record in self.card_sessions(event.serial):
            pid = record.get("pid")
            found = logind.valid_session_id(record.get("logind_session"))
            found = found or (logind.session_of_pid(pid) if isinstance(pid, int) else None)
            why = f"session={sid}; logind session {found or '(none)'}; card {event.reason}"
            fingerprint = record.get("card_fingerprint")
            card = CardFacts(
                fingerprint=fingerprint if isinstance(fingerprint, str) else "",
                token_serial=event.serial,
            )
            try:
                if found is None:
                    raise logind.LockFailed(
                        "the login process is in no logind session", reason="no_logind_session"
                    )
                logind.lock_session(found)
            except logind.LockFailed as e:
                d = Decision(False, e.reason, e.message, user=user, card=card)
                outcome = Outcome.ERROR
            else:
                d = Decision(True, "locked", "", user=user, card=card)
                outcome = Outcome.SUCCESS
            try:
                self._audited("session_lock", outcome, d, uid, "card_watch", detail=why)
            except SvmmError as e:
                failure = failure or e
        if failure is not None:
            raise failure

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
        data = {
            "allowed": allowed,
            "running": mine,
            "allowlist": note,
            "keys_held": sorted(self.keys.held(uid)),  # names only
        }
        if self.dmcrypt is not None:  # dm-crypt: what the caller's sessions have mapped
            try:
                data["volumes_open"] = sorted(self.dmcrypt.open_volumes(uid))
            except SvmmError as e:
                data["volumes_open"] = []
                data["allowlist"] = f"{note}; dm-crypt state: {e.reason}"
        return self._audited("vm_list", Outcome.SUCCESS, decision, uid, "list", data)

    def _start(self, uid: int, vm: str) -> Reply:
        with self._lock:
            now = self.now()
            try:
                allowlist = self._allowlist(uid, now)
            except LauncherRefused as e:
                d = Decision(False, e.reason, e.message, vm, _user_name(uid))
                return self._audited("vm_deny", Outcome.FAILURE, d, uid, "start")
            d = decide_start(uid, vm, allowlist, self.policy, self.registry.running(), now=now,
                             keys_held=self._keys_held(uid, vm, allowlist))  # fmt: skip
            if not d.allowed:
                outcome = Outcome.UNDECIDED if d.reason == "policy_unavailable" else Outcome.FAILURE
                return self._audited("vm_deny", outcome, d, uid, "start")
            vols = f"volumes={','.join(d.volumes)}" if d.volumes else ""
            lc = self.config.launcher
            try:
                mine = sorted(r.vm for r in self.registry.running().values() if r.uid == uid)
                devices = decide_devices(vm, allowlist, self.policy, mine,
                                         [n.name for n in lc.networks])  # fmt: skip
            except LauncherRefused as e:
                bad = Decision(False, e.reason, e.message, vm, d.user, d.roles, d.card)
                return self._audited("vm_deny", Outcome.FAILURE, bad, uid, "start", detail=vols)
            vols = "; ".join(x for x in (vols, devices.detail()) if x)
            try:
                disks = self._disks(uid, d.volumes)
            except LauncherRefused as e:
                bad = Decision(False, e.reason, e.message, vm, d.user, d.roles, d.card)
                return self._audited("vm_deny", Outcome.FAILURE, bad, uid, "start", detail=vols)
            try:
                keys = self.keys.borrow(uid, d.volumes) if self.dmcrypt is None else {}
            except KeyError as e:  # dropped since the decision
                gone = Decision(False, "volume_key_unavailable",
                                f"{vm} needs the key of volume {e.args[0]}, which the launcher "
                                "does not hold", vm, d.user, d.roles, d.card)  # fmt: skip
                return self._audited("vm_deny", Outcome.FAILURE, gone, uid, "start", detail=vols)
            # Any uid of the range answers the KVM question: they share the kvm group. The
            # registry picks the VM's own uid when it starts it (under its lock).
            run_as = RunAs.for_vm(lc.vm_uid_min)
            taps: dict[str, int] = {}
            try:
                nics = self._nics(vm, devices.networks, taps)
                usb = tuple(UsbHost.parse(u) for u in devices.usb)
                # Devices need a PCI machine; without any, no machine at all (-machine none).
                machine = Machine.Q35 if usb or nics else Machine.NONE
                spec = VmSpec(vm, disks=disks, machine=machine, accel=detect_accel(run_as),
                              usb=usb, nics=nics, console=True)  # fmt: skip
                record = self.registry.launch(
                    spec,
                    keys,
                    uid=uid,
                    user=d.user,
                    run_dir=lc.run_dir / vm,
                    run_as=None,
                    vm_uids=(lc.vm_uid_min, lc.vm_uid_max),
                    ready_timeout=lc.start_timeout,
                    card_fingerprint=d.card.fingerprint if d.card else "",
                    card_serial=d.card.serial if d.card else "",
                    token_serial=self._token_serial(
                        uid, d.volumes, d.card.fingerprint if d.card else ""
                    ),
                    now=now,
                    taps=taps,
                )
            except (VmError, VolumeError) as e:
                failed = Decision(False, e.reason, e.message, vm, d.user, d.roles, d.card)
                return self._audited("vm_start", Outcome.ERROR, failed, uid, "start", detail=vols)
            finally:
                for buf in keys.values():
                    wipe(buf)
                for fd in taps.values():
                    os.close(fd)  # QEMU has its own: the tap goes when QEMU exits
            self._sync_watch()
            try:
                return self._audited(
                    "vm_start", Outcome.SUCCESS, d, uid, "start",
                    {"vm": vm, "pid": record.pid, "volumes": list(d.volumes),
                     "usb": list(devices.usb), "networks": list(devices.networks)},
                    detail=vols,
                )  # fmt: skip
            except SvmmError:
                # Unaudited VMs do not run.
                self._stop(vm)
                raise

    def _nics(self, vm: str, networks: Collection[str], taps: dict[str, int]) -> tuple[Nic, ...]:
        """A virtio-net device per network, on the backend ``[launcher.networks.NAME]``
        defines; bridged ones get a tap svmmd makes (added to ``taps``, closed by the
        caller)."""
        from ..adapters.tap import open_tap

        nics = []
        for name in networks:
            backend = self.config.launcher.network(name)
            if backend is None:  # decide_devices saw to it
                raise VmError(f"network {name} is not defined", reason="network_undefined")
            if backend.kind is NetworkKind.USER:
                nics.append(Nic(name, NetKind.USER, mac_for(vm, name), backend.restrict))
            else:
                taps[name], _ifname = open_tap(backend.bridge)
                nics.append(Nic(name, NetKind.TAP, mac_for(vm, name)))
        return tuple(nics)

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

    def _resume(self, uid: int, vm: str) -> Reply:
        with self._lock:
            d = decide_control(uid, vm, self.registry.running())
            handle = self.registry.get(vm) if d.allowed else None
            if handle is None:
                if d.allowed:  # ended between the two looks
                    d = Decision(False, "vm_not_running", f"{vm} is not running", vm, d.user)
                return self._audited("vm_deny", Outcome.FAILURE, d, uid, "resume")
            record = handle.record
            try:
                d = self._decide_resume(record, self.now())
                if d.allowed:
                    state = handle.status()
                    # paused: by card removal; prelaunch: started held (-S), never run yet
                    if state["status"] not in RESUMABLE:
                        d = Decision(False, "vm_not_paused", f"{vm} is {state['status']}",
                                     vm, d.user, d.roles, d.card)  # fmt: skip
            except VmError as e:
                failed = Decision(False, e.reason, e.message, vm, record.user)
                return self._audited("vm_resume", Outcome.ERROR, failed, uid, "resume")
            if not d.allowed:
                return self._audited("vm_deny", Outcome.FAILURE, d, uid, "resume")
            try:
                handle.qmp.execute("cont")
                state = handle.status()
            except VmError as e:
                failed = Decision(False, e.reason, e.message, vm, d.user, d.roles, d.card)
                return self._audited("vm_resume", Outcome.ERROR, failed, uid, "resume")
            return self._audited("vm_resume", Outcome.SUCCESS, d, uid, "resume",
                                 {"vm": vm, "status": state["status"]})  # fmt: skip

    def _console(self, uid: int, vm: str) -> Reply:
        """The VM's serial console: svmmd connects to the console socket QEMU listens on
        (root's, in the VM's private run folder) and passes the connection to the caller
        (SCM_RIGHTS with the reply). One client at a time (``console_busy``)."""
        import socket as _socket

        with self._lock:
            now = self.now()
            allowlist: Allowlist | None = None
            if uid != 0:
                try:
                    allowlist = self._allowlist(uid, now)
                except LauncherRefused as e:
                    d = Decision(False, e.reason, e.message, vm, _user_name(uid))
                    return self._audited("vm_deny", Outcome.FAILURE, d, uid, "console")
            d = decide_console(uid, vm, self.registry.running(), allowlist, self.policy, now=now)
            handle = self.registry.get(vm) if d.allowed else None
            if handle is None:
                if d.allowed:
                    d = Decision(False, "vm_not_running", f"{vm} is not running", vm, d.user)
                return self._audited("vm_deny", Outcome.FAILURE, d, uid, "console")
            conn = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
            try:
                states = _console_states(handle)
                if not states:
                    raise VmError(f"VM {vm} has no console", reason="console_unavailable")
                if not states[0].startswith("disconnected:"):
                    raise VmError(f"{vm}'s console is in use", reason="console_busy")
                conn.settimeout(5.0)
                try:
                    conn.connect(str(handle.console_socket))
                except OSError as e:
                    raise VmError(f"VM {vm}: console: {e.strerror}",
                                  reason="console_unavailable") from None  # fmt: skip
                conn.settimeout(None)
                # QEMU accepts in its main loop: wait (under the lock) until it has, so the
                # next request sees the console taken instead of queueing behind this one.
                if not _console_taken(handle, deadline=time.monotonic() + 2.0):
                    raise VmError(f"VM {vm}: QEMU did not take the console connection",
                                  reason="console_unavailable")  # fmt: skip
                reply = self._audited("vm_console", Outcome.SUCCESS, d, uid, "console",
                                      {"vm": vm, "escape": "^]"})  # fmt: skip
            except VmError as e:
                conn.close()
                failed = Decision(False, e.reason, e.message, vm, d.user, d.roles, d.card)
                outcome = Outcome.FAILURE if e.reason == "console_busy" else Outcome.ERROR
                return self._audited("vm_console", outcome, failed, uid, "console")
            except BaseException:
                conn.close()
                raise
            return Reply(reply.ok, reply.reason, reply.message, reply.data, (conn.detach(),))

    def _decide_resume(self, record: VmRecord, now: dt.datetime) -> Decision:
        """May ``record``'s VM run again? As for a start, on its owner's behalf: the allowlist
        still lets them boot it, the keys of its volumes are held again, and (the VM was
        opened by a card) a session of that card holds keys: a new PIN login with it."""
        vm, owner = record.vm, record.uid
        try:
            allowlist = self._allowlist(owner, now)
        except LauncherRefused as e:
            return Decision(False, e.reason, e.message, vm, record.user)

        def deny(reason: str, message: str) -> Decision:
            return Decision(False, reason, message, vm, allowlist.user, allowlist.roles,
                            allowlist.card)  # fmt: skip

        if not allowlist.permits(vm, pdp.BOOT, now=now):
            return deny("not_in_allowlist", f"{allowlist.user} may not boot {vm} (allowlist)")
        if self.dmcrypt is not None:
            held, serials = set(self.dmcrypt.open_volumes(owner)), self._dmcrypt_card_serials(owner)
        else:
            held, serials = self.keys.held(owner), self.keys.card_serials(owner)
        missing = [v for v in allowlist.vms[vm].volumes if v not in held]
        if missing and self.dmcrypt is not None:
            return deny("volume_not_open", f"{vm} needs volume {missing[0]}, which no session "
                        "of its owner has open (log in again with the card)")  # fmt: skip
        if missing:
            return deny(
                "volume_key_unavailable",
                f"{vm} needs the key of volume {missing[0]}, which the launcher does not hold",
            )
        if record.token_serial and record.token_serial not in serials:
            return deny(
                "card_login_required", f"log in again with the card that started {vm} first"
            )
        return Decision(True, "ok", "", vm, allowlist.user, allowlist.roles, allowlist.card,
                        allowlist.vms[vm].volumes)  # fmt: skip

    # --- volumes: held keys (vmm) or dm-crypt mappings (services/dmcrypt.py)

    def _keys_held(self, uid: int, vm: str, allowlist: Allowlist) -> Collection[str]:
        """For decide_start: the volumes whose keys are held; in dm-crypt mode all of the
        VM's (each mapping is checked by ``_disks``, which says ``volume_not_open``)."""
        if self.dmcrypt is None:
            return self.keys.held(uid)
        allowance = allowlist.vms.get(vm)
        return allowance.volumes if allowance is not None else ()

    def _disks(self, uid: int, volumes: tuple[str, ...]) -> tuple[LuksDisk | RawDisk, ...]:
        """LUKS images QEMU decrypts (vmm), or the plaintext mappings /dev/mapper/svmm-NAME
        that ``uid``'s sessions opened (dm-crypt; ``volume_not_open`` otherwise)."""
        if self.dmcrypt is None:
            return tuple(LuksDisk(v, volume_image(self.config.volumes.dir, v)) for v in volumes)
        from .dmcrypt import mapping_path

        try:
            open_now = self.dmcrypt.open_volumes(uid)
        except SvmmError as e:
            raise _refuse("volume_not_open", f"dm-crypt state: {e.message}") from None
        for v in volumes:
            check_volume_name(v)
            if v not in open_now:
                raise _refuse(
                    "volume_not_open",
                    f"volume {v} is not open for you: /dev/mapper/svmm-{v} must be open by a "
                    "session of yours whose card is in (log in with the card)",
                )
        return tuple(RawDisk(v, mapping_path(v)) for v in volumes)

    def _token_serial(self, uid: int, volumes: tuple[str, ...], fingerprint: str) -> str:
        if self.dmcrypt is None:
            return self.keys.card_for(uid, volumes, fingerprint)
        serials = self.dmcrypt.open_volumes(uid).get(volumes[0], ()) if volumes else ()
        return min(serials, default="")

    def _dmcrypt_card_serials(self, uid: int | None = None) -> set[str]:
        if self.dmcrypt is None:
            return set()
        try:
            return set(self.dmcrypt.card_serials(uid))
        except SvmmError as e:
            log.error("dm-crypt state: %s", e.message)
            return set()

    def _dmcrypt_card_removed(self, event: CardEvent) -> None:
        """dm-crypt hook of card removal: after the card's VMs got their action, the mappings
        only its sessions hold are luksSuspend-ed (key wiped); audited ``volume_suspend``.
        Not with ``card_removal = lock``: the VMs run on and need their disks."""
        if self.dmcrypt is None or self.card_policy.action.value == "lock":
            return
        try:
            events = self.dmcrypt.card_removed(event.serial)
        except SvmmError as e:
            events = []
            d = Decision(False, e.reason, f"dm-crypt: {e.message}")
            self._audited("volume_suspend", Outcome.ERROR, d, 0, "card_watch")
        for ev in events:
            d = Decision(ev.ok, ev.reason, f"volume={ev.volume}; {ev.detail}",
                         user=",".join(ev.users))  # fmt: skip
            outcome = Outcome.SUCCESS if ev.ok else Outcome.ERROR
            why = f"card {event.reason}; token {event.serial}"
            self._audited("volume_suspend", outcome, d, 0, "card_watch", detail=why)

    def _stop(self, vm: str, *, graceful: bool = True) -> str:
        """``graceful``: the guest gets the ACPI power button first (a user's stop, the last
        logout); a pulled card's VMs are quit at once: no grace for a guest whose card left."""
        lc = self.config.launcher
        try:
            return self.registry.stop(
                vm,
                powerdown_timeout=lc.powerdown_timeout if graceful else 0.0,
                quit_timeout=lc.quit_timeout,
                term_timeout=lc.term_timeout,
                kill_timeout=lc.kill_timeout,
            )
        finally:
            self._sync_watch()

    # --- audit

    def _audited(
        self,
        event: str,
        outcome: Outcome,
        d: Decision,
        uid: int,
        op: str,
        data: Mapping[str, Any] | None = None,
        *,
        detail: str = "",
    ) -> Reply:
        card = d.card
        if isinstance(card, CardRef):
            card = CardFacts(fingerprint=card.fingerprint, serial=card.serial)
        detail = "; ".join(x for x in (f"uid={uid}; op={op}", detail, d.message) if x)
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


def _console_states(handle: Any) -> list[str]:
    """The console chardev's QMP filename ("disconnected:..." while nobody is attached)."""
    chardevs = handle.qmp.execute("query-chardev")
    return [
        str(c.get("filename", ""))
        for c in chardevs or []
        if isinstance(c, dict) and c.get("label") == CONSOLE_ID
    ]


def _console_taken(handle: Any, *, deadline: float) -> bool:
    while True:
        states = _console_states(handle)
        if states and not states[0].startswith("disconnected:"):
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
