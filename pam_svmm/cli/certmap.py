"""`svmm cert map CERT`: how a certificate maps to a directory entry (like
`sssctl cert-eval-rule`): every rule in priority order, whether it matches and why not,
its filter, the entries it finds, and the identity and roles the deciding rule yields.

Read-only: it neither refreshes nor reads the offline cache.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from .. import config as config_mod
from ..errors import AmbiguousUser, ConfigError, SvmmError, UnknownUser
from .common import add_json, print_json


def register(sub: argparse._SubParsersAction) -> None:
    """Adds `map` under the `cert` group (registered by cli.cert), or makes that group."""
    cert = sub.choices.get("cert")
    if cert is None:
        cert = sub.add_parser("cert", help="certificate checks")
        cert.add_subparsers(dest="cmd", required=True, metavar="SUBCOMMAND")
    subs = next(a for a in cert._actions if isinstance(a, argparse._SubParsersAction))
    m = subs.add_parser("map", help="show how a certificate maps to a directory entry")
    m.add_argument("cert", type=Path, help="certificate file (PEM or DER)")
    add_json(m)
    m.set_defaults(func=show_map)


def show_map(args: argparse.Namespace) -> int:
    from ..adapters.directory import DirectoryClient
    from ..adapters.identity_cache import IdentityCache
    from ..domain import certmap
    from ..services.identity import DirectoryMapper
    from .cert import certificate_json, load_cert_file

    cfg = config_mod.load(args.config)
    if not cfg.directory.enabled:
        raise ConfigError("directory.enabled", "the directory is not enabled")
    cert = load_cert_file(args.cert)
    doc: dict[str, Any] = {
        "certificate": certificate_json(cert),
        "rules": [],
        "directory": [],
        "identity": None,
        "ok": False,
        "reason": None,
        "message": None,
    }
    # The pure part first: it needs no directory.
    for ev in (certmap.evaluate(rule, cert) for rule in certmap.ordered(cfg.certmap.rules)):
        doc["rules"].append({"name": ev.rule.name, "priority": ev.rule.priority,
                             "matched": ev.matched, "detail": ev.detail,
                             "filter": ev.ldap_filter or None})  # fmt: skip
    try:
        client = DirectoryClient.from_config(cfg.directory)
        try:
            cache = IdentityCache(cfg.directory.cache_dir, 0)  # disabled: read-only tool
            traces, identity = DirectoryMapper(cfg, client, cache).explain(cert)
        finally:
            client.close()
        decider = None
        for trace in traces:
            if not trace.ldap_filter:
                continue
            decider = decider or trace
            doc["directory"].append({"rule": trace.rule,
                                     "search": client.user_filter_for(trace.ldap_filter),
                                     "entries": list(trace.entries),
                                     "decides": trace is decider})  # fmt: skip
        _verdict(decider, identity)
        assert identity is not None
        doc["identity"] = identity_json(identity)
        doc["ok"] = True
    except SvmmError as e:
        doc["reason"], doc["message"] = e.reason, e.message
        _print(doc, args.json)
        raise
    _print(doc, args.json)
    return 0


def _verdict(decider: Any, identity: Any) -> None:
    """The deciding rule's outcome as the login sees it: one entry holding the certificate."""
    if decider is None:
        raise UnknownUser("no rule matches this certificate", reason="no_matching_rule")
    if not decider.entries:
        raise UnknownUser(f"rule {decider.rule}: no directory entry for this certificate")
    if len(decider.entries) > 1:
        raise AmbiguousUser(f"rule {decider.rule}: {len(decider.entries)} entries; none is picked")
    if identity is None:
        raise UnknownUser(
            f"rule {decider.rule}: {decider.entries[0]} does not hold this certificate",
            reason="certificate_not_in_entry",
        )


def identity_json(identity: Any) -> dict[str, Any]:
    a = identity.account
    return {
        "dn": identity.dn,
        "user": a.name,
        "uid": a.uid,
        "gid": a.gid,
        "home": a.home,
        "shell": a.shell,
        "groups": [{"name": g.name, "gid": g.gid} for g in identity.groups],
        "roles": list(identity.roles),
        "state": {"status": identity.state.status.value, "reason": identity.state.reason or None},
    }


def _print(doc: dict[str, Any], as_json: bool) -> None:
    """`svmm cert map --json` prints ``doc``; the text says the same."""
    if as_json:
        print_json(doc)
        return
    c = doc["certificate"]
    print(f"certificate: {c['subject']}")
    print(f"  issuer:      {c['issuer']}")
    print(f"  serial:      {c['serial']}")
    print(f"  sha256:      {c['sha256']}")
    for r in doc["rules"]:
        verdict = "matches" if r["matched"] else f"no match: {r['detail']}"
        print(f"rule {r['name']} (priority {r['priority']}): {verdict}")
        if r["matched"]:
            print(f"  filter:  {r['filter']}")
    if doc["directory"] or doc["identity"]:
        print("directory:")
    for d in doc["directory"]:
        mark = "  (decides)" if d["decides"] else ""
        print(f"  rule {d['rule']}: {len(d['entries'])} entries{mark}")
        print(f"    search:  {d['search']}")
        for dn in d["entries"]:
            print(f"    entry:   {dn}")
    i = doc["identity"]
    if i is None:
        return
    print(f"identity: {i['dn']}")
    print(
        f"  user:    {i['user']} uid={i['uid']} gid={i['gid']} home={i['home']} shell={i['shell']}"
    )
    groups = ", ".join(f"{g['name']}({g['gid']})" for g in i["groups"])
    print(f"  groups:  {groups or '-'}")
    print(f"  roles:   {', '.join(i['roles']) or '-'}")
    reason = i["state"]["reason"]
    print(f"  state:   {i['state']['status']}{f' ({reason})' if reason else ''}")
