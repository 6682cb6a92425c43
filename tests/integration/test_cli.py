"""The `svmm` command on the lab: cert verify, card list, doctor."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from pam_svmm.lab.directory import Slapd
from pam_svmm.lab.lab import Lab
from pam_svmm.lab.userland import userland
from tests.integration import ldap_fixtures
from tests.unit import cli_schemas

pytestmark = pytest.mark.integration
NOBODY = 65534
slapd = ldap_fixtures.slapd


def svmm(lab: Lab, *args: str, cards: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, SVMM_CONFIG=str(lab.config_path), **lab.insert(*cards).env)
    return subprocess.run(
        [sys.executable, "-m", "pam_svmm.cli.main", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


def test_cert_verify_good_card(lab: Lab) -> None:
    p = svmm(lab, "cert", "verify", str(lab.cards_dir / "alice" / "cert.pem"))
    assert p.returncode == 0, p.stdout + p.stderr
    assert "ok   chain" in p.stdout and "ok   revocation" in p.stdout
    assert "would log in as alice" in p.stdout


@pytest.mark.parametrize(
    ("card", "reason", "code"),
    [
        ("mallory", "certificate_revoked", 1),
        ("eve", "certificate_expired", 1),
        ("rogue", "certificate_untrusted", 1),
    ],
)
def test_cert_verify_says_why_it_fails(lab: Lab, card: str, reason: str, code: int) -> None:
    p = svmm(lab, "cert", "verify", str(lab.cards_dir / card / "cert.pem"))
    assert p.returncode == code, p.stdout + p.stderr
    assert f"FAIL {reason}" in p.stdout


def test_cert_verify_malformed_file(lab: Lab, tmp_path: Path) -> None:
    bad = tmp_path / "bad.der"
    bad.write_bytes(b"\x30\x03\x02\x01")
    p = svmm(lab, "cert", "verify", str(bad))
    assert p.returncode == 1
    assert "malformed" in p.stdout + p.stderr


def test_card_list_shows_tokens_and_the_choice(lab: Lab) -> None:
    p = svmm(lab, "card", "list", "--user", "bob", cards=("alice", "bob"))
    assert p.returncode == 0, p.stdout + p.stderr
    out = p.stdout
    assert "token 'alice ID card'" in out and "token 'bob ID card'" in out
    assert "key RSA-2048" in out and "P-256" in out
    assert "maps to alice" in out and "maps to bob" in out
    assert "would use 'auth' on 'bob ID card' for bob" in out


def test_card_list_without_a_card(lab: Lab) -> None:
    p = svmm(lab, "card", "list")
    assert p.returncode == 3 and "no card" in p.stdout


def test_card_list_explains_an_unusable_card(lab: Lab) -> None:
    p = svmm(lab, "card", "list", cards=("eve",))
    assert p.returncode == 1
    assert "not usable: certificate_expired" in p.stdout


def test_doctor_on_the_lab(lab: Lab) -> None:
    p = svmm(lab, "doctor", "--cert", str(lab.cards_dir / "mallory" / "cert.pem"), cards=("alice",))
    assert p.returncode == 0, p.stdout + p.stderr
    assert "ok   configuration" in p.stdout
    assert "tokens: alice ID card" in p.stdout
    assert "answers: revoked" in p.stdout  # the OCSP responder, asked about mallory's card
    assert "intermediate.crl: answers" in p.stdout


def test_doctor_with_a_broken_config(lab: Lab, tmp_path: Path) -> None:
    cfg = tmp_path / "svmm.toml"
    cfg.write_text('[revocation]\nend_entity = "sometimes"\n')
    p = subprocess.run(
        [sys.executable, "-m", "pam_svmm.cli.main", "--config", str(cfg), "doctor"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert p.returncode == 3
    assert "revocation.end_entity" in p.stdout


@pytest.fixture
def public_dir() -> Iterator[Path]:
    # Not under pytest's tmp_path: its 0700 parents would keep `nobody` out.
    d = Path(tempfile.mkdtemp(prefix="svmm-cli-", dir="/tmp"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_an_unreadable_intermediates_dir_is_named_not_an_internal_error(
    lab: Lab, public_dir: Path
) -> None:
    """A user runs `svmm cert verify` where the intermediates folder is root's alone."""
    inter = public_dir / "intermediates"
    inter.mkdir(mode=0o700)
    shutil.copy(lab.ca_dir / "intermediate.pem", inter)
    for name in ("root.pem",):
        shutil.copy(lab.ca_dir / name, public_dir / name)
    shutil.copy(lab.cards_dir / "alice" / "cert.pem", public_dir / "alice.pem")
    cfg = public_dir / "svmm.toml"
    cfg.write_text(
        f'[trust]\nanchors = ["{public_dir / "root.pem"}"]\nintermediates_dir = "{inter}"\n'
        '[revocation]\nend_entity = "off"\nca = "off"\n'
    )
    for p in public_dir.iterdir():
        if p.is_file():
            p.chmod(0o644)
    u = userland()
    p = subprocess.run(
        u.argv("-m", "pam_svmm.cli.main", "--config", str(cfg), "cert", "verify",
               str(public_dir / "alice.pem")),
        capture_output=True, text=True, env=u.env(), user=NOBODY, group=NOBODY,
        extra_groups=[], timeout=60, check=False,
    )  # fmt: skip
    assert "internal error" not in p.stderr, p.stderr
    assert p.returncode == 5, p.stdout + p.stderr  # a configuration this user cannot use
    assert f"trust.intermediates_dir: cannot read {inter}" in p.stderr
    assert "Permission denied" in p.stderr


