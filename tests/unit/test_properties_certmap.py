"""Properties of what the mapper reads from a certificate: arbitrary text in the subject and
the subjectAltName (and damaged DER) ends in a filter whose structure is the template's, a
user name, or a typed error; never another exception. LDAP filter escaping round-trips."""

from __future__ import annotations

import contextlib
import functools
import re
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat import asn1
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.name import _ASN1Type
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from pam_svmm.config import CertmapRule, MappingKind, MappingRule, SanKind
from pam_svmm.domain import certmap
from pam_svmm.domain.certpolicy import parse_certificate
from pam_svmm.domain.mapping import CertificateMapper, check_user
from pam_svmm.errors import CertificateInvalid, UnknownUser, UserMismatch
from tests.unit.certfactory import NOT_AFTER, NOT_BEFORE, UPN_OID
from tests.unit.ldap_filters import parse_filter

# cryptography warns of a CN longer than 64 characters (or empty): that is the point here.
pytestmark = pytest.mark.filterwarnings("ignore:Attribute's length:UserWarning")
PROPS = settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TYPED: tuple[type[Exception], ...] = (UnknownUser, CertificateInvalid)
CUSTOM_OID = x509.ObjectIdentifier("2.5.4.45")
SPECIAL = st.sampled_from(["*", "(", ")", "\\", "\0", "\\2a", ")(uid=*)", "(|", "{cn}", "@", " "])
text = st.lists(st.text(max_size=6) | SPECIAL, max_size=6).map("".join)


@functools.cache
def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _attr(oid: x509.ObjectIdentifier, value: str) -> x509.NameAttribute:
    # No validation: a hostile CA puts any length and any text there.
    return x509.NameAttribute(oid, value, _type=_ASN1Type.UTF8String, _validate=False)


def _general(kind: str, value: str) -> x509.GeneralName:
    if kind == "upn":
        return x509.OtherName(UPN_OID, asn1.encode_der(value))
    if kind == "upn_raw":  # an otherName UPN that is no UTF8String
        return x509.OtherName(UPN_OID, value.encode("utf-8", "surrogatepass"))
    cls = x509.RFC822Name if kind == "email" else x509.DNSName
    # cryptography checks these are IDNA A-labels; certificates on the wire need not be.
    return cls._init_without_validation(value)


@st.composite
def certificates(draw: st.DrawFn) -> bytes:
    subject = [
        _attr(oid, draw(text))
        for oid in draw(
            st.lists(
                st.sampled_from(
                    [
                        NameOID.COMMON_NAME,
                        NameOID.EMAIL_ADDRESS,
                        NameOID.ORGANIZATION_NAME,
                        CUSTOM_OID,
                    ]
                ),
                max_size=4,
            )
        )
    ]
    sans = [
        _general(draw(st.sampled_from(["upn", "upn_raw", "email", "dns"])), draw(text))
        for _ in range(draw(st.integers(0, 3)))
    ]
    b = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(subject))
        .issuer_name(x509.Name([_attr(NameOID.COMMON_NAME, draw(text) or "CA")]))
        .public_key(_key().public_key())
        .serial_number(draw(st.integers(1, 2**159 - 1)))
        .not_valid_before(NOT_BEFORE)
        .not_valid_after(NOT_AFTER)
    )
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    try:
        cert = b.sign(_key(), hashes.SHA256())
    except ValueError:  # the encoder refuses a few (e.g. a lone surrogate)
        assume(False)
    return cert.public_bytes(Encoding.DER)


TEMPLATES = ["(uid={cn})", "(mail={email})", "(&(uid={upn_local})(o=x))", "(cn={subject})",
             "(|(x={issuer})(y={serial}))", "(userPrincipalName={upn})", "(uid={email_local})",
             "(a={subject_attr:2.5.4.45})", "(userCertificate;binary={cert})",
             "(userCertificate={cert_exact})"]  # fmt: skip
