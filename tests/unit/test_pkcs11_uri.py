from __future__ import annotations

from dataclasses import dataclass

import pytest

from pam_svmm.domain.pkcs11_uri import InvalidPkcs11Uri, Pkcs11Uri, parse


@dataclass(frozen=True)
class Tok:
    slot_id: int = 3
    label: str = "Alice card                      "
    manufacturer: str = "SoftHSM project"
    model: str = "SoftHSM v2"
    serial: str = "9a1b2c3d4e5f6071"


def test_empty_uri_matches_everything():
    u = parse("pkcs11:")
    assert u == Pkcs11Uri()
    assert u.matches_token(Tok())
    assert u.matches_object("any", b"\x01", "cert")
    assert u.matches_library("x", "y", (1, 2))
    assert u.matches_slot(7, "d", "m")


def test_rfc_example_with_all_token_attributes():
    u = parse(
        "pkcs11:token=Alice%20card;manufacturer=SoftHSM%20project;model=SoftHSM%20v2;"
        "serial=9a1b2c3d4e5f6071;slot-id=3;object=my%20key;id=%01%ff;type=private"
    )
    assert u.token == "Alice card"
    assert u.manufacturer == "SoftHSM project"
    assert u.model == "SoftHSM v2"
    assert u.serial == "9a1b2c3d4e5f6071"
    assert u.slot_id == 3
    assert u.object == "my key"
    assert u.id == b"\x01\xff"
    assert u.type == "private"
    # PKCS#11 space padding on the token side does not break equality.
    assert u.matches_token(Tok())


@pytest.mark.parametrize(
    ("uri", "field", "value"),
    [
        ("pkcs11:token=Bob", "label", "Alice"),
        ("pkcs11:serial=1", "serial", "2"),
        ("pkcs11:model=M", "model", "N"),
        ("pkcs11:manufacturer=A", "manufacturer", "B"),
    ],
)
def test_each_token_attribute_can_exclude(uri, field, value):
    u = parse(uri)
    base = {"label": "x", "serial": "x", "model": "x", "manufacturer": "x"}
    assert not u.matches_token(Tok(**{**base, field: value}))
    assert u.matches_token(Tok(**{**base, field: uri.split("=", 1)[1]}))


def test_slot_id_excludes_other_slots():
    u = parse("pkcs11:slot-id=4")
    assert not u.matches_token(Tok(slot_id=3))
    assert u.matches_token(Tok(slot_id=4))
    assert u.matches_slot(4, "", "") and not u.matches_slot(5, "", "")


def test_object_matching_by_label_id_and_type():
    u = parse("pkcs11:object=auth;id=%0A;type=cert")
    assert u.matches_object("auth", b"\n", "cert")
    assert u.matches_object("auth", b"\n")  # type not checked when not given
    assert not u.matches_object("auth", b"\n", "private")
    assert not u.matches_object("auth", b"\x0b", "cert")
    assert not u.matches_object("sign", b"\n", "cert")


def test_library_attributes_and_version_default_minor():
    u = parse("pkcs11:library-manufacturer=OpenSC;library-description=x;library-version=2")
    assert u.library_version == (2, 0)
    assert u.matches_library("OpenSC", "x", (2, 0))
    assert not u.matches_library("OpenSC", "x", (2, 1))
    assert not u.matches_library("Other", "x", (2, 0))
    assert parse("pkcs11:library-version=2.6").library_version == (2, 6)


def test_slot_description_and_manufacturer():
    u = parse("pkcs11:slot-description=Reader%201;slot-manufacturer=ACS")
    assert u.matches_slot(0, "Reader 1   ", "ACS")
    assert not u.matches_slot(0, "Reader 2", "ACS")


def test_query_attributes_parsed_and_vendor_ignored():
    u = parse("pkcs11:token=T?module-path=/usr/lib/x.so&pin-source=file:/p&x-foo=bar")
    assert u.module_path == "/usr/lib/x.so"
    assert u.pin_source == "file:/p"
    assert u.token == "T"
    assert parse("pkcs11:?module-name=softhsm2").module_name == "softhsm2"


def test_utf8_and_reserved_characters_in_values():
    u = parse("pkcs11:token=J%C3%BCrgen%3Bx;object=a=b")
    assert u.token == "Jürgen;x"
    assert u.object == "a=b"


def test_scheme_is_case_insensitive():
    assert parse("PKCS11:token=a").token == "a"


@pytest.mark.parametrize(
    ("uri", "problem"),
    [
        ("http://x", "must start with 'pkcs11:'"),
        ("pkcs11:token", "is not name=value"),
        ("pkcs11:=x", "is not name=value"),
        ("pkcs11:token=a;token=b", "appears more than once"),
        ("pkcs11:tokne=a", "unknown path attribute 'tokne'"),
        ("pkcs11:x-vendor=a", "vendor path attribute"),
        ("pkcs11:token=a b", "must be percent-encoded"),
        ("pkcs11:token=a/b", "must be percent-encoded"),
        ("pkcs11:id=%0", "malformed percent-encoding"),
        ("pkcs11:id=%zz", "malformed percent-encoding"),
        ("pkcs11:token=%ff", "not UTF-8"),
        ("pkcs11:slot-id=-1", "slot-id must be a decimal number"),
        ("pkcs11:slot-id=%31%32x", "slot-id must be a decimal number"),
        ("pkcs11:type=key", "type must be one of"),
        ("pkcs11:library-version=1.2.3", "library-version must be M or M.N"),
        ("pkcs11:?pin-value=1234", "pin-value is not accepted"),
        ("pkcs11:?foo=1", "unknown query attribute 'foo'"),
        ("pkcs11:token=a#frag", "fragment"),
        ("pkcs11:Token=a", "malformed"),
    ],
)
def test_malformed_uris_name_the_problem(uri, problem):
    with pytest.raises(InvalidPkcs11Uri) as exc:
        parse(uri)
    assert problem in str(exc.value)
    assert isinstance(exc.value, ValueError)


def test_pin_value_never_echoed():
    with pytest.raises(InvalidPkcs11Uri) as exc:
        parse("pkcs11:token=a?pin-value=123456")
    assert "123456" not in str(exc.value)


def test_frozen():
    u = parse("pkcs11:token=a")
    with pytest.raises(AttributeError):
        u.token = "b"  # type: ignore[misc]
