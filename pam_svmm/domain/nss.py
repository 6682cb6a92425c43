"""The NSS bridge's files: directory accounts and groups as passwd(5)/group(5) text.

Pure: the directory's records and the local /etc/passwd and /etc/group content go in, the
text of the passwd and group files that libnss-extrausers reads comes out, with a report of
every record left out and why. Rules:

* Local accounts win: a directory record whose name or id a local account (or group) already
  has is never written, so the directory can never shadow root, a system account or a local
  admin. ``nsswitch.conf`` lists ``files`` first, but ``getpwuid`` of a shared uid would still
  be ambiguous to every tool that maps ids back to names.
* uid and gid must lie in the configured ranges; an account's primary gid too (a directory
  account must not get gid 0 or a local group's privileges by its gidNumber).
* Names are strict POSIX (``mapping.is_valid_username``); home and shell are absolute clean
  paths; no field may contain ``:``, a newline or another control character. A bad name, id,
  home or shell drops the record; the gecos, being free text, is sanitised instead.
* Two directory records that claim the same name or id are both dropped (never pick one).
* Group members must be valid names of accounts this file set defines: a directory group never
  lends its gid to a local account that merely shares a name with a directory user.
* The password field is ``*``: no password through pam_unix, and no shadow entry needed (with
  ``x``, pam_unix's account phase looks for a shadow entry and refuses `su`/`login`).
* Output order is deterministic (by id, then name), so an unchanged directory gives identical
  bytes and a sync can tell "nothing changed".
"""

from __future__ import annotations

import enum
import posixpath
import unicodedata
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

from .identity import PosixAccount, PosixGroup
from .mapping import is_valid_username
from .settings import NssConfig

GECOS_MAX = 256
PATH_MAX = 4096


class IdentitySource(Protocol):
    """Where directory accounts come from (``DirectoryClient`` satisfies it)."""

    def accounts(self) -> Iterable[PosixAccount]: ...

    def groups(self) -> Iterable[PosixGroup]: ...


class Skip(enum.Enum):
    """Why a record was not written (stable tokens for output and tests)."""

    INVALID_NAME = "invalid_name"
    INVALID_ID = "invalid_id"
    UID_OUT_OF_RANGE = "uid_out_of_range"
    GID_OUT_OF_RANGE = "gid_out_of_range"
    INVALID_HOME = "invalid_home"
    INVALID_SHELL = "invalid_shell"
    LOCAL_NAME = "local_name_conflict"
    LOCAL_ID = "local_id_conflict"
    DUPLICATE_NAME = "duplicate_name"
    DUPLICATE_ID = "duplicate_id"
    # group members
    INVALID_MEMBER = "invalid_member_name"
    LOCAL_MEMBER = "member_is_local_account"
    UNKNOWN_MEMBER = "member_not_synced"


@dataclass(frozen=True)
class Skipped:
    kind: str  # "passwd", "group" or "member"
    name: str  # printable (repr'd when not a valid name)
    reason: Skip
    detail: str = ""

    def line(self) -> str:
        extra = f" ({self.detail})" if self.detail else ""
        return f"{self.kind} {self.name}: {self.reason.value}{extra}"


@dataclass(frozen=True)
class LocalDb:
    """Names and ids taken by local accounts or groups (from /etc/passwd or /etc/group)."""

    names: frozenset[str] = frozenset()
    ids: frozenset[int] = frozenset()


@dataclass(frozen=True)
class NssFiles:
    passwd: str
    group: str
    accounts: tuple[PosixAccount, ...]
    groups: tuple[PosixGroup, ...]
    skipped: tuple[Skipped, ...] = ()
    gecos_changed: tuple[str, ...] = field(default=())  # accounts whose gecos was sanitised

    @property
    def conflicts(self) -> tuple[Skipped, ...]:
        return tuple(s for s in self.skipped if s.reason in (Skip.LOCAL_NAME, Skip.LOCAL_ID))

    def summary(self) -> list[str]:
        records = [s for s in self.skipped if s.kind != "member"]
        members = [s for s in self.skipped if s.kind == "member"]
        out = [
            f"passwd: {len(self.accounts)} written, "
            f"{sum(s.kind == 'passwd' for s in records)} skipped",
            f"group: {len(self.groups)} written, {sum(s.kind == 'group' for s in records)} skipped"
            f", {len(members)} members dropped",
            f"conflicts with local accounts: {len(self.conflicts)}",
        ]
        out += [f"  skipped {s.line()}" for s in records]
        out += [f"  dropped {s.line()}" for s in members]
        out += [f"  sanitised gecos of {name}" for name in self.gecos_changed]
        return out


