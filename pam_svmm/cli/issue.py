"""`svmm card issue` and `svmm card revoke`: rolling cards out (administrators).

PINs are asked on the terminal (echo off) or read from a root-only file given by path;
never from argv or the environment.
"""

from __future__ import annotations

import argparse
import getpass
import os
import stat
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from .. import config as config_mod
from ..errors import ConfigError, ConversationFailed, IssueFailed, NoCard
from .common import lab, service_module

if TYPE_CHECKING:
    from ..adapters.token import Pkcs11Module, TokenInfo
    from ..domain.pkcs11_uri import Pkcs11Uri


def register_into(s: argparse._SubParsersAction) -> None:
    """Add `issue` and `revoke` to the `card` group's subcommands."""
    from ..adapters.token import KeySpec
    from ..services.issuing import REVOCATION_REASONS

    p = s.add_parser(
        "issue",
        help="generate a key on a card, have it certified, write it back and publish it",
    )
    p.add_argument("--user", required=True, help="the card holder's user name")
    p.add_argument("--cn", help="common name in the request (default: the user name)")
    p.add_argument("--upn", help="user principal name to request (user@domain)")
    p.add_argument("--email", help="e-mail address to request")
    p.add_argument("--org", help="organisation (O=) in the request")
    p.add_argument(
        "--key",
        choices=[k.value for k in KeySpec],
        default=KeySpec.EC_P256.value,
        help="key pair generated on the card (default: %(default)s)",
    )
    p.add_argument("--key-id", help="CKA_ID in hex (default: the lowest free one-byte id)")
    p.add_argument("--key-label", default="auth", help="label of the key and certificate")
    p.add_argument("--token", help="label of the card to use when several are present")
    p.add_argument(
        "--init",
        metavar="LABEL",
        help="initialize the blank card in the reader with this label (asks the SO PIN and a"
        " new PIN)",
    )
    p.add_argument("--pin-file", type=Path, help="root-only file holding the (new) user PIN")
    p.add_argument("--so-pin-file", type=Path, help="root-only file holding the SO PIN (--init)")
    p.add_argument(
        "--demo-ca",
        type=Path,
        metavar="DIR",
        help="certify with the demo CA in DIR, not ca_command",
    )
    p.add_argument("--dn", help="directory entry to publish to (default: looked up by user)")
    p.add_argument("--no-publish", action="store_true", help="do not publish to the directory")
    p.set_defaults(func=issue_card)

    r = s.add_parser("revoke", help="revoke a card's certificate (demo CA: new CRL and OCSP)")
    which = r.add_mutually_exclusive_group(required=True)
    which.add_argument("--serial", help="certificate serial number in hex")
    which.add_argument("--cert", type=Path, help="the certificate (PEM or DER)")
    r.add_argument(
        "--reason", choices=sorted(REVOCATION_REASONS), default="keyCompromise", help="CRL reason"
    )
    r.add_argument("--demo-ca", type=Path, metavar="DIR", help="the demo CA's folder")
    r.set_defaults(func=revoke_card)


# --- issue ------------------------------------------------------------------------------------


def issue_card(args: argparse.Namespace) -> int:
    from ..adapters.token import KeySpec
    from ..domain import pkcs11_uri
    from ..services.issuing import (
        CardIssuer,
        CertificateAuthority,
        CertificatePublisher,
        CommandCA,
        IssueRequest,
        directory_publisher,
    )
    from ..services.login import LoginService

    cfg = config_mod.load(args.config)
    request = IssueRequest(
        common_name=args.cn or args.user,
        upn=args.upn,
        email=args.email,
        organisation=args.org,
        key_spec=KeySpec(args.key),
        key_id=_hex(args.key_id, "--key-id") if args.key_id else None,
        key_label=args.key_label,
    )
    # Everything that can be checked is checked before the card is touched.
    ca: CertificateAuthority
    if args.demo_ca is not None:
        ca = lab("demo_ca").DemoCA.open(args.demo_ca)
    elif cfg.issue.ca_command:
        ca = CommandCA(cfg.issue.ca_command)
    else:
        raise ConfigError("issue.ca_command", "no CA command configured (or use --demo-ca DIR)")
    publisher: CertificatePublisher | None = None
    if not args.no_publish:
        publisher = directory_publisher(cfg, args.user, args.dn)
    svc = LoginService(cfg)
    module = service_module(svc)  # the library's own stderr lines kept off the terminal
    if args.init:
        so_pin = _secret(args.so_pin_file, f"SO PIN for the blank card {args.init!r}: ")
        pin = _new_pin(args.pin_file, args.init)
        token = module.init_token(args.init, so_pin, pin)
        print(f"initialized token {token.describe()}")
    else:
        token = _pick_token(module, pkcs11_uri.parse(cfg.pkcs11.uri), args.token)
        if token.protected_auth_path and args.pin_file is None:
            pin = None  # the reader's PIN pad
            print(f"enter the PIN for {token.label} on the reader")
        else:
            pin = _secret(args.pin_file, f"PIN for {token.label}: ")
    issuer = CardIssuer.from_config(
        cfg,
        module,
        ca=ca,
        anchors=svc.anchors,
        intermediates=svc.intermediates,
        publisher=publisher,
    )
    result = issuer.issue(token, request, pin=pin)
    cert = result.certificate
    from ..domain.certpolicy import fingerprint, key_description

    print(f"issued on {result.token.describe()}: key id {result.key_id.hex()}")
    print(f"  key     {key_description(cert)}, generated on the card")
    print(f"  subject {cert.subject.rfc4514_string()}")
    print(f"  issuer  {cert.issuer.rfc4514_string()}, serial {cert.serial_number:x}")
    print(f"  sha256  {fingerprint(cert)}")
    anchor = result.chain[-1].subject.rfc4514_string()
    print(
        f"  trust anchor {anchor}: {'written' if result.anchor_written else 'already on the card'}"
    )
    if result.published_to:
        print(f"  published to {result.published_to}")
    else:
        print("  not published to the directory (--no-publish)")
    return 0


