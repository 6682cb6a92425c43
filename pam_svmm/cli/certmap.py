"""`svmm cert map CERT`: how a certificate maps to a directory entry (like
`sssctl cert-eval-rule`): every rule in priority order, whether it matches and why not,
its filter, the entries it finds, and the identity and roles the deciding rule yields.

Read-only: it neither refreshes nor reads the offline cache.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from .. import config as config_mod
from ..errors import AmbiguousUser, ConfigError, UnknownUser


def register(sub: argparse._SubParsersAction) -> None:
    """Adds `map` under the `cert` group (registered by cli.cert), or makes that group."""
    cert = sub.choices.get("cert")
    if cert is None:
        cert = sub.add_parser("cert", help="certificate checks")
        cert.add_subparsers(dest="cmd", required=True, metavar="SUBCOMMAND")
    subs = next(a for a in cert._actions if isinstance(a, argparse._SubParsersAction))
    m = subs.add_parser("map", help="show how a certificate maps to a directory entry")
    m.add_argument("cert", type=Path, help="certificate file (PEM or DER)")
    m.set_defaults(func=show_map)


def show_map(args: argparse.Namespace) -> int:
    from ..adapters.directory import DirectoryClient
    from ..adapters.identity_cache import IdentityCache
    from ..domain import certmap
    from ..domain.certpolicy import fingerprint
    from ..services.identity import DirectoryMapper
    from .cert import load_cert_file

    cfg = config_mod.load(args.config)
    if not cfg.directory.enabled:
        raise ConfigError("directory.enabled", "the directory is not enabled")
    cert = load_cert_file(args.cert)
    print(f"certificate: {cert.subject.rfc4514_string()}")
    print(f"  issuer:      {cert.issuer.rfc4514_string()}")
    print(f"  serial:      {cert.serial_number:x}")
    print(f"  sha256:      {fingerprint(cert)}")

    # The pure part first: it needs no directory.
    evaluations = [certmap.evaluate(rule, cert) for rule in certmap.ordered(cfg.certmap.rules)]
    for ev in evaluations:
        verdict = "matches" if ev.matched else f"no match: {ev.detail}"
        print(f"rule {ev.rule.name} (priority {ev.rule.priority}): {verdict}")
        if ev.matched:
            print(f"  filter:  {ev.ldap_filter}")

    client = DirectoryClient.from_config(cfg.directory)
    try:
        cache = IdentityCache(cfg.directory.cache_dir, 0)  # disabled: read-only tool
        mapper = DirectoryMapper(cfg, client, cache)
        traces, identity = mapper.explain(cert)
    finally:
        client.close()
    print("directory:")
    decider = None
    for trace in traces:
        if not trace.ldap_filter:
            continue
        decider = decider or trace
        mark = "  (decides)" if trace is decider else ""
        print(f"  rule {trace.rule}: {len(trace.entries)} entries{mark}")
        print(f"    search:  {client.user_filter_for(trace.ldap_filter)}")
        for dn in trace.entries:
            print(f"    entry:   {dn}")
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
    a = identity.account
    print(f"identity: {identity.dn}")
    print(f"  user:    {a.name} uid={a.uid} gid={a.gid} home={a.home} shell={a.shell}")
    print(f"  groups:  {', '.join(f'{g.name}({g.gid})' for g in identity.groups) or '-'}")
    print(f"  roles:   {', '.join(identity.roles) or '-'}")
    state = identity.state
    print(f"  state:   {state.status.value}{f' ({state.reason})' if state.reason else ''}")
    return 0