# --- local files -------------------------------------------------------------------------


def parse_local(text: str) -> LocalDb:
    """Names (field 1) and ids (field 3) of an /etc/passwd or /etc/group text.

    Lenient on purpose: a malformed line still reserves whatever name and id it shows, and
    NIS compat entries (``+name``, ``-name``) reserve the name after the sign.
    """
    names: set[str] = set()
    ids: set[int] = set()
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split(":")
        name = fields[0].lstrip("+-@")
        if name:
            names.add(name)
        if len(fields) > 2 and fields[2].isascii() and fields[2].isdigit():
            ids.add(int(fields[2]))
    return LocalDb(frozenset(names), frozenset(ids))


# --- field checks --------------------------------------------------------------------------


def _is_control(ch: str) -> bool:
    # Cc/Cf/Cs/Co/Cn plus line and paragraph separators: anything that could end or hide a
    # record for one parser or another.
    return unicodedata.category(ch)[0] == "C" or unicodedata.category(ch) in ("Zl", "Zp")


def sanitize_gecos(gecos: str) -> str:
    """The gecos with ``:`` and control characters replaced by spaces, trimmed, bounded."""
    clean = "".join(" " if ch == ":" or _is_control(ch) else ch for ch in gecos)
    return " ".join(clean.split())[:GECOS_MAX]


def is_clean_path(path: object) -> bool:
    """An absolute, normalised path without ``:`` or control characters."""
    return (
        isinstance(path, str)
        and path.startswith("/")
        and len(path) <= PATH_MAX
        and posixpath.normpath(path) == path
        and not path.startswith("//")
        and ":" not in path
        and not any(_is_control(ch) for ch in path)
    )


