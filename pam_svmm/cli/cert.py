"""`svmm cert verify CERT`: exactly the checks a login applies, with the reason on failure."""

from __future__ import annotations

import argparse
import datetime as dt
from pathlib import Path
from typing import Any

from cryptography import x509

from .. import config as config_mod
from ..errors import CertificateInvalid, SvmmError
from .common import add_json, print_json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cert", help="certificate checks")
    s = p.add_subparsers(dest="cmd", required=True, metavar="SUBCOMMAND")
    v = s.add_parser("verify", help="apply the login's certificate checks to a file")
    v.add_argument("cert", type=Path, help="certificate file (PEM or DER)")
    v.add_argument(
        "--intermediate",
        type=Path,
        action="append",
        default=[],
        help="extra intermediate CA certificate (PEM), as a card would carry",
    )
    v.add_argument("--at", help="validation time, ISO 8601 (default: now)")
    add_json(v)
    v.set_defaults(func=verify)


def load_cert_file(path: Path) -> x509.Certificate:
    from ..domain.certpolicy import parse_certificate, parse_pem_certificates

    try:
        data = path.read_bytes()
    except OSError as e:
        raise CertificateInvalid(f"cannot read {path}: {e.strerror}") from None
    if b"-----BEGIN" in data:
        try:
            return parse_pem_certificates(data)[0]
        except CertificateInvalid as e:
            raise CertificateInvalid(
                f"{path}: not a PEM certificate ({e.message})", reason="certificate_malformed"
            ) from None
    return parse_certificate(data)


def certificate_json(cert: x509.Certificate) -> dict[str, str]:
    """A certificate as the commands name it: subject, issuer, serial (hex), SHA-256."""
    from ..domain.certpolicy import fingerprint

    return {
        "subject": cert.subject.rfc4514_string(),
        "issuer": cert.issuer.rfc4514_string(),
        "serial": f"{cert.serial_number:x}",
        "sha256": fingerprint(cert),
    }


def verify_json(
    cert: x509.Certificate | None,
    steps: list[dict[str, str]],
    *,
    user: str | None = None,
    rule: str | None = None,
    error: BaseException | None = None,
) -> dict[str, Any]:
    """`svmm cert verify --json`: the checks that passed, then whom a login would be, or the
    first failure's reason token and message."""
    return {
        "certificate": certificate_json(cert) if cert is not None else None,
        "ok": error is None,
        "steps": steps,
        "user": user,
        "rule": rule,
        "reason": None if error is None else str(getattr(error, "reason", type(error).__name__)),
        "message": None if error is None else str(getattr(error, "message", error)),
    }


def verify(args: argparse.Namespace) -> int:
    from ..services.login import LoginService

    svc = LoginService(config_mod.load(args.config))
    try:
        cert = load_cert_file(args.cert)
    except CertificateInvalid as e:
        if args.json:
            print_json(verify_json(None, [], error=e))
        else:
            print(f"  FAIL {e.reason}: {e.message}")
        raise
    from ..domain.certpolicy import parse_pem_certificates

    extra: list[x509.Certificate] = []
    for p in args.intermediate:
        try:
            extra.extend(parse_pem_certificates(p.read_bytes()))
        except OSError as e:
            raise CertificateInvalid(f"cannot read {p}: {e.strerror}") from None
    at = dt.datetime.fromisoformat(args.at) if args.at else None
    if at is not None and at.tzinfo is None:
        at = at.replace(tzinfo=dt.UTC)
    steps: list[dict[str, str]] = []

    def step(name: str, detail: str) -> None:
        steps.append({"check": name, "detail": detail})
        if not args.json:
            print(f"  ok   {name}: {detail}")

    if not args.json:
        print(f"certificate: {cert.subject.rfc4514_string()}")
    try:
        verdict = svc.verify_certificate(cert, extra_intermediates=extra, at=at, step=step)
    except SvmmError as e:
        # The answer about this certificate (a ConfigError too: it names what to fix).
        if args.json:
            print_json(verify_json(cert, steps, error=e))
        else:
            print(f"  FAIL {e.reason}: {e.message}")
        raise
    if args.json:
        print_json(verify_json(cert, steps, user=verdict.user, rule=verdict.rule))
    else:
        print(f"result: would log in as {verdict.user}")
    return 0
