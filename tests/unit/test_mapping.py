from __future__ import annotations

from typing import Any

import pytest
from certfactory import UPN_OID, pki, upn_other_name
from cryptography import x509
from cryptography.hazmat import asn1
from cryptography.x509.oid import NameOID

from pam_svmm.config import MappingKind, MappingRule
from pam_svmm.domain.mapping import (
    CertificateMapper,
    IdentityMapper,
    MappedIdentity,
    check_user,
    is_valid_username,
)
from pam_svmm.errors import ConfigError, UnknownUser, UserMismatch

K = MappingKind
UID = "0.9.2342.19200300.100.1.1"
UID_OID = x509.ObjectIdentifier(UID)
CN = MappingRule(K.SUBJECT_CN)
UIDRULE = MappingRule(K.SUBJECT_ATTR, oid=UID)
UPN_STRIP = MappingRule(K.UPN, strip_domain=True, domains=("corp.example",))
EMAIL_STRIP = MappingRule(K.EMAIL, strip_domain=True, domains=("corp.example",))


def leaf(**kw: Any) -> x509.Certificate:
    return pki().leaf(**kw).cert


def mapped(rules: list[MappingRule], **leaf_kw: Any) -> MappedIdentity:
    return CertificateMapper(rules).map(leaf(**leaf_kw))


# --- each kind of rule --------------------------------------------------------------------

ALLOW: list[tuple[str, list[MappingRule], dict[str, Any], tuple[str, str, str]]] = [
    # (id, rules, leaf kwargs, (username, rule, source_value))
    ("subject_cn", [CN], {"cn": "alice"}, ("alice", "subject_cn", "alice")),
    (
        "subject_attr uid",
        [UIDRULE],
        {"cn": "Alice Example", "subject_extra": [(UID_OID, "alice")]},
        ("alice", f"subject_attr:{UID}", "alice"),
    ),
    (
        "upn stripped",
        [UPN_STRIP],
        {"upns": ["alice@corp.example"]},
        ("alice", "upn", "alice@corp.example"),
    ),
    (
        "upn domain compared without case",
        [UPN_STRIP],
        {"upns": ["alice@CORP.Example"]},
        ("alice", "upn", "alice@CORP.Example"),
    ),
    (
        "upn any domain",
        [MappingRule(K.UPN, strip_domain=True)],
        {"upns": ["alice@elsewhere.example"]},
        ("alice", "upn", "alice@elsewhere.example"),
    ),
    (
        "upn picks the accepted domain",
        [UPN_STRIP],
        {"upns": ["mallory@evil.example", "alice@corp.example"]},
        ("alice", "upn", "alice@corp.example"),
    ),
    (
        "upn ignores other otherNames",
        [UPN_STRIP],
        {
            "other_names": [x509.OtherName(x509.ObjectIdentifier("1.2.3.4"), b"\x0c\x01x")],
            "upns": ["alice@corp.example"],
        },
        ("alice", "upn", "alice@corp.example"),
    ),
    (
        "same user in two accepted domains",
        [MappingRule(K.UPN, strip_domain=True, domains=("corp.example", "lab.example"))],
        {"upns": ["alice@corp.example", "alice@lab.example"]},
        ("alice", "upn", "alice@corp.example"),
    ),
    (
        "email from SAN",
        [EMAIL_STRIP],
        {"emails": ["alice@corp.example"]},
        ("alice", "email", "alice@corp.example"),
    ),
    (
        "email from subject when no SAN",
        [EMAIL_STRIP],
        {"subject_extra": [(NameOID.EMAIL_ADDRESS, "alice@corp.example")]},
        ("alice", "email", "alice@corp.example"),
    ),
    (
        "email SAN wins over subject",
        [EMAIL_STRIP],
        {
            "emails": ["alice@corp.example"],
            "subject_extra": [(NameOID.EMAIL_ADDRESS, "bob@corp.example")],
        },
        ("alice", "email", "alice@corp.example"),
    ),
    (
        "email subject when SAN domain not accepted",
        [EMAIL_STRIP],
        {
            "emails": ["alice@gmail.example"],
            "subject_extra": [(NameOID.EMAIL_ADDRESS, "alice@corp.example")],
        },
        ("alice", "email", "alice@corp.example"),
    ),
    (
        "first rule that yields wins",
        [UPN_STRIP, CN],
        {"cn": "bob", "upns": ["alice@corp.example"]},
        ("alice", "upn", "alice@corp.example"),
    ),
    (
        "falls through to the next rule",
        [UPN_STRIP, EMAIL_STRIP, CN],
        {"cn": "carol"},
        ("carol", "subject_cn", "carol"),
    ),
    (
        "domain filter falls through",
        [UPN_STRIP, CN],
        {"cn": "carol", "upns": ["alice@evil.example"]},
        ("carol", "subject_cn", "carol"),
    ),
    (
        "value without @ is no upn",
        [UPN_STRIP, CN],
        {"cn": "carol", "upns": ["alice"]},
        ("carol", "subject_cn", "carol"),
    ),
    (
        "two @ is no upn",
        [UPN_STRIP, CN],
        {"cn": "carol", "upns": ["alice@x@corp.example"]},
        ("carol", "subject_cn", "carol"),
    ),
    ("longest valid name", [CN], {"cn": "a" * 32}, ("a" * 32, "subject_cn", "a" * 32)),
    ("underscore dot dash", [CN], {"cn": "_a.b-c9"}, ("_a.b-c9", "subject_cn", "_a.b-c9")),
]


