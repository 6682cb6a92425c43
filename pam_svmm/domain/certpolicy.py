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

import ipaddress
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat import asn1
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import (
    Criticality,
    ExtensionPolicy,
    PolicyBuilder,
    Store,
    VerificationError,
)

from ..errors import (
    CertificateInvalid,
    CertificateUntrusted,
    ConfigError,
    NameConstraintsViolated,
)
from .mapping import UPN_OID
from .settings import KEY_USAGE_NAMES, TrustConfig

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


# What cryptography raises for X.509 bytes it will not read: some are not ValueErrors (a
# version it does not know, two extensions of one type, a SAN name form it does not know).
PARSE_ERRORS: tuple[type[Exception], ...] = (
    ValueError,
    TypeError,
    x509.InvalidVersion,
    x509.DuplicateExtension,
    x509.UnsupportedGeneralNameType,
    UnsupportedAlgorithm,
)
_PARSE_ERRORS = PARSE_ERRORS


def _touch(cert: x509.Certificate) -> x509.Certificate:
    # cryptography parses some parts lazily: touched here, a malformed certificate fails at
    # the boundary instead of somewhere later in the login.
    _ = cert.extensions, cert.subject, cert.issuer
    _ = cert.not_valid_before_utc, cert.not_valid_after_utc
    return cert


def parse_certificate(der: bytes) -> x509.Certificate:
    """Parse DER; a certificate that does not parse is ``certificate_malformed``.

    cryptography parses some parts lazily, so they are touched here: a malformed
    certificate then fails at the boundary instead of somewhere later in the login.
    """
    try:
        return _touch(x509.load_der_x509_certificate(der))
    except PARSE_ERRORS as e:
        raise CertificateInvalid(
            f"certificate does not parse: {e}", reason="certificate_malformed"
        ) from None


def parse_pem_certificates(data: bytes) -> list[x509.Certificate]:
    """Every certificate of a PEM text; ``certificate_malformed`` as above (and for a text
    with no PEM certificate in it)."""
    try:
        return [_touch(c) for c in x509.load_pem_x509_certificates(data)]
    except PARSE_ERRORS as e:
        raise CertificateInvalid(
            f"certificate does not parse: {e}", reason="certificate_malformed"
        ) from None


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
    except _PARSE_ERRORS as e:
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
    chain = list(verified.chain)
    check_name_constraints(chain)
    return chain


# --- name constraints (RFC 5280 4.2.1.10, 6.1.3 (b) and (c)) ------------------------------
#
# cryptography's verifier applies dNSName, iPAddress and rfc822Name constraints to SAN
# entries, and refuses URI, otherName and critical directoryName constraints it cannot
# evaluate. It never looks at the subject's emailAddress, at the subject DN under a
# non-critical directoryName constraint, or at a UPN; the mapper reads all of them. So every
# name of every certificate is checked here against the constraints of every CA above it
# (the anchor's too), for each RFC 5280 name form, permitted and excluded.
#
# A UPN (otherName 1.3.6.1.4.1.311.20.2.3) has no RFC 5280 constraint semantics. It is a
# login name of the form user@domain, so a constrained CA must not be able to mint one
# outside its namespace. Our rule (fail closed):
#   * UPN-typed otherName subtrees, where a CA has them, are matched like rfc822Name
#     (Windows' semantics; the verifier refuses such chains today, this is for later);
#   * otherwise the UPN must lie within the CA's permitted rfc822Name subtrees;
#   * a CA with permitted subtrees of neither form (e.g. dNSName only) refuses any UPN:
#     its namespace does not say it may vouch for login names;
#   * excluded rfc822Name and UPN subtrees both exclude a UPN.
# The subject's emailAddress is checked against rfc822Name subtrees even when a SAN is
# present (RFC 5280 asks only without a SAN), because the mapper falls back to it.

_NameValue = str | x509.Name | ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class _Name:
    form: str  # rfc822, dns, dir, uri, ip, upn
    value: _NameValue | None  # None: present but not decodable (never within anything)
    shown: str  # for the message: where the name is and what it says


_FORM_LABEL = {
    "rfc822": "rfc822Name",
    "dns": "dNSName",
    "dir": "directoryName",
    "uri": "uniformResourceIdentifier",
    "ip": "iPAddress",
    "upn": "otherName UPN",
}