# --- --json ----------------------------------------------------------------------------------


def test_cert_verify_json(lab: Lab) -> None:
    p = svmm(lab, "cert", "verify", str(lab.cards_dir / "alice" / "cert.pem"), "--json")
    assert p.returncode == 0, p.stderr
    doc = cli_schemas.parse(p.stdout, cli_schemas.CERT_VERIFY)
    assert doc["ok"] and doc["user"] == "alice" and doc["reason"] is None
    assert [s["check"] for s in doc["steps"]][:2] == ["chain", "revocation"]
    assert doc["certificate"]["subject"].startswith("CN=alice")
    p = svmm(lab, "cert", "verify", str(lab.cards_dir / "mallory" / "cert.pem"), "--json")
    doc = cli_schemas.parse(p.stdout, cli_schemas.CERT_VERIFY)
    assert p.returncode == 1 and not doc["ok"] and doc["reason"] == "certificate_revoked"
    assert doc["user"] is None and doc["message"]


def test_cert_map_and_id_json(lab: Lab, slapd: Slapd, tmp_path: Path) -> None:
    cfg = lab.write_config(lab.directory_overrides(slapd), tmp_path / "svmm.toml")
    p = svmm(lab, "--config", str(cfg), "cert", "map", str(lab.cards_dir / "alice" / "cert.pem"),
             "--json")  # fmt: skip
    assert p.returncode == 0, p.stderr
    doc = cli_schemas.parse(p.stdout, cli_schemas.CERT_MAP)
    assert doc["ok"] and doc["identity"]["user"] == "alice"
    assert [r["name"] for r in doc["rules"]] == ["upn", "email"] and doc["rules"][0]["matched"]
    assert doc["directory"][0]["decides"] and doc["directory"][0]["rule"] == "upn"
    p = svmm(lab, "--config", str(cfg), "cert", "map", str(lab.cards_dir / "twin" / "cert.pem"),
             "--json")  # fmt: skip
    doc = cli_schemas.parse(p.stdout, cli_schemas.CERT_MAP)
    assert p.returncode == 1 and doc["reason"] == "mapping_ambiguous" and doc["identity"] is None
    p = svmm(lab, "--config", str(cfg), "id", "alice", "--json")
    doc = cli_schemas.parse(p.stdout, cli_schemas.ID)
    assert p.returncode == 0 and doc["user"] == "alice" and doc["dn"].startswith("uid=alice")
