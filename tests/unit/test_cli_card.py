"""`svmm card list`: the text is printed from the --json document (card_list_json), so the
two say the same; the document's shape is cli_schemas.CARD_LIST."""

from __future__ import annotations

import argparse
import json
from typing import Any

import pytest

from pam_svmm.cli import card
from pam_svmm.cli.main import build_parser
from tests.unit import cli_schemas


def _cert(**over: Any) -> dict[str, Any]:
    cert = {
        "label": "auth",
        "id": "01",
        "readable": True,
        "ca": False,
        "subject": "CN=alice",
        "key": "RSA-2048",
        "not_before": "2026-01-01T00:00:00+00:00",
        "not_after": "2027-01-01T00:00:00+00:00",
        "sha256": "ab" * 32,
        "stage": "passed",
        "usable": True,
        "user": "alice",
        "rule": "upn",
        "reason": None,
        "message": None,
    }
    return cert | over


def _doc(certs: list[dict[str, Any]], **over: Any) -> dict[str, Any]:
    token = {
        "label": "alice ID card",
        "serial": "1234",
        "slot": 7,
        "manufacturer": "SoftHSM project",
        "model": "SoftHSM v2",
        "login_required": True,
        "pin_tries": "unknown",
        "pin_pad": False,
        "skipped": None,
        "problem": None,
        "certificates": certs,
    }
    doc = {
        "module": "/var/lib/lab/pinguard.so",
        "user": None,
        "tokens": [token],
        "chosen": None,
        "ok": False,
        "reason": None,
        "message": None,
    }
    return doc | over


def _run(monkeypatch: pytest.MonkeyPatch, doc: dict[str, Any], *argv: str) -> int:
    monkeypatch.setattr(card, "card_list_json", lambda args: doc)
    args = build_parser().parse_args(["card", "list", *argv])
    assert isinstance(args, argparse.Namespace) and args.func is card.list_cards
    return int(args.func(args))


def test_a_usable_card_text_and_json(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    chosen = {
        "token": "alice ID card",
        "token_serial": "1234",
        "certificate": "auth",
        "sha256": "ab" * 32,
        "user": "alice",
    }
    doc = _doc([_cert()], chosen=chosen, ok=True)
    cli_schemas.check(doc, cli_schemas.CARD_LIST)
    assert _run(monkeypatch, doc) == 0
    assert capsys.readouterr().out.splitlines() == [
        "module: /var/lib/lab/pinguard.so",
        "token 'alice ID card' serial 1234 slot 7 (SoftHSM project SoftHSM v2);"
        " PIN: tries left not reported",
        "  certificate 'auth' id 01: CN=alice",
        "    key RSA-2048, valid 2026-01-01 to 2027-01-01, sha256 abababababababab",
        "    login: passes policy and revocation, maps to alice (rule upn)",
        "a login would use 'auth' on 'alice ID card' for alice",
    ]
    assert _run(monkeypatch, doc, "--json") == 0
    assert json.loads(capsys.readouterr().out) == doc


def test_refusals_say_why(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    revoked = _cert(
        stage="revocation", usable=False, reason="certificate_revoked", message="revoked"
    )
    other = _cert(label="second", id="", stage="user", usable=False, user="bob")
    broken = _cert(label="junk", readable=False, subject=None, key=None, not_before=None,
                   not_after=None, stage="parse", usable=False, user=None, rule=None,
                   reason="certificate_malformed", message="does not parse")  # fmt: skip
    ca = _cert(label="ca", ca=True, usable=False, user=None, rule=None, stage="chain")
    doc = _doc([revoked, other, broken, ca], reason="certificate_revoked", message="revoked")
    doc["tokens"][0]["problem"] = {"reason": "token_error", "message": "gone"}
    cli_schemas.check(doc, cli_schemas.CARD_LIST)
    assert _run(monkeypatch, doc) == 1
    out = capsys.readouterr().out
    assert "    login: not usable: certificate_revoked: revoked" in out
    assert "  certificate 'second' id -: CN=alice" in out
    assert "    login: maps to bob (rule upn), not the requested user" in out
    assert "  certificate 'junk' id 01: unreadable (does not parse)" in out
    assert "  CA certificate 'ca' id 01: CN=alice" in out
    assert out.count("    login: ") == 2  # none for the CA or the unreadable one
    assert "  not readable: token_error: gone" in out
    assert out.endswith("a login would fail: certificate_revoked: revoked\n")
    assert "would use" not in out


def test_no_card_exits_3_in_both_forms(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    doc = _doc([], tokens=[], reason="no_card", message="no smart card found")
    cli_schemas.check(doc, cli_schemas.CARD_LIST)
    assert _run(monkeypatch, doc) == 3
    assert capsys.readouterr().out == "module: /var/lib/lab/pinguard.so\nno card found\n"
    assert _run(monkeypatch, doc, "--json") == 3
    assert json.loads(capsys.readouterr().out)["reason"] == "no_card"


def test_card_list_takes_json() -> None:
    args = build_parser().parse_args(["card", "list", "--json", "--user", "bob"])
    assert args.json is True and args.user == "bob"
