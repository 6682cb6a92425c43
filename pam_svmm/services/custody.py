"""Wrap a volume secret to a card or to the escrow certificate; release it again.

The randomness and the card calls live here; the format and the cryptography choices are
in ``pam_svmm.domain.custody``. A typical volume::

    secret = new_volume_secret()
    try:
        card_token = wrap_for_card(card_cert, secret, key_id=cert_on_card.id)
        escrow_token = wrap_for_escrow(escrow_cert, secret)
        ...  # add the LUKS keyslot with ``secret``, import the tokens (with_keyslots)
    finally:
        wipe(secret)

and at session open, after the whole login succeeded::

    with module.session(token_info) as s:
        s.login(pin)
        secret = release(s, card_token_json)    # bytearray: hand over, then wipe

Secrets are bytearrays owned by the caller, who wipes them. Immutable copies are avoided
where the libraries allow it; those that remain (a PyKCS11 tuple, a cryptography ``bytes``
from the software escrow key) are dropped at once.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, TypeAlias

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from ..domain.custody import (
    OAEP_HASHES,
    SECRET_BYTES,
    TYPE_CARD,
    TYPE_ESCROW,
    CardObjectRef,
    Kem,
    PublicKey,
    Token,
    WrappedKey,
    kem_for,
    make_card_object_ref,
    open_wrapped,
    parse_token,
    seal,
    spki_sha256,
    verify_card_object,
    wipe,
)
from ..errors import KeyReleaseFailed, KeyTokenInvalid, SvmmError, TokenError

if TYPE_CHECKING:
    from ..adapters.token import CardCertificate, TokenSession

TokenInput: TypeAlias = str | bytes | Mapping[str, Any] | Token


def new_volume_secret() -> bytearray:
    """32 random bytes from the kernel, read straight into a bytearray."""
    buf = bytearray(SECRET_BYTES)
    fd = os.open("/dev/urandom", os.O_RDONLY | os.O_CLOEXEC)
    try:
        view = memoryview(buf)
        got = 0
        while got < SECRET_BYTES:
            n = os.readv(fd, [view[got:]])
            if n <= 0:
                raise OSError("short read from /dev/urandom")
            got += n
    finally:
        os.close(fd)
    return buf


# --- wrapping (host side, public keys only) ---------------------------------------------------


def wrap_for_card(
    recipient: x509.Certificate | PublicKey,
    secret: bytes | bytearray,
    *,
    key_id: bytes | None,
    oaep_hash: str = "sha256",
) -> WrappedKey:
    """Wrap ``secret`` to a card's key (its certificate or public key); ``key_id`` is the
    card key's CKA_ID. ``oaep_hash``: see ``card_oaep_hash`` for RSA cards."""
    return _wrap(TYPE_CARD, recipient, secret, key_id=key_id, oaep_hash=oaep_hash)


def wrap_for_escrow(
    escrow: x509.Certificate | PublicKey, secret: bytes | bytearray, *, oaep_hash: str = "sha256"
) -> WrappedKey:
    """Wrap ``secret`` to the organisation's escrow certificate (recovery keyslot)."""
    return _wrap(TYPE_ESCROW, escrow, secret, key_id=None, oaep_hash=oaep_hash)


def _wrap(
    kind: str,
    recipient: x509.Certificate | PublicKey,
    secret: bytes | bytearray,
    *,
    key_id: bytes | None,
    oaep_hash: str,
) -> WrappedKey:
    public_key = _public_key(recipient)
    kem = kem_for(public_key, oaep_hash=oaep_hash)
    shared: bytearray | bytes
    if isinstance(public_key, rsa.RSAPublicKey):
        shared = new_volume_secret()  # the KEM secret: as random and as long as a volume key
        enc = public_key.encrypt(bytes(shared), kem.oaep_padding())  # wants bytes
    else:
        assert isinstance(public_key, ec.EllipticCurvePublicKey)
        ephemeral = ec.generate_private_key(kem.curve)
        shared = ephemeral.exchange(ec.ECDH(), public_key)
        enc = _point(ephemeral.public_key())
        del ephemeral
    try:
        return seal(
            type=kind,
            kem=kem,
            recipient=spki_sha256(public_key),
            key_id=key_id,
            enc=enc,
            nonce=os.urandom(12),
            shared=shared,
            secret=secret,
        )
    finally:
        if isinstance(shared, bytearray):
            wipe(shared)


