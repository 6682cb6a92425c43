"""`svmm id USER` and `svmm nss sync|status`: directory users as POSIX accounts.

`svmm nss sync` writes the passwd and group files libnss-extrausers reads (see
config/systemd/svmm-nss-sync.service for the timer and the nsswitch.conf lines). It reads the
whole directory first and writes only when that worked: a failure leaves the old files.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from .. import config as config_mod
from ..config import Config
from ..domain import nss
from ..domain.identity import Identity
from ..errors import ConfigError, SvmmError, UnknownUser
from .common import add_json, print_json

LOCAL_PASSWD = Path("/etc/passwd")
LOCAL_GROUP = Path("/etc/group")


def register(sub: argparse._SubParsersAction) -> None:
    i = sub.add_parser("id", help="a directory user's uid, groups, roles and entry (like id(1))")
    i.add_argument("user", help="user name")
    add_json(i)
    i.set_defaults(func=show_id)

    p = sub.add_parser("nss", help="the NSS bridge (libnss-extrausers files)")
    s = p.add_subparsers(dest="cmd", required=True, metavar="SUBCOMMAND")
    sy = s.add_parser("sync", help="write directory accounts and groups for NSS")
    sy.add_argument("--dry-run", action="store_true", help="report what would be written")
    sy.add_argument(
        "--show", action="store_true", help="also print the passwd and group text (dry run)"
    )
    sy.add_argument(
        "--allow-empty",
        action="store_true",
        help="write even if the directory returns no account while the files have some",
    )
    add_json(sy)
    _local_args(sy)
    sy.set_defaults(func=sync)
    st = s.add_parser("status", help="file ages, entry counts, conflicts with local accounts")
    add_json(st)
    _local_args(st)
    st.set_defaults(func=show_status)


def _local_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--local-passwd", type=Path, default=LOCAL_PASSWD, help=argparse.SUPPRESS)
    p.add_argument("--local-group", type=Path, default=LOCAL_GROUP, help=argparse.SUPPRESS)


# --- the directory -------------------------------------------------------------------------


def identity_source(cfg: Config) -> Any:
    """The directory as an ``IdentitySource`` that also answers ``user_by_name``.

    Uses ``services.identity.source_factory`` when that exists, else a ``DirectoryClient``."""
    if not cfg.directory.enabled:
        raise ConfigError("directory.enabled", "the directory is not enabled")
    try:
        service = importlib.import_module("pam_svmm.services.identity")
    except ImportError:
        service = None
    factory: Callable[[Config], Any] | None = getattr(service, "source_factory", None)
    if factory is not None:
        return factory(cfg)
    try:
        from ..adapters.directory import DirectoryClient
    except ImportError as e:
        raise SvmmError(f"directory support is not available: {e}") from None
    return DirectoryClient.from_config(cfg.directory)


# --- svmm id -----------------------------------------------------------------------------


def show_id(args: argparse.Namespace) -> int:
    cfg = config_mod.load(args.config)
    with _closing(identity_source(cfg)) as source:
        ident = source.user_by_name(args.user)
    if ident is None:
        raise UnknownUser(f"{args.user}: no such user in the directory")
    doc = id_json(
        ident,
        cfg,
        local_passwd=_read_optional(LOCAL_PASSWD),
        synced_passwd=_read_optional(cfg.nss.dir / "passwd"),
    )
    if args.json:
        print_json(doc)
    else:
        for line in describe(doc):
            print(line)
    return 0


def id_json(
    ident: Identity, cfg: Config, *, local_passwd: str = "", synced_passwd: str = ""
) -> dict[str, Any]:
    """`svmm id --json`: the account, its groups (the primary first), roles, entry, state,
    and whether the NSS bridge may write it (``eligible``) and has (``synced``: the account's
    name and uid are in ``[nss] dir``/passwd now)."""
    acc = ident.account
    names = {g.gid: g.name for g in ident.groups}
    gids = [acc.gid, *sorted({g.gid for g in ident.groups} - {acc.gid})]
    problem = nss.account_problem(acc, cfg.nss, nss.parse_local(local_passwd))
    return {
        "user": acc.name,
        "uid": acc.uid,
        "gid": acc.gid,
        "home": acc.home,
        "shell": acc.shell,
        "gecos": acc.gecos,
        "groups": [{"name": names.get(g, ""), "gid": g} for g in gids],
        "roles": list(ident.roles),
        "dn": ident.dn,
        "source": ident.source,
        "state": {"status": ident.state.status.value, "reason": ident.state.reason or None},
        "nss": {
            "eligible": problem is None,
            "synced": problem is None and _in_passwd(synced_passwd, acc.name, acc.uid),
            "problem": problem[0].value if problem else None,
            "detail": (problem[1] or None) if problem else None,
        },
    }


def _in_passwd(text: str, name: str, uid: int) -> bool:
    for line in text.splitlines():
        fields = line.split(":")
        if len(fields) > 2 and fields[0] == name and fields[2] == str(uid):
            return True
    return False


def describe(doc: dict[str, Any]) -> list[str]:
    """id(1)'s line for this identity, then roles, entry, source, state and NSS."""

    def one(g: dict[str, Any]) -> str:
        return f"{g['gid']}({g['name']})" if g["name"] else str(g["gid"])

    primary = next((g for g in doc["groups"] if g["gid"] == doc["gid"]), {"gid": doc["gid"]})
    state = doc["state"]["status"] + (
        f" ({doc['state']['reason']})" if doc["state"]["reason"] else ""
    )
    n = doc["nss"]
    if n["synced"]:
        synced = "synced by svmm nss sync"
    elif n["eligible"]:
        synced = "not synced yet (run svmm nss sync)"
    else:
        synced = f"not synced: {n['problem']}" + (f" ({n['detail']})" if n["detail"] else "")
    return [
        f"uid={doc['uid']}({doc['user']}) gid={one({'name': '', **primary})} "
        f"groups={','.join(one(g) for g in doc['groups'])}",
        f"roles: {', '.join(doc['roles']) or '-'}",
        f"dn: {doc['dn']}",
        f"source: {doc['source']}",
        f"state: {state}",
        f"nss: {synced}",
    ]