def _pick_token(module: Pkcs11Module, uri: Pkcs11Uri, label: str | None) -> TokenInfo:
    tokens = [t for t in module.tokens(uri) if t.login_required]
    if label is not None:
        tokens = [t for t in tokens if t.label == label]
    if not tokens:
        which = f" labelled {label!r}" if label else ""
        raise NoCard(f"no initialized card{which} is present (a blank card needs --init LABEL)")
    if len(tokens) > 1:
        names = ", ".join(t.describe() for t in tokens)
        raise IssueFailed(f"several cards are present ({names}): choose one with --token")
    return tokens[0]


def _secret(path: Path | None, prompt: str) -> str:
    if path is not None:
        return read_pin_file(path)
    if not sys.stdin.isatty():
        raise ConversationFailed("no terminal to ask for the PIN: give a PIN file")
    value = getpass.getpass(prompt)
    if not value:
        raise ConversationFailed("no PIN given")
    return value


def _new_pin(path: Path | None, label: str) -> str:
    if path is not None:
        return read_pin_file(path)
    first = _secret(None, f"new PIN for {label!r}: ")
    if _secret(None, "the new PIN again: ") != first:
        raise ConversationFailed("the two PINs differ")
    return first


def read_pin_file(path: Path) -> str:
    """The first line of a regular file only its owner may access (not through a symlink)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        raise ConfigError(str(path), f"cannot open the PIN file: {e.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(str(path), "the PIN file is not a regular file")
        if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise ConfigError(str(path), "a PIN file must not be accessible to group or others")
        lines = f.read(4096).decode("utf-8", "replace").splitlines()
    if not lines or not lines[0]:
        raise ConfigError(str(path), "the PIN file is empty")
    return lines[0]


def _hex(text: str, option: str) -> bytes:
    try:
        value = bytes.fromhex(text.removeprefix("0x").replace(":", ""))
    except ValueError:
        raise IssueFailed(
            f"{option}: {text!r} is not hexadecimal", reason="request_invalid"
        ) from None
    if not value:
        raise IssueFailed(f"{option} is empty", reason="request_invalid")
    return value


# --- revoke -----------------------------------------------------------------------------------


def revoke_card(args: argparse.Namespace) -> int:
    from ..services.issuing import (
        REVOCATION_REASONS,
        load_certificate_file,
        real_ca_revocation_steps,
    )

    reason = REVOCATION_REASONS[args.reason]
    if args.cert is not None:
        given = load_certificate_file(args.cert)
        serial = given.serial_number
    else:
        given = None
        serial = int.from_bytes(_hex(args.serial, "--serial"), "big")
    if args.demo_ca is None:
        print(real_ca_revocation_steps(serial, reason))
        return 1  # nothing was revoked here
    if given is not None:
        issued = lab("demo_ca").DemoCA.open(args.demo_ca).ca.issued(serial)
        if issued is None or issued != given:
            print(real_ca_revocation_steps(serial, reason))
            return 1
    cert = lab("demo_ca").revoke_with_demo_ca(args.demo_ca, serial=serial, reason=reason)
    print(
        f"revoked serial {serial:x} ({cert.subject.rfc4514_string()}), reason {reason.value};"
        f" published {args.demo_ca / 'intermediate.crl'} and the OCSP index"
    )
    return 0
