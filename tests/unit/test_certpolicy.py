from __future__ import annotations

import hashlib
import ipaddress
from dataclasses import replace
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from certfactory import (
    CLIENT_AUTH,
    EMAIL_PROTECTION,
    NOT_AFTER,
    NOT_BEFORE,
    NOW,
    SERVER_AUTH,
    SMARTCARD_LOGON,
    UPN_OID,
    make_ca,
    make_leaf,
    pki,
)
from cryptography import x509
from cryptography.hazmat import asn1
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID

from pam_svmm.config import TrustConfig
from pam_svmm.domain.certpolicy import (
    CertPolicy,
    check_name_constraints,
    describe,
    fingerprint,
    parse_certificate,
    validate_chain,
)
from pam_svmm.errors import (
    AuthFailed,
    CertificateInvalid,
    CertificateUntrusted,
    ConfigError,
    NameConstraintsViolated,
)

POLICY = CertPolicy.from_config(TrustConfig())
P = pki()
ANCHORS = [P.root.cert]
INTER = [P.intermediate.cert]
SECOND = timedelta(seconds=1)


def test_policy_from_default_config() -> None:
    assert POLICY.extended_key_usages == ("1.3.6.1.5.5.7.3.2", "1.3.6.1.4.1.311.20.2.2")
    assert POLICY.key_usages == ("digital_signature",)
    assert POLICY.max_chain_depth == 5
    assert POLICY.allow_missing_eku is False


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"extended_key_usages": ()}, "trust.extended_key_usages"),
        ({"extended_key_usages": ("clientAuth",)}, "trust.extended_key_usages"),
        ({"key_usages": ("key_cert_sign",)}, "trust.key_usages"),
        ({"max_chain_depth": 0}, "trust.max_chain_depth"),
        ({"max_chain_depth": 17}, "trust.max_chain_depth"),
    ],
)
def test_policy_rejects_bad_values(kwargs: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError) as e:
        replace(POLICY, **kwargs)
    assert e.value.key == key


# --- accepted -----------------------------------------------------------------------------

ALLOW: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    # (id, leaf kwargs, validate_chain overrides)
    ("default", {}, {}),
    ("smartcardLogon only", {"eku": (SMARTCARD_LOGON,)}, {}),
    ("clientAuth only", {"eku": (CLIENT_AUTH,)}, {}),
    ("extra EKUs", {"eku": (EMAIL_PROTECTION, SMARTCARD_LOGON)}, {}),
    ("EC P-384", {"key_kind": "p384"}, {}),
    ("RSA-2048", {"key_kind": "rsa2048"}, {}),
    ("RSA-3072", {"key_kind": "rsa3072"}, {}),
    ("no SAN, no CN", {"cn": None}, {}),
    ("UPN and email SAN", {"upns": ["alice@corp.example"], "emails": ["a@corp.example"]}, {}),
    ("extra key usages", {"ku": ("digital_signature", "key_encipherment")}, {}),
    ("at exactly not_before", {}, {"at": NOT_BEFORE}),
    ("at exactly not_after", {}, {"at": NOT_AFTER}),
    ("at in another time zone", {}, {"at": NOW.astimezone(timezone(timedelta(hours=-7)))}),
    ("no EKU when allowed", {"eku": None}, {"policy": replace(POLICY, allow_missing_eku=True)}),
    ("no KU when none required", {"ku": None}, {"policy": replace(POLICY, key_usages=())}),
    (
        "dotted custom EKU",
        {"eku": (EMAIL_PROTECTION,)},
        {"policy": replace(POLICY, extended_key_usages=(EMAIL_PROTECTION.dotted_string,))},
    ),
]


@pytest.mark.parametrize(("leaf_kw", "over"), [a[1:] for a in ALLOW], ids=[a[0] for a in ALLOW])
def test_accepts(leaf_kw: dict[str, Any], over: dict[str, Any]) -> None:
    leaf = P.leaf(**leaf_kw).cert
    args: dict[str, Any] = {"at": NOW, "policy": POLICY, **over}
    chain = validate_chain(leaf, INTER, ANCHORS, **args)
    assert chain == [leaf, P.intermediate.cert, P.root.cert]