# --- unwrapping ---------------------------------------------------------------------------------


def release(session: TokenSession, token: TokenInput) -> bytearray:
    """The volume secret a card releases for ``token`` (wrapped or card-object), after login."""
    parsed = parse_token(token)
    if isinstance(parsed, CardObjectRef):
        return read_from_card(session, parsed)
    return unwrap_with_card(session, parsed)


def unwrap_with_card(session: TokenSession, token: TokenInput) -> bytearray:
    """Unwrap a wrapped-key token with the card in ``session`` (logged in).

    The card's certificate whose key is the token's recipient picks the key; a card
    without it is refused before any private-key operation (KeyReleaseFailed). The KEM runs
    on the card; the AEAD on the host refuses an altered token or a wrong key."""
    parsed = parse_token(token)
    if not isinstance(parsed, WrappedKey):
        raise KeyTokenInvalid("key token: custody: not a wrapped key (use read_from_card)")
    card_cert, public_key = _recipient_on_card(session, parsed.recipient)
    _check_kem(parsed, public_key)
    shared: bytearray
    if parsed.kem.is_rsa:
        shared = session.decrypt_rsa_oaep(card_cert.id, parsed.enc, hash=parsed.kem.oaep_hash)
    else:
        peer = ec.EllipticCurvePublicKey.from_encoded_point(parsed.kem.curve, parsed.enc)
        shared = session.ecdh_derive(card_cert.id, peer)
    try:
        return open_wrapped(parsed, shared)
    finally:
        wipe(shared)


def unwrap_with_escrow(
    private_key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, token: TokenInput
) -> bytearray:
    """Unwrap a wrapped-key token (escrow or card) with a software private key."""
    parsed = parse_token(token)
    if not isinstance(parsed, WrappedKey):
        raise KeyTokenInvalid("key token: custody: not a wrapped key")
    public_key = private_key.public_key()
    if spki_sha256(public_key) != parsed.recipient:
        raise KeyReleaseFailed(
            "this key is not the one the volume key was wrapped to"
            f" (recipient {parsed.recipient.hex()[:16]}...)",
            reason="not_recipient",
        )
    _check_kem(parsed, public_key)
    if isinstance(private_key, rsa.RSAPrivateKey):
        try:
            plain = private_key.decrypt(parsed.enc, parsed.kem.oaep_padding())
        except ValueError:
            raise KeyReleaseFailed(
                "the escrow key could not decrypt the wrapped key", reason="key_unwrap_failed"
            ) from None
    else:
        peer = ec.EllipticCurvePublicKey.from_encoded_point(parsed.kem.curve, parsed.enc)
        plain = private_key.exchange(ec.ECDH(), peer)
    shared = bytearray(plain)
    del plain  # immutable bytes from cryptography: dropped, cannot be wiped
    try:
        return open_wrapped(parsed, shared)
    finally:
        wipe(shared)


# --- the key object on the card -----------------------------------------------------------------


def store_on_card(
    session: TokenSession,
    secret: bytes | bytearray,
    *,
    card_certificate: x509.Certificate | PublicKey,
    object_id: bytes,
    label: str,
) -> CardObjectRef:
    """Store ``secret`` as a private object on the card (RW session, logged in); return the
    token that finds it again. ``card_certificate`` names the card in the token."""
    ref = make_card_object_ref(
        recipient=spki_sha256(_public_key(card_certificate)),
        object_id=object_id,
        label=label,
        secret=secret,
    )
    session.store_secret(label, object_id, secret)
    return ref


