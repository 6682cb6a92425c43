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

LOCAL_PASSWD = Path("/etc/passwd")
LOCAL_GROUP = Path("/etc/group")


def register(sub: argparse._SubParsersAction) -> None:
    i = sub.add_parser("id", help="a directory user's uid, groups, roles and entry (like id(1))")
    i.add_argument("user", help="user name")
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
    _local_args(sy)
    sy.set_defaults(func=sync)
    st = s.add_parser("status", help="file ages, entry counts, conflicts with local accounts")
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
    for line in describe(ident, cfg, local_passwd=_read_optional(LOCAL_PASSWD)):
        print(line)
    return 0


def describe(ident: Identity, cfg: Config, *, local_passwd: str = "") -> list[str]:
    """id(1)'s line for this identity, then roles, entry, source, state and NSS eligibility."""
    acc = ident.account
    names = {g.gid: g.name for g in ident.groups}

    def one(num: int) -> str:
        return f"{num}({names[num]})" if num in names else str(num)

    gids = [acc.gid, *sorted({g.gid for g in ident.groups} - {acc.gid})]
    problem = nss.account_problem(acc, cfg.nss, nss.parse_local(local_passwd))
    state = ident.state.status.value + (f" ({ident.state.reason})" if ident.state.reason else "")
    synced = "synced by svmm nss sync" if problem is None else f"not synced: {problem[0].value}"
    if problem and problem[1]:
        synced += f" ({problem[1]})"
    return [
        f"uid={acc.uid}({acc.name}) gid={one(acc.gid)} groups={','.join(one(g) for g in gids)}",
        f"roles: {', '.join(ident.roles) or '-'}",
        f"dn: {ident.dn}",
        f"source: {ident.source}",
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
    for line in files.summary():
        print(line)
    if args.dry_run:
        if args.show:
            print("--- passwd\n" + files.passwd + "--- group\n" + files.group, end="")
        print(f"dry run: nothing written to {cfg.nss.dir}")
        return 0
    if not files.accounts and not args.allow_empty:
        current = {s.name: s for s in nss_files.status(cfg.nss.dir)}
        if current["passwd"].entries:
            raise nss_files.NssWriteError(
                f"the directory returned no usable account but {cfg.nss.dir}/passwd has "
                f"{current['passwd'].entries}; not emptying it (use --allow-empty)"
            )
    nss_files.write_files(cfg.nss.dir, {"passwd": files.passwd, "group": files.group})
    print(f"wrote {cfg.nss.dir}/passwd and {cfg.nss.dir}/group")
    return 0


def show_status(args: argparse.Namespace) -> int:
    from ..adapters import nss_files

    cfg = config_mod.load(args.config)
    files = nss_files.status(cfg.nss.dir)
    local = {
        "passwd": nss.parse_local(nss_files.read_text(args.local_passwd)),
        "group": nss.parse_local(nss_files.read_text(args.local_group)),
    }
    conflicts = 0
    for f in files:
        if not f.exists:
            print(f"{cfg.nss.dir}/{f.name}: missing (run svmm nss sync)")
            continue
        print(f"{cfg.nss.dir}/{f.name}: {f.entries} entries, {_age(f.age or 0.0)} old")
        # Local accounts added since the last sync now collide with synced ones.
        ours = nss.parse_local(f.text)
        for name in sorted(ours.names & local[f.name].names):
            conflicts += 1
            print(f"  conflict: {name} is also a local {f.name} entry")
        for num in sorted(ours.ids & local[f.name].ids):
            conflicts += 1
            print(f"  conflict: id {num} is also used by a local {f.name} entry")
    print(f"conflicts: {conflicts}")
    return 0 if all(f.exists for f in files) and not conflicts else 3


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
