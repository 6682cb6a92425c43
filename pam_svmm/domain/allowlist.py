"""The per-user VM allowlist the session writes and the launcher reads. Pure.

    {"format": "svmm-allowlist/1", "user": "alice", "uid": 10001, "roles": [...],
     "card": {"fingerprint": "...", "serial": "..."} | null, "method": "card"|"password",
     "sessions": ["<session id>", ...], "policy_version": 7, "host": "lab-host",
     "issued_at": ISO, "expires_at": ISO,
     "vms": {"vm-web": {"permissions": ["boot", "console", ...], "volumes": [...]}}}

``build_allowlist`` computes it from the compiled policy (``grants_for``: static
constraints applied; the Chinese Wall is decided at boot by the launcher with ``decide``).
A VM's volumes are listed only when the user may boot it (they are what a boot unlocks).
``parse_allowlist`` is strict: the launcher trusts nothing it did not check.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from ..errors import AllowlistInvalid, InputMalformed
from .audit_record import CardFacts
from .bounded import loads_json
from .policy import BOOT, CompiledPolicy, Subject, grants_for, is_name, is_role, is_user
from .policy import normalise_permission as _perm

FORMAT = "svmm-allowlist/1"
MAX_ALLOWLIST_BYTES = 4 << 20
METHODS = ("card", "password")
_KEYS = frozenset(
    {
        "format",
        "user",
        "uid",
        "roles",
        "card",
        "method",
        "sessions",
        "policy_version",
        "host",
        "issued_at",
        "expires_at",
        "vms",
    }
)
MAX_SESSIONS = 1024
_HEX = re.compile(r"[0-9a-fA-F]+")


@dataclass(frozen=True)
class CardRef:
    fingerprint: str  # sha256 of the certificate, lowercase hex
    serial: str  # certificate serial, hex


@dataclass(frozen=True)
class VmAllowance:
    permissions: tuple[str, ...]
    volumes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Allowlist:
    user: str
    uid: int
    roles: tuple[str, ...]
    card: CardRef | None
    method: str
    sessions: tuple[str, ...]
    policy_version: int
    host: str
    issued_at: dt.datetime
    expires_at: dt.datetime
    vms: Mapping[str, VmAllowance]

    def valid_at(self, now: dt.datetime) -> bool:
        return self.issued_at <= now < self.expires_at

    def permits(self, vm_id: str, permission: str, *, now: dt.datetime) -> bool:
        """Whether this (unexpired) allowlist lists ``permission`` on ``vm_id``. The launcher
        still asks ``policy.decide`` for the mandatory constraints that depend on what runs."""
        vm = self.vms.get(vm_id)
        return self.valid_at(now) and vm is not None and permission in vm.permissions

    def with_sessions(self, sessions: Iterable[str]) -> Allowlist:
        return replace(self, sessions=_sessions(list(sessions)))

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "user": self.user,
            "uid": self.uid,
            "roles": list(self.roles),
            "card": None
            if self.card is None
            else {"fingerprint": self.card.fingerprint, "serial": self.card.serial},
            "method": self.method,
            "sessions": list(self.sessions),
            "policy_version": self.policy_version,
            "host": self.host,
            "issued_at": _iso(self.issued_at),
            "expires_at": _iso(self.expires_at),
            "vms": {
                vm_id: {"permissions": list(a.permissions), "volumes": list(a.volumes)}
                for vm_id, a in sorted(self.vms.items())
            },
        }

    def to_json(self) -> bytes:
        # Compact: json's C encoder only runs without indent (a 150-VM list in 0.1 ms).
        return (json.dumps(self.to_dict(), separators=(",", ":")) + "\n").encode("ascii")


def _iso(t: dt.datetime) -> str:
    return t.astimezone(dt.UTC).isoformat(timespec="seconds")


def _sessions(values: list[str]) -> tuple[str, ...]:
    out: list[str] = []
    for s in values:
        if not isinstance(s, str) or not s or len(s) > 128 or not s.isprintable():
            raise AllowlistInvalid(f"allowlist: sessions: {s!r} is not a session id")
        if s not in out:
            out.append(s)
    return tuple(out)


def build_allowlist(
    compiled: CompiledPolicy,
    *,
    user: str,
    uid: int,
    roles: Iterable[str],
    card: CardFacts | CardRef | None,
    method: str,
    sessions: Iterable[str],
    host: str,
    now: dt.datetime,
    ttl: float,
) -> Allowlist:
    """The allowlist for one user on ``host`` at ``now``, valid for ``ttl`` seconds."""
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}")
    roles_t = tuple(sorted(set(roles)))
    ref: CardRef | None
    if isinstance(card, CardFacts):
        ref = CardRef(card.fingerprint, card.serial) if card.fingerprint else None
    else:
        ref = card
    vms: dict[str, VmAllowance] = {}
    policy = compiled.policy
    for vm_id, perms in sorted(grants_for(compiled, Subject(user, roles_t)).items()):
        ordered = tuple(sorted(perms, key=_perm_order))
        volumes = policy.vms[vm_id].volumes if BOOT in perms else ()
        vms[vm_id] = VmAllowance(ordered, tuple(volumes))
    issued = now.astimezone(dt.UTC).replace(microsecond=0)
    allowlist = Allowlist(
        user=user,
        uid=uid,
        roles=roles_t,
        card=ref,
        method=method,
        sessions=_sessions(list(sessions)),
        policy_version=compiled.version,
        host=host,
        issued_at=issued,
        expires_at=issued + dt.timedelta(seconds=int(ttl)),
        vms=vms,
    )
    # What we write must be what the launcher accepts.
    return parse_allowlist(allowlist.to_json())


def _perm_order(p: str) -> tuple[int, str]:
    kind = p.partition(":")[0]
    return ({"boot": 0, "console": 1, "usb": 2, "network": 3}.get(kind, 9), p)


# --- strict parsing -----------------------------------------------------------------------


def _bad(field: str, problem: str) -> AllowlistInvalid:
    return AllowlistInvalid(f"allowlist: {field}: {problem}")


def _time(doc: dict[str, Any], name: str) -> dt.datetime:
    v = doc[name]
    if not isinstance(v, str):
        raise _bad(name, "must be an ISO 8601 time")
    try:
        t = dt.datetime.fromisoformat(v)
    except ValueError:
        raise _bad(name, f"{v!r} is not an ISO 8601 time") from None
    if t.tzinfo is None:
        raise _bad(name, "must carry a time zone")
    return t


def _int(doc: dict[str, Any], name: str, minimum: int) -> int:
    v = doc[name]
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise _bad(name, f"must be an integer >= {minimum}")
    return v


def _str_list(v: object, name: str) -> list[str]:
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise _bad(name, "must be an array of strings")
    return v


def parse_allowlist(data: bytes) -> Allowlist:
    """An allowlist from its JSON bytes; AllowlistInvalid names the first bad field."""
    try:
        doc = loads_json(data, max_bytes=MAX_ALLOWLIST_BYTES, max_depth=4, what="allowlist")
    except InputMalformed as e:
        raise AllowlistInvalid(e.message) from None
    if not isinstance(doc, dict):
        raise AllowlistInvalid("allowlist: not a JSON object")
    if set(doc) != _KEYS:
        missing, extra = sorted(_KEYS - set(doc)), sorted(set(doc) - _KEYS)
        raise AllowlistInvalid(
            f"allowlist: keys missing: {missing or '-'}, unknown: {extra or '-'}"
        )
    if doc["format"] != FORMAT:
        raise _bad("format", f"{doc['format']!r} is not {FORMAT!r}")
    user = doc["user"]
    if not is_user(user):
        raise _bad("user", f"{user!r} is not a user name")
    uid = _int(doc, "uid", 0)
    roles = _str_list(doc["roles"], "roles")
    for i, r in enumerate(roles):
        if not is_role(r):
            raise _bad(f"roles[{i}]", f"{r!r} is not a role name")
    card_raw = doc["card"]
    card: CardRef | None = None
    if card_raw is not None:
        if not isinstance(card_raw, dict) or set(card_raw) != {"fingerprint", "serial"}:
            raise _bad("card", "must be null or {fingerprint, serial}")
        fp, serial = card_raw["fingerprint"], card_raw["serial"]
        if not (isinstance(fp, str) and len(fp) == 64 and _is_hex(fp) and fp == fp.lower()):
            raise _bad("card.fingerprint", "must be a lowercase hex SHA-256")
        if not (isinstance(serial, str) and 0 < len(serial) <= 64 and _is_hex(serial)):
            raise _bad("card.serial", "must be a hex serial number")
        card = CardRef(fp, serial)
    method = doc["method"]
    if method not in METHODS:
        raise _bad("method", f"{method!r} is not one of {', '.join(METHODS)}")
    if method == "card" and card is None:
        raise _bad("card", "is required when method is 'card'")
    sessions = _str_list(doc["sessions"], "sessions")
    if len(sessions) > MAX_SESSIONS:
        raise _bad("sessions", f"more than {MAX_SESSIONS}")
    if len(set(sessions)) != len(sessions):
        raise _bad("sessions", "lists a session twice")
    policy_version = _int(doc, "policy_version", 1)
    host = doc["host"]
    if not is_name(host):
        raise _bad("host", f"{host!r} is not a host name")
    issued, expires = _time(doc, "issued_at"), _time(doc, "expires_at")
    if expires <= issued:
        raise _bad("expires_at", "is not after issued_at")
    vms_raw = doc["vms"]
    if not isinstance(vms_raw, dict):
        raise _bad("vms", "must be an object")
    vms: dict[str, VmAllowance] = {}
    for vm_id, body in vms_raw.items():
        key = f"vms.{vm_id}"
        if not is_name(vm_id):
            raise _bad(key, "is not a VM id")
        if not isinstance(body, dict) or set(body) != {"permissions", "volumes"}:
            raise _bad(key, "must be {permissions, volumes}")
        perms = _str_list(body["permissions"], f"{key}.permissions")
        for j, p in enumerate(perms):
            if _perm(p) != p:
                raise _bad(f"{key}.permissions[{j}]", f"{p!r} is not a permission")
        if len(set(perms)) != len(perms):
            raise _bad(f"{key}.permissions", "lists a permission twice")
        volumes = _str_list(body["volumes"], f"{key}.volumes")
        for j, v in enumerate(volumes):
            if not is_name(v):
                raise _bad(f"{key}.volumes[{j}]", f"{v!r} is not a volume name")
        vms[vm_id] = VmAllowance(tuple(perms), tuple(volumes))
    return Allowlist(
        user=user,
        uid=uid,
        roles=tuple(roles),
        card=card,
        method=method,
        sessions=_sessions(sessions),
        policy_version=policy_version,
        host=host,
        issued_at=issued,
        expires_at=expires,
        vms=vms,
    )


def _is_hex(s: str) -> bool:
    return _HEX.fullmatch(s) is not None
