"""Certificate rules for a card login: leaf checks, then a path to a configured trust anchor.

Pure: the validation time is a parameter and nothing here reads files or the network.
The leaf is checked *before* path building, so each failure has its own ``reason`` token
(expired, not yet valid, weak key, key usage, EKU) instead of one opaque "no path".
Path building itself is cryptography's ``x509.verification`` (RFC 5280 / Web PKI profile),
with two relaxations for smart-card certificates: a SAN is optional, and EKU is ours to
check (cryptography's client verifier insists on clientAuth; many cards carry only
smartcardLogon). Revocation is not checked here (see the revocation module).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.verification import (
    Criticality,
    ExtensionPolicy,
    PolicyBuilder,
    Store,
    VerificationError,
)

from ..config import KEY_USAGE_NAMES, TrustConfig
from ..errors import CertificateInvalid, CertificateUntrusted, ConfigError

MIN_RSA_BITS = 2048
# Curves a card login key may use; others (P-521, secp256k1, ...) are refused as weak_key.
ALLOWED_CURVES = {"secp256r1": "P-256", "secp384r1": "P-384"}


@dataclass(frozen=True)
class CertPolicy:
    """What a login certificate must satisfy.

    ``extended_key_usages`` are dotted OIDs; a leaf passes with ANY of them.
    ``key_usages`` are ``x509.KeyUsage`` attribute names; a leaf needs ALL of them.
    ``max_chain_depth`` is the number of intermediates allowed between leaf and anchor
    (cryptography's meaning of the term).
    """

    extended_key_usages: tuple[str, ...]
    key_usages: tuple[str, ...] = ("digital_signature",)
    max_chain_depth: int = 5
    # A leaf without any EKU extension is refused unless this is set.
    allow_missing_eku: bool = False

    def __post_init__(self) -> None:
        if not self.extended_key_usages:
            raise ConfigError("trust.extended_key_usages", "must name at least one usage")
        for oid in self.extended_key_usages:
            try:
                x509.ObjectIdentifier(oid)
            except ValueError:
                raise ConfigError("trust.extended_key_usages", f"{oid!r} is not an OID") from None
        for ku in self.key_usages:
            if ku not in KEY_USAGE_NAMES:
                raise ConfigError("trust.key_usages", f"{ku!r} is not a known key usage")
        if not 1 <= self.max_chain_depth <= 16:
            raise ConfigError("trust.max_chain_depth", "must be between 1 and 16")

    @classmethod
    def from_config(cls, trust: TrustConfig) -> CertPolicy:
        return cls(
            extended_key_usages=tuple(trust.extended_key_usages),
            key_usages=tuple(trust.key_usages),
            max_chain_depth=trust.max_chain_depth,
        )

    @property
    def eku_oids(self) -> frozenset[x509.ObjectIdentifier]:
        return frozenset(x509.ObjectIdentifier(o) for o in self.extended_key_usages)


# --- parsing and description --------------------------------------------------------------


def parse_certificate(der: bytes) -> x509.Certificate:
    """Parse DER; a certificate that does not parse is ``certificate_malformed``.

    cryptography parses some parts lazily, so they are touched here: a malformed
    certificate then fails at the boundary instead of somewhere later in the login.
    """
    try:
        cert = x509.load_der_x509_certificate(der)
        _ = cert.extensions, cert.subject, cert.issuer
        _ = cert.not_valid_before_utc, cert.not_valid_after_utc
    except (ValueError, TypeError) as e:
        raise CertificateInvalid(
            f"certificate does not parse: {e}", reason="certificate_malformed"
        ) from None
    return cert


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the DER certificate, lowercase hex (the audit trail's card identifier)."""
    return cert.fingerprint(hashes.SHA256()).hex()


def key_description(cert: x509.Certificate) -> str:
    """A short name of the certificate's key: ``RSA-2048``, ``EC P-256``, ``Ed25519``..."""
    try:
        pub = cert.public_key()
    except (ValueError, UnsupportedAlgorithm):
        return "unsupported"
    if isinstance(pub, rsa.RSAPublicKey):
        return f"RSA-{pub.key_size}"
    if isinstance(pub, ec.EllipticCurvePublicKey):
        return f"EC {ALLOWED_CURVES.get(pub.curve.name, pub.curve.name)}"
    if isinstance(pub, ed25519.Ed25519PublicKey):
        return "Ed25519"
    if isinstance(pub, ed448.Ed448PublicKey):
        return "Ed448"
    return type(pub).__name__


def describe(cert: x509.Certificate) -> dict[str, Any]:
    """The facts about a certificate that the audit trail and the CLI show."""
    return {
        "subject": cert.subject.rfc4514_string(),
        "issuer": cert.issuer.rfc4514_string(),
        "serial": format(cert.serial_number, "x"),
        "not_before": cert.not_valid_before_utc.isoformat(),
        "not_after": cert.not_valid_after_utc.isoformat(),
        "key_type": key_description(cert),
        "fingerprint_sha256": fingerprint(cert),
    }


# --- leaf checks --------------------------------------------------------------------------


def _check_parsed(cert: x509.Certificate) -> None:
    try:
        _ = cert.extensions
    except ValueError as e:
        raise CertificateInvalid(
            f"certificate extensions do not parse: {e}", reason="certificate_malformed"
        ) from None


def _check_validity(cert: x509.Certificate, at: datetime) -> None:
    # RFC 5280 4.1.2.5: both bounds are inclusive.
    if at < cert.not_valid_before_utc:
        raise CertificateInvalid(
            f"certificate is not valid before {cert.not_valid_before_utc.isoformat()}",
            reason="certificate_not_yet_valid",
        )
    if at > cert.not_valid_after_utc:
        raise CertificateInvalid(
            f"certificate expired at {cert.not_valid_after_utc.isoformat()}",
            reason="certificate_expired",
        )


def _check_key(cert: x509.Certificate) -> None:
    try:
        pub = cert.public_key()
    except UnsupportedAlgorithm:
        raise CertificateInvalid(
            "certificate key algorithm is not supported", reason="weak_key"
        ) from None
    except ValueError as e:
        raise CertificateInvalid(
            f"certificate public key does not parse: {e}", reason="certificate_malformed"
        ) from None
    if isinstance(pub, rsa.RSAPublicKey):
        if pub.key_size < MIN_RSA_BITS:
            raise CertificateInvalid(
                f"RSA key of {pub.key_size} bits is below the minimum of {MIN_RSA_BITS}",
                reason="weak_key",
            )
        return
    if isinstance(pub, ec.EllipticCurvePublicKey):
        if pub.curve.name not in ALLOWED_CURVES:
            allowed = ", ".join(ALLOWED_CURVES.values())
            raise CertificateInvalid(
                f"EC curve {pub.curve.name} is not allowed (allowed: {allowed})",
                reason="weak_key",
            )
        return
    raise CertificateInvalid(
        f"key type {key_description(cert)} is not allowed (RSA >= {MIN_RSA_BITS}, EC P-256/P-384)",
        reason="weak_key",
    )


def _check_key_usage(cert: x509.Certificate, policy: CertPolicy) -> None:
    if not policy.key_usages:
        return
    try:
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        raise CertificateInvalid(
            "certificate has no key usage extension; required: " + ", ".join(policy.key_usages),
            reason="key_usage_missing",
        ) from None
    missing = [name for name in policy.key_usages if not getattr(ku, name)]
    if missing:
        raise CertificateInvalid(
            "certificate key usage lacks " + ", ".join(missing), reason="key_usage_missing"
        )


def _check_eku(cert: x509.Certificate, policy: CertPolicy) -> None:
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        if policy.allow_missing_eku:
            return
        raise CertificateInvalid(
            "certificate has no extended key usage extension; required one of: "
            + ", ".join(policy.extended_key_usages),
            reason="eku_missing",
        ) from None
    if not policy.eku_oids.intersection(eku):
        present = ", ".join(o.dotted_string for o in eku) or "none"
        raise CertificateInvalid(
            f"certificate extended key usage ({present}) has none of: "
            + ", ".join(policy.extended_key_usages),
            reason="eku_missing",
        )


def check_leaf(leaf: x509.Certificate, *, at: datetime, policy: CertPolicy) -> None:
    """The checks on the end-entity certificate alone, each with its own reason."""
    _check_parsed(leaf)
    _check_validity(leaf, at)
    _check_key(leaf)
    _check_key_usage(leaf, policy)
    _check_eku(leaf, policy)


# --- path building ------------------------------------------------------------------------


def _extension_policies(policy: CertPolicy) -> tuple[ExtensionPolicy, ExtensionPolicy]:
    login_ekus = policy.eku_oids | {ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE}

    def ca_eku(_p: object, cert: x509.Certificate, ext: x509.ExtendedKeyUsage | None) -> None:
        # A CA that constrains its EKUs must allow a login usage. Web PKI would demand
        # clientAuth here, which smart-card CAs (smartcardLogon only) often lack.
        if ext is not None and not login_ekus.intersection(ext):
            raise ValueError(f"CA {cert.subject.rfc4514_string()} EKU excludes login usages")

    ca = ExtensionPolicy.webpki_defaults_ca().may_be_present(
        x509.ExtendedKeyUsage, Criticality.AGNOSTIC, ca_eku
    )
    ee = (
        ExtensionPolicy.webpki_defaults_ee()
        # Card certificates often have no SAN; identity comes from the mapping rules.
        .may_be_present(x509.SubjectAlternativeName, Criticality.AGNOSTIC, None)
        # Checked by _check_eku against the configured set, before path building.
        .may_be_present(x509.ExtendedKeyUsage, Criticality.AGNOSTIC, None)
    )
    return ca, ee


def validate_chain(
    leaf: x509.Certificate,
    intermediates: Sequence[x509.Certificate],
    anchors: Sequence[x509.Certificate],
    *,
    at: datetime,
    policy: CertPolicy,
) -> list[x509.Certificate]:
    """Check ``leaf`` and build a path to one of ``anchors`` valid at ``at``.

    Returns the chain leaf first, anchor last. Raises ``CertificateInvalid`` (with a
    specific ``reason``) for a leaf that fails policy, ``CertificateUntrusted`` when no
    valid path to an anchor exists. Revocation is not checked.
    """
    if at.tzinfo is None:
        raise ValueError("validation time must be timezone-aware")
    check_leaf(leaf, at=at, policy=policy)
    if not anchors:
        raise CertificateUntrusted("no trust anchors are configured")
    ca_policy, ee_policy = _extension_policies(policy)
    verifier = (
        PolicyBuilder()
        .store(Store(list(anchors)))
        .time(at)
        .max_chain_depth(policy.max_chain_depth)
        .extension_policies(ca_policy=ca_policy, ee_policy=ee_policy)
        .build_client_verifier()
    )
    try:
        verified = verifier.verify(leaf, list(intermediates))
    except VerificationError as e:
        raise CertificateUntrusted(
            f"no valid chain from {leaf.subject.rfc4514_string()} to a trust anchor: {e}"
        ) from None
    return list(verified.chain)