def _san_value(cert: x509.Certificate) -> x509.SubjectAlternativeName | None:
    try:
        return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None


def _decode_upn(der: bytes) -> str | None:
    try:
        return asn1.decode_der(str, der)
    except ValueError:
        return None


def _names_of(cert: x509.Certificate) -> Iterator[_Name]:
    """Every name of ``cert`` that a constraint form covers."""
    subject = cert.subject
    if len(subject) > 0:  # RFC 5280: directoryName constraints apply to a non-empty subject
        yield _Name("dir", subject, f"subject {subject.rfc4514_string()!r}")
    for attr in subject.get_attributes_for_oid(NameOID.EMAIL_ADDRESS):
        value = attr.value if isinstance(attr.value, str) else None
        yield _Name("rfc822", value, f"subject emailAddress {attr.value!r}")
    san = _san_value(cert)
    if san is None:
        return
    for gn in san:
        if isinstance(gn, x509.RFC822Name):
            yield _Name("rfc822", gn.value, f"SAN rfc822Name {gn.value!r}")
        elif isinstance(gn, x509.DNSName):
            yield _Name("dns", gn.value, f"SAN dNSName {gn.value!r}")
        elif isinstance(gn, x509.DirectoryName):
            yield _Name("dir", gn.value, f"SAN directoryName {gn.value.rfc4514_string()!r}")
        elif isinstance(gn, x509.UniformResourceIdentifier):
            yield _Name("uri", gn.value, f"SAN URI {gn.value!r}")
        elif isinstance(gn, x509.IPAddress):
            if isinstance(gn.value, ipaddress.IPv4Address | ipaddress.IPv6Address):
                yield _Name("ip", gn.value, f"SAN iPAddress {gn.value}")
        elif isinstance(gn, x509.OtherName) and gn.type_id == UPN_OID:
            upn = _decode_upn(gn.value)
            yield _Name("upn", upn, f"SAN UPN {upn!r}" if upn else "SAN UPN (undecodable)")


def _form_of(gn: x509.GeneralName) -> str | None:
    if isinstance(gn, x509.RFC822Name):
        return "rfc822"
    if isinstance(gn, x509.DNSName):
        return "dns"
    if isinstance(gn, x509.DirectoryName):
        return "dir"
    if isinstance(gn, x509.UniformResourceIdentifier):
        return "uri"
    if isinstance(gn, x509.IPAddress):
        return "ip"
    if isinstance(gn, x509.OtherName) and gn.type_id == UPN_OID:
        return "upn"
    return None  # forms the mapper never reads (other otherNames, registeredID)


def _describe_subtree(gn: x509.GeneralName) -> str:
    form = _form_of(gn)
    if isinstance(gn, x509.DirectoryName):
        return f"directoryName {gn.value.rfc4514_string()!r}"
    if isinstance(gn, x509.OtherName):
        return f"otherName UPN {_decode_upn(gn.value)!r}"
    return f"{_FORM_LABEL.get(form or '', type(gn).__name__)} {str(gn.value)!r}"


def _host_in(host: str, constraint: str) -> bool:
    """DNS-style: ``.d`` matches names below d; ``d`` matches d and names below it."""
    host, constraint = host.rstrip(".").casefold(), constraint.rstrip(".").casefold()
    if not constraint:
        return True
    if constraint.startswith("."):
        return host.endswith(constraint)
    return host == constraint or host.endswith("." + constraint)


def _mailbox_in(mailbox: str, constraint: str) -> bool:
    """rfc822Name: a mailbox (exact), a host (every mailbox on it), or ``.domain`` (every
    mailbox on a host below it). The local part is compared exactly, domains without case."""
    local, at, domain = mailbox.rpartition("@")
    if not at or not local or not domain:
        return False
    c_local, c_at, c_domain = constraint.rpartition("@")
    if c_at:
        return local == c_local and domain.casefold() == c_domain.casefold()
    if constraint.startswith("."):
        return domain.casefold().endswith(constraint.casefold())
    return domain.casefold() == constraint.casefold()


def _rdn_key(rdn: x509.RelativeDistinguishedName) -> frozenset[tuple[str, object]]:
    # RFC 5280 7.1: caseIgnoreMatch with insignificant whitespace removed.
    out = set()
    for attr in rdn:
        value: object = attr.value
        if isinstance(value, str):
            value = " ".join(value.split()).casefold()
        out.add((attr.oid.dotted_string, value))
    return frozenset(out)


