"""`svmm cert verify CERT`: exactly the checks a login applies, with the reason on failure."""

from __future__ import annotations

import argparse
import datetime as dt
from pathlib import Path

from cryptography import x509

from .. import config as config_mod
from ..errors import CertificateInvalid


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
    v.set_defaults(func=verify)


def load_cert_file(path: Path) -> x509.Certificate:
    from ..domain.certpolicy import parse_certificate

    try:
        data = path.read_bytes()
    except OSError as e:
        raise CertificateInvalid(f"cannot read {path}: {e.strerror}") from None
    if b"-----BEGIN" in data:
        try:
            return x509.load_pem_x509_certificate(data)
        except ValueError:
            raise CertificateInvalid(
                f"{path}: not a PEM certificate", reason="certificate_malformed"
            ) from None
    return parse_certificate(data)


def verify(args: argparse.Namespace) -> int:
    from ..services.login import LoginService

    svc = LoginService(config_mod.load(args.config))
    try:
        cert = load_cert_file(args.cert)
    except CertificateInvalid as e:
        print(f"  FAIL {e.reason}: {e.message}")
        raise
    extra: list[x509.Certificate] = []
    for p in args.intermediate:
        extra.extend(x509.load_pem_x509_certificates(p.read_bytes()))
    at = dt.datetime.fromisoformat(args.at) if args.at else None
    if at is not None and at.tzinfo is None:
        at = at.replace(tzinfo=dt.UTC)
    print(f"certificate: {cert.subject.rfc4514_string()}")
    try:
        verdict = svc.verify_certificate(
            cert,
            extra_intermediates=extra,
            at=at,
            step=lambda name, detail: print(f"  ok   {name}: {detail}"),
        )
    except Exception as e:
        reason = getattr(e, "reason", type(e).__name__)
        print(f"  FAIL {reason}: {getattr(e, 'message', e)}")
        raise
    print(f"result: would log in as {verdict.user}")
    return 0
