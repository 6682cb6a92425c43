"""`svmm card list --json`: one document in the shape of cli_schemas.CARD_LIST, with the same
verdicts, choice and exit status as the text (the text is printed from the document)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from svmm_lab.lab import Lab
from tests.unit import cli_schemas

pytestmark = pytest.mark.integration


def card_list(
    lab: Lab, *args: str, cards: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, SVMM_CONFIG=str(lab.config_path), **lab.insert(*cards).env)
    return subprocess.run(
        [sys.executable, "-m", "pam_svmm.cli.main", "card", "list", *args],
        capture_output=True, text=True, env=env, timeout=60, check=False,
    )  # fmt: skip


def test_two_cards_and_the_one_a_login_as_bob_would_use(lab: Lab) -> None:
    p = card_list(lab, "--json", "--user", "bob", cards=("alice", "bob"))
    assert p.returncode == 0, p.stdout + p.stderr
    doc = cli_schemas.parse(p.stdout, cli_schemas.CARD_LIST)
    assert doc["ok"] and doc["user"] == "bob" and doc["reason"] is None
    by_label = {t["label"]: t for t in doc["tokens"]}
    assert {"alice ID card", "bob ID card"} <= set(by_label)
    leaves = {t["label"]: [c for c in t["certificates"] if not c["ca"]] for t in doc["tokens"]}
    (alice,) = leaves["alice ID card"]
    (bob,) = leaves["bob ID card"]
    assert alice["key"] == "RSA-2048" and "P-256" in bob["key"]
    assert (alice["user"], alice["usable"], alice["stage"]) == ("alice", False, "user")
    assert (bob["user"], bob["usable"], bob["stage"]) == ("bob", True, "passed")
    assert doc["chosen"] == {
        "token": "bob ID card",
        "token_serial": by_label["bob ID card"]["serial"],
        "certificate": "auth",
        "sha256": bob["sha256"],
        "user": "bob",
    }
    assert len(bob["sha256"]) == 64 and bob["not_before"] < bob["not_after"]


def test_a_revoked_card_is_never_chosen(lab: Lab) -> None:
    p = card_list(lab, "--json", "--user", "mallory", cards=("mallory",))
    assert p.returncode == 1, p.stdout + p.stderr
    doc = cli_schemas.parse(p.stdout, cli_schemas.CARD_LIST)
    assert doc["chosen"] is None and not doc["ok"]
    assert doc["reason"] == "certificate_revoked" and doc["message"]
    (cert,) = [c for t in doc["tokens"] for c in t["certificates"] if not c["ca"]]
    assert (cert["usable"], cert["reason"], cert["stage"]) == (
        False,
        "certificate_revoked",
        "revocation",
    )


def test_no_card_is_a_document_too_and_exits_3(lab: Lab) -> None:
    p = card_list(lab, "--json")
    assert p.returncode == 3, p.stdout + p.stderr
    doc = cli_schemas.parse(p.stdout, cli_schemas.CARD_LIST)
    assert doc["tokens"] == [] and doc["chosen"] is None
    assert (doc["ok"], doc["reason"]) == (False, "no_card")


@pytest.mark.parametrize("cards", [("alice", "bob"), ("eve",), ()])
def test_the_text_says_what_the_document_says(lab: Lab, cards: tuple[str, ...]) -> None:
    text = card_list(lab, cards=cards)
    doc = json.loads(card_list(lab, "--json", cards=cards).stdout)
    assert text.returncode == (0 if doc["ok"] else 3 if not doc["tokens"] else 1)
    assert text.stdout.splitlines()[0] == f"module: {doc['module']}"
    for t in doc["tokens"]:
        assert f"token {t['label']!r}" in text.stdout
        for c in t["certificates"]:
            assert f"sha256 {c['sha256'][:16]}" in text.stdout
    if doc["chosen"]:
        assert f"would use {doc['chosen']['certificate']!r}" in text.stdout
    elif doc["tokens"]:
        assert f"a login would fail: {doc['reason']}: {doc['message']}" in text.stdout
    else:
        assert "no card found" in text.stdout