RULES = [
    CertmapRule(name=f"r{i}", map=t, match_san=s)
    for i, (t, s) in enumerate(
        [(t, ()) for t in TEMPLATES] + [("(uid={cn})", (SanKind.UPN, SanKind.EMAIL))]
    )
]


def _shape(tree: Any) -> Any:
    """The structure of a parsed filter: operators and attribute names, no values."""
    if isinstance(tree, tuple) and tree and tree[0] in ("&", "|", "!"):
        return (tree[0], *[_shape(k) for k in tree[1:]])
    return tree[0]


@PROPS
@given(der=certificates())
def test_certificate_fields_give_filters_of_the_templates_shape_or_typed_errors(
    der: bytes,
) -> None:
    cert = parse_certificate(der)
    for rule in RULES:
        try:
            ev = certmap.evaluate(rule, cert)
        except TYPED:
            continue
        if not ev.matched:
            continue
        tree: Any = parse_filter(ev.ldap_filter)  # raises on any injected structure
        template_shape: Any = _shape(parse_filter(re.sub(r"\{[^}]*\}", "v", rule.map)))
        if tree[0] == "|" and template_shape[0] != "|":  # several values: an OR of copies
            assert all(_shape(k) == template_shape for k in tree[1:])
        else:
            assert _shape(tree) == template_shape


MAPPINGS = [
    MappingRule(MappingKind.SUBJECT_CN),
    MappingRule(MappingKind.UPN, strip_domain=True),
    MappingRule(MappingKind.EMAIL, domains=("demo.example",)),
    MappingRule(MappingKind.SUBJECT_ATTR, oid="2.5.4.45"),
]


@PROPS
@given(der=certificates(), pam_user=st.none() | text)
def test_the_mapper_gives_a_user_or_a_typed_error(der: bytes, pam_user: str | None) -> None:
    cert = parse_certificate(der)
    for rule in MAPPINGS:
        try:
            mapped = CertificateMapper([rule]).map(cert)
        except UnknownUser:
            continue
        assert isinstance(mapped.username, str)
        with contextlib.suppress(UnknownUser, UserMismatch):
            check_user(pam_user, mapped)


@PROPS
@given(
    der=certificates(),
    at=st.integers(0, 2000) | st.just(-1),  # -1: the version's value byte
    junk=st.binary(min_size=1, max_size=4),
)
def test_damaged_der_is_a_certificate_or_certificate_invalid_and_then_maps_or_refuses(
    der: bytes, at: int, junk: bytes
) -> None:
    at = der.index(bytes.fromhex("a003020102")) + 4 if at < 0 else at % len(der)
    damaged = der[:at] + junk + der[at + len(junk) :]
    try:
        cert = parse_certificate(damaged)
    except CertificateInvalid as e:
        assert e.reason == "certificate_malformed"
        return
    for rule in RULES:
        with contextlib.suppress(*TYPED):
            certmap.evaluate(rule, cert)
    with contextlib.suppress(UnknownUser):
        CertificateMapper(MAPPINGS).map(cert)


def _unescape(escaped: str) -> bytes:
    return re.sub(rb"\\([0-9a-fA-F]{2})", lambda m: bytes([int(m.group(1), 16)]), escaped.encode())


@PROPS
@given(value=st.text() | SPECIAL)
def test_escaping_text_round_trips_and_leaves_no_filter_syntax(value: str) -> None:
    escaped = certmap.escape_value(value)
    assert _unescape(escaped) == value.encode("utf-8")
    assert not re.search(r"[*()\0]", escaped)
    assert not re.search(r"\\(?![0-9a-fA-F]{2})", escaped)  # every backslash starts \xx
    assert parse_filter(f"(uid={escaped})") == ("uid", value.encode("utf-8"))


@PROPS
@given(value=st.binary())
def test_escaping_bytes_round_trips_and_escapes_every_byte(value: bytes) -> None:
    escaped = certmap.escape_value(value)
    assert re.fullmatch(r"(\\[0-9a-f]{2})*", escaped)
    assert _unescape(escaped) == value
