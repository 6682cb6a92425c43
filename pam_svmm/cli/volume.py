"""`svmm volume create|enroll|status|rekey|recover`: LUKS volumes whose keys the cards hold.

Cards are named by token label or a ``pkcs11:`` URI and found through the configured
PKCS#11 module (``--module`` overrides it). PINs come from a terminal prompt or a root-only
``--pin-file``, never from argv. Progress lines (formatting, key derivation) go to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import ConversationFailed, NoCard, VolumeError
from .common import add_json, load_module, print_json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("volume", help="encrypted VM volumes unlocked by cards")
    s = p.add_subparsers(dest="cmd", required=True, metavar="SUBCOMMAND")

    c = s.add_parser("create", help="format an image or device, enrol a card and the escrow")
    c.add_argument("path", type=Path)
    c.add_argument("--size", help="create a new image of this size (64M, 1G); else format PATH")
    who = c.add_mutually_exclusive_group(required=True)
    who.add_argument("--owner", metavar="USER", help="the user the volume belongs to")
    who.add_argument("--role", help="the role the volume belongs to")
    c.add_argument(
        "--custody",
        choices=("wrapped", "key-object", "card-object"),
        default="wrapped",
        help="wrapped to the card's key, or a secret object on the card (key-object)",
    )
    c.add_argument("--escrow-cert", type=Path, required=True, help="escrow certificate (PEM)")
    c.add_argument(
        "--luks1",
        action="store_true",
        help="LUKS1 with tokens beside the image (QEMU 7.2's LUKS driver opens only LUKS1)",
    )
    _card_args(c, "--card", "the card to enrol")
    _pbkdf_args(c)
    c.set_defaults(func=create)

    e = s.add_parser("enroll", help="add a card, unlocked by an enrolled card or the escrow key")
    e.add_argument("path", type=Path)
    _card_args(e, "--card", "the card to add")
    _unlock_args(e)
    _pbkdf_args(e)
    e.set_defaults(func=enroll)

    st = s.add_parser("status", help="keyslots, cards, escrow and owner (no PIN needed)")
    st.add_argument("path", type=Path)
    add_json(st)
    st.set_defaults(func=status)

    r = s.add_parser("rekey", help="replace a card's keyslot by a new card's")
    r.add_argument("path", type=Path)
    r.add_argument("--old", required=True, help="the old card: hex prefix of its fingerprint")
    _card_args(r, "--card", "the new card")
    _unlock_args(r)
    _pbkdf_args(r)
    r.set_defaults(func=rekey)

    v = s.add_parser("recover", help="enrol a new card with the escrow key, without the old one")
    v.add_argument("path", type=Path)
    v.add_argument("--escrow-key", type=Path, required=True, help="escrow private key (PEM)")
    v.add_argument("--keep-old", action="store_true", help="keep the other cards' keyslots")
    _card_args(v, "--card", "the new card")
    _pbkdf_args(v)
    v.set_defaults(func=recover)


def _card_args(p: argparse.ArgumentParser, flag: str, text: str) -> None:
    p.add_argument(flag, dest="card", required=True, help=f"{text}: token label or pkcs11: URI")
    p.add_argument("--module", help="PKCS#11 module (default: the configured one)")
    p.add_argument("--pin-file", type=Path, help="root-only file holding the card's PIN")


def _unlock_args(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--with-card", help="an enrolled card (label or URI) that unlocks the volume")
    g.add_argument("--escrow-key", type=Path, help="escrow private key (PEM)")
    p.add_argument("--with-pin-file", type=Path, help="PIN file for --with-card")


def _pbkdf_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("key derivation (default: argon2id, cryptsetup's benchmark)")
    g.add_argument("--pbkdf", choices=("argon2id", "argon2i", "pbkdf2"), default=None)
    g.add_argument("--iter-time", type=int, metavar="MS", help="benchmark target per keyslot")
    g.add_argument("--pbkdf-memory", type=int, metavar="KIB", help="argon2 memory cost")
    g.add_argument("--pbkdf-parallel", type=int, metavar="N", help="argon2 threads")
    g.add_argument("--pbkdf-iterations", type=int, metavar="N", help="fixed cost, no benchmark")


# --- commands -----------------------------------------------------------------------------


def create(args: argparse.Namespace) -> int:
    from ..adapters.luks import parse_size
    from ..domain.custody import Custody
    from ..services.volumes import Owner

    owner = Owner("user", args.owner) if args.owner else Owner("role", args.role)
    custody = Custody.WRAPPED if args.custody == "wrapped" else Custody.CARD_OBJECT
    size = parse_size(args.size) if args.size else None
    escrow = _load_cert(args.escrow_cert)
    vols = _volumes(args, luks1=args.luks1)
    with _card(args, args.card, args.pin_file) as (card, session):
        st = vols.create(
            args.path,
            owner=owner,
            custody=custody,
            card=card,
            escrow_certificate=escrow,
            size=size,
            luks_type="luks1" if args.luks1 else "luks2",
            card_session=session,
        )
    _print_status(st)
    return 0


def enroll(args: argparse.Namespace) -> int:
    vols = _volumes(args)
    with _unlock(args) as unlock, _card(args, args.card, args.pin_file) as (card, session):
        slot = vols.enroll(args.path, unlock, card, card_session=session)
    print(f"enrolled {card.certificate.subject.rfc4514_string()} in keyslot {slot}")
    return 0


def rekey(args: argparse.Namespace) -> int:
    vols = _volumes(args)
    with _unlock(args) as unlock, _card(args, args.card, args.pin_file) as (card, session):
        slot = vols.rekey(args.path, unlock, card, old=args.old, card_session=session)
    print(f"replaced card {args.old} by {card.certificate.subject.rfc4514_string()} (slot {slot})")
    return 0


def recover(args: argparse.Namespace) -> int:
    vols = _volumes(args)
    key = _load_key(args.escrow_key)
    with _card(args, args.card, args.pin_file) as (card, session):
        slot = vols.recover(args.path, key, card, replace=not args.keep_old, card_session=session)
    print(f"recovered: {card.certificate.subject.rfc4514_string()} enrolled in keyslot {slot}")
    return 0


def status(args: argparse.Namespace) -> int:
    from ..services.volumes import Volumes

    doc = status_json(Volumes().status(args.path))
    if args.json:
        print_json(doc)
    else:
        _print_status_doc(doc)
    return 0


def status_json(st: Any) -> dict[str, Any]:
    """`svmm volume status --json`: the volume and each keyslot (no PIN needed, no secret)."""
    return {
        "path": str(st.path),
        "luks_version": st.luks_version,
        "uuid": st.uuid,
        "owner": {"kind": st.owner.kind, "name": st.owner.name} if st.owner else None,
        "custody": st.custody.value if st.custody else None,
        "slots": [
            {
                "slot": s.slot,
                "kind": s.kind,
                "custody": s.custody,
                "recipient": s.recipient,
                "card": dict(s.card) if s.card is not None else None,
            }
            for s in st.slots
        ],
    }


def _print_status(st: Any) -> None:
    _print_status_doc(status_json(st))


def _print_status_doc(doc: dict[str, Any]) -> None:
    owner = f"{doc['owner']['kind']} {doc['owner']['name']}" if doc["owner"] else "unknown"
    print(
        f"volume {doc['path']}: LUKS{doc['luks_version']} {doc['uuid']}, owner {owner}, "
        f"custody {doc['custody'] or 'unknown'}"
    )
    for s in doc["slots"]:
        if s["kind"] == "card":
            card = s["card"] or {}
            print(
                f"  keyslot {s['slot']}: card {card.get('subject', '?')} ({s['custody']}),"
                f" key {(s['recipient'] or '?')[:16]}, token {card.get('token-label', '?')!r}"
            )
        elif s["kind"] == "escrow":
            print(
                f"  keyslot {s['slot']}: recovery, escrowed to key {(s['recipient'] or '?')[:16]}"
            )
        else:
            print(f"  keyslot {s['slot']}: not managed by svmm")


# --- plumbing -----------------------------------------------------------------------------


def _volumes(args: argparse.Namespace, *, luks1: bool = False) -> Any:
    from ..adapters.luks import Pbkdf
    from ..services.volumes import Volumes

    kind = args.pbkdf or ("pbkdf2" if luks1 else "argon2id")
    pbkdf = Pbkdf(
        kind,
        iter_time_ms=args.iter_time,
        memory_kib=args.pbkdf_memory,
        parallel=args.pbkdf_parallel,
        force_iterations=args.pbkdf_iterations,
    )
    return Volumes(pbkdf=pbkdf, progress=lambda line: print(f"svmm: {line}", file=sys.stderr))


def _module_path(args: argparse.Namespace) -> str:
    if args.module:
        return str(args.module)
    from .. import config as config_mod

    return config_mod.load(args.config).pkcs11.module


@contextlib.contextmanager
def _card(args: argparse.Namespace, name: str, pin_file: Path | None) -> Iterator[tuple[Any, Any]]:
    """The card ``name`` (label or URI), logged in, as (volumes.Card, RW session)."""
    from ..domain import pkcs11_uri
    from ..services.volumes import Card

    uri = pkcs11_uri.parse(name if name.startswith("pkcs11:") else _label_uri(name))
    with load_module(_module_path(args)) as module:
        tokens = module.tokens(uri)
        if len(tokens) != 1:
            raise NoCard(f"{len(tokens)} cards match {name!r}; insert exactly one")
        token = tokens[0]
        with module.session(token, rw=True) as session:
            certs = [c for c in session.certificates(uri) if not _is_ca(c.load())]
            if len(certs) != 1:
                raise VolumeError(
                    f"card {token.label!r} holds {len(certs)} user certificates; name one"
                    " with a pkcs11: URI (id= or object=)"
                )
            if token.protected_auth_path and pin_file is None:
                session.login(None)
            else:
                session.login(_pin(pin_file, f"PIN for {token.label}: "))
            cert = certs[0]
            yield Card(cert.load(), cert.id, token.label, token.serial), session


@contextlib.contextmanager
def _unlock(args: argparse.Namespace) -> Iterator[Any]:
    from ..services.volumes import Unlock

    if args.escrow_key is not None:
        yield Unlock.with_escrow(_load_key(args.escrow_key))
        return
    with _card(args, args.with_card, args.with_pin_file) as (card, session):
        yield Unlock.with_card(card, session)


def _label_uri(label: str) -> str:
    from urllib.parse import quote

    return "pkcs11:token=" + quote(label, safe="")


def _pin(path: Path | None, prompt: str) -> str:
    from .issue import read_pin_file

    if path is not None:
        return read_pin_file(path)
    if not sys.stdin.isatty():
        raise ConversationFailed("no terminal to ask for the PIN: give --pin-file")
    value = getpass.getpass(prompt)
    if not value:
        raise ConversationFailed("no PIN given")
    return value


def _is_ca(cert: Any) -> bool:
    from ..services.auth import _is_ca as is_ca

    return is_ca(cert)


def _load_cert(path: Path) -> Any:
    from cryptography import x509

    from ..domain.certpolicy import PARSE_ERRORS

    try:
        data = path.read_bytes()
    except OSError as e:
        raise VolumeError(f"{path}: not a readable PEM certificate ({e})") from None
    try:
        return x509.load_pem_x509_certificate(data)
    except PARSE_ERRORS as e:
        raise VolumeError(f"{path}: not a readable PEM certificate ({e})") from None


def _load_key(path: Path) -> Any:
    from cryptography.hazmat.primitives import serialization

    try:
        data = path.read_bytes()
    except OSError as e:
        raise VolumeError(f"{path}: {e.strerror}") from None
    try:
        return serialization.load_pem_private_key(data, password=None)
    except TypeError:  # encrypted: ask for its passphrase
        if not sys.stdin.isatty():
            raise ConversationFailed(f"{path} is encrypted and there is no terminal") from None
        secret = getpass.getpass(f"passphrase for {path}: ").encode()
        try:
            return serialization.load_pem_private_key(data, password=secret)
        except ValueError:
            raise VolumeError(f"{path}: wrong passphrase or not a private key") from None
    except ValueError:
        raise VolumeError(f"{path}: not a PEM private key") from None
