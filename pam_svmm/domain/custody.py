"""Volume keys held by a card: the token format and the cryptographic choices (pure).

A volume's LUKS passphrase is 32 random bytes (``SECRET_BYTES``, binary: it reaches
cryptsetup and QEMU through ``--key-file=-`` or a file descriptor, never a prompt). Two
custody modes describe where it lives; both are JSON tokens kept in the LUKS2 header (type
``svmm-card`` / ``svmm-escrow``; ``keyslots`` is filled in by the LUKS adapter):

* ``wrapped`` (after systemd-cryptenroll's PKCS#11 enrolment): the secret is encrypted to a
  certificate's public key and the card decrypts or derives at unlock. Where systemd stores
  ``RSA-PKCS1(passphrase)`` or uses the raw ECDH output as the passphrase, with nothing
  authenticating the token, this is a KEM + AEAD, in the manner of HPKE:

  - KEM ``rsa-oaep-sha256`` (``rsa-oaep-sha1`` for cards whose module does OAEP only with
    SHA-1, e.g. SoftHSM 2.6): ``enc`` = RSA-OAEP(MGF1 with the same hash, no label) of a
    random 32-byte KEM secret; the card decrypts it (CKM_RSA_PKCS_OAEP).
  - KEM ``ecdh-p256`` / ``ecdh-p384``: ``enc`` = an ephemeral public point (X9.62
    uncompressed); the shared secret is ECDH's x coordinate, derived on the card with
    CKM_ECDH1_DERIVE and CKD_NULL (the private key never leaves it).
  - wrap key = HKDF-SHA256(shared, salt = none, info = ``WRAP_INFO`` || 0 || kem || 0 ||
    recipient || enc), 32 bytes: bound to the KEM, the recipient and this ``enc``.
  - ``ciphertext`` = AES-256-GCM(wrap key, ``nonce``, secret, AAD = the token's canonical
    header), so any change to the token (kem, recipient, key id, enc, type, version) is
    refused, and an OAEP-SHA-1 token cannot be passed off as a SHA-256 one or back.

* ``card-object``: the secret is a private CKO_SECRET_KEY object on the card, read after
  login. The token names the card (``recipient``), the object, and carries ``check`` =
  HMAC-SHA256(secret, ``CHECK_INFO`` || header): a wrong object is refused with a clear
  error instead of a failed cryptsetup call.

``recipient`` is SHA-256 over the DER SubjectPublicKeyInfo of the key the secret is for:
it picks the card's key (or the escrow key) and tells a wrong card before any card call.

Secrets are bytearrays and are wiped (``wipe``) by whoever owns them. Values cryptography
returns as ``bytes`` are avoided where an ``_into`` variant exists.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import hmac
import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ..errors import CertificateInvalid, InputMalformed, KeyReleaseFailed, KeyTokenInvalid
from .bounded import loads_json

FORMAT_VERSION = 1
SECRET_BYTES = 32  # the volume passphrase, and the KEM secret for RSA
NONCE_BYTES = 12
TAG_BYTES = 16
TYPE_CARD = "svmm-card"
TYPE_ESCROW = "svmm-escrow"
# Domain separation: a wrap key or check value made here is never valid for anything else.
WRAP_INFO = b"pam_svmm volume key wrap v1"
CHECK_INFO = b"pam_svmm card object check v1"
MAX_TOKEN_BYTES = 1 << 20  # a LUKS2 header's JSON area is at most 4 MiB, tokens far less
MIN_RSA_BITS = 2048
MAX_RSA_BITS = 8192

PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey


class Custody(enum.Enum):
    WRAPPED = "wrapped"
    CARD_OBJECT = "card-object"


class Kem(enum.Enum):
    RSA_OAEP_SHA256 = "rsa-oaep-sha256"
    RSA_OAEP_SHA1 = "rsa-oaep-sha1"
    ECDH_P256 = "ecdh-p256"
    ECDH_P384 = "ecdh-p384"

    @property
    def is_rsa(self) -> bool:
        return self.value.startswith("rsa")

    @property
    def oaep_hash(self) -> str:
        """The OAEP hash (and its MGF1 hash) of an RSA KEM: "sha256" or "sha1"."""
        if not self.is_rsa:
            raise ValueError(f"{self.value} is not an RSA KEM")
        return self.value.rsplit("-", 1)[1]

    def oaep_padding(self) -> padding.OAEP:
        algorithm: hashes.HashAlgorithm = (
            hashes.SHA256() if self.oaep_hash == "sha256" else hashes.SHA1()  # noqa: S303
        )
        return padding.OAEP(mgf=padding.MGF1(algorithm), algorithm=algorithm, label=None)

    @property
    def curve(self) -> ec.EllipticCurve:
        if self is Kem.ECDH_P256:
            return ec.SECP256R1()
        if self is Kem.ECDH_P384:
            return ec.SECP384R1()
        raise ValueError(f"{self.value} is not an ECDH KEM")


OAEP_HASHES = ("sha256", "sha1")


def kem_for(public_key: object, *, oaep_hash: str = "sha256") -> Kem:
    """The KEM for a recipient key: RSA (2048..8192 bits) or EC on P-256/P-384."""
    if isinstance(public_key, rsa.RSAPublicKey):
        if not MIN_RSA_BITS <= public_key.key_size <= MAX_RSA_BITS:
            raise CertificateInvalid(
                f"RSA key of {public_key.key_size} bits: wrapping needs {MIN_RSA_BITS} or more"
            )
        if oaep_hash not in OAEP_HASHES:
            raise ValueError(f"unsupported OAEP hash {oaep_hash!r}")
        return Kem.RSA_OAEP_SHA256 if oaep_hash == "sha256" else Kem.RSA_OAEP_SHA1
    if isinstance(public_key, ec.EllipticCurvePublicKey):
        if public_key.curve.name == "secp256r1":
            return Kem.ECDH_P256
        if public_key.curve.name == "secp384r1":
            return Kem.ECDH_P384
        raise CertificateInvalid(f"EC key on {public_key.curve.name}: use P-256 or P-384")
    raise CertificateInvalid(f"cannot wrap a key to a {type(public_key).__name__}: use RSA or EC")


def spki_sha256(public_key: PublicKey) -> bytes:
    """SHA-256 over the DER SubjectPublicKeyInfo: names a key independent of certificates."""
    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(der).digest()


def wipe(buf: bytearray | memoryview | None) -> None:
    """Overwrite a secret buffer in place (slice assignment keeps the same memory)."""
    if buf is not None:
        buf[:] = bytes(len(buf))


# --- tokens ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class WrappedKey:
    """A volume secret encrypted to one public key (a card's, or the escrow key)."""

    type: str
    kem: Kem
    recipient: bytes  # spki_sha256 of the recipient key
    key_id: bytes | None  # CKA_ID of the card key (a hint; the recipient decides)
    enc: bytes
    nonce: bytes
    ciphertext: bytes  # AES-GCM ciphertext || tag
    keyslots: tuple[str, ...] = ()  # LUKS2 keyslots; not authenticated (set after wrapping)

    custody = Custody.WRAPPED

    def header(self) -> dict[str, Any]:
        """The authenticated fields (everything but ``keyslots`` and ``ciphertext``)."""
        h: dict[str, Any] = {
            "type": self.type,
            "svmm-version": FORMAT_VERSION,
            "custody": self.custody.value,
            "kem": self.kem.value,
            "recipient-spki-sha256": self.recipient.hex(),
            "enc": _b64(self.enc),
            "nonce": _b64(self.nonce),
        }
        if self.key_id is not None:
            h["key-id"] = self.key_id.hex()
        return h

    def aad(self) -> bytes:
        return _canonical(self.header())

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.header(),
            "keyslots": list(self.keyslots),
            "ciphertext": _b64(self.ciphertext),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def with_keyslots(self, *keyslots: int | str) -> WrappedKey:
        return replace(self, keyslots=_keyslots([str(k) for k in keyslots]))


@dataclass(frozen=True)
class CardObjectRef:
    """A volume secret stored on a card as a private secret-key object."""

    type: str
    recipient: bytes  # spki_sha256 of the card's certificate key: which card
    object_id: bytes
    label: str
    check: bytes  # HMAC-SHA256(secret, CHECK_INFO || header)
    keyslots: tuple[str, ...] = ()

    custody = Custody.CARD_OBJECT

    def header(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "svmm-version": FORMAT_VERSION,
            "custody": self.custody.value,
            "recipient-spki-sha256": self.recipient.hex(),
            "object-id": self.object_id.hex(),
            "object-label": self.label,
        }

    def to_dict(self) -> dict[str, Any]:
        return {**self.header(), "keyslots": list(self.keyslots), "check": _b64(self.check)}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    def with_keyslots(self, *keyslots: int | str) -> CardObjectRef:
        return replace(self, keyslots=_keyslots([str(k) for k in keyslots]))


Token = WrappedKey | CardObjectRef

_COMMON = {"type", "svmm-version", "custody", "keyslots", "recipient-spki-sha256"}
_WRAPPED_REQUIRED = _COMMON | {"kem", "enc", "nonce", "ciphertext"}
_WRAPPED_OPTIONAL = {"key-id"}
_OBJECT_REQUIRED = _COMMON | {"object-id", "object-label", "check"}


def parse_token(data: str | bytes | Mapping[str, Any] | Token) -> Token:
    """Validate a token (JSON text or its decoded object); KeyTokenInvalid names the field."""
    if isinstance(data, WrappedKey | CardObjectRef):
        return data
    if isinstance(data, str | bytes):
        try:
            obj = loads_json(data, max_bytes=MAX_TOKEN_BYTES, max_depth=4, what="key token")
        except InputMalformed as e:
            raise KeyTokenInvalid(e.message) from None
    else:
        obj = data
    if not isinstance(obj, Mapping):
        raise KeyTokenInvalid("key token: not a JSON object")
    kind = obj.get("type")
    if kind not in (TYPE_CARD, TYPE_ESCROW):
        raise KeyTokenInvalid(f"key token: type: {kind!r} is not {TYPE_CARD} or {TYPE_ESCROW}")
    version = obj.get("svmm-version")
    if version != FORMAT_VERSION or isinstance(version, bool):
        raise KeyTokenInvalid(f"key token: svmm-version: {version!r} is not {FORMAT_VERSION}")
    custody = obj.get("custody")
    if custody == Custody.WRAPPED.value:
        _fields(obj, _WRAPPED_REQUIRED, _WRAPPED_OPTIONAL)
        return _parse_wrapped(obj, kind)
    if custody == Custody.CARD_OBJECT.value:
        if kind != TYPE_CARD:
            raise KeyTokenInvalid("key token: custody: card-object tokens are of type svmm-card")
        _fields(obj, _OBJECT_REQUIRED, set())
        return CardObjectRef(
            type=kind,
            recipient=_hex(obj, "recipient-spki-sha256", exact=32),
            object_id=_hex(obj, "object-id", low=1, high=64),
            label=_label(obj.get("object-label")),
            check=_b64field(obj, "check", exact=32),
            keyslots=_keyslots(obj["keyslots"]),
        )
    raise KeyTokenInvalid(f"key token: custody: {custody!r} is not wrapped or card-object")


def _parse_wrapped(obj: Mapping[str, Any], kind: str) -> WrappedKey:
    try:
        kem = Kem(obj["kem"])
    except (ValueError, TypeError):
        raise KeyTokenInvalid(f"key token: kem: {obj['kem']!r} is not supported") from None
    if kem.is_rsa:
        enc = _b64field(obj, "enc", low=MIN_RSA_BITS // 8, high=MAX_RSA_BITS // 8)
    else:
        enc = _b64field(obj, "enc", low=1, high=200)
        try:
            # Validates the point is on the curve: a bad point never reaches the card.
            ec.EllipticCurvePublicKey.from_encoded_point(kem.curve, enc)
        except ValueError:
            raise KeyTokenInvalid(f"key token: enc: not a point on {kem.curve.name}") from None
        if enc[0] != 0x04:
            raise KeyTokenInvalid("key token: enc: the point is not in uncompressed form")
    key_id = _hex(obj, "key-id", low=1, high=64) if "key-id" in obj else None
    if kind == TYPE_ESCROW and key_id is not None:
        raise KeyTokenInvalid("key token: key-id: an escrow token names no card key")
    return WrappedKey(
        type=kind,
        kem=kem,
        recipient=_hex(obj, "recipient-spki-sha256", exact=32),
        key_id=key_id,
        enc=enc,
        nonce=_b64field(obj, "nonce", exact=NONCE_BYTES),
        ciphertext=_b64field(obj, "ciphertext", exact=SECRET_BYTES + TAG_BYTES),
        keyslots=_keyslots(obj["keyslots"]),
    )


# --- sealing and opening --------------------------------------------------------------------


def derive_wrap_key(kem: Kem, shared: bytes | bytearray, enc: bytes, recipient: bytes) -> bytearray:
    """HKDF-SHA256 of the KEM's shared secret into a 32-byte AES key (a bytearray to wipe)."""
    info = WRAP_INFO + b"\x00" + kem.value.encode() + b"\x00" + recipient + enc
    out = bytearray(32)
    HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive_into(shared, out)
    return out


def seal(
    *,
    type: str,
    kem: Kem,
    recipient: bytes,
    key_id: bytes | None,
    enc: bytes,
    nonce: bytes,
    shared: bytes | bytearray,
    secret: bytes | bytearray,
) -> WrappedKey:
    """Encrypt ``secret`` under the wrap key derived from ``shared``; the caller supplies the
    randomness (``nonce``, and ``enc``/``shared`` from the KEM)."""
    if len(secret) != SECRET_BYTES:
        raise ValueError(f"a volume secret is {SECRET_BYTES} bytes, not {len(secret)}")
    if len(nonce) != NONCE_BYTES:
        raise ValueError(f"the nonce is {NONCE_BYTES} bytes")
    draft = WrappedKey(type, kem, recipient, key_id, enc, nonce, b"")
    parse_token(draft.to_dict() | {"ciphertext": _b64(bytes(SECRET_BYTES + TAG_BYTES))})
    key = derive_wrap_key(kem, shared, enc, recipient)
    try:
        ciphertext = AESGCM(key).encrypt(nonce, secret, draft.aad())
    finally:
        wipe(key)
    return replace(draft, ciphertext=ciphertext)


def open_wrapped(token: WrappedKey, shared: bytes | bytearray) -> bytearray:
    """Decrypt a token's secret with the KEM's shared secret; KeyReleaseFailed if it does
    not authenticate (wrong key, or any field of the token altered)."""
    key = derive_wrap_key(token.kem, shared, token.enc, token.recipient)
    out = bytearray(len(token.ciphertext) - TAG_BYTES)
    try:
        AESGCM(key).decrypt_into(token.nonce, token.ciphertext, token.aad(), out)
    except InvalidTag:
        wipe(out)
        raise KeyReleaseFailed(
            "the wrapped volume key does not authenticate: the key used is not its recipient's,"
            " or the token was altered",
            reason="key_unwrap_failed",
        ) from None
    finally:
        wipe(key)
    return out


def card_object_check(ref: CardObjectRef, secret: bytes | bytearray) -> bytes:
    """The token's check value for ``secret`` (HMAC-SHA256 keyed with the secret)."""
    return hmac.new(secret, CHECK_INFO + _canonical(ref.header()), "sha256").digest()


def make_card_object_ref(
    *, recipient: bytes, object_id: bytes, label: str, secret: bytes | bytearray
) -> CardObjectRef:
    if len(secret) != SECRET_BYTES:
        raise ValueError(f"a volume secret is {SECRET_BYTES} bytes, not {len(secret)}")
    draft = CardObjectRef(TYPE_CARD, recipient, object_id, label, b"")
    ref = replace(draft, check=card_object_check(draft, secret))
    parse_token(ref.to_dict())  # the same limits as a token read back
    return ref


def verify_card_object(ref: CardObjectRef, secret: bytes | bytearray) -> None:
    if len(secret) != SECRET_BYTES or not hmac.compare_digest(
        card_object_check(ref, secret), ref.check
    ):
        raise KeyReleaseFailed(
            f"the secret object {ref.label!r} on the card is not this volume's key",
            reason="secret_mismatch",
        )


# --- field helpers --------------------------------------------------------------------------


def _canonical(obj: Mapping[str, Any]) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _fields(obj: Mapping[str, Any], required: set[str], optional: set[str]) -> None:
    missing = sorted(required - obj.keys())
    if missing:
        raise KeyTokenInvalid(f"key token: {missing[0]}: missing")
    extra = sorted(obj.keys() - required - optional)
    if extra:
        raise KeyTokenInvalid(f"key token: {extra[0]}: unknown field")


def _b64field(
    obj: Mapping[str, Any], name: str, *, exact: int | None = None, low: int = 0, high: int = 0
) -> bytes:
    value = obj[name]
    if not isinstance(value, str):
        raise KeyTokenInvalid(f"key token: {name}: not a base64 string")
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise KeyTokenInvalid(f"key token: {name}: not valid base64") from None
    _length(name, data, exact, low, high)
    return data


def _hex(
    obj: Mapping[str, Any], name: str, *, exact: int | None = None, low: int = 0, high: int = 0
) -> bytes:
    value = obj[name]
    if not isinstance(value, str) or value != value.lower():
        raise KeyTokenInvalid(f"key token: {name}: not a lower-case hex string")
    try:
        data = bytes.fromhex(value)
    except ValueError:
        raise KeyTokenInvalid(f"key token: {name}: not valid hex") from None
    if data.hex() != value:  # bytes.fromhex skips spaces
        raise KeyTokenInvalid(f"key token: {name}: not valid hex")
    _length(name, data, exact, low, high)
    return data


def _length(name: str, data: bytes, exact: int | None, low: int, high: int) -> None:
    if exact is not None and len(data) != exact:
        raise KeyTokenInvalid(f"key token: {name}: {len(data)} bytes, expected {exact}")
    if exact is None and not low <= len(data) <= high:
        raise KeyTokenInvalid(f"key token: {name}: {len(data)} bytes, expected {low}..{high}")


def _label(value: object) -> str:
    if not isinstance(value, str) or not 0 < len(value.encode("utf-8")) <= 64:
        raise KeyTokenInvalid("key token: object-label: not a string of 1..64 bytes")
    if not value.isprintable():
        raise KeyTokenInvalid("key token: object-label: contains control characters")
    return value


def _keyslots(value: object) -> tuple[str, ...]:
    # LUKS2 wants keyslot numbers as decimal strings (cryptsetup token import refuses others).
    if not isinstance(value, list | tuple) or not all(
        isinstance(k, str) and k.isdigit() and k.isascii() and len(k) <= 3 for k in value
    ):
        raise KeyTokenInvalid("key token: keyslots: not a list of keyslot numbers as strings")
    return tuple(value)