@pytest.mark.parametrize(
    ("rules", "leaf_kw", "want"), [a[1:] for a in ALLOW], ids=[a[0] for a in ALLOW]
)
def test_maps(
    rules: list[MappingRule], leaf_kw: dict[str, Any], want: tuple[str, str, str]
) -> None:
    assert mapped(rules, **leaf_kw) == MappedIdentity(*want)


DENY: list[tuple[str, list[MappingRule], dict[str, Any], str]] = [
    # (id, rules, leaf kwargs, reason)
    ("no CN", [CN], {"cn": None}, "unknown_user"),
    ("no uid", [UIDRULE], {}, "unknown_user"),
    ("no SAN for upn", [UPN_STRIP], {}, "unknown_user"),
    ("upn domain not accepted", [UPN_STRIP], {"upns": ["alice@evil.example"]}, "unknown_user"),
    (
        "upn look-alike domain",
        [UPN_STRIP],
        {"upns": ["alice@corp.example.evil.example"]},
        "unknown_user",
    ),
    ("upn empty local part", [UPN_STRIP], {"upns": ["@corp.example"]}, "unknown_user"),
    (
        "email domain not accepted",
        [EMAIL_STRIP],
        {"emails": ["alice@evil.example"]},
        "unknown_user",
    ),
    ("no rule yields", [UPN_STRIP, EMAIL_STRIP, UIDRULE], {}, "unknown_user"),
    (
        "upn kept whole is no POSIX name",
        [MappingRule(K.UPN)],
        {"upns": ["alice@corp.example"]},
        "invalid_username",
    ),
    (
        "invalid first value does not fall through",
        [CN, UIDRULE],
        {"cn": "Alice Example", "subject_extra": [(UID_OID, "alice")]},
        "invalid_username",
    ),
    (
        "two users in one rule",
        [UPN_STRIP],
        {"upns": ["alice@corp.example", "bob@corp.example"]},
        "mapping_ambiguous",
    ),
    (
        "two CNs",
        [CN],
        {"cn": "alice", "subject_extra": [(NameOID.COMMON_NAME, "bob")]},
        "mapping_ambiguous",
    ),
    (
        "upn differing only in case",
        [UPN_STRIP],
        {"upns": ["alice@corp.example", "Alice@corp.example"]},
        "mapping_ambiguous",
    ),
    (
        "upn as IA5String",
        [UPN_STRIP],
        {"other_names": [x509.OtherName(UPN_OID, asn1.encode_der(asn1.IA5String("a@b.c")))]},
        "mapping_malformed",
    ),
    (
        "upn not UTF-8",
        [UPN_STRIP],
        {"other_names": [x509.OtherName(UPN_OID, b"\x0c\x02\xff\xfe")]},
        "mapping_malformed",
    ),
    (
        "upn as SEQUENCE",
        [UPN_STRIP],
        {"other_names": [x509.OtherName(UPN_OID, b"\x30\x03\x0c\x01a")]},
        "mapping_malformed",
    ),
]