def test_leaf_directly_under_anchor_needs_no_intermediate() -> None:
    leaf = make_leaf(P.root).cert
    assert validate_chain(leaf, [], ANCHORS, at=NOW, policy=POLICY) == [leaf, P.root.cert]


def test_unrelated_intermediates_and_anchors_are_ignored() -> None:
    other = pki("p256", "p256")
    leaf = P.leaf().cert
    chain = validate_chain(
        leaf,
        [other.intermediate.cert, *INTER],
        [other.root.cert, P.root.cert],
        at=NOW,
        policy=POLICY,
    )
    assert chain == [leaf, P.intermediate.cert, P.root.cert]


def test_ca_constrained_to_smartcard_logon_is_accepted() -> None:
    ca = make_ca("SC CA", issuer=P.root, slot=11, eku=[SMARTCARD_LOGON])
    leaf = make_leaf(ca, eku=(SMARTCARD_LOGON,)).cert
    assert validate_chain(leaf, [ca.cert], ANCHORS, at=NOW, policy=POLICY)[1] == ca.cert


@pytest.mark.parametrize(("depth", "ok"), [(1, False), (2, True), (3, True)])
def test_max_chain_depth_counts_intermediates(depth: int, ok: bool) -> None:
    i1 = make_ca("Level 1 CA", issuer=P.root, slot=12)
    i2 = make_ca("Level 2 CA", issuer=i1, slot=13)
    leaf = make_leaf(i2).cert
    policy = replace(POLICY, max_chain_depth=depth)
    if ok:
        chain = validate_chain(leaf, [i1.cert, i2.cert], ANCHORS, at=NOW, policy=policy)
        assert chain == [leaf, i2.cert, i1.cert, P.root.cert]
    else:
        with pytest.raises(CertificateUntrusted, match="max depth"):
            validate_chain(leaf, [i1.cert, i2.cert], ANCHORS, at=NOW, policy=policy)


# --- refused by the leaf checks, each with its own reason ---------------------------------

DENY_LEAF: list[tuple[str, dict[str, Any], dict[str, Any], str]] = [
    ("expired by 1s", {}, {"at": NOT_AFTER + SECOND}, "certificate_expired"),
    (
        "expired by 1us",
        {},
        {"at": NOT_AFTER + timedelta(microseconds=1)},
        "certificate_expired",
    ),
    ("not yet valid by 1s", {}, {"at": NOT_BEFORE - SECOND}, "certificate_not_yet_valid"),
    ("no KU extension", {"ku": None}, {}, "key_usage_missing"),
    ("KU without digitalSignature", {"ku": ("key_encipherment",)}, {}, "key_usage_missing"),
    (
        "KU lacks one of two required",
        {},
        {"policy": replace(POLICY, key_usages=("digital_signature", "content_commitment"))},
        "key_usage_missing",
    ),
    ("no EKU extension", {"eku": None}, {}, "eku_missing"),
    ("serverAuth only", {"eku": (SERVER_AUTH,)}, {}, "eku_missing"),
    ("emailProtection only", {"eku": (EMAIL_PROTECTION,)}, {}, "eku_missing"),
    (
        "anyEKU not configured",
        {"eku": (ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE,)},
        {},
        "eku_missing",
    ),
    ("weak RSA-1024", {"key_kind": "rsa1024"}, {}, "weak_key"),
    ("EC P-521", {"key_kind": "p521"}, {}, "weak_key"),
    ("EC secp256k1", {"key_kind": "secp256k1"}, {}, "weak_key"),
    ("Ed25519", {"key_kind": "ed25519"}, {}, "weak_key"),
    # The order is fixed: validity, then key, then KU, then EKU.
    (
        "expired and weak",
        {"key_kind": "rsa1024"},
        {"at": NOT_AFTER + SECOND},
        "certificate_expired",
    ),
    ("weak and no KU", {"key_kind": "rsa1024", "ku": None}, {}, "weak_key"),
    ("no KU and no EKU", {"ku": None, "eku": None}, {}, "key_usage_missing"),
]


