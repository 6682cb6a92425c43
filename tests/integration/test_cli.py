"""The `svmm` command on the lab: cert verify, card list, doctor."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pam_svmm import config as config_mod
from svmm_lab.directory import Slapd
from svmm_lab.lab import Lab
from svmm_lab.userland import userland
from tests.integration import ldap_fixtures
from tests.unit import cli_schemas

pytestmark = pytest.mark.integration
NOBODY = 65534
ROOT = Path(__file__).resolve().parents[2]
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


@pytest.mark.parametrize("text", ['[revocation]\nend_entity = "sometimes"\n', None])
def test_doctor_that_cannot_read_its_configuration_exits_2(
    tmp_path: Path, text: str | None
) -> None:
    cfg = tmp_path / "svmm.toml"
    if text is not None:
        cfg.write_text(text)
    p = subprocess.run(
        [sys.executable, "-m", "pam_svmm.cli.main", "--config", str(cfg), "doctor"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert p.returncode == 2, p.stdout + p.stderr
    assert p.stdout.startswith("FAIL configuration: ")
    assert ("revocation.end_entity" if text else "file not found") in p.stdout


class Host:
    """A host as doctor sees it, all in a tmp folder: the lab's configuration with the
    directory, an accepted policy, a seal key, an svmmd answering on its socket, and a
    system root (--root) with the shim, common-auth and nsswitch.conf."""

    def __init__(self, lab: Lab, slapd: Slapd, tmp: Path) -> None:
        self.lab, self.tmp = lab, tmp
        self.seal_key = tmp / "audit-seal.key"
        self.seal_key.write_bytes(os.urandom(32))
        self.seal_key.chmod(0o600)
        self.socket = tmp / "launcher.sock"
        self.root = tmp / "root"
        (self.root / "etc" / "pam.d").mkdir(parents=True)
        (self.root / "usr" / "lib" / "svmm").mkdir(parents=True)
        (self.root / "usr" / "share" / "pam-configs").mkdir(parents=True)
        shim = self.root / "usr" / "lib" / "svmm" / "pam_svmm.py"
        shutil.copy(ROOT / "pam_svmm" / "pam" / "shim.py", shim)
        shim.chmod(0o644)
        shutil.copy(ROOT / "config" / "pam-configs" / "svmm", self.root / "usr/share/pam-configs")
        (self.root / "etc" / "pam.d" / "common-auth").write_text(
            "auth [success=end authinfo_unavail=ignore default=die] pam_python.so "
            "/usr/lib/svmm/pam_svmm.py\nauth [success=1 default=ignore] pam_unix.so\n"
        )
        (self.root / "etc" / "nsswitch.conf").write_text(
            "passwd: files systemd extrausers\ngroup:  files systemd extrausers\n"
        )
        bundle = lab.write_policy(POLICY, tmp / "policy.bundle")
        # As README's host: the [pkcs11] module alone (no pass_environment, the lab's readers).
        module = config_mod.load(lab.config_path).pkcs11.module
        self.config = lab.write_config(
            f'[pkcs11]\nmodule = "{module}"\n'
            + lab.directory_overrides(slapd)
            + lab.policy_overrides(bundle, state=tmp / "policy-state")
            + f'\n[audit]\npath = "{tmp / "audit.jsonl"}"\nsyslog = false\n'
            f'seal_key = "{self.seal_key}"\n'
            f'\n[launcher]\nsocket = "{self.socket}"\n',
            tmp / "svmm.toml",
        )
        p = self.svmm("policy", "load")
        assert p.returncode == 0, p.stdout + p.stderr

    def svmm(
        self, *args: str, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "pam_svmm.cli.main", "--config", str(self.config), *args],
            capture_output=True, text=True, timeout=60, check=False,
            env={**os.environ, **self.lab.insert().env, **(env or {})},
        )  # fmt: skip

    def doctor(
        self, *args: str, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        return self.svmm("doctor", "--root", str(self.root), *args, env=env)


POLICY = b"""
version = 1
[hosts.lab-host]
login_roles = ["vm-users"]
services = ["svmm-login"]

[vms.vm-web]
label = "web"

[[grants]]
role = "vm-users"
vm = "vm-web"
permissions = ["boot"]
"""

LAUNCHER_REPLY = (
    b'{"version": "svmm-launcher/1", "ok": true, "reason": "ok", "message": "ok", "data": {}}\n'
)


@contextlib.contextmanager
def svmmd_stand_in(
    path: Path, *, answer: bool = True, reply: bytes = LAUNCHER_REPLY
) -> Iterator[None]:
    """A root-owned socket at ``path``: answering ``reply`` (or never listening)."""
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(path))
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = sock.accept()
            except OSError:
                return
            with conn, contextlib.suppress(OSError):  # a client that left without asking
                if conn.makefile("rb").readline():
                    conn.sendall(reply)

    thread = threading.Thread(target=serve, daemon=True)
    if answer:
        sock.listen(4)
        thread.start()
    try:
        yield
    finally:
        stop.set()
        sock.close()
        path.unlink(missing_ok=True)


def lines(out: str) -> dict[str, tuple[str, str]]:
    """name -> (status, detail) of doctor's lines."""
    found = {}
    for line in out.splitlines():
        status, _, rest = line.partition(" ")
        name, _, detail = rest.strip().partition(": ")
        found[name] = (status, detail)
    return found


CHECKS = ("configuration", "card module", "card helper", "trust anchors", "intermediates",
          "audit log", "audit seal key", "directory bind secret", "directory", "policy",
          "policy source", "svmmd socket", "PAM module", "PAM profile", "nsswitch")  # fmt: skip


