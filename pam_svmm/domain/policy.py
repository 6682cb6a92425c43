"""The VM policy decision point. Pure: no I/O, no clock.

A policy document (TOML, see config/policy.example.toml) names hosts, VMs, networks, grants
and conflict-of-interest classes. ``load_policy`` parses and validates it (every error names
the exact key) and compiles it into indexes by user, by role and by VM, so that a decision
costs O(roles of the subject), not O(size of the policy).

Decisions, in the order they are made (the first that decides wins):

1. the VM and the action must exist (else deny);
2. mandatory constraints, which no grant overrides:
   * type enforcement: a VM joins a network only if the network's ``types`` include the
     VM's ``type``, and only a network the VM is configured for;
   * a USB device must be assigned to the VM;
   * Chinese Wall: a user running a VM of one class may not boot a VM of a class in
     conflict with it (``[conflicts] classes``) while the other runs;
3. a grant to the user, or to one of the user's roles, naming the action (lowest index wins
   for the explanation);
4. otherwise: default deny.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from ..errors import InputMalformed, PolicyError
from .bounded import loads_toml

BOOT = "boot"
CONSOLE = "console"
SIMPLE_PERMISSIONS = (BOOT, CONSOLE)
MAX_POLICY_BYTES = 16 << 20  # what a policy bundle can carry
MAX_POLICY_DEPTH = 8  # the format nests 3 deep ([[grants]] permissions, conflicts classes)

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_USER = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.@-]{0,63}")
_USB = re.compile(r"[0-9a-fA-F]{4}:[0-9a-fA-F]{4}")


def is_name(value: object) -> bool:
    """VM ids, hosts, networks, classes, types, volumes: a conservative token."""
    return isinstance(value, str) and _NAME.fullmatch(value) is not None


def is_user(value: object) -> bool:
    return isinstance(value, str) and _USER.fullmatch(value) is not None


def is_role(value: object) -> bool:
    # Role names come from the directory (group cns): any printable text.
    return isinstance(value, str) and 0 < len(value) <= 256 and value.isprintable()


def parse_permission(text: object) -> tuple[str, str] | None:
    """``boot`` -> ("boot", ""), ``usb:046d:c52b`` -> ("usb", "046d:c52b"),
    ``network:dmz`` -> ("network", "dmz"); None when it is not a permission."""
    if not isinstance(text, str):
        return None
    if text in SIMPLE_PERMISSIONS:
        return text, ""
    kind, _, arg = text.partition(":")
    if kind == "usb" and _USB.fullmatch(arg):
        return "usb", arg.lower()
    if kind == "network" and is_name(arg):
        return "network", arg
    return None


def normalise_permission(text: str) -> str | None:
    p = parse_permission(text)
    if p is None:
        return None
    return p[0] if not p[1] else f"{p[0]}:{p[1]}"


# --- the document --------------------------------------------------------------------------


@dataclass(frozen=True)
class Host:
    name: str
    login_roles: frozenset[str]
    services: frozenset[str]


@dataclass(frozen=True)
class Vm:
    id: str
    label: str = ""
    vm_class: str = ""  # conflict-of-interest class ("class" in the file)
    type: str = ""  # type-enforcement label, matched against networks' types
    volumes: tuple[str, ...] = ()
    usb: tuple[str, ...] = ()  # "vvvv:pppp", lower case
    networks: tuple[str, ...] = ()


@dataclass(frozen=True)
class Network:
    name: str
    types: frozenset[str]


@dataclass(frozen=True)
class Grant:
    index: int
    vm: str
    permissions: tuple[str, ...]
    user: str = ""
    role: str = ""

    @property
    def principal(self) -> str:
        return f"user {self.user}" if self.user else f"role {self.role}"


@dataclass(frozen=True)
class Policy:
    version: int
    hosts: Mapping[str, Host]
    vms: Mapping[str, Vm]
    networks: Mapping[str, Network]
    grants: tuple[Grant, ...]
    conflicts: tuple[tuple[str, ...], ...]  # sets of classes, in file order
    description: str = ""


class Subject(NamedTuple):
    user: str
    roles: Collection[str] = ()


@dataclass(frozen=True)
class Decision:
    allowed: bool
    rule: str  # which grant or constraint decided, for people
    reason: str  # a stable token for the audit trail

    def __bool__(self) -> bool:
        # A dataclass is always true: `if decide(...)` would allow everything. Fail loudly.
        raise TypeError("use Decision.allowed, not the Decision itself")


# A principal's grants: vm id -> permission -> the lowest grant index giving it.
_Index = dict[str, dict[str, int]]


@dataclass(frozen=True)
class CompiledPolicy:
    policy: Policy
    by_user: Mapping[str, _Index]
    by_role: Mapping[str, _Index]
    by_vm: Mapping[str, tuple[int, ...]]  # grant indexes naming the VM
    # class -> conflicting class -> index of the conflict set
    walls: Mapping[str, Mapping[str, int]] = field(default_factory=dict)

    @property
    def version(self) -> int:
        return self.policy.version


# --- parsing -------------------------------------------------------------------------------


class _T:
    """A TOML table being read: every key is consumed once, leftovers are errors."""

    def __init__(self, data: object, key: str) -> None:
        if not isinstance(data, dict):
            raise PolicyError(key, "must be a table")
        self.data = dict(data)
        self.prefix = key

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def pop(self, name: str, default: Any = None) -> Any:
        return self.data.pop(name, default)

    def text(self, name: str, default: str = "") -> str:
        v = self.pop(name, default)
        if not isinstance(v, str):
            raise PolicyError(self.key(name), "must be a string")
        return v

    def strings(self, name: str) -> list[str]:
        v = self.pop(name, [])
        if not isinstance(v, list):
            raise PolicyError(self.key(name), "must be an array of strings")
        for i, x in enumerate(v):
            if not isinstance(x, str):
                raise PolicyError(f"{self.key(name)}[{i}]", "must be a string")
        return v

    def names(self, name: str, check: Any = is_name, what: str = "name") -> tuple[str, ...]:
        out: list[str] = []
        for i, x in enumerate(self.strings(name)):
            if not check(x):
                raise PolicyError(f"{self.key(name)}[{i}]", f"{x!r} is not a valid {what}")
            if x in out:
                raise PolicyError(f"{self.key(name)}[{i}]", f"{x!r} is listed twice")
            out.append(x)
        return tuple(out)

    def done(self) -> None:
        if self.data:
            extra = sorted(self.data)[0]
            raise PolicyError(self.key(extra), "unknown key")


def parse_policy(data: bytes | str) -> Policy:
    """Parse and validate a policy document; PolicyError names the first bad key."""
    try:
        raw = loads_toml(data, max_bytes=MAX_POLICY_BYTES, max_depth=MAX_POLICY_DEPTH, what="")
    except InputMalformed as e:
        raise PolicyError("", e.message) from None
    top = _T(raw, "")
    version = top.pop("version")
    if version is None:
        raise PolicyError("version", "is required")
    if isinstance(version, bool) or not isinstance(version, int) or not 0 < version < 2**63:
        raise PolicyError("version", "must be a positive 64-bit integer")
    description = top.text("description")
    networks = _networks(top.pop("networks", {}))
    vms = _vms(top.pop("vms", {}), networks)
    hosts = _hosts(top.pop("hosts", {}))
    conflicts = _conflicts(top.pop("conflicts", {}), vms)
    grants = _grants(top.pop("grants", []), vms, networks)
    top.done()
    return Policy(
        version=version,
        hosts=hosts,
        vms=vms,
        networks=networks,
        grants=grants,
        conflicts=conflicts,
        description=description,
    )


def _table_of_tables(raw: object, key: str) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise PolicyError(key, "must be a table")
    for name in raw:
        if not is_name(name):
            raise PolicyError(f"{key}.{name}", f"{name!r} is not a valid name")
    return raw


def _networks(raw: object) -> dict[str, Network]:
    out = {}
    for name, body in _table_of_tables(raw, "networks").items():
        t = _T(body, f"networks.{name}")
        types = t.names("types", what="type label")
        if not types:
            raise PolicyError(t.key("types"), "must name at least one VM type")
        t.text("description")
        t.done()
        out[name] = Network(name, frozenset(types))
    return out


def _vms(raw: object, networks: Mapping[str, Network]) -> dict[str, Vm]:
    out = {}
    for vm_id, body in _table_of_tables(raw, "vms").items():
        t = _T(body, f"vms.{vm_id}")
        label = t.text("label")
        vm_class = t.text("class")
        if vm_class and not is_name(vm_class):
            raise PolicyError(t.key("class"), f"{vm_class!r} is not a valid class name")
        vm_type = t.text("type")
        if vm_type and not is_name(vm_type):
            raise PolicyError(t.key("type"), f"{vm_type!r} is not a valid type label")
        volumes = t.names("volumes", what="volume name")
        usb = []
        for i, dev in enumerate(t.names("usb", check=lambda x: _USB.fullmatch(x), what="usb id")):
            if dev.lower() in usb:
                raise PolicyError(f"{t.key('usb')}[{i}]", f"{dev!r} is listed twice")
            usb.append(dev.lower())
        nets = t.names("networks", what="network name")
        for i, net in enumerate(nets):
            k = f"{t.key('networks')}[{i}]"
            if net not in networks:
                raise PolicyError(k, f"unknown network {net!r}")
            allowed = networks[net].types
            if vm_type not in allowed:
                # Type enforcement is checked here too: a VM configured for a network its
                # type may never join is a mistake, not a policy.
                what = f"type {vm_type!r}" if vm_type else "no type"
                raise PolicyError(
                    k,
                    f"{vm_id} has {what}; network {net!r} admits types "
                    f"{', '.join(sorted(allowed))} (networks.{net}.types)",
                )
        t.text("description")
        t.done()
        out[vm_id] = Vm(vm_id, label, vm_class, vm_type, volumes, tuple(usb), nets)
    return out


def _hosts(raw: object) -> dict[str, Host]:
    out = {}
    for name, body in _table_of_tables(raw, "hosts").items():
        t = _T(body, f"hosts.{name}")
        roles = t.names("login_roles", check=is_role, what="role name")
        services = t.names("services", check=is_name, what="PAM service name")
        t.text("description")
        t.done()
        out[name] = Host(name, frozenset(roles), frozenset(services))
    return out


def _conflicts(raw: object, vms: Mapping[str, Vm]) -> tuple[tuple[str, ...], ...]:
    t = _T(raw, "conflicts")
    sets = t.pop("classes", [])
    t.done()
    if not isinstance(sets, list):
        raise PolicyError("conflicts.classes", "must be an array of arrays of class names")
    known = {vm.vm_class for vm in vms.values() if vm.vm_class}
    out = []
    for i, group in enumerate(sets):
        key = f"conflicts.classes[{i}]"
        if not isinstance(group, list) or len(group) < 2:
            raise PolicyError(key, "must be an array of at least two class names")
        seen: list[str] = []
        for j, cls in enumerate(group):
            if not isinstance(cls, str):
                raise PolicyError(f"{key}[{j}]", "must be a string")
            if cls not in known:
                raise PolicyError(f"{key}[{j}]", f"unknown class {cls!r} (no VM has it)")
            if cls in seen:
                raise PolicyError(f"{key}[{j}]", f"{cls!r} is listed twice")
            seen.append(cls)
        out.append(tuple(seen))
    return tuple(out)


def _grants(
    raw: object, vms: Mapping[str, Vm], networks: Mapping[str, Network]
) -> tuple[Grant, ...]:
    if not isinstance(raw, list):
        raise PolicyError("grants", "must be an array of tables ([[grants]])")
    out = []
    for i, body in enumerate(raw):
        t = _T(body, f"grants[{i}]")
        user, role = t.text("user"), t.text("role")
        if bool(user) == bool(role):
            raise PolicyError(t.key("role"), "exactly one of 'role' and 'user' is required")
        if user and not is_user(user):
            raise PolicyError(t.key("user"), f"{user!r} is not a valid user name")
        if role and not is_role(role):
            raise PolicyError(t.key("role"), f"{role!r} is not a valid role name")
        vm_id = t.text("vm")
        if not vm_id:
            raise PolicyError(t.key("vm"), "is required")
        if vm_id not in vms:
            raise PolicyError(t.key("vm"), f"unknown VM {vm_id!r}")
        vm = vms[vm_id]
        perms: list[str] = []
        texts = t.strings("permissions")
        if not texts:
            raise PolicyError(t.key("permissions"), "must name at least one permission")
        for j, text in enumerate(texts):
            k = f"{t.key('permissions')}[{j}]"
            p = parse_permission(text)
            if p is None:
                raise PolicyError(
                    k,
                    f"unknown permission {text!r} (boot, console, usb:VID:PID with hex ids, "
                    f"network:NAME)",
                )
            kind, arg = p
            if kind == "usb" and arg not in vm.usb:
                raise PolicyError(
                    k, f"usb device {arg} is not assigned to {vm_id} (vms.{vm_id}.usb)"
                )
            if kind == "network" and arg not in networks:
                raise PolicyError(k, f"unknown network {arg!r}")
            norm = kind if not arg else f"{kind}:{arg}"
            if norm in perms:
                raise PolicyError(k, f"{norm!r} is listed twice")
            perms.append(norm)
        t.text("description")
        t.done()
        out.append(Grant(i, vm_id, tuple(perms), user=user, role=role))
    return tuple(out)


# --- compiling ----------------------------------------------------------------------------


def _statically_possible(policy: Policy, vm: Vm, perm: str) -> bool:
    """Whether a permission can ever be exercised (the mandatory constraints that do not
    depend on running state); grants that cannot are kept out of the indexes."""
    kind, _, arg = perm.partition(":")
    if kind == "network":
        net = policy.networks.get(arg)
        return net is not None and vm.type in net.types and arg in vm.networks
    if kind == "usb":
        return arg in vm.usb
    return True


def compile_policy(policy: Policy) -> CompiledPolicy:
    by_user: dict[str, _Index] = {}
    by_role: dict[str, _Index] = {}
    by_vm: dict[str, list[int]] = {}
    for g in policy.grants:
        vm = policy.vms[g.vm]
        index = by_user.setdefault(g.user, {}) if g.user else by_role.setdefault(g.role, {})
        perms = index.setdefault(g.vm, {})
        for p in g.permissions:
            if _statically_possible(policy, vm, p):
                perms.setdefault(p, g.index)
        by_vm.setdefault(g.vm, []).append(g.index)
    walls: dict[str, dict[str, int]] = {}
    for i, group in enumerate(policy.conflicts):
        for a in group:
            for b in group:
                if a != b:
                    walls.setdefault(a, {}).setdefault(b, i)
    return CompiledPolicy(
        policy=policy,
        by_user=by_user,
        by_role=by_role,
        by_vm={k: tuple(v) for k, v in by_vm.items()},
        walls=walls,
    )


def load_policy(data: bytes | str) -> CompiledPolicy:
    """Parse, validate and compile."""
    return compile_policy(parse_policy(data))


# --- decisions -----------------------------------------------------------------------------


def _deny(rule: str, reason: str) -> Decision:
    return Decision(False, rule, reason)


def _roles_text(roles: Iterable[str]) -> str:
    r = sorted(roles)
    return ", ".join(r) if r else "none"


def _subject(subject: Subject | tuple[str, Collection[str]]) -> tuple[str, Collection[str]]:
    user, roles = subject
    if isinstance(roles, str):
        # "vm-users" would be read as the roles "v", "m", ...: refuse instead.
        raise TypeError("roles must be a collection of role names, not a string")
    return user, roles


def decide(
    compiled: CompiledPolicy,
    subject: Subject | tuple[str, Collection[str]],
    vm_id: str,
    action: str,
    running: Collection[str] = (),
) -> Decision:
    """May ``subject`` (user, roles) do ``action`` on ``vm_id`` while running ``running``?"""
    user, roles = _subject(subject)
    policy = compiled.policy
    vm = policy.vms.get(vm_id)
    if vm is None:
        return _deny(f"no VM {vm_id!r} in policy version {policy.version}", "unknown_vm")
    perm = normalise_permission(action)
    if perm is None:
        return _deny(
            f"{action!r} is not an action (boot, console, usb:VID:PID, network:NAME)",
            "unknown_action",
        )
    kind, _, arg = perm.partition(":")

    # Mandatory constraints first: no grant overrides them.
    if kind == "network":
        net = policy.networks.get(arg)
        if net is None:
            return _deny(f"no network {arg!r} in the policy", "unknown_network")
        if vm.type not in net.types:
            what = f"type {vm.type!r}" if vm.type else "no type"
            return _deny(
                f"type enforcement: {vm_id} has {what}; networks.{arg}.types admits "
                f"{', '.join(sorted(net.types))}",
                "network_type_denied",
            )
        if arg not in vm.networks:
            return _deny(f"vms.{vm_id}.networks does not include {arg!r}", "network_not_attached")
    elif kind == "usb" and arg not in vm.usb:
        return _deny(f"vms.{vm_id}.usb does not include {arg}", "device_not_assigned")
    elif kind == BOOT and vm.vm_class:
        wall = compiled.walls.get(vm.vm_class)
        if wall:
            for other_id in sorted(running):
                if other_id == vm_id:
                    continue
                other = policy.vms.get(other_id)
                if other is not None and other.vm_class in wall:
                    i = wall[other.vm_class]
                    return _deny(
                        f"Chinese Wall (conflicts.classes[{i}]): {vm_id} is of class "
                        f"{vm.vm_class!r}, which conflicts with class {other.vm_class!r} of "
                        f"{other_id}, running for {user}",
                        "conflict_of_interest",
                    )

    best: int | None = None
    user_index = compiled.by_user.get(user)
    if user_index is not None:
        best = user_index.get(vm_id, {}).get(perm)
    for role in roles:
        role_index = compiled.by_role.get(role)
        if role_index is None:
            continue
        found = role_index.get(vm_id, {}).get(perm)
        if found is not None and (best is None or found < best):
            best = found
    if best is None:
        return _deny(
            f"default deny: no grant gives user {user} (roles: {_roles_text(roles)}) "
            f"{perm!r} on {vm_id}",
            "no_grant",
        )
    g = policy.grants[best]
    return Decision(
        True, f"grants[{best}]: {g.principal} is granted {perm!r} on {vm_id}", "granted"
    )


def grants_for(
    compiled: CompiledPolicy, subject: Subject | tuple[str, Collection[str]]
) -> dict[str, frozenset[str]]:
    """Every VM the subject has a grant on, with the permissions that can take effect.

    Static constraints (type enforcement, device assignment) are applied; the Chinese Wall
    depends on what runs, so boot on both sides of a wall is listed and ``decide`` is asked
    at boot time."""
    user, roles = _subject(subject)
    acc: dict[str, set[str]] = {}
    indexes = [compiled.by_user.get(user)] + [compiled.by_role.get(r) for r in roles]
    for index in indexes:
        if not index:
            continue
        for vm_id, perms in index.items():
            if perms:
                acc.setdefault(vm_id, set()).update(perms)
    return {vm_id: frozenset(p) for vm_id, p in acc.items()}


def host_login(
    compiled: CompiledPolicy, host: str, service: str, roles: Collection[str]
) -> Decision:
    """May a holder of ``roles`` log in on ``host`` through the PAM ``service``?"""
    if isinstance(roles, str):
        raise TypeError("roles must be a collection of role names, not a string")
    h = compiled.policy.hosts.get(host)
    if h is None:
        return _deny(f"no host {host!r} in the policy: nobody may log in", "unknown_host")
    if service not in h.services:
        return _deny(f"hosts.{host}.services does not include {service!r}", "service_not_allowed")
    matching = sorted(set(roles) & h.login_roles)
    if not matching:
        return _deny(
            f"hosts.{host}.login_roles ({_roles_text(h.login_roles)}) has none of the roles "
            f"({_roles_text(roles)})",
            "role_not_allowed",
        )
    return Decision(
        True,
        f"hosts.{host}.login_roles: role {matching[0]} may log in through {service}",
        "login_allowed",
    )


# --- lint ---------------------------------------------------------------------------------


def lint(policy: Policy) -> list[str]:
    """Warnings about a valid policy: things that are allowed but probably wrong."""
    out: list[str] = []
    granted_vms = {g.vm for g in policy.grants}
    for vm_id in policy.vms:
        if vm_id not in granted_vms:
            out.append(f"vms.{vm_id}: no grant refers to this VM")
    used_nets = {n for vm in policy.vms.values() for n in vm.networks}
    for name in policy.networks:
        if name not in used_nets:
            out.append(f"networks.{name}: no VM is configured for this network")
    seen: dict[tuple[str, str, str], int] = {}
    for g in policy.grants:
        vm = policy.vms[g.vm]
        for j, p in enumerate(g.permissions):
            key = f"grants[{g.index}].permissions[{j}]"
            if not _statically_possible(policy, vm, p):
                net = p.partition(":")[2]
                if vm.type not in policy.networks[net].types:
                    out.append(
                        f"{key}: {p} can never take effect: type enforcement refuses "
                        f"{g.vm} (type {vm.type or 'none'!r}) on {net}"
                    )
                else:
                    out.append(
                        f"{key}: {p} can never take effect: {g.vm} is not configured for {net} "
                        f"(vms.{g.vm}.networks)"
                    )
            principal = (g.user or "", g.role or "", f"{g.vm}/{p}")
            if principal in seen:
                out.append(
                    f"{key}: {p} on {g.vm} for {g.principal} is already in "
                    f"grants[{seen[principal]}]"
                )
            else:
                seen[principal] = g.index
    # Who may boot VMs on two sides of one wall: allowed (one side at a time), worth knowing.
    walls_of: dict[str, list[int]] = {}
    for i, group in enumerate(policy.conflicts):
        for cls in group:
            walls_of.setdefault(cls, []).append(i)
    compiled = compile_policy(policy)
    sides: dict[tuple[int, str], set[str]] = {}
    principals = [
        *((f"user {u}", x) for u, x in compiled.by_user.items()),
        *((f"role {r}", x) for r, x in compiled.by_role.items()),
    ]
    for name, index in principals:
        for vm_id, perms in index.items():
            cls = policy.vms[vm_id].vm_class
            if BOOT in perms and cls:
                for i in walls_of.get(cls, ()):
                    sides.setdefault((i, name), set()).add(cls)
    for (i, name), classes in sorted(sides.items()):
        if len(classes) > 1:
            out.append(
                f"conflicts.classes[{i}]: {name} may boot VMs of {', '.join(sorted(classes))}; "
                f"the Chinese Wall lets them run one side at a time"
            )
    for name, h in policy.hosts.items():
        if not h.services:
            out.append(f"hosts.{name}.services: empty, nobody may log in on {name}")
        if not h.login_roles:
            out.append(f"hosts.{name}.login_roles: empty, nobody may log in on {name}")
    return out


def summary(policy: Policy) -> str:
    return (
        f"policy version {policy.version}: {len(policy.hosts)} hosts, {len(policy.vms)} VMs, "
        f"{len(policy.networks)} networks, {len(policy.grants)} grants, "
        f"{len(policy.conflicts)} conflict sets"
    )
