"""The fast login path: the PAM module as a thin client of svmmd (its own root process).

svmmd holds the card reader (its SOFTHSM2_CONF); the PAM application's own reader is EMPTY.
So a login that succeeds can only have been done by svmmd: a module working in-process would
find no card. `daemon=required` never falls back to the process; `daemon=auto` does when
svmmd is not there. Real parts: the PAM stack, SoftHSM2 behind pinguard, the lab CA with its
OCSP responder, slapd, a signed policy, svmmd started as `python -m pam_svmm.daemon.server`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from svmm_lab.directory import Slapd
from svmm_lab.lab import Lab
from svmm_lab.pamclient import build_client, start_session
from svmm_lab.svmmd import SvmmdProcess
from svmm_lab.userland import userland
from svmm_lab.volumes import make_volume
from tests.integration import ldap_fixtures
from tests.integration.logins import PIN

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (svmmd, other uids)"),
]
slapd = ldap_fixtures.slapd
ROOT = Path(__file__).resolve().parents[2]
ALICE_UID = 10001  # config/ldap/example-org.ldif
PAM_SUCCESS, PAM_AUTH_ERR, PAM_AUTHINFO_UNAVAIL = 0, 7, 9


@pytest.fixture(scope="module")
def fast(lab: Lab, slapd: Slapd) -> Iterator[tuple[SvmmdProcess, str, str]]:
    sock_dir = Path(tempfile.mkdtemp(prefix="svmm-fast-", dir="/tmp"))
    os.chmod(sock_dir, 0o755)  # noqa: S103 - root's folder; every user reaches the socket
    policy = (ROOT / "config" / "policy.example.toml").read_bytes()
    policy = policy.replace(b'"svmm-login"]', b'"svmm-login", "svmm-fast", "svmm-fast-auto"]')
    bundle = lab.write_policy(policy, lab.folder / "policy-fast.bundle")
    for volume in ("web-disk", "bank-a-data"):  # the volumes of the VMs alice may boot
        make_volume(lab, volume, "alice")
    overrides = (
        lab.directory_overrides(slapd)
        + lab.policy_overrides(bundle, state=lab.folder / "policy-state-fast")
        + lab.launcher_overrides(sock_dir)
    )
    sock = sock_dir / "launcher.sock"
    required = lab.variant("fast", overrides, args=f"daemon=required socket={sock}")
    auto = lab.variant("fast-auto", overrides, args=f"daemon=auto socket={sock}")
    env = {"PYTHONPATH": str(ROOT), **lab.insert("alice").env}
    daemon = SvmmdProcess(lab.folder / f"{required}.toml", sock, env, sock_dir / "svmmd.log")
    daemon.start()
    try:
        yield daemon, required, auto
    finally:
        daemon.stop()
        shutil.rmtree(sock_dir, ignore_errors=True)


def test_a_card_login_is_done_by_svmmd(lab: Lab, fast: tuple[SvmmdProcess, str, str]) -> None:
    _daemon, required, _auto = fast
    before = len(lab.audit_records())
    report = lab.login(lab.insert(), pin=PIN, service=required)  # an empty reader here
    assert report.ok, report
    assert report.user == "alice"  # mapped from the card svmmd sees, not given
    assert any(p.startswith("PIN for") for p in report.prompts)  # relayed conversation
    auth = [r for r in lab.audit_records()[before:] if r["event"] == "auth"]
    assert [(r["outcome"], r["user"]) for r in auth] == [("success", "alice")]
    assert auth[0]["roles"]  # the directory's roles, from svmmd's pooled connection


def test_wrong_pin_through_svmmd(lab: Lab, fast: tuple[SvmmdProcess, str, str]) -> None:
    _daemon, required, _auto = fast
    report = lab.login(lab.insert(), pin="000000", service=required)
    assert report.code == PAM_AUTH_ERR, report
    assert any("PIN" in m for m in report.messages), report  # svmmd's message reached us
    assert lab.login(lab.insert(), pin=PIN, service=required).ok  # the counter is reset


def test_a_pending_login_never_vouches_for_a_wrong_pin(
    lab: Lab, fast: tuple[SvmmdProcess, str, str]
) -> None:
    """pam_p11's bypass class: svmmd keeps alice's card logged in from authenticate until her
    open_session has released her keys. Meanwhile a second PAM application (`su alice` typed
    by someone else) with a wrong PIN must not log in. Each login's card helper is its own
    PKCS#11 application (adapters/card_helper.py), so the card is not "already logged in"
    for the second one: the card checks its PIN and says it is wrong. (Where one application
    does see "already logged in", that is card_busy, never a success: test_token_login.)
    Then a right PIN in a third application works while the first is still pending."""
    _daemon, required, _auto = fast
    first = start_session(
        build_client(lab.folder / "bin"), lab.pam_dir, required, "", PIN,
        env=lab.insert().env, pause=True,
    )  # fmt: skip
    try:
        assert first.authenticated == PAM_SUCCESS, first.report
        before = len(lab.audit_records())
        second = lab.login(lab.insert(), pin="000000", service=required)
        assert second.code != PAM_SUCCESS, second
        auth = [r for r in lab.audit_records()[before:] if r["event"] == "auth"]
        assert [(r["outcome"], r["reason"]) for r in auth] == [("failure", "pin_incorrect")], auth
        third = lab.login(lab.insert(), pin=PIN, service=required)
        assert third.ok, third
        first.resume()
        assert first.opened == PAM_SUCCESS  # the first login goes on unharmed
    finally:
        first.close()
    assert lab.login(lab.insert(), pin=PIN, service=required).ok  # nothing left logged in


def test_session_through_svmmd_writes_and_removes_the_allowlist(
    lab: Lab, fast: tuple[SvmmdProcess, str, str]
) -> None:
    _daemon, required, _auto = fast
    before = len(lab.audit_records())
    with lab.login(lab.insert(), pin=PIN, service=required, session=True) as session:
        assert session.opened == PAM_SUCCESS, session.report
        # The card session svmmd kept from authenticate released the volume keys to svmmd.
        released = [r for r in lab.audit_records()[before:] if r["event"] == "key_release"]
        assert sorted((r["vm"], r["outcome"]) for r in released) == [
            ("bank-a", "success"),
            ("vm-web", "success"),
        ]
        allowlist = lab.allowlist(ALICE_UID)
        assert allowlist is not None and "vm-web" in json.dumps(allowlist)
        state = list((lab.folder / "run" / "sessions").rglob("*"))
        assert any(str(session.pid) in p.read_text() for p in state if p.is_file())
    assert session.report is not None and session.report.session_close == PAM_SUCCESS
    assert lab.allowlist(ALICE_UID) is None


def test_without_svmmd_required_refuses_and_auto_runs_in_process(
    lab: Lab, fast: tuple[SvmmdProcess, str, str]
) -> None:
    daemon, required, auto = fast
    daemon.stop()
    try:
        refused = lab.login(lab.insert("alice"), pin=PIN, service=required)
        assert refused.code == PAM_AUTHINFO_UNAVAIL, refused
        # auto: the same login in this process, which needs the card in its own reader.
        assert lab.login(lab.insert(), pin=PIN, service=auto).code != PAM_SUCCESS
        local = lab.login(lab.insert("alice"), pin=PIN, service=auto)
        assert local.ok and local.user == "alice", local
    finally:
        daemon.start()


def test_svmmd_answers_pam_calls_of_root_only(fast: tuple[SvmmdProcess, str, str]) -> None:
    daemon, _required, _auto = fast
    probe = (
        "import socket,sys;from pam_svmm.pam import shim;"
        "s=socket.socket(socket.AF_UNIX);s.connect(sys.argv[1]);"
        "s.sendall(shim.MAGIC+shim.encode({'call':'authenticate','item.user':'alice'}));"
        "print(shim.read_frame(s.recv))"
    )
    p = subprocess.run(
        userland().argv("-c", probe, str(daemon.socket)),
        capture_output=True, text=True, timeout=30, check=True,
        user=ALICE_UID, group=ALICE_UID, extra_groups=[], cwd="/", env=userland().env(),
    )  # fmt: skip
    assert "unavailable" in p.stdout and "only root" in p.stdout, p.stdout