@pytest.mark.parametrize(
    ("leaf_kw", "over", "reason"), [d[1:] for d in DENY_LEAF], ids=[d[0] for d in DENY_LEAF]
)
def test_refuses_leaf(leaf_kw: dict[str, Any], over: dict[str, Any], reason: str) -> None:
    leaf = P.leaf(**leaf_kw).cert
    args: dict[str, Any] = {"at": NOW, "policy": POLICY, **over}
    with pytest.raises(CertificateInvalid) as e:
        validate_chain(leaf, INTER, ANCHORS, **args)
    assert e.value.reason == reason
    assert type(e.value) is CertificateInvalid


def test_leaf_checks_come_before_path_building() -> None:
    # An expired leaf from an untrusted CA reports the expiry, not the missing path.
    stranger = pki("p256", "p256")
    leaf = stranger.leaf().cert
    with pytest.raises(CertificateInvalid) as e:
        validate_chain(leaf, [], ANCHORS, at=NOT_AFTER + SECOND, policy=POLICY)
    assert e.value.reason == "certificate_expired"


# --- refused by path building -------------------------------------------------------------


def _impostor_leaf() -> x509.Certificate:
    # Same issuer name and key identifier as the real intermediate, signed by another key.
    fake = make_ca("Test Issuing CA", issuer=P.root, key_kind="p384", slot=21)
    forged = make_leaf(fake).cert
    real = make_leaf(P.intermediate).cert
    assert forged.issuer == real.issuer
    return forged


def _expired_intermediate_leaf() -> tuple[x509.Certificate, x509.Certificate]:
    inter = make_ca(
        "Old CA",
        issuer=P.root,
        slot=22,
        not_before=NOW - timedelta(days=900),
        not_after=NOW - SECOND,
    )
    return make_leaf(inter).cert, inter.cert


def test_untrusted_ca() -> None:
    stranger = pki("p256", "p256")
    with pytest.raises(CertificateUntrusted):
        validate_chain(
            stranger.leaf().cert, [stranger.intermediate.cert], ANCHORS, at=NOW, policy=POLICY
        )


def test_intermediate_missing() -> None:
    with pytest.raises(CertificateUntrusted, match="no valid chain"):
        validate_chain(P.leaf().cert, [], ANCHORS, at=NOW, policy=POLICY)


def test_intermediate_as_anchor_is_enough() -> None:
    leaf = P.leaf().cert
    chain = validate_chain(leaf, [], [P.intermediate.cert], at=NOW, policy=POLICY)
    assert chain == [leaf, P.intermediate.cert]


def _tampered_leaf() -> x509.Certificate:
    # A genuine leaf whose signature value has one bit flipped (the last DER byte is in it).
    der = bytearray(P.leaf().cert.public_bytes(Encoding.DER))
    der[-1] ^= 0x01
    return parse_certificate(bytes(der))


@pytest.mark.parametrize("make", [_impostor_leaf, _tampered_leaf], ids=["impostor", "tampered"])
def test_forged_signature(make: Any) -> None:
    with pytest.raises(CertificateUntrusted):
        validate_chain(make(), INTER, ANCHORS, at=NOW, policy=POLICY)


def test_expired_intermediate() -> None:
    leaf, inter = _expired_intermediate_leaf()
    with pytest.raises(CertificateUntrusted):
        validate_chain(leaf, [inter], ANCHORS, at=NOW, policy=POLICY)


def test_intermediate_with_weak_rsa_key() -> None:
    weak = make_ca("Weak CA", issuer=P.root, key_kind="rsa1024")
    with pytest.raises(CertificateUntrusted):
        validate_chain(make_leaf(weak).cert, [weak.cert], ANCHORS, at=NOW, policy=POLICY)


def test_ca_whose_eku_excludes_login() -> None:
    ca = make_ca("Mail CA", issuer=P.root, slot=23, eku=[EMAIL_PROTECTION])
    leaf = make_leaf(ca).cert
    with pytest.raises(CertificateUntrusted, match="EKU excludes login"):
        validate_chain(leaf, [ca.cert], ANCHORS, at=NOW, policy=POLICY)


def test_ca_certificate_as_leaf() -> None:
    ca = make_ca("Sneaky CA", issuer=P.root, slot=24, eku=[CLIENT_AUTH])
    with pytest.raises(CertificateUntrusted):
        validate_chain(ca.cert, [], ANCHORS, at=NOW, policy=POLICY)


