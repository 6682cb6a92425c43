"""`svmm policy check|sign|load|show|explain|grants` end to end on files in a tmp folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pam_svmm.cli.main import main
from svmm_lab.pki import LabCA, key_pem, new_key
from tests.unit import cli_schemas

EXAMPLE = Path(__file__).resolve().parents[2] / "config" / "policy.example.toml"
LEADS = "vm-users,vm-admins,engineering-leads"


class Site:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.ca = LabCA.create(tmp / "ca", crl_base="http://127.0.0.1:9/", ocsp_url="http://x/")
        key = new_key("p256")
        self.key = tmp / "signer.key"
        self.key.write_bytes(key_pem(key))
        self.cert = tmp / "signer.pem"
        self.cert.write_bytes(
            _pem(self.ca.issue_policy_signer("Demo Policy Signer", key.public_key()))
        )
        other = new_key("p256")
        self.other_key = tmp / "other.key"
        self.other_key.write_bytes(key_pem(other))
        self.user_cert = tmp / "user.pem"
        self.user_cert.write_bytes(_pem(self.ca.issue_user("alice", other.public_key())))
        self.chain = self.ca.folder / "intermediate.pem"
        self.anchor = self.ca.folder / "root.pem"
        self.bundle = tmp / "policy.bundle"
        self.audit = tmp / "audit" / "audit.jsonl"
        self.config = tmp / "svmm.toml"
        self.config.write_text(
            f'[trust]\nanchors = ["{self.anchor}"]\n'
            f'[policy]\nfile = "{self.bundle}"\nstate_dir = "{tmp / "state"}"\nhost = "lab-host"\n'
            f'[audit]\npath = "{self.audit}"\nsyslog = false\nseal_key = "{tmp / "seal.key"}"\n'
        )

    def sign(self, policy: Path = EXAMPLE, *extra: str) -> int:
        return main(
            [
                "policy", "sign", str(policy), "--key", str(self.key), "--cert", str(self.cert),
                "--chain", str(self.chain), "--anchor", str(self.anchor), "-o", str(self.bundle),
                *extra,
            ]
        )  # fmt: skip

    def svmm(self, *args: str) -> int:
        return main(["--config", str(self.config), *args])


def _pem(cert: object) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return cert.public_bytes(serialization.Encoding.PEM)  # type: ignore[attr-defined]


@pytest.fixture
def site(tmp_path: Path) -> Site:
    return Site(tmp_path)


def test_check(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["policy", "check", str(EXAMPLE)]) == 0
    out = capsys.readouterr().out
    assert "policy version 1: 1 hosts, 4 VMs" in out and "1 warning(s)" in out
    assert main(["policy", "check", "--strict", str(EXAMPLE)]) == 1
    bad = tmp_path / "bad.toml"
    bad.write_text(EXAMPLE.read_text().replace('vm = "vm-db"', 'vm = "vm-x"'))
    capsys.readouterr()
    assert main(["policy", "check", str(bad)]) == 1
    assert "grants[1].vm: unknown VM 'vm-x'" in capsys.readouterr().err


def test_sign_load_show_explain(site: Site, capsys: pytest.CaptureFixture[str]) -> None:
    assert site.sign() == 0
    assert json.loads(site.bundle.read_bytes())["format"] == "svmm-policy-bundle/1"
    assert site.svmm("policy", "show") == 3  # nothing accepted yet
    assert site.svmm("policy", "load") == 0
    assert (
        "accepted; in force: version 1 signed by CN=Demo Policy Signer" in capsys.readouterr().out
    )
    record = json.loads(site.audit.read_text().splitlines()[-1])
    assert record["event"] == "policy_load" and record["outcome"] == "success"
    assert site.svmm("policy", "show") == 0
    assert "version:      1" in capsys.readouterr().out

    args = ("policy", "explain", "dave", "bank-b", "--roles", LEADS)
    assert site.svmm(*args, "--running", "bank-a") == 1
    out = capsys.readouterr().out
    assert "DENIED" in out and "conflict_of_interest" in out and "Chinese Wall" in out
    assert site.svmm(*args) == 0
    assert "ALLOWED" in capsys.readouterr().out
    assert site.svmm("policy", "explain", "bob", "vm-web", "--roles", "vm-users",
                     "--action", "network:internal") == 1  # fmt: skip
    assert "network_type_denied" in capsys.readouterr().out
    assert site.svmm("policy", "grants", "alice", "--roles", "vm-users") == 0
    out = capsys.readouterr().out
    assert "bank-a" in out and "vm-web" in out and "vm-db" not in out

    # an older bundle is refused and reported; the accepted one stays
    newer = site.tmp / "v2.toml"
    newer.write_text(EXAMPLE.read_text().replace("version = 1", "version = 2"))
    assert site.sign(newer) == 0 and site.svmm("policy", "load") == 0
    assert site.sign() == 0
    assert site.svmm("policy", "load") == 1
    assert "refused: policy version 1 is older" in capsys.readouterr().out
    record = json.loads(site.audit.read_text().splitlines()[-1])
    assert record["outcome"] == "failure" and record["reason"] == "policy_rollback"


def test_explain_a_policy_file_without_configuration(capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["policy", "explain", "eve", "vm-web", "--policy", str(EXAMPLE), "--roles", ""])
    assert rc == 1
    assert "default deny" in capsys.readouterr().out


def test_sign_refuses_a_key_that_is_not_the_certificates(
    site: Site, capsys: pytest.CaptureFixture[str]
) -> None:
    site.key.write_bytes(site.other_key.read_bytes())
    assert site.sign() == 1
    assert "does not match" in capsys.readouterr().err
    assert not site.bundle.exists()


def test_sign_refuses_a_certificate_without_the_signing_eku(
    site: Site, capsys: pytest.CaptureFixture[str]
) -> None:
    site.key.write_bytes(site.other_key.read_bytes())
    site.cert.write_bytes(site.user_cert.read_bytes())
    assert site.sign() == 1
    assert "extended key usage" in capsys.readouterr().err
    assert not site.bundle.exists()


def test_sign_refuses_an_invalid_policy(site: Site, tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("version = 0\n")
    assert site.sign(bad) != 0
    assert not site.bundle.exists()


# --- --json ----------------------------------------------------------------------------------


def test_check_json(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["policy", "check", str(EXAMPLE), "--json"]) == 0
    doc = cli_schemas.parse(capsys.readouterr().out, cli_schemas.POLICY_CHECK)
    assert doc["valid"] and doc["error"] is None and doc["version"] == 1
    assert doc["counts"] == {"hosts": 1, "vms": 4, "networks": doc["counts"]["networks"],
                             "grants": doc["counts"]["grants"], "conflicts": 1}  # fmt: skip
    assert len(doc["warnings"]) == 1
    bad = tmp_path / "bad.toml"
    bad.write_text(EXAMPLE.read_text().replace('vm = "vm-db"', 'vm = "vm-x"'))
    assert main(["policy", "check", str(bad), "--json"]) == 1
    doc = cli_schemas.parse(capsys.readouterr().out, cli_schemas.POLICY_CHECK)
    assert not doc["valid"] and "unknown VM 'vm-x'" in doc["error"] and doc["counts"] is None


def test_show_explain_grants_json(site: Site, capsys: pytest.CaptureFixture[str]) -> None:
    assert site.sign() == 0
    capsys.readouterr()
    assert site.svmm("policy", "show", "--json") == 3
    doc = cli_schemas.parse(capsys.readouterr().out, cli_schemas.POLICY_SHOW)
    assert doc["policy"] is None and doc["state_problem"] is None
    assert site.svmm("policy", "load") == 0
    capsys.readouterr()
    assert site.svmm("policy", "show", "--json") == 0
    doc = cli_schemas.parse(capsys.readouterr().out, cli_schemas.POLICY_SHOW)
    assert doc["policy"]["version"] == 1 and doc["policy"]["signer"].startswith(
        "CN=Demo Policy Signer"
    )

    args = ("policy", "explain", "dave", "bank-b", "--roles", LEADS, "--json")
    assert site.svmm(*args, "--running", "bank-a") == 1
    doc = cli_schemas.parse(capsys.readouterr().out, cli_schemas.POLICY_EXPLAIN)
    assert not doc["allowed"] and doc["reason"] == "conflict_of_interest"
    assert doc["running"] == ["bank-a"] and doc["roles_from"] == "--roles"
    assert doc["policy"]["version"] == 1
    assert site.svmm(*args) == 0
    assert cli_schemas.parse(capsys.readouterr().out, cli_schemas.POLICY_EXPLAIN)["allowed"]

    assert site.svmm("policy", "grants", "alice", "--roles", "vm-users", "--json") == 0
    doc = cli_schemas.parse(capsys.readouterr().out, cli_schemas.POLICY_GRANTS)
    vms = {v["vm"]: v for v in doc["vms"]}
    assert "bank-a" in vms and "vm-web" in vms and "vm-db" not in vms
    assert "boot" in vms["vm-web"]["permissions"]


def test_load_json(site: Site, capsys: pytest.CaptureFixture[str]) -> None:
    assert site.sign() == 0
    capsys.readouterr()
    assert site.svmm("policy", "load", "--json") == 0
    doc = cli_schemas.parse(capsys.readouterr().out, cli_schemas.POLICY_LOAD)
    assert doc["event"] == "accepted" and doc["version"] == 1 and doc["refused"] is None
    assert site.svmm("policy", "load", "--json") == 0
    doc = cli_schemas.parse(capsys.readouterr().out, cli_schemas.POLICY_LOAD)
    assert doc["event"] == "unchanged" and doc["previous_version"] == 1