def test_doctor_on_a_host_set_up_as_readme_says_is_all_ok_and_exits_0(
    lab: Lab, slapd: Slapd, tmp_path: Path
) -> None:
    host = Host(lab, slapd, tmp_path)
    with svmmd_stand_in(host.socket):
        p = host.doctor()
    assert p.returncode == 0, p.stdout + p.stderr
    found = lines(p.stdout)
    assert all(name in found for name in CHECKS), p.stdout
    assert {n: s for n, (s, _) in found.items() if s != "ok"} == {}, p.stdout
    assert "answers svmm-launcher/1" in found["svmmd socket"][1]
    assert "version 1 signed by" in found["policy"][1] and "verifies now" in found["policy"][1]
    assert "holds the accepted bundle" in found["policy source"][1]
    assert "(root's, this version's)" in found["PAM module"][1]
    assert "uses pam_svmm" in found["PAM profile"][1]
    assert "extrausers" in found["nsswitch"][1]
    assert "answers" in found["directory"][1]
    with svmmd_stand_in(host.socket):
        p = host.doctor("--json")
    doc = cli_schemas.parse(p.stdout, cli_schemas.DOCTOR)
    assert p.returncode == 0 and doc["exit"] == 0 and doc["failed"] == 0
    assert [c["name"] for c in doc["checks"]][: len(CHECKS)] == list(CHECKS)


def test_doctor_warns_about_what_is_not_set_up_yet_and_still_exits_0(
    lab: Lab, slapd: Slapd, tmp_path: Path
) -> None:
    host = Host(lab, slapd, tmp_path)
    shutil.rmtree(host.root)
    host.root.mkdir()
    host.seal_key.unlink()
    p = host.doctor()  # and no svmmd
    assert p.returncode == 0, p.stdout + p.stderr
    found = lines(p.stdout)
    assert {n for n, (s, _) in found.items() if s != "ok"} == {
        "audit seal key", "svmmd socket", "PAM module", "PAM profile", "nsswitch"}  # fmt: skip
    assert all(found[n][0] == "WARN" for n in ("svmmd socket", "PAM module", "nsswitch"))
    assert "systemctl enable --now svmmd.socket" in found["svmmd socket"][1]
    with svmmd_stand_in(host.socket, answer=False):  # a stale socket: nobody listens
        p = host.doctor()
    assert p.returncode == 0 and lines(p.stdout)["svmmd socket"][0] == "WARN", p.stdout
    assert "nobody listens" in lines(p.stdout)["svmmd socket"][1]


def _world_readable(host: Host) -> None:
    host.seal_key.chmod(0o644)


def _secret_readable(host: Host) -> None:
    text = host.config.read_text()
    secret = host.lab.folder / "ldap-service.secret"
    copy = host.tmp / "ldap.secret"
    shutil.copy(secret, copy)
    copy.chmod(0o644)
    host.config.write_text(text.replace(str(secret), str(copy)))


def _foreign_shim(host: Host) -> None:
    (host.root / "usr/lib/svmm/pam_svmm.py").chmod(0o666)


def _missing_shim(host: Host) -> None:
    (host.root / "usr/lib/svmm/pam_svmm.py").unlink()


def _tampered_bundle(host: Host) -> None:
    import base64
    import json

    bundle = host.tmp / "policy.bundle"
    doc = json.loads(bundle.read_text())
    doc["policy"] = base64.b64encode(POLICY.replace(b"version = 1", b"version = 2")).decode()
    bundle.write_text(json.dumps(doc))


@pytest.mark.parametrize(
    ("spoil", "check", "says"),
    [
        (_world_readable, "audit seal key", "0644"),
        (_secret_readable, "directory bind secret", "readable by root only"),
        (_foreign_shim, "PAM module", "writable by others"),
        (_missing_shim, "PAM module", "does not exist"),
        (_tampered_bundle, "policy source", "signature"),
        (None, "svmmd socket", "no valid reply"),  # something else answers there
    ],
)
def test_doctor_that_finds_a_problem_says_which_and_exits_1(
    lab: Lab, slapd: Slapd, tmp_path: Path, spoil: Callable[[Host], None] | None, check: str,
    says: str,
) -> None:  # fmt: skip
    host = Host(lab, slapd, tmp_path)
    if spoil is not None:
        spoil(host)
    with svmmd_stand_in(host.socket, reply=LAUNCHER_REPLY if spoil else b"220 smtp ready\n"):
        p = host.doctor()
    assert p.returncode == 1, p.stdout + p.stderr
    failed = {n: d for n, (s, d) in lines(p.stdout).items() if s == "FAIL"}
    also = ["directory"] if check == "directory bind secret" else []  # it cannot bind
    assert list(failed) == [check, *also], p.stdout
    assert says in failed[check], failed


def test_doctor_keeps_a_card_modules_own_messages_off_the_terminal(
    lab: Lab, slapd: Slapd, tmp_path: Path
) -> None:
    host = Host(lab, slapd, tmp_path)
    with svmmd_stand_in(host.socket):
        p = host.doctor(env={"SVMM_PINGUARD_MODULE": str(tmp_path / "no-such-module.so")})
    assert p.returncode == 1
    assert "pinguard" not in p.stderr and p.stderr == "", p.stderr
    status, detail = lines(p.stdout)["card module"]
    assert status == "FAIL" and "cannot load PKCS#11 module" in detail
    assert "the module said: pinguard: cannot load" in detail  # its words, in our message


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
