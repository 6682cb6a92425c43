"""End to end: a card login opens a PAM session, the card releases the keys of the user's VM
volumes, svmmd holds them, the user boots the VM, whose QEMU process reads and writes the
decrypted disk; the last logout drops the keys; a revoked card releases nothing.

Real parts: the PAM stack, SoftHSM2 cards, the lab CA and OCSP responder, slapd, a signed
policy, LUKS1 volumes made by cryptsetup, svmmd as its own root process, QEMU as nobody."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from pam_svmm.config import load
from pam_svmm.daemon.server import bind_socket, serving
from pam_svmm.services.launcher import Launcher
from svmm_lab.directory import Slapd
from svmm_lab.lab import Lab
from svmm_lab.volumes import make_volume
from tests.integration import ldap_fixtures
from tests.integration.logins import PIN
from tests.integration.volume_session import ALICE_UID, ROOT, records, socket_dir, vm

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        shutil.which("qemu-system-x86_64") is None, reason="qemu-system-x86_64 not installed"
    ),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (svmmd, other uids)"),
]
slapd = ldap_fixtures.slapd
__all__ = ["socket_dir"]  # fixtures


@pytest.fixture
def service(lab: Lab, slapd: Slapd, socket_dir: Path) -> Iterator[tuple[str, Launcher]]:
    policy = (ROOT / "config" / "policy.example.toml").read_bytes()
    # The example policy, with this test's PAM service allowed on the lab host.
    policy = policy.replace(b'"svmm-login"]', b'"svmm-login", "svmm-volumes"]')
    assert b"svmm-volumes" in policy
    bundle = lab.write_policy(policy, lab.folder / "policy-volumes.bundle")
    for volume in ("web-disk", "bank-a-data"):  # the volumes of the VMs alice may boot
        make_volume(lab, volume, "alice")
    name = lab.variant(
        "volumes",
        lab.directory_overrides(slapd)
        + lab.policy_overrides(bundle)
        + lab.launcher_overrides(socket_dir),
    )
    config = load(lab.folder / f"{name}.toml")
    # svmmd's own wiring, served from a thread of this process so the test can reach the VM's
    # QMP connection (QEMU takes one QMP client: the launcher's).
    launcher = Launcher.from_config(config, syslog_mirror=False)
    try:
        with serving(launcher, bind_socket(config.launcher.socket)):
            yield name, launcher
    finally:
        for running in list(launcher.registry.running()):
            launcher.registry.stop(running, quit_timeout=2, term_timeout=2, kill_timeout=2)
        launcher.close()


def test_session_keys_boot_the_vm_with_its_decrypted_disk(
    lab: Lab, service: tuple[str, Launcher], socket_dir: Path
) -> None:
    service_name, launcher = service
    before = len(lab.audit_records())
    with lab.login(lab.insert("alice"), pin=PIN, user="alice", service=service_name,
                   session=True) as session:  # fmt: skip
        assert session.opened == 0, session.report
        released = records(lab, before, "key_release")
        assert sorted((r["vm"], r["outcome"]) for r in released) == [
            ("bank-a", "success"),
            ("vm-web", "success"),
        ]
        assert all(r["card"]["token"] == "alice ID card" for r in released)

        code, started = vm(socket_dir, "start", "vm-web")
        assert code == 0 and started["ok"], started
        assert started["data"]["volumes"] == ["web-disk"]
        pid = started["data"]["pid"]
        assert 70000 <= os.stat(f"/proc/{pid}").st_uid <= 70255  # the VM's own uid
        for what in ("cmdline", "environ"):
            assert b"web-disk.img" not in Path(f"/proc/{pid}/{what}").read_bytes()

        # The VM process writes and reads its disk through QEMU's LUKS driver; on the host
        # the image holds only ciphertext.
        handle = launcher.registry.get("vm-web")
        assert handle is not None
        assert handle.qmp.hmp('qemu-io web-disk "write -P 0x5a 0 65536"') == ""
        assert handle.qmp.hmp('qemu-io web-disk "read -P 0x5a 0 65536"') == ""
        code, stopped = vm(socket_dir, "stop", "vm-web")
        assert code == 0 and stopped["ok"], stopped
        log = (Path(handle.record.run_dir) / "qemu.log").read_text()
        assert "Pattern verification failed" not in log and log.count("65536/65536") == 2
        image = (lab.folder / "volumes" / "web-disk.img").read_bytes()
        assert b"\x5a" * 4096 not in image

        # Another user cannot boot alice's VM (no allowlist of theirs names it).
        code, other = vm(socket_dir, "start", "vm-web", uid=10002)
        assert code != 0 and not other.get("ok")
    # The last logout drops the keys: the VM can no longer boot.
    dropped = records(lab, before, "key_drop")
    assert dropped and dropped[-1]["outcome"] == "success"
    audit = lab.audit_path.read_text()
    assert '"passphrase"' not in audit


def test_a_revoked_card_releases_nothing(
    lab: Lab, service: tuple[str, Launcher], socket_dir: Path
) -> None:
    before = len(lab.audit_records())
    report = lab.login(lab.insert("mallory"), pin=PIN, user="mallory", service=service[0])
    assert report.name == "PAM_AUTH_ERR"
    assert records(lab, before, "key_release") == []
    assert records(lab, before, "session_open") == []


def test_a_dead_login_is_no_grant(
    lab: Lab, service: tuple[str, Launcher], socket_dir: Path
) -> None:
    """Invariant 12. The PAM application that opened alice's session is SIGKILLed (as is a
    login whose process crashed, or svmmd killed during open_session): it never closes its
    session, and its allowlist and the keys it handed over stayed behind, so VMs started
    with no live login at all. Now the next request finds no live session, forgets the grant
    (allowlist removed, keys dropped, audited session_lost) and refuses."""
    import signal

    service_name, launcher = service
    session = lab.login(lab.insert("alice"), pin=PIN, user="alice", service=service_name,
                        session=True)  # fmt: skip
    assert session.opened == 0
    assert lab.allowlist(ALICE_UID) is not None and launcher.keys.held(ALICE_UID)
    before = len(lab.audit_records())
    session.proc.send_signal(signal.SIGKILL)
    session.proc.wait(10)
    code, started = vm(socket_dir, "start", "vm-web")
    assert code != 0 and started.get("reason") == "no_live_session", started
    assert lab.allowlist(ALICE_UID) is None and not launcher.keys.held(ALICE_UID)
    lost = records(lab, before, "session_lost")
    assert len(lost) == 1 and lost[0]["user"] == "alice", lost
    # svmmd's sweeper finds nothing more to do; a new login grants again.
    assert launcher.sweep_sessions() == []
    with lab.login(lab.insert("alice"), pin=PIN, user="alice", service=service_name,
                   session=True) as again:  # fmt: skip
        assert again.opened == 0
        code, started = vm(socket_dir, "start", "vm-web")
        assert code == 0 and started["ok"], started
        assert vm(socket_dir, "stop", "vm-web")[0] == 0


def test_the_sweeper_forgets_a_dead_login_without_a_request(
    lab: Lab, service: tuple[str, Launcher], socket_dir: Path
) -> None:
    import signal

    service_name, launcher = service
    session = lab.login(lab.insert("alice"), pin=PIN, user="alice", service=service_name,
                        session=True)  # fmt: skip
    assert session.opened == 0 and launcher.keys.held(ALICE_UID)
    assert launcher.sweep_sessions() == []  # alive: nothing to forget
    session.proc.send_signal(signal.SIGKILL)
    session.proc.wait(10)
    assert launcher.sweep_sessions() == [ALICE_UID]
    assert lab.allowlist(ALICE_UID) is None and not launcher.keys.held(ALICE_UID)


def test_a_new_policy_takes_effect_in_svmmd_at_once(
    lab: Lab, slapd: Slapd, socket_dir: Path
) -> None:
    """svmmd once kept deciding with the policy it loaded at start: after a new signed
    bundle took a grant away, it still booted the VM until restarted. Now a changed bundle
    is loaded at the next check (svmmd looks every few seconds), audited, and a running VM
    it no longer allows is stopped (launcher.on_grant_revoked = "stop", the default)."""
    text = (ROOT / "config" / "policy.example.toml").read_text()
    text = text.replace('"svmm-login"]', '"svmm-login", "svmm-reload"]')
    bundle = lab.write_policy(text.encode(), lab.folder / "policy-reload.bundle")
    for volume in ("web-disk", "bank-a-data"):
        make_volume(lab, volume, "alice")
    name = lab.variant(
        "reload",
        lab.directory_overrides(slapd)
        + lab.policy_overrides(bundle, state=lab.folder / "policy-state-reload")
        + lab.launcher_overrides(socket_dir),
    )
    launcher = Launcher.from_config(load(lab.folder / f"{name}.toml"), syslog_mirror=False)
    try:
        with (
            serving(launcher, bind_socket(launcher.config.launcher.socket)),
            lab.login(
                lab.insert("alice"), pin=PIN, user="alice", service=name, session=True
            ) as session,
        ):
            assert session.opened == 0
            assert launcher.check_policy() is None  # nothing changed: nothing asked
            code, started = vm(socket_dir, "start", "vm-web")
            assert code == 0 and started["ok"], started
            before = len(lab.audit_records())
            # Version 2 takes boot on vm-web away from every role alice has.
            revoked = text.replace("version = 1", "version = 2").replace(
                'vm = "vm-web"\npermissions = ["boot", ', 'vm = "vm-web"\npermissions = ['
            )
            assert revoked.count('vm = "vm-web"\npermissions = ["console"') == 2
            lab.write_policy(revoked.encode(), bundle)
            load_result = launcher.check_policy()
            assert load_result is not None and load_result.event.value == "accepted"
            assert launcher.registry.get("vm-web") is None  # stopped
            revoked_records = records(lab, before, "grant_revoked")
            assert [(r["vm"], r["reason"]) for r in revoked_records] == [("vm-web", "stopped")]
            assert records(lab, before, "policy_load")[0]["outcome"] == "success"
            code, again = vm(socket_dir, "start", "vm-web")
            assert code != 0 and again.get("reason") in ("no_grant", "not_in_allowlist"), again
    finally:
        for running in list(launcher.registry.running()):
            launcher.registry.stop(running, quit_timeout=2, term_timeout=2, kill_timeout=2)
        launcher.close()
