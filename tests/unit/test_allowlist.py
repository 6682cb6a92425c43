"""The allowlist document: built from the policy's grants, parsed strictly."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pam_svmm.domain.allowlist import CardRef, build_allowlist, parse_allowlist
from pam_svmm.domain.audit_record import CardFacts
from pam_svmm.domain.policy import load_policy
from pam_svmm.errors import AllowlistInvalid

EXAMPLE = Path(__file__).resolve().parents[2] / "config" / "policy.example.toml"
NOW = dt.datetime(2026, 11, 27, 12, 0, 0, 123456, tzinfo=dt.UTC)
FP = "ab" * 32


@pytest.fixture(scope="module")
def compiled():  # type: ignore[no-untyped-def]
    return load_policy(EXAMPLE.read_bytes())


def _build(compiled: Any, **kw: Any):  # type: ignore[no-untyped-def]
    args: dict[str, Any] = {
        "user": "dave",
        "uid": 10004,
        "roles": ["vm-users", "vm-admins", "engineering-leads"],
        "card": CardFacts(fingerprint=FP, serial="1f2e", issuer="CN=x"),
        "method": "card",
        "sessions": ["c1", "c2"],
        "host": "lab-host",
        "now": NOW,
        "ttl": 3600,
    }
    args.update(kw)
    return build_allowlist(compiled, **args)


def test_document_matches_the_contract(compiled: Any) -> None:
    a = _build(compiled)
    doc = json.loads(a.to_json())
    assert doc == {
        "format": "svmm-allowlist/1",
        "user": "dave",
        "uid": 10004,
        "roles": ["engineering-leads", "vm-admins", "vm-users"],
        "card": {"fingerprint": FP, "serial": "1f2e"},
        "method": "card",
        "sessions": ["c1", "c2"],
        "policy_version": 1,
        "host": "lab-host",
        "issued_at": "2026-11-27T12:00:00+00:00",
        "expires_at": "2026-11-27T13:00:00+00:00",
        "vms": {
            "bank-a": {
                "permissions": ["boot", "console", "usb:1050:0407", "network:internal"],
                "volumes": ["bank-a-data"],
            },
            "bank-b": {
                "permissions": ["boot", "console", "network:internal"],
                "volumes": ["bank-b-data"],
            },
            "vm-db": {
                "permissions": ["boot", "console", "network:internal"],
                "volumes": ["db-disk", "db-logs"],
            },
            "vm-web": {
                "permissions": ["boot", "console", "usb:046d:c52b", "network:dmz"],
                "volumes": ["web-disk"],
            },
        },
    }
    assert parse_allowlist(a.to_json()) == a


def test_grants_by_user_and_role_and_nothing_else(compiled: Any) -> None:
    a = _build(compiled, user="alice", uid=10001, roles=["vm-users", "auditor"])
    assert set(a.vms) == {"vm-web", "bank-a"}
    assert a.vms["bank-a"].permissions == ("boot", "console")  # alice's own grant
    nobody = _build(compiled, user="eve", uid=10005, roles=[])
    assert nobody.vms == {}


def test_password_login_has_no_card(compiled: Any) -> None:
    a = _build(compiled, method="password", card=None)
    assert json.loads(a.to_json())["card"] is None
    assert _build(compiled, method="password", card=CardFacts()).card is None
    with pytest.raises(AllowlistInvalid, match="card"):
        _build(compiled, method="card", card=None)


def test_validity_window_and_permits(compiled: Any) -> None:
    a = _build(compiled)
    assert a.permits("vm-web", "boot", now=NOW)
    assert not a.permits("vm-web", "usb:dead:beef", now=NOW)
    assert not a.permits("vm-x", "boot", now=NOW)
    assert not a.permits("vm-web", "boot", now=NOW + dt.timedelta(seconds=3600))
    assert not a.permits("vm-web", "boot", now=NOW - dt.timedelta(seconds=1))


def test_sessions_are_deduplicated_and_replaced(compiled: Any) -> None:
    a = _build(compiled, sessions=["c1", "c1", "c2"])
    assert a.sessions == ("c1", "c2")
    assert a.with_sessions(["c3"]).sessions == ("c3",)
    with pytest.raises(AllowlistInvalid):
        _build(compiled, sessions=["bad\nid"])


def test_naive_time_is_refused(compiled: Any) -> None:
    with pytest.raises(ValueError):
        _build(compiled, now=dt.datetime(2026, 1, 1))


def _mutate(compiled: Any, change: Callable[[dict[str, Any]], None]) -> bytes:
    doc = json.loads(_build(compiled).to_json())
    change(doc)
    return json.dumps(doc).encode()


def _set(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda d: d.__setitem__(key, value)


def _vm(field: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return lambda d: d["vms"]["vm-web"].__setitem__(field, value)


BAD: list[tuple[str, Callable[[dict[str, Any]], None], str]] = [
    ("format", _set("format", "svmm-allowlist/2"), "format"),
    ("extra key", _set("admin", True), "unknown"),
    ("missing key", lambda d: d.pop("expires_at"), "missing"),
    ("user", _set("user", "../root"), "user"),
    ("uid negative", _set("uid", -1), "uid"),
    ("uid bool", _set("uid", True), "uid"),
    ("uid string", _set("uid", "10004"), "uid"),
    ("roles", _set("roles", "vm-users"), "roles"),
    ("card keys", _set("card", {"fingerprint": FP}), "card"),
    ("card fp", _set("card", {"fingerprint": "zz", "serial": "1"}), "card.fingerprint"),
    ("card fp 0x", _set("card", {"fingerprint": "0x" + "a" * 62, "serial": "1"}), "fingerprint"),
    ("card serial", _set("card", {"fingerprint": FP, "serial": ""}), "card.serial"),
    ("method", _set("method", "magic"), "method"),
    ("sessions dup", _set("sessions", ["a", "a"]), "sessions"),
    ("sessions type", _set("sessions", [1]), "sessions"),
    ("version", _set("policy_version", 0), "policy_version"),
    ("host", _set("host", "a/b"), "host"),
    ("naive time", _set("issued_at", "2026-11-27T12:00:00"), "issued_at"),
    ("bad time", _set("expires_at", "tomorrow"), "expires_at"),
    ("expires first", _set("expires_at", "2026-11-27T11:00:00+00:00"), "expires_at"),
    ("vms type", _set("vms", []), "vms"),
    ("vm id", lambda d: d["vms"].__setitem__("../x", d["vms"]["vm-web"]), "vms.../x"),
    ("vm keys", _vm("extra", 1), "vms.vm-web"),
    ("permission", _vm("permissions", ["boot", "root"]), "vms.vm-web.permissions[1]"),
    ("permission case", _vm("permissions", ["usb:046D:C52B"]), "permissions[0]"),
    ("permission dup", _vm("permissions", ["boot", "boot"]), "twice"),
    ("volume", _vm("volumes", ["../../etc"]), "vms.vm-web.volumes[0]"),
]


@pytest.mark.parametrize(("name", "change", "field"), BAD, ids=[b[0] for b in BAD])
def test_parse_is_strict(compiled: Any, name: str, change: Any, field: str) -> None:
    with pytest.raises(AllowlistInvalid) as e:
        parse_allowlist(_mutate(compiled, change))
    assert field in e.value.message
    assert e.value.reason == "allowlist_invalid"


@pytest.mark.parametrize("data", [b"", b"not json", b"[]", b"\xff", b"null"])
def test_parse_refuses_what_is_not_an_object(data: bytes) -> None:
    with pytest.raises(AllowlistInvalid):
        parse_allowlist(data)


def test_card_ref_is_accepted_directly(compiled: Any) -> None:
    a = _build(compiled, card=CardRef(FP, "01"))
    assert a.card == CardRef(FP, "01")