# --- svmm nss ----------------------------------------------------------------------------


def sync(args: argparse.Namespace) -> int:
    from ..adapters import nss_files

    cfg = config_mod.load(args.config)
    local_passwd = nss_files.read_text(args.local_passwd)
    local_group = nss_files.read_text(args.local_group)
    # Read everything before writing anything: a directory error mid-way writes nothing.
    with _closing(identity_source(cfg)) as source:
        accounts = list(source.accounts())
        groups = list(source.groups())
    files = nss.build(
        accounts, groups, local_passwd=local_passwd, local_group=local_group, config=cfg.nss
    )
    if not args.dry_run and not files.accounts and not args.allow_empty:
        current = {s.name: s for s in nss_files.status(cfg.nss.dir)}
        if current["passwd"].entries:
            if not args.json:
                print("\n".join(sync_summary(sync_json(files, cfg.nss.dir, dry_run=False))))
            raise nss_files.NssWriteError(
                f"the directory returned no usable account but {cfg.nss.dir}/passwd has "
                f"{current['passwd'].entries}; not emptying it (use --allow-empty)"
            )
    if not args.dry_run:
        nss_files.write_files(cfg.nss.dir, {"passwd": files.passwd, "group": files.group})
    doc = sync_json(files, cfg.nss.dir, dry_run=args.dry_run, show=args.show)
    if args.json:
        print_json(doc)
        return 0
    for line in sync_summary(doc):
        print(line)
    if doc["text"] is not None:
        print("--- passwd\n" + doc["text"]["passwd"] + "--- group\n" + doc["text"]["group"], end="")
    if args.dry_run:
        print(f"dry run: {cfg.nss.dir} left as it is")
    else:
        print(f"wrote {cfg.nss.dir}/passwd and {cfg.nss.dir}/group")
    return 0