def test_no_anchors() -> None:
    with pytest.raises(CertificateUntrusted, match="no trust anchors"):
        validate_chain(P.leaf().cert, INTER, [], at=NOW, policy=POLICY)


def test_naive_time_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="timezone"):
        validate_chain(P.leaf().cert, INTER, ANCHORS, at=datetime(2025, 6, 1), policy=POLICY)


def test_every_refusal_is_an_auth_failure() -> None:
    # Fail closed: each of these is in the "answer is no" branch, never something else.
    leaf, inter = _expired_intermediate_leaf()
    cases = [
        (_impostor_leaf(), INTER),
        (_tampered_leaf(), INTER),
        (leaf, [inter]),
        (P.leaf(key_kind="rsa1024").cert, INTER),
    ]
    for cert, inters in cases:
        with pytest.raises(AuthFailed):
            validate_chain(cert, inters, ANCHORS, at=NOW, policy=POLICY)


# --- parsing, fingerprint, description ----------------------------------------------------


def test_parse_certificate_roundtrip() -> None:
    cert = P.leaf().cert
    assert parse_certificate(cert.public_bytes(Encoding.DER)) == cert


_DER = P.leaf().cert.public_bytes(Encoding.DER)
_PEM = P.leaf().cert.public_bytes(Encoding.PEM)


@pytest.mark.parametrize(
    "der",
    [b"", b"not a certificate", _DER[:-10], _DER + b"\x00", _PEM, b"\x30\x03\x02\x01\x01"],
    ids=["empty", "garbage", "truncated", "trailing", "pem", "wrong-structure"],
)
def test_parse_certificate_malformed(der: bytes) -> None:
    with pytest.raises(CertificateInvalid) as e:
        parse_certificate(der)
    assert e.value.reason == "certificate_malformed"


def test_fingerprint_is_lowercase_sha256_of_der() -> None:
    cert = P.leaf().cert
    fp = fingerprint(cert)
    assert fp == hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest()
    assert fp == fp.lower()
    assert len(fp) == 64


@pytest.mark.parametrize(
    ("key_kind", "key_type"),
    [("p256", "EC P-256"), ("p384", "EC P-384"), ("rsa2048", "RSA-2048"), ("ed25519", "Ed25519")],
)
def test_describe(key_kind: str, key_type: str) -> None:
    cert = P.leaf(key_kind=key_kind, cn="alice").cert
    d = describe(cert)
    assert d == {
        "subject": "CN=alice,O=Example Org",
        "issuer": "CN=Test Issuing CA,O=Example Org",
        "serial": format(cert.serial_number, "x"),
        "not_before": NOT_BEFORE.isoformat(),
        "not_after": NOT_AFTER.isoformat(),
        "key_type": key_type,
        "fingerprint_sha256": fingerprint(cert),
    }
    assert d["not_before"].endswith("+00:00")


def test_describe_times_are_utc() -> None:
    assert datetime.fromisoformat(describe(P.leaf().cert)["not_after"]).tzinfo == UTC


# --- name constraints: every name the mapper can use lies within every CA's subtrees -------

_EMAIL = x509.oid.NameOID.EMAIL_ADDRESS
_CORP = x509.Name([x509.NameAttribute(x509.oid.NameOID.ORGANIZATION_NAME, "Corp")])
_EXAMPLE_ORG = x509.Name([x509.NameAttribute(x509.oid.NameOID.ORGANIZATION_NAME, "Example Org")])


def _nc(
    permitted: list[x509.GeneralName] | None = None,
    excluded: list[x509.GeneralName] | None = None,
) -> x509.NameConstraints:
    return x509.NameConstraints(permitted_subtrees=permitted, excluded_subtrees=excluded)


def _constrained_ca(nc: x509.NameConstraints, *, critical: bool = True, slot: int = 40) -> Any:
    return make_ca("Constrained CA", issuer=P.root, slot=slot, name_constraints=nc,
                   name_constraints_critical=critical)  # fmt: skip


