"""`svmm card list`: tokens, certificates, key types, and which one a login would use."""

from __future__ import annotations

import argparse
import datetime as dt

from .. import config as config_mod
from ..errors import SvmmError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("card", help="smart cards")
    s = p.add_subparsers(dest="cmd", required=True, metavar="SUBCOMMAND")
    ls = s.add_parser("list", help="list tokens and certificates; say which a login would use")
    ls.add_argument("--user", help="the user who would log in (default: whoever the card says)")
    ls.set_defaults(func=list_cards)
    from . import issue  # `card issue` and `card revoke`

    issue.register_into(s)


def list_cards(args: argparse.Namespace) -> int:
    from ..domain import certpolicy, pkcs11_uri
    from ..services.auth import LoginRequest
    from ..services.login import LoginService

    svc = LoginService(config_mod.load(args.config))
    cfg = svc.config
    uri = pkcs11_uri.parse(cfg.pkcs11.uri)
    module = svc.module
    now = dt.datetime.now(dt.UTC)
    policy = certpolicy.CertPolicy.from_config(cfg.trust)
    tokens = module.tokens(uri)
    print(f"module: {cfg.pkcs11.module}")
    if not tokens:
        print("no card found")
        return 3
    for token in tokens:
        if not token.login_required:
            print(f"token {token.label!r}: needs no PIN, holds no login key (not a card), skipped")
            continue
        pad = ", PIN pad" if token.protected_auth_path else ""
        print(
            f"token {token.label!r} serial {token.serial} slot {token.slot_id}"
            f" ({token.manufacturer} {token.model}); PIN: {token.pin_tries.describe()}{pad}"
        )
        card_certs = module.certificates(token, uri)
        parsed = []
        for cc in card_certs:
            try:
                parsed.append((cc, certpolicy.parse_certificate(cc.der)))
            except SvmmError as e:
                print(f"  certificate {cc.label!r} id {cc.id.hex()}: unreadable ({e.message})")
        cas = [c for _, c in parsed if _is_ca(c)]
        for cc, cert in parsed:
            kind = "CA certificate" if _is_ca(cert) else "certificate"
            print(f"  {kind} {cc.label!r} id {cc.id.hex() or '-'}: {cert.subject.rfc4514_string()}")
            print(
                f"    key {certpolicy.key_description(cert)}, valid"
                f" {cert.not_valid_before_utc:%Y-%m-%d} to {cert.not_valid_after_utc:%Y-%m-%d},"
                f" sha256 {certpolicy.fingerprint(cert)[:16]}"
            )
            if _is_ca(cert):
                continue
            try:
                certpolicy.validate_chain(
                    cert, [*svc.intermediates, *cas], svc.anchors, at=now, policy=policy
                )
                ident = svc.mapper.map(cert)
                print(f"    login: passes policy, maps to {ident.username} (rule {ident.rule})")
            except SvmmError as e:
                print(f"    login: not usable: {e.reason}: {e.message}")
    try:
        token, cands = svc.authenticator().select(LoginRequest("svmm", "", args.user), now)
        c = cands[0]
        print(
            f"a login{' as ' + args.user if args.user else ''} would use {c.card_cert.label!r}"
            f" on {token.label!r} for {c.mapped.username}"
        )
    except SvmmError as e:
        print(f"a login would fail: {e.reason}: {e.message}")
        return 1
    return 0


def _is_ca(cert: object) -> bool:
    from ..services.auth import _is_ca as is_ca

    return is_ca(cert)  # type: ignore[arg-type]
