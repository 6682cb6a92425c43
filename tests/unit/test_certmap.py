"""Certificate mapping rules (pure): match parts, template fields, priority, escaping."""

from __future__ import annotations

import re

import pytest
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from pam_svmm.config import CertmapRule, SanKind, parse
from pam_svmm.domain import certmap
from pam_svmm.errors import ConfigError, UnknownUser
from tests.unit.certfactory import (
    CLIENT_AUTH,
    EMAIL_PROTECTION,
    SMARTCARD_LOGON,
    make_ca,
    make_leaf,
    pki,
)
from tests.unit.ldap_filters import parse_filter

UID_OID = NameOID.USER_ID  # 0.9.2342.19200300.100.1.1
INJECTION = "x*)(uid=*)(|(cn=\\\x00"


def rule(map_: str = "(uid={cn})", **kw: object) -> CertmapRule:
    return CertmapRule(name=str(kw.pop("name", "r")), map=map_, **kw)  # type: ignore[arg-type]


def leaf(**kw: object):
    return pki().leaf(**kw).cert


# --- the strict RFC 4515 reader (tests/unit/ldap_filters.py): the ground truth ------------


def test_reader_sees_an_unescaped_injection() -> None:
    # Sanity of the ground truth: the naive substitution would be caught.
    naive = "(uid={cn})".replace("{cn}", "x)(uid=*")
    with pytest.raises(ValueError):
        parse_filter(naive)


# --- match part ---------------------------------------------------------------------------


def test_empty_match_part_matches_any_certificate() -> None:
    ev = certmap.evaluate(rule(), leaf(cn="alice"))
    assert ev.matched and ev.ldap_filter == "(uid=alice)" and ev.detail == ""


@pytest.mark.parametrize(
    ("pattern", "expected"),
    [
        ("^CN=Test Issuing CA,O=Example Org$", True),
        ("Issuing", True),  # searched, not anchored (SSSD's regexec)
        ("^O=Example Org", False),  # RFC 4514 order: the CN comes first
        ("^CN=Other CA", False),
    ],
)
def test_issuer_regex(pattern: str, expected: bool) -> None:
    ev = certmap.evaluate(rule(match_issuer=pattern), leaf())
    assert ev.matched is expected
    if not expected:
        assert "issuer does not match" in ev.detail


def test_subject_regex() -> None:
    cert = leaf(cn="alice")
    assert certmap.rule_matches(rule(match_subject=r"^CN=alice,O=Example Org$"), cert)
    assert not certmap.rule_matches(rule(match_subject=r"^CN=bob,"), cert)


def test_eku_must_all_be_present() -> None:
    cert = leaf(eku=(CLIENT_AUTH, SMARTCARD_LOGON))
    both = rule(match_ekus=(CLIENT_AUTH.dotted_string, SMARTCARD_LOGON.dotted_string))
    assert certmap.rule_matches(both, cert)
    ev = certmap.evaluate(rule(match_ekus=(EMAIL_PROTECTION.dotted_string,)), cert)
    assert not ev.matched and EMAIL_PROTECTION.dotted_string in ev.detail
    assert not certmap.rule_matches(both, leaf(eku=None))  # no EKU extension at all


@pytest.mark.parametrize(
    ("kind", "kw"),
    [
        (SanKind.UPN, {"upns": ["alice@demo.example"]}),
        (SanKind.EMAIL, {"emails": ["alice@demo.example"]}),
        (SanKind.DNS, {"dns_names": ["host.demo.example"]}),
    ],
)
def test_san_kind_required(kind: SanKind, kw: dict[str, object]) -> None:
    assert certmap.rule_matches(rule(match_san=(kind,)), leaf(**kw))
    ev = certmap.evaluate(rule(match_san=(kind,)), leaf())
    assert not ev.matched and kind.value in ev.detail
    # A SAN of another kind does not count.
    other = {"dns_names": ["h.example"]} if kind is not SanKind.DNS else {"emails": ["a@b.c"]}
    assert not certmap.rule_matches(rule(match_san=(kind,)), leaf(**other))