def test_subject_email_outside_a_permitted_rfc822_subtree_is_refused() -> None:
    # The reported hole: no SAN, subject emailAddress admin@evil.org under a CA permitted
    # only rfc822Name corp.example. RFC 5280 4.2.1.10 applies the constraint to it.
    ca = _constrained_ca(_nc(permitted=[x509.RFC822Name("corp.example")]))
    leaf = make_leaf(ca, cn=None, subject_extra=[(_EMAIL, "admin@evil.org")]).cert
    with pytest.raises(CertificateUntrusted) as e:
        validate_chain(leaf, [ca.cert], ANCHORS, at=NOW, policy=POLICY)
    assert e.value.reason == "name_constraints"
    assert "admin@evil.org" in e.value.message and "corp.example" in e.value.message


NC_DENY: list[tuple[str, x509.NameConstraints, bool, dict[str, Any]]] = [
    # (id, the CA's constraints, critical, leaf kwargs): cryptography's verifier passes each.
    (
        "subject email in an excluded rfc822 subtree",
        _nc(excluded=[x509.RFC822Name("evil.org")]),
        True,
        {"subject_extra": [(_EMAIL, "admin@evil.org")]},
    ),
    (
        "subject email beside an in-subtree SAN email",
        _nc(permitted=[x509.RFC822Name("corp.example")]),
        True,
        {"emails": ["admin@corp.example"], "subject_extra": [(_EMAIL, "admin@evil.org")]},
    ),
    (
        "subject email in a subdomain-only subtree's parent",
        _nc(permitted=[x509.RFC822Name(".corp.example")]),
        True,
        {"subject_extra": [(_EMAIL, "admin@corp.example")]},
    ),
    (
        "UPN domain outside the permitted rfc822 subtree",
        _nc(permitted=[x509.RFC822Name("corp.example")]),
        True,
        {"upns": ["admin@evil.org"]},
    ),
    (
        "UPN domain in an excluded rfc822 subtree",
        _nc(excluded=[x509.RFC822Name("evil.org")]),
        True,
        {"upns": ["admin@evil.org"]},
    ),
    (
        "UPN under a CA permitted only DNS names",
        _nc(permitted=[x509.DNSName("corp.example")]),
        True,
        {"upns": ["admin@corp.example"]},
    ),
    (
        "subject outside a permitted directoryName (non-critical: the verifier skips it)",
        _nc(permitted=[x509.DirectoryName(_CORP)]),
        False,
        {"cn": "admin"},
    ),
    (
        "subject in an excluded directoryName (non-critical)",
        _nc(excluded=[x509.DirectoryName(_EXAMPLE_ORG)]),
        False,
        {"cn": "admin"},
    ),
]


@pytest.mark.parametrize(
    ("nc", "critical", "leaf_kw"), [d[1:] for d in NC_DENY], ids=[d[0] for d in NC_DENY]
)
def test_names_outside_the_name_constraints_are_refused(
    nc: x509.NameConstraints, critical: bool, leaf_kw: dict[str, Any]
) -> None:
    ca = _constrained_ca(nc, critical=critical)
    leaf = make_leaf(ca, **leaf_kw).cert
    with pytest.raises(CertificateUntrusted) as e:
        validate_chain(leaf, [ca.cert], ANCHORS, at=NOW, policy=POLICY)
    assert e.value.reason == "name_constraints", e.value.message


def test_constraints_of_every_ca_in_the_chain_apply() -> None:
    # The intermediate is unconstrained; the CA above it permits corp.example only.
    upper = _constrained_ca(_nc(permitted=[x509.RFC822Name("corp.example")]), slot=41)
    lower = make_ca("Issuing CA", issuer=upper, slot=42)
    leaf = make_leaf(lower, upns=["admin@evil.org"]).cert
    with pytest.raises(CertificateUntrusted) as e:
        validate_chain(leaf, [upper.cert, lower.cert], ANCHORS, at=NOW, policy=POLICY)
    assert e.value.reason == "name_constraints"
    assert "Constrained CA" in e.value.message