def _dn_in(name: x509.Name, constraint: x509.Name) -> bool:
    """directoryName: the constraint's RDNs are the first RDNs of the name."""
    ours, theirs = name.rdns, constraint.rdns
    if len(theirs) > len(ours):
        return False
    return all(_rdn_key(a) == _rdn_key(b) for a, b in zip(ours, theirs, strict=False))


def _within(name: _Name, gn: x509.GeneralName) -> bool | None:
    """Does ``name`` lie in subtree ``gn``? None: the two cannot be compared (fail closed)."""
    v = name.value
    if v is None:
        return None
    if name.form in ("rfc822", "upn"):
        if isinstance(gn, x509.OtherName):
            c = _decode_upn(gn.value)
            return None if c is None else _mailbox_in(str(v), c)
        return _mailbox_in(str(v), str(gn.value))
    if name.form == "dns":
        return _host_in(str(v), str(gn.value))
    if name.form == "uri":
        try:
            host = urlsplit(str(v)).hostname
        except ValueError:
            host = None
        if not host:
            return None  # RFC 5280: a URI without a host cannot satisfy a URI constraint
        # A URI constraint names a host exactly, or with a leading "." the hosts below it.
        c = str(gn.value)
        return _host_in(host, c) if c.startswith(".") else host.casefold() == c.casefold()
    if name.form == "ip":
        net = gn.value
        if not isinstance(net, ipaddress.IPv4Network | ipaddress.IPv6Network):
            return None
        return isinstance(v, type(net.network_address)) and v in net
    if name.form == "dir" and isinstance(v, x509.Name) and isinstance(gn.value, x509.Name):
        return _dn_in(v, gn.value)
    return None


def _applicable(
    name: _Name, subtrees: Sequence[x509.GeneralName], *, permitted: bool
) -> list[x509.GeneralName]:
    """The subtrees that constrain ``name``'s form (see the UPN rule above)."""
    forms = {name.form}
    if name.form == "upn":
        has_upn = any(_form_of(g) == "upn" for g in subtrees)
        forms = ({"upn"} if has_upn else {"rfc822"}) if permitted else {"upn", "rfc822"}
    return [g for g in subtrees if _form_of(g) in forms]


def _name_problem(name: _Name, nc: x509.NameConstraints) -> str | None:
    for gn in _applicable(name, nc.excluded_subtrees or [], permitted=False):
        if _within(name, gn) is not False:
            return f"is in the excluded subtree {_describe_subtree(gn)}"
    permitted = list(nc.permitted_subtrees or [])
    if not permitted:
        return None
    usable = _applicable(name, permitted, permitted=True)
    if not usable:
        if name.form == "upn":
            return (
                "is a UPN and the permitted subtrees ("
                + ", ".join(_describe_subtree(g) for g in permitted)
                + ") have no rfc822Name or UPN form to place it in"
            )
        return None  # this form is not constrained by the CA
    if any(_within(name, gn) is True for gn in usable):
        return None
    return "is not in the permitted subtrees " + ", ".join(_describe_subtree(g) for g in usable)


def check_name_constraints(chain: Sequence[x509.Certificate]) -> None:
    """Raise NameConstraintsViolated unless every name of every certificate in ``chain``
    (leaf first, anchor last) lies within the nameConstraints of every CA above it.

    Self-issued intermediates are exempt, as RFC 5280 6.1.3 (b) says; the leaf never is.
    """
    for i, cert in enumerate(chain[:-1]):
        if i > 0 and cert.subject == cert.issuer:
            continue
        names: list[_Name] | None = None
        for ca in chain[i + 1 :]:
            try:
                nc = ca.extensions.get_extension_for_class(x509.NameConstraints).value
            except x509.ExtensionNotFound:
                continue
            if names is None:
                names = list(_names_of(cert))
            for name in names:
                problem = _name_problem(name, nc)
                if problem is not None:
                    raise NameConstraintsViolated(
                        f"the {name.shown} of {cert.subject.rfc4514_string()!r} {problem} "
                        f"(nameConstraints of {ca.subject.rfc4514_string()!r})"
                    )
