"""The host challenge a card signs, and the check that the signature proves key possession.

Pure: the caller supplies the nonce (from ``os.urandom``) and the clock. The bytes to sign
are a domain-separated, length-prefixed encoding, so no two distinct challenges (and no
other protocol's message) encode to the same bytes, whatever the host or service contain.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from ..errors import ProofOfPossessionFailed
from .signing import KeyType, SignatureScheme

PURPOSE = b"pam_svmm login v1"
MIN_NONCE_BYTES = 16
_LEN_BYTES = 4  # each field is prefixed with its length, 32-bit big-endian


def _field(value: bytes) -> bytes:
    if len(value) >= 1 << (8 * _LEN_BYTES):
        raise ValueError("challenge field too long")
    return len(value).to_bytes(_LEN_BYTES, "big") + value


def _canonical_time(t: datetime) -> bytes:
    # One spelling per instant: UTC, microseconds, "Z".
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ").encode("ascii")


@dataclass(frozen=True)
class Challenge:
    host: str
    service: str
    nonce: bytes
    issued_at: datetime

    def __post_init__(self) -> None:
        for name in ("host", "service"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value:
                raise ValueError(f"challenge {name} must be a non-empty string")
            value.encode("utf-8")  # lone surrogates fail here, not at signing time
        if not isinstance(self.nonce, bytes) or len(self.nonce) < MIN_NONCE_BYTES:
            raise ValueError(f"challenge nonce must be at least {MIN_NONCE_BYTES} bytes")
        if self.issued_at.tzinfo is None:
            raise ValueError("challenge issued_at must be timezone-aware")

    def to_be_signed(self) -> bytes:
        """The exact bytes the card signs: purpose, host, service, time, nonce."""
        return b"".join(
            _field(f)
            for f in (
                PURPOSE,
                self.host.encode("utf-8"),
                self.service.encode("utf-8"),
                _canonical_time(self.issued_at),
                self.nonce,
            )
        )


def new_challenge(host: str, service: str, *, at: datetime, nonce: bytes) -> Challenge:
    """A challenge for ``host``/``service`` issued at ``at``; ``nonce`` comes from the caller
    (``os.urandom(config.auth.challenge_bytes)``) so this stays pure."""
    return Challenge(host=host, service=service, nonce=bytes(nonce), issued_at=at)


def check_fresh(challenge: Challenge, at: datetime, max_age: timedelta) -> None:
    """Refuse a challenge older than ``max_age`` at ``at``, or one issued in the future."""
    if at.tzinfo is None:
        raise ValueError("time must be timezone-aware")
    if max_age <= timedelta(0):
        raise ValueError("max_age must be positive")
    age = at - challenge.issued_at
    if age < timedelta(0):
        raise ProofOfPossessionFailed(
            f"challenge was issued {-age.total_seconds():.3f}s in the future",
            reason="challenge_from_future",
        )
    if age > max_age:
        raise ProofOfPossessionFailed(
            f"challenge is {age.total_seconds():.3f}s old, more than the "
            f"{max_age.total_seconds():.3f}s allowed",
            reason="challenge_expired",
        )


_HASHES: dict[SignatureScheme, type[hashes.HashAlgorithm]] = {
    SignatureScheme.RSA_PKCS1_SHA256: hashes.SHA256,
    SignatureScheme.RSA_PSS_SHA256: hashes.SHA256,
    SignatureScheme.ECDSA_SHA256: hashes.SHA256,
    SignatureScheme.ECDSA_SHA384: hashes.SHA384,
}


def verify_possession(
    cert: x509.Certificate, scheme: SignatureScheme, data: bytes, signature: bytes
) -> None:
    """Verify that ``signature`` over ``data`` was made with the key of ``cert``.

    Raises ``ProofOfPossessionFailed`` when it does not verify, or when ``scheme`` is not
    one for the certificate's key type (an RSA scheme never verifies against an EC key).
    """
    try:
        pub = cert.public_key()
    except (ValueError, UnsupportedAlgorithm):
        raise ProofOfPossessionFailed(
            "certificate public key is unusable", reason="unsupported_key"
        ) from None
    if isinstance(pub, rsa.RSAPublicKey):
        key_type = KeyType.RSA
    elif isinstance(pub, ec.EllipticCurvePublicKey):
        key_type = KeyType.EC
    else:
        raise ProofOfPossessionFailed(
            f"certificate key type {type(pub).__name__} cannot prove possession",
            reason="unsupported_key",
        )
    if scheme.key_type is not key_type:
        raise ProofOfPossessionFailed(
            f"signature scheme {scheme.value} does not fit the certificate's "
            f"{key_type.value.upper()} key",
            reason="scheme_mismatch",
        )
    digest = _HASHES[scheme]()
    try:
        if isinstance(pub, rsa.RSAPublicKey):
            pad: padding.AsymmetricPadding
            if scheme is SignatureScheme.RSA_PSS_SHA256:
                # Any salt length: PSS security does not depend on it, and tokens differ.
                pad = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.AUTO)
            else:
                pad = padding.PKCS1v15()
            pub.verify(signature, data, pad, digest)
        else:
            pub.verify(signature, data, ec.ECDSA(digest))
    except InvalidSignature:
        raise ProofOfPossessionFailed(
            "the signature over the challenge does not verify with the certificate's key"
        ) from None