NC_ALLOW: list[tuple[str, x509.NameConstraints, bool, dict[str, Any]]] = [
    (
        "subject email in the permitted domain",
        _nc(permitted=[x509.RFC822Name("corp.example")]),
        True,
        {"subject_extra": [(_EMAIL, "admin@corp.example")]},
    ),
    (
        "subject email domain differs only in case",
        _nc(permitted=[x509.RFC822Name("corp.example")]),
        True,
        {"subject_extra": [(_EMAIL, "admin@CORP.example")]},
    ),
    (
        "subject email in a permitted subdomain subtree",
        _nc(permitted=[x509.RFC822Name(".corp.example")]),
        True,
        {"subject_extra": [(_EMAIL, "admin@mail.corp.example")]},
    ),
    (
        "UPN and email in the permitted domain",
        _nc(permitted=[x509.RFC822Name("corp.example")]),
        True,
        {"upns": ["admin@corp.example"], "emails": ["admin@corp.example"]},
    ),
    (
        "UPN beside an excluded domain",
        _nc(excluded=[x509.RFC822Name("evil.org")]),
        True,
        {"upns": ["admin@corp.example"]},
    ),
    (
        "DNS constraint leaves the subject email alone",
        _nc(permitted=[x509.DNSName("corp.example")]),
        True,
        {"subject_extra": [(_EMAIL, "admin@evil.org")], "dns_names": ["h.corp.example"]},
    ),
    (
        "subject under the permitted directoryName",
        _nc(permitted=[x509.DirectoryName(_EXAMPLE_ORG)]),
        False,
        {"cn": "admin"},
    ),
    (
        "directoryName compared without case",
        _nc(
            permitted=[
                x509.DirectoryName(
                    x509.Name(
                        [x509.NameAttribute(x509.oid.NameOID.ORGANIZATION_NAME, "example  ORG")]
                    )
                )
            ]
        ),
        False,
        {"cn": "admin"},
    ),
]


@pytest.mark.parametrize(
    ("nc", "critical", "leaf_kw"), [a[1:] for a in NC_ALLOW], ids=[a[0] for a in NC_ALLOW]
)
def test_names_within_the_name_constraints_are_accepted(
    nc: x509.NameConstraints, critical: bool, leaf_kw: dict[str, Any]
) -> None:
    ca = _constrained_ca(nc, critical=critical)
    leaf = make_leaf(ca, **leaf_kw).cert
    assert validate_chain(leaf, [ca.cert], ANCHORS, at=NOW, policy=POLICY)[0] == leaf


# The forms cryptography's verifier already refuses or checks: the same rule holds when the
# check runs on its own (defence in depth if the verifier's coverage ever changes).
_UPN_SUBTREE = x509.OtherName(UPN_OID, asn1.encode_der("corp.example"))
NC_DIRECT: list[tuple[str, x509.NameConstraints, dict[str, Any], bool]] = [
    # (id, constraints, leaf kwargs, accepted)
    ("URI host in", _nc(permitted=[x509.UniformResourceIdentifier("h.corp.example")]),
     {"more_sans": [x509.UniformResourceIdentifier("https://h.corp.example/x")]}, True),
    ("URI host out", _nc(permitted=[x509.UniformResourceIdentifier("h.corp.example")]),
     {"more_sans": [x509.UniformResourceIdentifier("https://evil.org/x")]}, False),
    ("URI below a .domain", _nc(permitted=[x509.UniformResourceIdentifier(".corp.example")]),
     {"more_sans": [x509.UniformResourceIdentifier("ldap://a.corp.example")]}, True),
    ("URI without a host", _nc(permitted=[x509.UniformResourceIdentifier(".corp.example")]),
     {"more_sans": [x509.UniformResourceIdentifier("urn:corp.example")]}, False),
    ("IP in", _nc(permitted=[x509.IPAddress(ipaddress.ip_network("10.0.0.0/8"))]),
     {"more_sans": [x509.IPAddress(ipaddress.ip_address("10.1.2.3"))]}, True),
    ("IP out", _nc(permitted=[x509.IPAddress(ipaddress.ip_network("10.0.0.0/8"))]),
     {"more_sans": [x509.IPAddress(ipaddress.ip_address("192.168.1.1"))]}, False),
    ("IPv6 against IPv4", _nc(permitted=[x509.IPAddress(ipaddress.ip_network("10.0.0.0/8"))]),
     {"more_sans": [x509.IPAddress(ipaddress.ip_address("::1"))]}, False),
    ("DNS excluded", _nc(excluded=[x509.DNSName("evil.org")]), {"dns_names": ["a.EVIL.org"]},
     False),
    ("DNS look-alike", _nc(permitted=[x509.DNSName("corp.example")]),
     {"dns_names": ["evilcorp.example"]}, False),
    ("SAN email in", _nc(permitted=[x509.RFC822Name("corp.example")]),
     {"emails": ["a@corp.example"]}, True),
    ("mailbox subtree", _nc(permitted=[x509.RFC822Name("a@corp.example")]),
     {"emails": ["b@corp.example"]}, False),
    ("SAN directoryName out", _nc(permitted=[x509.DirectoryName(_EXAMPLE_ORG)]),
     {"more_sans": [x509.DirectoryName(_CORP)]}, False),
    ("UPN subtree in", _nc(permitted=[_UPN_SUBTREE]), {"upns": ["a@corp.example"]}, True),
    ("UPN subtree out", _nc(permitted=[_UPN_SUBTREE]), {"upns": ["a@evil.org"]}, False),
    ("UPN subtree excluded", _nc(excluded=[_UPN_SUBTREE]), {"upns": ["a@corp.example"]}, False),
    ("UPN that does not decode", _nc(excluded=[x509.RFC822Name("evil.org")]),
     {"other_names": [x509.OtherName(UPN_OID, b"\x04\x01a")]}, False),
    ("unconstrained forms pass",
     _nc(permitted=[x509.IPAddress(ipaddress.ip_network("10.0.0.0/8"))]),
     {"emails": ["a@evil.org"], "dns_names": ["evil.org"]}, True),
]  # fmt: skip