def test_all_conditions_must_hold() -> None:
    cert = leaf(cn="alice", upns=["alice@demo.example"])
    r = rule(match_issuer="Issuing", match_subject="alice", match_san=(SanKind.UPN,))
    assert certmap.rule_matches(r, cert)
    assert not certmap.rule_matches(
        rule(match_issuer="Issuing", match_subject="bob", match_san=(SanKind.UPN,)), cert
    )


# --- every template field ------------------------------------------------------------------


def test_cert_field_escapes_every_byte() -> None:
    cert = leaf()
    der = cert.public_bytes(Encoding.DER)
    f = certmap.render_filter(rule("(userCertificate;binary={cert})"), cert)
    assert f == "(userCertificate;binary=" + "".join(f"\\{b:02x}" for b in der) + ")"
    assert parse_filter(f) == ("userCertificate;binary", der)


def test_subject_and_issuer_fields_are_rfc4514() -> None:
    cert = leaf(cn="alice")
    f = certmap.render_filter(rule("(svmmCertMapping=X509:<I>{issuer}<S>{subject})"), cert)
    assert (
        f == "(svmmCertMapping=X509:<I>CN=Test Issuing CA,O=Example Org<S>CN=alice,O=Example Org)"
    )


def test_serial_field_is_uppercase_der_hex() -> None:
    cert = leaf()
    f = certmap.render_filter(rule("(serial={serial})"), cert)
    n = cert.serial_number
    value = f[len("(serial=") : -1]
    assert value == value.upper() and len(value) % 2 == 0
    assert int(value, 16) == n


def test_serial_with_high_bit_keeps_the_der_leading_zero() -> None:
    from pam_svmm.domain.certmap import _serial_hex

    class Fake:
        serial_number = 0x80FF

    assert _serial_hex(Fake()) == "0080FF"  # type: ignore[arg-type]
    Fake.serial_number = 0x7F
    assert _serial_hex(Fake()) == "7F"  # type: ignore[arg-type]


def test_upn_and_email_fields_and_their_local_parts() -> None:
    cert = leaf(upns=["alice@demo.example"], emails=["a.smith@mail.example"])
    assert certmap.render_filter(rule("(p={upn})"), cert) == "(p=alice@demo.example)"
    assert certmap.render_filter(rule("(uid={upn_local})"), cert) == "(uid=alice)"
    assert certmap.render_filter(rule("(mail={email})"), cert) == "(mail=a.smith@mail.example)"
    assert certmap.render_filter(rule("(uid={email_local})"), cert) == "(uid=a.smith)"


def test_email_falls_back_to_subject_email_address() -> None:
    cert = leaf(subject_extra=[(NameOID.EMAIL_ADDRESS, "legacy@demo.example")])
    assert certmap.render_filter(rule("(mail={email})"), cert) == "(mail=legacy@demo.example)"


def test_cn_and_subject_attr_fields() -> None:
    cert = leaf(cn="Alice Smith", subject_extra=[(UID_OID, "asmith")])
    assert certmap.render_filter(rule("(cn={cn})"), cert) == "(cn=Alice Smith)"
    r = rule(f"(uid={{subject_attr:{UID_OID.dotted_string}}})")
    assert certmap.render_filter(r, cert) == "(uid=asmith)"


def test_bad_subject_attr_oid_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="not a dotted OID"):
        certmap.evaluate(rule("(uid={subject_attr:uid})"), leaf())


def test_several_fields_in_one_template() -> None:
    cert = leaf(cn="alice", upns=["alice@demo.example"])
    f = certmap.render_filter(rule("(&(cn={cn})(svmmPrincipalName={upn}))"), cert)
    assert parse_filter(f) == ("&", ("cn", b"alice"), ("svmmPrincipalName", b"alice@demo.example"))


def test_missing_value_means_no_match_and_render_refuses() -> None:
    cert = leaf()  # no SAN
    ev = certmap.evaluate(rule("(svmmPrincipalName={upn})"), cert)
    assert not ev.matched and "{upn}" in ev.detail and ev.ldap_filter == ""
    with pytest.raises(UnknownUser) as e:
        certmap.render_filter(rule("(svmmPrincipalName={upn})"), cert)
    assert e.value.reason == "certmap_no_value"


