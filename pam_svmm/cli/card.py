"""`svmm card list`: tokens, certificates, key types, and which one a login would use."""

from __future__ import annotations

import argparse
import datetime as dt
from typing import TYPE_CHECKING

from .. import config as config_mod
from ..errors import SvmmError

if TYPE_CHECKING:
    from ..services.auth import Verdict


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("card", help="smart cards")
    s = p.add_subparsers(dest="cmd", required=True, metavar="SUBCOMMAND")
    ls = s.add_parser("list", help="list tokens and certificates; say which a login would use")
    ls.add_argument("--user", help="the user who would log in (default: whoever the card says)")
    ls.set_defaults(func=list_cards)
    from . import issue  # `card issue` and `card revoke`

    issue.register_into(s)


def list_cards(args: argparse.Namespace) -> int:
    """Every certificate with the verdict a login would give it (revocation included), and
    the one a login would use: the first that passes, never a refused one."""
    from ..domain import certpolicy, pkcs11_uri
    from ..services.auth import LoginRequest
    from ..services.login import LoginService

    svc = LoginService(config_mod.load(args.config))
    cfg = svc.config
    uri = pkcs11_uri.parse(cfg.pkcs11.uri)
    module = svc.module
    now = dt.datetime.now(dt.UTC)
    tokens = module.tokens(uri)
    print(f"module: {cfg.pkcs11.module}")
    if not tokens:
        print("no card found")
        return 3
    auth = svc.authenticator()
    request = LoginRequest("svmm", "", args.user)
    chosen: Verdict | None = None
    refused: list[Verdict] = []
    for token in tokens:
        if not token.login_required:
            print(f"token {token.label!r}: needs no PIN, holds no login key (not a card), skipped")
            continue
        pad = ", PIN pad" if token.protected_auth_path else ""
        print(
            f"token {token.label!r} serial {token.serial} slot {token.slot_id}"
            f" ({token.manufacturer} {token.model}); PIN: {token.pin_tries.describe()}{pad}"
        )
        try:
            for v in auth.evaluate(request, now, tokens=[token]):
                cc, cert = v.card_cert, v.cert
                if cert is None:
                    msg = v.error.message if v.error else ""
                    print(f"  certificate {cc.label!r} id {cc.id.hex()}: unreadable ({msg})")
                    refused.append(v)
                    continue
                kind = "CA certificate" if v.is_ca else "certificate"
                subject = cert.subject.rfc4514_string()
                print(f"  {kind} {cc.label!r} id {cc.id.hex() or '-'}: {subject}")
                print(
                    f"    key {certpolicy.key_description(cert)}, valid"
                    f" {cert.not_valid_before_utc:%Y-%m-%d} to"
                    f" {cert.not_valid_after_utc:%Y-%m-%d},"
                    f" sha256 {certpolicy.fingerprint(cert)[:16]}"
                )
                if v.is_ca:
                    continue
                print(f"    login: {_verdict_line(v)}")
                if v.candidate is not None:
                    chosen = chosen or v
                else:
                    refused.append(v)
        except SvmmError as e:  # the token itself (not one certificate) could not be read
            print(f"  not readable: {e.reason}: {e.message}")
    if chosen is not None and chosen.mapped is not None:
        print(
            f"a login{' as ' + args.user if args.user else ''} would use"
            f" {chosen.card_cert.label!r} on {chosen.token.label!r} for {chosen.mapped.username}"
        )
        return 0
    best = max(refused, key=lambda v: v.rank, default=None)  # the login's reason: the first
    if best is not None and best.error is not None:  # of those that got furthest
        print(f"a login would fail: {best.error.reason}: {best.error.message}")
    elif not any(t.login_required for t in tokens):
        print("a login would fail: no_card: no smart card found")
    else:
        print("a login would fail: no_usable_certificate: no certificate usable for login")
    return 1


def _verdict_line(v: Verdict) -> str:
    from ..services.auth import Stage

    ident = v.mapped
    if v.candidate is not None and ident is not None:
        return f"passes policy and revocation, maps to {ident.username} (rule {ident.rule})"
    if v.stage is Stage.USER and ident is not None:
        return f"maps to {ident.username} (rule {ident.rule}), not the requested user"
    error = v.error.reason + ": " + v.error.message if v.error else "refused"
    return f"not usable: {error}"


def _is_ca(cert: object) -> bool:
    from ..services.auth import _is_ca as is_ca

    return is_ca(cert)  # type: ignore[arg-type]
