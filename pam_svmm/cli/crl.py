"""`svmm crl refresh`: fetch, verify and index every configured CRL ahead of need.

Run by svmm-crl-refresh.timer (config/systemd/) so that a login's revocation check only looks
up a cached index and never waits for a CRL download or a cold parse. See
services/crl_refresh.py for the sources and when a cached CRL is fetched again.

Exit 0 when every source is indexed (or fresh, or skipped); 3 when one failed (the CRL it
had stays in the cache, and a login decides as before: stale is unknown, never good).
"""

from __future__ import annotations

import argparse
from typing import Any

from .. import config as config_mod
from ..errors import Undecided
from .common import add_json, print_json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("crl", help="the CRL cache")
    s = p.add_subparsers(dest="cmd", required=True, metavar="SUBCOMMAND")
    r = s.add_parser(
        "refresh",
        help="fetch, verify and index every configured CRL before a login needs it",
    )
    r.add_argument(
        "--url",
        action="append",
        default=[],
        metavar="URL",
        help="also this CRL distribution point (e.g. the one in your users' certificates); "
        "repeatable",
    )
    r.add_argument("--force", action="store_true", help="fetch every URL, even a CRL not yet due")
    add_json(r)
    r.set_defaults(func=refresh)


def refresh_json(cache_dir: str, results: list[Any]) -> dict[str, Any]:
    """`svmm crl refresh --json`: one entry per source, and whether all are in the cache."""
    return {
        "cache_dir": cache_dir,
        "ok": all(r.ok for r in results),
        "sources": [r.to_json() for r in results],
    }


def refresh(args: argparse.Namespace) -> int:
    from ..adapters.crl_store import CrlStore
    from ..adapters.fetch import HttpFetcher
    from ..services.crl_refresh import refresh_crls
    from ..services.login import LoginService

    cfg = config_mod.load(args.config)
    rc = cfg.revocation
    svc = LoginService(cfg)
    cas = [*svc.anchors, *svc.intermediates]
    fetcher = HttpFetcher()
    store = CrlStore(rc.cache_dir, fetcher=fetcher, skew=rc.clock_skew, grace=rc.crl_grace)
    try:
        results = refresh_crls(rc, cas, store=store, fetcher=fetcher, urls=args.url,
                               force=args.force)  # fmt: skip
    finally:
        store.close()
    doc = refresh_json(str(rc.cache_dir), results)
    if args.json:
        print_json(doc)
    else:
        if not results:
            print("no CRL source: no revocation.crl_files, no distribution point in the CAs")
        for r in doc["sources"]:
            when = f", next update {r['next_update']}" if r["next_update"] else ""
            entries = f", {r['entries']} entries" if r["entries"] is not None else ""
            detail = f": {r['detail']}" if r["detail"] else ""
            print(f"{r['action']:<9} {r['source']} ({r['origin']}{entries}{when}){detail}")
    failed = [r for r in results if not r.ok]
    if failed:
        raise Undecided(
            f"{len(failed)} of {len(results)} CRL sources could not be refreshed",
            reason="crl_refresh_failed",
        )
    return 0