def test_local_part_needs_an_at_sign() -> None:
    ev = certmap.evaluate(rule("(uid={upn_local})"), leaf(upns=["noatsign"]))
    assert not ev.matched


def test_several_values_become_an_or_so_the_directory_sees_every_candidate() -> None:
    cert = leaf(upns=["alice@demo.example", "bob@demo.example"])
    f = certmap.render_filter(rule("(svmmPrincipalName={upn})"), cert)
    assert parse_filter(f) == (
        "|",
        ("svmmPrincipalName", b"alice@demo.example"),
        ("svmmPrincipalName", b"bob@demo.example"),
    )


def test_combinations_are_bounded() -> None:
    cert = leaf(upns=[f"u{i}@x.example" for i in range(5)], emails=[f"m{i}@x" for i in range(5)])
    ev = certmap.evaluate(rule("(&(a={upn})(b={email}))"), cert)
    assert not ev.matched and "combinations" in ev.detail


# --- priority ------------------------------------------------------------------------------


def test_priority_order_lower_first_and_first_match_decides() -> None:
    cert = leaf(cn="alice", emails=["alice@demo.example"])
    rules = [
        rule("(mail={email})", name="by-mail", priority=20),
        rule("(svmmPrincipalName={upn})", name="by-upn", priority=5),  # no UPN: no match
        rule("(cn={cn})", name="by-cn", priority=10),
    ]
    ev = certmap.first_match(rules, cert)
    assert ev is not None and ev.rule.name == "by-cn"
    assert [r.name for r in certmap.ordered(rules)] == ["by-upn", "by-cn", "by-mail"]
    assert certmap.first_match([rules[1]], cert) is None


def test_equal_priorities_keep_configuration_order() -> None:
    cert = leaf(cn="alice")
    rules = [rule("(a={cn})", name="one"), rule("(b={cn})", name="two")]
    assert certmap.first_match(rules, cert).rule.name == "one"  # type: ignore[union-attr]


def test_config_sorts_rules_by_priority() -> None:
    cfg = parse(
        {
            "certmap": {
                "rules": [
                    {"name": "late", "map": "(uid={cn})", "priority": 50},
                    {"name": "early", "map": "(mail={email})", "priority": 1},
                ]
            }
        }
    )
    assert [r.name for r in cfg.certmap.rules] == ["early", "late"]


# --- injection -------------------------------------------------------------------------------


@pytest.mark.parametrize("char", ["*", "(", ")", "\\", "\x00"])
def test_each_special_character_is_escaped(char: str) -> None:
    cert = leaf(cn=f"a{char}b")
    f = certmap.render_filter(rule("(cn={cn})"), cert)
    assert parse_filter(f) == ("cn", f"a{char}b".encode())
    assert f == "(cn=a" + f"\\{ord(char):02x}" + "b)"


@pytest.mark.parametrize(
    "template",
    [
        "(cn={cn})",
        "(uid={subject_attr:0.9.2342.19200300.100.1.1})",
        "(svmmCertMapping=X509:<I>{issuer}<S>{subject})",
        "(&(objectClass=person)(cn={cn}))",
    ],
)
def test_injection_in_subject_fields_cannot_change_the_filter(template: str) -> None:
    cert = leaf(cn=INJECTION, subject_extra=[(UID_OID, INJECTION)])
    f = certmap.render_filter(rule(template), cert)
    tree = parse_filter(f)  # parses as the template's shape, not the attacker's
    if template.startswith("(&"):
        assert tree == ("&", ("objectClass", b"person"), ("cn", INJECTION.encode()))
    elif "{subject}" in template:
        attr, value = tree  # type: ignore[misc]
        assert attr == "svmmCertMapping"
        # The RFC 4514 form of the CN (its own escapes included) is carried verbatim.
        assert cert.subject.rfc4514_string().encode() in value
    else:
        attr, value = tree  # type: ignore[misc]
        assert value == INJECTION.encode()
    assert "\x00" not in f and "*" not in f