def _is_id(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _printable(name: object) -> str:
    return name if is_valid_username(name) else repr(name)  # type: ignore[return-value]


def account_problem(
    account: PosixAccount, config: NssConfig, local: LocalDb = LocalDb()
) -> tuple[Skip, str] | None:
    """Why this account cannot be written on its own (None: it can)."""
    if not is_valid_username(account.name):
        return Skip.INVALID_NAME, "not a POSIX user name"
    if not (_is_id(account.uid) and _is_id(account.gid)):
        return Skip.INVALID_ID, f"uid {account.uid!r} gid {account.gid!r}"
    if not config.uid_min <= account.uid <= config.uid_max:
        return Skip.UID_OUT_OF_RANGE, f"uid {account.uid} not in {config.uid_min}-{config.uid_max}"
    if not config.gid_min <= account.gid <= config.gid_max:
        return Skip.GID_OUT_OF_RANGE, f"gid {account.gid} not in {config.gid_min}-{config.gid_max}"
    if not is_clean_path(account.home):
        return Skip.INVALID_HOME, f"home {account.home!r}"
    if not is_clean_path(account.shell):
        return Skip.INVALID_SHELL, f"shell {account.shell!r}"
    if account.name in local.names:
        return Skip.LOCAL_NAME, "a local account has this name"
    if account.uid in local.ids:
        return Skip.LOCAL_ID, f"a local account has uid {account.uid}"
    return None


def group_problem(
    group: PosixGroup, config: NssConfig, local: LocalDb = LocalDb()
) -> tuple[Skip, str] | None:
    """Why this group cannot be written on its own (None: it can)."""
    if not is_valid_username(group.name):
        return Skip.INVALID_NAME, "not a POSIX group name"
    if not _is_id(group.gid):
        return Skip.INVALID_ID, f"gid {group.gid!r}"
    if not config.gid_min <= group.gid <= config.gid_max:
        return Skip.GID_OUT_OF_RANGE, f"gid {group.gid} not in {config.gid_min}-{config.gid_max}"
    if group.name in local.names:
        return Skip.LOCAL_NAME, "a local group has this name"
    if group.gid in local.ids:
        return Skip.LOCAL_ID, f"a local group has gid {group.gid}"
    return None


# --- building ----------------------------------------------------------------------------


def _duplicate(
    record: PosixAccount | PosixGroup, kind: str, names: Counter[str], ids: Counter[int], num: int
) -> Skipped | None:
    if names[record.name] > 1:
        return Skipped(kind, record.name, Skip.DUPLICATE_NAME, f"{names[record.name]} records")
    if ids[num] > 1:
        label = "uid" if kind == "passwd" else "gid"
        return Skipped(kind, record.name, Skip.DUPLICATE_ID, f"{label} {num} claimed twice")
    return None


def build(
    accounts: Iterable[PosixAccount],
    groups: Iterable[PosixGroup],
    *,
    local_passwd: str,
    local_group: str,
    config: NssConfig,
) -> NssFiles:
    """The passwd and group files for these directory records, given the local files."""
    local_users = parse_local(local_passwd)
    local_groups = parse_local(local_group)
    skipped: list[Skipped] = []

    # Identical records (a paged search repeating an entry) count once; differing records
    # sharing a name or id are all dropped, even when only one of them is otherwise valid.
    accs = sorted(set(accounts), key=_account_key)
    names, ids = Counter(a.name for a in accs), Counter(a.uid for a in accs)
    written: list[PosixAccount] = []
    sanitised: list[str] = []
    for a in accs:
        problem = account_problem(a, config, local_users)
        if problem:
            skipped.append(Skipped("passwd", _printable(a.name), *problem))
        elif dup := _duplicate(a, "passwd", names, ids, a.uid):
            skipped.append(dup)
        else:
            gecos = sanitize_gecos(a.gecos)
            if gecos != a.gecos:
                sanitised.append(a.name)
            written.append(PosixAccount(a.name, a.uid, a.gid, gecos, a.home, a.shell))
    synced = {a.name for a in written}

    grps = sorted(set(groups), key=_group_key)
    names, ids = Counter(g.name for g in grps), Counter(g.gid for g in grps)
    written_groups: list[PosixGroup] = []
    for g in grps:
        problem = group_problem(g, config, local_groups)
        if problem:
            skipped.append(Skipped("group", _printable(g.name), *problem))
            continue
        if dup := _duplicate(g, "group", names, ids, g.gid):
            skipped.append(dup)
            continue
        members: set[str] = set()
        for m in g.members:
            if not is_valid_username(m):
                skipped.append(Skipped("member", f"{g.name}/{m!r}", Skip.INVALID_MEMBER))
            elif m in synced:
                members.add(m)
            elif m in local_users.names:
                skipped.append(Skipped("member", f"{g.name}/{m}", Skip.LOCAL_MEMBER))
            else:
                skipped.append(Skipped("member", f"{g.name}/{m}", Skip.UNKNOWN_MEMBER))
        written_groups.append(PosixGroup(g.name, g.gid, tuple(sorted(members))))

    return NssFiles(
        passwd=render_passwd(written),
        group=render_group(written_groups),
        accounts=tuple(written),
        groups=tuple(written_groups),
        skipped=tuple(skipped),
        gecos_changed=tuple(sanitised),
    )


def _account_key(a: PosixAccount) -> tuple[int, str, str]:
    return (a.uid if _is_id(a.uid) else -1, str(a.name), repr(a))


def _group_key(g: PosixGroup) -> tuple[int, str, str]:
    return (g.gid if _is_id(g.gid) else -1, str(g.name), repr(g))


def render_passwd(accounts: Iterable[PosixAccount]) -> str:
    """passwd(5) lines; callers pass records that passed ``account_problem``."""
    return "".join(f"{a.name}:*:{a.uid}:{a.gid}:{a.gecos}:{a.home}:{a.shell}\n" for a in accounts)


def render_group(groups: Iterable[PosixGroup]) -> str:
    return "".join(f"{g.name}:*:{g.gid}:{','.join(g.members)}\n" for g in groups)