@pytest.mark.parametrize(
    ("nc", "leaf_kw", "ok"), [d[1:] for d in NC_DIRECT], ids=[d[0] for d in NC_DIRECT]
)
def test_check_name_constraints_by_form(
    nc: x509.NameConstraints, leaf_kw: dict[str, Any], ok: bool
) -> None:
    ca = _constrained_ca(nc, slot=43)
    chain = [make_leaf(ca, **leaf_kw).cert, ca.cert, P.root.cert]
    if ok:
        check_name_constraints(chain)
    else:
        with pytest.raises(NameConstraintsViolated):
            check_name_constraints(chain)


def test_intermediate_subjects_are_checked_and_self_issued_ones_are_not() -> None:
    top = _constrained_ca(_nc(permitted=[x509.DirectoryName(_CORP)]), slot=45)
    lower = make_ca("Issuing CA", issuer=top, slot=46)  # O=Example Org: outside O=Corp
    leaf = make_leaf(lower, subject=_CORP).cert
    with pytest.raises(NameConstraintsViolated, match="Issuing CA"):
        check_name_constraints([leaf, lower.cert, top.cert])
    # A self-issued certificate (a re-keyed CA) is exempt from its own CA's constraints.
    rekeyed = make_ca("Constrained CA", issuer=top, slot=47)
    check_name_constraints([make_leaf(rekeyed, subject=_CORP).cert, rekeyed.cert, top.cert])


def _duplicate_extension_der() -> bytes:
    """A leaf whose basicConstraints appears twice (cryptography's builder refuses to make
    one, so a placeholder OID of the same DER length is renamed afterwards)."""
    base = P.leaf().cert
    b = (
        x509.CertificateBuilder()
        .subject_name(base.subject)
        .issuer_name(base.issuer)
        .public_key(base.public_key())  # type: ignore[arg-type]
        .serial_number(base.serial_number)
        .not_valid_before(base.not_valid_before_utc)
        .not_valid_after(base.not_valid_after_utc)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
    )
    bc = x509.BasicConstraints(ca=False, path_length=None).public_bytes()
    b = b.add_extension(x509.UnrecognizedExtension(x509.ObjectIdentifier("2.5.29.99"), bc), True)
    der = b.sign(P.intermediate.key, hashes.SHA256()).public_bytes(Encoding.DER)
    return der.replace(b"\x06\x03\x55\x1d\x63", b"\x06\x03\x55\x1d\x13")


def test_a_duplicate_extension_is_a_malformed_certificate() -> None:
    # cryptography raises DuplicateExtension (not a ValueError) when the extensions are read.
    with pytest.raises(CertificateInvalid) as e:
        parse_certificate(_duplicate_extension_der())
    assert e.value.reason == "certificate_malformed" and "Duplicate" in e.value.message