def test_injection_in_san_values() -> None:
    # cryptography refuses such an rfc822Name; the legacy subject emailAddress takes it.
    cert = leaf(
        upns=["a*)(uid=*@x.example"], subject_extra=[(NameOID.EMAIL_ADDRESS, "b)(|(x=*@y.example")]
    )
    f = certmap.render_filter(rule("(|(svmmPrincipalName={upn})(mail={email}))"), cert)
    assert parse_filter(f) == (
        "|",
        ("svmmPrincipalName", b"a*)(uid=*@x.example"),
        ("mail", b"b)(|(x=*@y.example"),
    )


def test_braces_in_a_value_are_not_template_fields() -> None:
    cert = leaf(cn="{cert}{subject}", subject_extra=[(UID_OID, "{cn}")])
    f = certmap.render_filter(
        rule("(&(cn={cn})(uid={subject_attr:0.9.2342.19200300.100.1.1}))"), cert
    )
    assert parse_filter(f) == ("&", ("cn", b"{cert}{subject}"), ("uid", b"{cn}"))


def test_non_ascii_text_is_kept_as_utf8() -> None:
    cert = leaf(cn="Zoë Ünal")
    f = certmap.render_filter(rule("(cn={cn})"), cert)
    assert parse_filter(f) == ("cn", "Zoë Ünal".encode())


def test_binary_certificate_escaping_covers_special_bytes() -> None:
    # A DER blob contains bytes 0x00, 0x28, 0x29, 0x2a, 0x5c somewhere in practice; escaping
    # every byte means none of them survives raw.
    cert = leaf(cn="x")
    f = certmap.render_filter(rule("(userCertificate;binary={cert})"), cert)
    value = f[len("(userCertificate;binary=") : -1]
    assert re.fullmatch(r"(\\[0-9a-f]{2})+", value)


def test_ldap3_reads_the_rendered_filter_as_one_equality() -> None:
    # The library that sends it agrees with our reader.
    from ldap3.operation.search import parse_filter as ldap3_parse

    cert = leaf(cn=INJECTION)
    f = certmap.render_filter(rule("(cn={cn})"), cert)
    root = ldap3_parse(f, None, True, True, None, False)
    (item,) = root.elements
    assert item.assertion["attr"] == "cn"
    from ldap3.protocol.convert import prepare_filter_for_sending

    assert prepare_filter_for_sending(item.assertion["value"]) == INJECTION.encode()


def test_cert_exact_is_a_gser_certificate_assertion() -> None:
    cert = leaf()
    f = certmap.render_filter(rule("(userCertificate;binary={cert_exact})"), cert)
    issuer = cert.issuer.rfc4514_string()
    expected = f'{{ serialNumber {cert.serial_number}, issuer rdnSequence:"{issuer}" }}'
    assert parse_filter(f) == ("userCertificate;binary", expected.encode())
    assert certmap.maps_whole_certificate(rule("(userCertificate;binary={cert_exact})"))
    assert certmap.maps_whole_certificate(rule("(userCertificate;binary={cert})"))
    assert not certmap.maps_whole_certificate(rule("(cn={cn})"))


def test_cert_exact_quotes_and_escapes_the_issuer() -> None:
    ca = make_ca('Evil " CA) (*\\', slot=98)
    cert = make_leaf(ca).cert
    f = certmap.render_filter(rule("(userCertificate;binary={cert_exact})"), cert)
    attr, value = parse_filter(f)  # type: ignore[misc]
    assert attr == "userCertificate;binary"
    # RFC 4514 escapes the quote and backslash, GSER doubles the quote, the filter escapes
    # ( ) * \ (the reader above undoes only that last layer).
    issuer = cert.issuer.rfc4514_string()
    assert issuer.startswith('CN=Evil \\" CA) (*\\\\,')
    quoted = issuer.replace(chr(34), chr(34) * 2)
    expected = f'{{ serialNumber {cert.serial_number}, issuer rdnSequence:"{quoted}" }}'
    assert value == expected.encode()