def sync_json(
    files: nss.NssFiles, folder: Path, *, dry_run: bool, show: bool = False
) -> dict[str, Any]:
    """`svmm nss sync --json`: what was written (or, ``dry_run``, would be), and what not.
    ``text``: the files' text (``--dry-run --show``), else null."""
    records = [s for s in files.skipped if s.kind != "member"]
    return {
        "dir": str(folder),
        "dry_run": dry_run,
        "written": not dry_run,
        "passwd": {
            "entries": len(files.accounts),
            "skipped": sum(s.kind == "passwd" for s in records),
        },
        "group": {
            "entries": len(files.groups),
            "skipped": sum(s.kind == "group" for s in records),
            "members_dropped": sum(s.kind == "member" for s in files.skipped),
        },
        "conflicts": len(files.conflicts),
        "skipped": [
            {"kind": s.kind, "name": s.name, "reason": s.reason.value, "detail": s.detail}
            for s in files.skipped
        ],
        "gecos_sanitised": list(files.gecos_changed),
        "text": {"passwd": files.passwd, "group": files.group} if dry_run and show else None,
    }


def sync_summary(doc: dict[str, Any]) -> list[str]:
    done = "written" if doc["written"] else "to write"
    p, g = doc["passwd"], doc["group"]
    out = [
        f"passwd: {p['entries']} {done}, {p['skipped']} skipped",
        f"group: {g['entries']} {done}, {g['skipped']} skipped, {g['members_dropped']} members"
        " dropped",
        f"conflicts with local accounts: {doc['conflicts']}",
    ]
    for s in doc["skipped"]:
        verb = "dropped" if s["kind"] == "member" else "skipped"
        out.append(f"  {verb} {s['kind']} {s['name']}: {s['reason']}"
                   + (f" ({s['detail']})" if s["detail"] else ""))  # fmt: skip
    out += [f"  sanitised gecos of {name}" for name in doc["gecos_sanitised"]]
    return out


def show_status(args: argparse.Namespace) -> int:
    from ..adapters import nss_files

    cfg = config_mod.load(args.config)
    doc = status_json(
        nss_files.status(cfg.nss.dir),
        cfg.nss.dir,
        local_passwd=nss_files.read_text(args.local_passwd),
        local_group=nss_files.read_text(args.local_group),
    )
    if args.json:
        print_json(doc)
    else:
        for f in doc["files"]:
            if not f["exists"]:
                print(f"{cfg.nss.dir}/{f['name']}: missing (run svmm nss sync)")
                continue
            print(f"{cfg.nss.dir}/{f['name']}: {f['entries']} entries, {_age(f['age'])} old")
            for c in (c for c in doc["conflicts"] if c["file"] == f["name"]):
                if c["name"] is not None:
                    print(f"  conflict: {c['name']} is also a local {f['name']} entry")
                else:
                    print(f"  conflict: id {c['id']} is also used by a local {f['name']} entry")
        print(f"conflicts: {len(doc['conflicts'])}")
    return 0 if all(f["exists"] for f in doc["files"]) and not doc["conflicts"] else 3


def status_json(
    files: list[Any], folder: Path, *, local_passwd: str, local_group: str
) -> dict[str, Any]:
    """`svmm nss status --json`: per file its entries and age (seconds), and the local
    accounts added since the last sync that now collide with synced ones (by name or id)."""
    local = {"passwd": nss.parse_local(local_passwd), "group": nss.parse_local(local_group)}
    conflicts: list[dict[str, Any]] = []
    for f in files:
        if not f.exists:
            continue
        ours = nss.parse_local(f.text)
        conflicts += [
            {"file": f.name, "name": name, "id": None}
            for name in sorted(ours.names & local[f.name].names)
        ]
        conflicts += [
            {"file": f.name, "name": None, "id": num}
            for num in sorted(ours.ids & local[f.name].ids)
        ]
    return {
        "dir": str(folder),
        "files": [
            {"name": f.name, "exists": f.exists, "entries": f.entries, "age": f.age} for f in files
        ],
        "conflicts": conflicts,
    }


@contextlib.contextmanager
def _closing(source: Any) -> Iterator[Any]:
    try:
        yield source
    finally:
        close = getattr(source, "close", None)
        if close is not None:
            close()


def _age(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86400:.1f}d"


def _read_optional(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