@pytest.mark.parametrize(
    ("rules", "leaf_kw", "reason"), [d[1:] for d in DENY], ids=[d[0] for d in DENY]
)
def test_refuses(rules: list[MappingRule], leaf_kw: dict[str, Any], reason: str) -> None:
    with pytest.raises(UnknownUser) as e:
        mapped(rules, **leaf_kw)
    assert e.value.reason == reason


def test_upn_decodes_non_ascii_then_refuses_it() -> None:
    # The UTF8String decodes (library-backed), and the Cyrillic look-alike is then refused.
    with pytest.raises(UnknownUser) as e:
        mapped([UPN_STRIP], upns=["\u0430lice@corp.example"])
    assert e.value.reason == "invalid_username"
    assert "\\u0430lice" in e.value.message or "\u0430lice" in e.value.message


def test_upn_otherName_value_is_der_utf8string() -> None:
    # The factory's encoding is what Windows CAs and OpenSSL write: OtherName.value = DER.
    assert upn_other_name("alice@corp.example").value == b"\x0c\x12alice@corp.example"


# --- user names ---------------------------------------------------------------------------

INVALID_NAMES = [
    "../root",
    "root\x00",
    "Alice ",
    "Alice",
    "ALICE",
    "alice\n",
    " alice",
    "alice ",
    "\u0430lice",  # Cyrillic a
    "\uff41lice",  # fullwidth a
    "al\u200bice",  # zero-width space
    "-alice",
    ".alice",
    "1alice",
    "al/ice",
    "al ice",
    "alice$",
    "alice@corp.example",
    "a" * 33,
    "",
]


# x509 refuses an empty attribute value, so "" is only tested on MappedIdentity.
@pytest.mark.parametrize("name", [n for n in INVALID_NAMES if n])
def test_invalid_names_from_certificates_are_refused(name: str) -> None:
    assert not is_valid_username(name)
    with pytest.raises(UnknownUser) as e:
        mapped([UIDRULE], subject_extra=[(UID_OID, name)])
    assert e.value.reason == "invalid_username"


@pytest.mark.parametrize("name", INVALID_NAMES)
def test_mapped_identity_never_holds_an_invalid_name(name: str) -> None:
    with pytest.raises(UnknownUser):
        MappedIdentity(name, "subject_cn", name)


@pytest.mark.parametrize("name", ["alice", "_svc", "a", "a.b-c_d", "bob9", "a" * 32])
def test_valid_names(name: str) -> None:
    assert is_valid_username(name)
    assert MappedIdentity(name, "subject_cn", name).username == name


def test_mapper_rejects_bad_setup() -> None:
    with pytest.raises(ConfigError) as e:
        CertificateMapper([])
    assert e.value.key == "mapping.rules"
    with pytest.raises(ConfigError) as e:
        CertificateMapper([CN, MappingRule(K.SUBJECT_ATTR, oid="uid")])
    assert e.value.key == "mapping.rules[1].oid"


def test_mapper_is_an_identity_mapper() -> None:
    m: IdentityMapper = CertificateMapper([CN])
    assert m.map(leaf(cn="alice")).username == "alice"


# --- PAM_USER binding ---------------------------------------------------------------------

ALICE = MappedIdentity("alice", "subject_cn", "alice")


@pytest.mark.parametrize("pam_user", [None, "", "alice"])
def test_check_user_accepts(pam_user: str | None) -> None:
    assert check_user(pam_user, ALICE) == "alice"


@pytest.mark.parametrize(
    "pam_user",
    [
        *("bob", "alice2", "alic", "Alice", "ALICE", "alice ", " alice", "alice\n", "alice\x00"),
        *("\u0430lice", "\uff41lice", "al\u200bice", "../alice", "root"),
    ],
)
def test_check_user_refuses_anyone_else(pam_user: str) -> None:
    with pytest.raises(UserMismatch) as e:
        check_user(pam_user, ALICE)
    assert e.value.reason == "user_mismatch"


def test_bob_card_never_logs_in_alice() -> None:
    bob = CertificateMapper([UPN_STRIP, CN]).map(leaf(cn="bob", upns=["bob@corp.example"]))
    with pytest.raises(UserMismatch, match="'bob', not to 'alice'"):
        check_user("alice", bob)
    assert check_user("bob", bob) == "bob"
