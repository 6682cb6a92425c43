"""Build small PKIs in memory for tests: a root CA, intermediates, leaf certificates, CRLs.

Every certificate is made with `cryptography` and a fixed clock (``NOW``), so tests never
depend on the wall clock. Keys are cached per (kind, slot): generating RSA keys is the slow
part, and a test that needs a *different* key of the same kind asks for another slot.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cryptography import x509
from cryptography.hazmat import asn1
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificateIssuerPrivateKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, ObjectIdentifier

NOW = datetime(2025, 6, 1, 12, 0, 0, tzinfo=UTC)
NOT_BEFORE = NOW - timedelta(days=30)
NOT_AFTER = NOW + timedelta(days=365)

UPN_OID = ObjectIdentifier("1.3.6.1.4.1.311.20.2.3")
CLIENT_AUTH = ExtendedKeyUsageOID.CLIENT_AUTH
SMARTCARD_LOGON = ExtendedKeyUsageOID.SMARTCARD_LOGON
EMAIL_PROTECTION = ExtendedKeyUsageOID.EMAIL_PROTECTION
SERVER_AUTH = ExtendedKeyUsageOID.SERVER_AUTH

KEY_KINDS = ("rsa2048", "rsa1024", "rsa3072", "p256", "p384", "p521", "secp256k1", "ed25519")

PrivateKey = CertificateIssuerPrivateKeyTypes


def key(kind: str = "p256", slot: int = 0) -> PrivateKey:
    """A private key of ``kind``; the same (kind, slot) always gives the same key."""
    return _key(kind, slot)


@functools.cache
def _key(kind: str, slot: int) -> PrivateKey:
    del slot  # only part of the cache key
    if kind.startswith("rsa"):
        return rsa.generate_private_key(public_exponent=65537, key_size=int(kind[3:]))
    curves: dict[str, ec.EllipticCurve] = {
        "p256": ec.SECP256R1(),
        "p384": ec.SECP384R1(),
        "p521": ec.SECP521R1(),
        "secp256k1": ec.SECP256K1(),
    }
    if kind in curves:
        return ec.generate_private_key(curves[kind])
    if kind == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    raise ValueError(f"unknown key kind {kind!r}; one of {KEY_KINDS}")


def _hash_for(signer: PrivateKey) -> hashes.HashAlgorithm | None:
    if isinstance(signer, ed25519.Ed25519PrivateKey):
        return None
    if isinstance(signer, ec.EllipticCurvePrivateKey) and signer.curve.key_size > 256:
        return hashes.SHA384()
    return hashes.SHA256()


@dataclass(frozen=True)
class Issued:
    """A certificate and its private key."""

    cert: x509.Certificate
    key: PrivateKey

    @property
    def name(self) -> x509.Name:
        return self.cert.subject


_serial = iter(range(0x1000, 1 << 62))


def _name(cn: str | None, extra: Iterable[tuple[ObjectIdentifier, str]] = ()) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Example Org")]
    if cn is not None:
        attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, cn))
    attrs += [x509.NameAttribute(oid, value) for oid, value in extra]
    return x509.Name(attrs)


def _ku(usages: Iterable[str]) -> x509.KeyUsage:
    names = set(usages)
    flags = {
        n: n in names
        for n in (
            "digital_signature",
            "content_commitment",
            "key_encipherment",
            "data_encipherment",
            "key_agreement",
            "key_cert_sign",
            "crl_sign",
        )
    }
    unknown = names - set(flags)
    if unknown:
        raise ValueError(f"unknown key usages {sorted(unknown)}")
    return x509.KeyUsage(**flags, encipher_only=False, decipher_only=False)


def make_ca(
    cn: str = "Test Root CA",
    *,
    issuer: Issued | None = None,
    key_kind: str = "p256",
    slot: int = 99,  # CA keys default away from the leaf slots
    not_before: datetime = NOT_BEFORE - timedelta(days=365),
    not_after: datetime = NOT_AFTER + timedelta(days=365),
    path_length: int | None = None,
    eku: Sequence[ObjectIdentifier] | None = None,
    name_constraints: x509.NameConstraints | None = None,
    name_constraints_critical: bool = True,
) -> Issued:
    """A CA certificate: self-signed when ``issuer`` is None, else signed by it."""
    k = key(key_kind, slot)
    subject = _name(cn)
    signer = issuer.key if issuer else k
    b = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.name if issuer else subject)
        .public_key(k.public_key())
        .serial_number(next(_serial))
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(_ku(("digital_signature", "key_cert_sign", "crl_sign")), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(k.public_key()), critical=False)
    )
    if issuer is not None:
        b = b.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()),
            critical=False,
        )
    if eku is not None:
        b = b.add_extension(x509.ExtendedKeyUsage(list(eku)), critical=False)
    if name_constraints is not None:
        b = b.add_extension(name_constraints, critical=name_constraints_critical)
    return Issued(b.sign(signer, _hash_for(signer)), k)


def upn_other_name(upn: str) -> x509.OtherName:
    """A Microsoft UPN SAN entry; OtherName.value is the DER of the inner UTF8String."""
    return x509.OtherName(UPN_OID, asn1.encode_der(upn))


def make_leaf(
    issuer: Issued,
    *,
    cn: str | None = "alice",
    subject_extra: Iterable[tuple[ObjectIdentifier, str]] = (),
    key_kind: str = "p256",
    slot: int = 0,
    not_before: datetime = NOT_BEFORE,
    not_after: datetime = NOT_AFTER,
    ku: Sequence[str] | None = ("digital_signature",),
    eku: Sequence[ObjectIdentifier] | None = (CLIENT_AUTH, SMARTCARD_LOGON),
    upns: Sequence[str] = (),
    emails: Sequence[str] = (),
    other_names: Sequence[x509.OtherName] = (),
    dns_names: Sequence[str] = (),
    more_sans: Sequence[x509.GeneralName] = (),
    subject: x509.Name | None = None,
    basic_constraints: bool = True,
) -> Issued:
    """An end-entity certificate issued by ``issuer``; ``None`` omits KU / EKU.

    ``subject`` replaces the default subject (O=Example Org, CN=``cn``, ``subject_extra``);
    ``more_sans`` adds any further subjectAltName entries (URIs, IPs, directory names)."""
    k = key(key_kind, slot)
    b = (
        x509.CertificateBuilder()
        .subject_name(subject if subject is not None else _name(cn, subject_extra))
        .issuer_name(issuer.name)
        .public_key(k.public_key())
        .serial_number(next(_serial))
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()),
            critical=False,
        )
    )
    if basic_constraints:
        b = b.add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
    if ku is not None:
        b = b.add_extension(_ku(ku), critical=True)
    if eku is not None:
        b = b.add_extension(x509.ExtendedKeyUsage(list(eku)), critical=False)
    san: list[x509.GeneralName] = [upn_other_name(u) for u in upns]
    san += list(other_names)
    san += [x509.RFC822Name(e) for e in emails]
    san += [x509.DNSName(d) for d in dns_names]
    san += list(more_sans)
    if san:
        b = b.add_extension(x509.SubjectAlternativeName(san), critical=False)
    return Issued(b.sign(issuer.key, _hash_for(issuer.key)), k)


@dataclass(frozen=True)
class Pki:
    root: Issued
    intermediate: Issued

    def leaf(self, **kw: object) -> Issued:
        return make_leaf(self.intermediate, **kw)  # type: ignore[arg-type]


@functools.cache
def pki(root_kind: str = "rsa2048", intermediate_kind: str = "p384") -> Pki:
    """A root CA and one intermediate under it (cached: tests only read them)."""
    # CA keys get their own slots, so no leaf ever shares a key with its CA.
    root = make_ca("Test Root CA", key_kind=root_kind, slot=100)
    inter = make_ca(
        "Test Issuing CA", issuer=root, key_kind=intermediate_kind, slot=101, path_length=0
    )
    return Pki(root, inter)


def make_crl(
    issuer: Issued,
    revoked: dict[int, x509.ReasonFlags | None],
    *,
    number: int | None = 1,
    this_update=NOW - timedelta(hours=1),  # type: ignore[no-untyped-def]
    next_update=NOW + timedelta(hours=1),  # type: ignore[no-untyped-def]
    signer: Issued | None = None,
    pem: bool = False,
    number_critical: bool = False,
    extensions: Sequence[tuple[x509.ExtensionType, bool]] = (),
    entry_extensions: Sequence[tuple[x509.ExtensionType, bool]] = (),
) -> bytes:
    """A CRL; ``extensions`` / ``entry_extensions``: more (value, critical) pairs for the
    CRL and for every entry."""
    entries = []
    for i, (serial, reason) in enumerate(revoked.items()):
        b = (
            x509.RevokedCertificateBuilder()
            .serial_number(serial)
            .revocation_date(NOW - timedelta(days=2, seconds=i))
        )
        if reason is not None:
            b = b.add_extension(x509.CRLReason(reason), critical=False)
        for value, critical in entry_extensions:
            b = b.add_extension(value, critical=critical)
        entries.append(b.build())
    exts = []
    if number is not None:
        exts.append(x509.Extension(x509.CRLNumber.oid, number_critical, x509.CRLNumber(number)))
    exts += [x509.Extension(v.oid, c, v) for v, c in extensions]
    # The constructor takes the entries at once (add_revoked_certificate copies: quadratic).
    builder = x509.CertificateRevocationListBuilder(
        issuer_name=issuer.cert.subject,
        last_update=this_update,
        next_update=next_update,
        extensions=exts,
        revoked_certificates=entries,
    )
    crl = builder.sign((signer or issuer).key, hashes.SHA256())
    return crl.public_bytes(serialization.Encoding.PEM if pem else serialization.Encoding.DER)
