"""`svmm card list`: tokens, certificates, key types, and which one a login would use."""

from __future__ import annotations

import argparse
import datetime as dt
from typing import TYPE_CHECKING, Any

from .. import config as config_mod
from ..errors import PinTries, SvmmError
from .common import add_json, print_json

if TYPE_CHECKING:
    from ..adapters.token import TokenInfo
    from ..services.auth import Verdict

EXIT_NO_CARD = 3  # no token at all: the command could not find out (Undecided's code)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("card", help="smart cards")
    s = p.add_subparsers(dest="cmd", required=True, metavar="SUBCOMMAND")
    ls = s.add_parser("list", help="list tokens and certificates; say which a login would use")
    ls.add_argument("--user", help="the user who would log in (default: whoever the card says)")
    add_json(ls)
    ls.set_defaults(func=list_cards)
    from . import issue  # `card issue` and `card revoke`

    issue.register_into(s)


def list_cards(args: argparse.Namespace) -> int:
    """Every certificate with the verdict a login would give it (revocation included), and
    the one a login would use: the first that passes, never a refused one."""
    doc = card_list_json(args)
    if getattr(args, "json", False):
        print_json(doc)
    else:
        _print_text(doc)
    if doc["chosen"] is not None:
        return 0
    return EXIT_NO_CARD if not doc["tokens"] else 1


def card_list_json(args: argparse.Namespace) -> dict[str, Any]:
    """`svmm card list --json`: the module, each token with its certificates and the verdict
    a login would give each (``usable``, whom it maps to, or the refusal's reason token and
    message), the certificate a login would use (``chosen``), or why a login would fail."""
    from ..domain import pkcs11_uri
    from ..services.auth import LoginRequest
    from ..services.login import LoginService

    svc = LoginService(config_mod.load(args.config))
    cfg = svc.config
    uri = pkcs11_uri.parse(cfg.pkcs11.uri)
    now = dt.datetime.now(dt.UTC)
    tokens = svc.module.tokens(uri)
    doc: dict[str, Any] = {
        "module": str(cfg.pkcs11.module),
        "user": args.user,
        "tokens": [],
        "chosen": None,
        "ok": False,
        "reason": None,
        "message": None,
    }
    if not tokens:
        doc.update(reason="no_card", message="no smart card found")
        return doc
    auth = svc.authenticator()
    request = LoginRequest("svmm", "", args.user)
    chosen: Verdict | None = None
    refused: list[Verdict] = []
    for token in tokens:
        entry = _token_json(token)
        doc["tokens"].append(entry)
        if not token.login_required:
            entry["skipped"] = "needs no PIN, holds no login key (not a card)"
            continue
        try:
            for v in auth.evaluate(request, now, tokens=[token]):
                entry["certificates"].append(_certificate_json(v))
                if v.is_ca:
                    continue
                if v.cert is not None and v.candidate is not None:
                    chosen = chosen or v
                else:
                    refused.append(v)
        except SvmmError as e:  # the token itself (not one certificate) could not be read
            entry["problem"] = {"reason": e.reason, "message": e.message}
    if chosen is not None and chosen.mapped is not None:
        doc["chosen"] = {
            "token": chosen.token.label,
            "token_serial": chosen.token.serial,
            "certificate": chosen.card_cert.label,
            "sha256": chosen.card.fingerprint,
            "user": chosen.mapped.username,
        }
        doc["ok"] = True
        return doc
    best = max(refused, key=lambda v: v.rank, default=None)  # the login's reason: the first
    if best is not None and best.error is not None:  # of those that got furthest
        doc.update(reason=best.error.reason, message=best.error.message)
    elif not any(t.login_required for t in tokens):
        doc.update(reason="no_card", message="no smart card found")
    else:
        doc.update(reason="no_usable_certificate", message="no certificate usable for login")
    return doc


def _token_json(token: TokenInfo) -> dict[str, Any]:
    return {
        "label": token.label,
        "serial": token.serial,
        "slot": token.slot_id,
        "manufacturer": token.manufacturer,
        "model": token.model,
        "login_required": token.login_required,
        "pin_tries": token.pin_tries.value,  # unknown, count_low, final_try, locked
        "pin_pad": token.protected_auth_path,
        "skipped": None,  # why the listing passed the token over
        "problem": None,  # the token could not be read: {reason, message}
        "certificates": [],
    }


def _certificate_json(v: Verdict) -> dict[str, Any]:
    from ..domain import certpolicy

    cc, cert = v.card_cert, v.cert
    ident = v.mapped
    usable = cert is not None and v.candidate is not None and ident is not None
    return {
        "label": cc.label,
        "id": cc.id.hex(),
        "readable": cert is not None,
        "ca": v.is_ca,
        "subject": cert.subject.rfc4514_string() if cert is not None else None,
        "key": certpolicy.key_description(cert) if cert is not None else None,
        "not_before": cert.not_valid_before_utc.isoformat() if cert is not None else None,
        "not_after": cert.not_valid_after_utc.isoformat() if cert is not None else None,
        "sha256": v.card.fingerprint,
        "stage": v.stage.name.lower(),  # how far it got: parse ... passed
        "usable": usable and not v.is_ca,
        "user": ident.username if ident is not None else None,  # whom it maps to
        "rule": ident.rule if ident is not None else None,
        "reason": v.error.reason if v.error is not None else None,
        "message": v.error.message if v.error is not None else None,
    }


def _print_text(doc: dict[str, Any]) -> None:
    print(f"module: {doc['module']}")
    if not doc["tokens"]:
        print("no card found")
        return
    for t in doc["tokens"]:
        if t["skipped"] is not None:
            print(f"token {t['label']!r}: {t['skipped']}, skipped")
            continue
        pad = ", PIN pad" if t["pin_pad"] else ""
        print(
            f"token {t['label']!r} serial {t['serial']} slot {t['slot']}"
            f" ({t['manufacturer']} {t['model']}); PIN: {PinTries(t['pin_tries']).describe()}{pad}"
        )
        for c in t["certificates"]:
            if not c["readable"]:
                print(
                    f"  certificate {c['label']!r} id {c['id']}: unreadable ({c['message'] or ''})"
                )
                continue
            kind = "CA certificate" if c["ca"] else "certificate"
            print(f"  {kind} {c['label']!r} id {c['id'] or '-'}: {c['subject']}")
            print(
                f"    key {c['key']}, valid {c['not_before'][:10]} to {c['not_after'][:10]},"
                f" sha256 {c['sha256'][:16]}"
            )
            if not c["ca"]:
                print(f"    login: {_verdict_line(c)}")
        if t["problem"] is not None:
            print(f"  not readable: {t['problem']['reason']}: {t['problem']['message']}")
    chosen = doc["chosen"]
    if chosen is not None:
        who = f" as {doc['user']}" if doc["user"] else ""
        print(
            f"a login{who} would use {chosen['certificate']!r} on {chosen['token']!r}"
            f" for {chosen['user']}"
        )
    else:
        print(f"a login would fail: {doc['reason']}: {doc['message']}")


def _verdict_line(c: dict[str, Any]) -> str:
    if c["usable"]:
        return f"passes policy and revocation, maps to {c['user']} (rule {c['rule']})"
    if c["stage"] == "user" and c["user"] is not None:
        return f"maps to {c['user']} (rule {c['rule']}), not the requested user"
    error = f"{c['reason']}: {c['message']}" if c["reason"] is not None else "refused"
    return f"not usable: {error}"


def _is_ca(cert: object) -> bool:
    from ..services.auth import _is_ca as is_ca

    return is_ca(cert)  # type: ignore[arg-type]