def read_from_card(session: TokenSession, token: TokenInput) -> bytearray:
    """Read a card-object token's secret from the card (logged in) and check it."""
    parsed = parse_token(token)
    if not isinstance(parsed, CardObjectRef):
        raise KeyTokenInvalid("key token: custody: not a card object (use unwrap_with_card)")
    _recipient_on_card(session, parsed.recipient)
    secret = session.read_secret(label=parsed.label, object_id=parsed.object_id)
    try:
        verify_card_object(parsed, secret)
    except SvmmError:
        wipe(secret)
        raise
    return secret


# --- choosing the OAEP hash for an RSA card -----------------------------------------------------


def card_oaep_hash(session: TokenSession, card_certificate: CardCertificate) -> str:
    """The OAEP hash this card can decrypt with: "sha256" if it can, else "sha1".

    PKCS#11 has no way to ask which OAEP parameters a module supports, so this decrypts a
    random value encrypted to the card's key (after login). Enrolment calls it once and
    records the answer in the token."""
    public_key = card_certificate.load().public_key()
    if not isinstance(public_key, rsa.RSAPublicKey):
        raise ValueError("card_oaep_hash is for RSA card keys")
    for oaep_hash in OAEP_HASHES:
        probe = new_volume_secret()
        enc = public_key.encrypt(
            bytes(probe), kem_for(public_key, oaep_hash=oaep_hash).oaep_padding()
        )
        try:
            got = session.decrypt_rsa_oaep(card_certificate.id, enc, hash=oaep_hash)
        except (TokenError, KeyReleaseFailed) as e:
            if e.reason in ("login_required", "private_key_missing", "key_function_not_permitted"):
                raise
            continue  # CKR_ARGUMENTS_BAD, CKR_MECHANISM_PARAM_INVALID, ...: try the next hash
        try:
            matches = got == probe
        finally:
            wipe(got)
            wipe(probe)
        if matches:
            return oaep_hash
    raise TokenError(
        f"the card cannot decrypt RSA-OAEP with {' or '.join(OAEP_HASHES)}",
        reason="no_mechanism",
    )


# --- helpers ------------------------------------------------------------------------------------


def _public_key(recipient: x509.Certificate | PublicKey) -> PublicKey:
    key = recipient.public_key() if isinstance(recipient, x509.Certificate) else recipient
    if not isinstance(key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey):
        kem_for(key)  # raises CertificateInvalid naming the key type
    return key  # type: ignore[return-value]


def _point(public_key: ec.EllipticCurvePublicKey) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return public_key.public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )


def _recipient_on_card(session: TokenSession, recipient: bytes) -> tuple[CardCertificate, Any]:
    """The certificate on the card whose key is ``recipient`` (public objects, no login)."""
    for cert in session.certificates():
        try:
            public_key = cert.load().public_key()
        except SvmmError:
            continue  # a malformed certificate on the card is not ours to judge here
        if isinstance(public_key, rsa.RSAPublicKey | ec.EllipticCurvePublicKey) and (
            spki_sha256(public_key) == recipient
        ):
            return cert, public_key
    raise KeyReleaseFailed(
        f"card {session.token.describe()} does not hold the key the volume key is for"
        f" (recipient {recipient.hex()[:16]}...)",
        reason="not_recipient",
    )


def _check_kem(token: WrappedKey, public_key: Any) -> None:
    """The KEM must fit the recipient key (a token edited to another KEM is refused here or,
    failing that, by the AEAD)."""
    if token.kem.is_rsa:
        ok = (
            isinstance(public_key, rsa.RSAPublicKey)
            and len(token.enc) == (public_key.key_size + 7) // 8
        )
    else:
        ok = isinstance(public_key, ec.EllipticCurvePublicKey) and (
            public_key.curve.name == token.kem.curve.name
        )
    if not ok:
        raise KeyTokenInvalid(f"key token: kem: {token.kem.value} does not fit the recipient key")


__all__ = [
    "Kem",
    "card_oaep_hash",
    "new_volume_secret",
    "read_from_card",
    "release",
    "store_on_card",
    "unwrap_with_card",
    "unwrap_with_escrow",
    "wipe",
    "wrap_for_card",
    "wrap_for_escrow",
]
