"""End to end: pulling the card that released a VM's keys pauses the VM and wipes the keys;
putting it back resumes nothing until the user logs in with it again and asks ``resume``.

Real parts as in test_volume_session.py (PAM stack, SoftHSM2 cards behind pinguard, lab CA and
OCSP, slapd, LUKS1 volumes, QEMU as nobody) plus svmmd's card watch polling the same PKCS#11
module (pinguard's ``removed`` marker empties the slot, as pulling the card out would)."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pam_svmm.adapters.token import Pkcs11Module
from pam_svmm.config import load
from pam_svmm.daemon.server import bind_socket, serving
from pam_svmm.services.launcher import Launcher
from svmm_lab import pinguard
from svmm_lab.directory import Slapd
from svmm_lab.lab import Lab, Reader
from svmm_lab.volumes import make_volume
from tests.integration import ldap_fixtures
from tests.integration.logins import PIN
from tests.integration.volume_session import (  # noqa: F401
    ALICE_UID,
    ROOT,
    records,
    socket_dir,
    vm,
)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        shutil.which("qemu-system-x86_64") is None, reason="qemu-system-x86_64 not installed"
    ),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (svmmd, other uids)"),
]
slapd = ldap_fixtures.slapd
INTERVAL = 0.2  # [launcher] card_poll_interval


@pytest.fixture
def reader(lab: Lab, monkeypatch: pytest.MonkeyPatch) -> Reader:
    """alice's card in a reader this process (svmmd's card watch) sees too."""
    r = lab.insert("alice")
    for name, value in r.env.items():
        monkeypatch.setenv(name, value)
    return r


@pytest.fixture
def service(
    lab: Lab,
    slapd: Slapd,
    socket_dir: Path,  # noqa: F811
    reader: Reader,
) -> Iterator[tuple[str, Launcher]]:
    policy = (ROOT / "config" / "policy.example.toml").read_bytes()
    policy = policy.replace(b'"svmm-login"]', b'"svmm-login", "svmm-card-removal"]')
    assert b"svmm-card-removal" in policy
    bundle = lab.write_policy(policy, lab.folder / "policy-card-removal.bundle")
    for volume in ("web-disk", "bank-a-data"):
        make_volume(lab, volume, "alice")
    name = lab.variant(
        "card-removal",
        lab.directory_overrides(slapd)
        # Its own accepted-policy state: another test's bundle (same version) came first.
        + lab.policy_overrides(bundle, state=lab.folder / "policy-state-card-removal")
        + lab.launcher_overrides(socket_dir, card_poll_interval=INTERVAL),
    )
    config = load(lab.folder / f"{name}.toml")
    assert config.launcher.card_poll_interval == INTERVAL
    assert config.launcher.card_removal.value == "pause"
    launcher = Launcher.from_config(config, syslog_mirror=False)
    # svmmd main()'s wiring: the card watch over the configured module (pinguard here).
    module = Pkcs11Module(config.pkcs11.module)
    watch = launcher.start_card_watch(module)
    assert watch.interval == INTERVAL
    try:
        with serving(launcher, bind_socket(config.launcher.socket)):
            yield name, launcher
    finally:
        assert launcher.stop_card_watch()
        for running in list(launcher.registry.running()):
            launcher.registry.stop(running, quit_timeout=2, term_timeout=2, kill_timeout=2)
        launcher.close()
        module.close()


def qmp_status(launcher: Launcher, name: str) -> str:
    handle = launcher.registry.get(name)
    assert handle is not None, f"{name} is not running"
    return str(handle.status()["status"])


def wait_status(launcher: Launcher, name: str, want: str, timeout: float) -> float:
    """Seconds until QMP's query-status says ``want``; fails after ``timeout``."""
    start = time.monotonic()
    while (status := qmp_status(launcher, name)) != want:
        assert time.monotonic() - start < timeout, f"{name} still {status}, not {want}"
        time.sleep(0.02)
    return time.monotonic() - start


def test_card_removal_pauses_the_vm_and_wipes_its_keys_until_a_new_login(
    lab: Lab,
    service: tuple[str, Launcher],
    socket_dir: Path,  # noqa: F811
    reader: Reader,
) -> None:
    service_name, launcher = service
    before = len(lab.audit_records())
    with lab.login(reader, pin=PIN, user="alice", service=service_name,
                   session=True) as session:  # fmt: skip
        assert session.opened == 0, session.report
        serials = launcher.keys.card_serials(ALICE_UID)
        assert len(serials) == 1, serials  # the token serial hold_keys carried
        (serial,) = serials
        code, started = vm(socket_dir, "start", "vm-web")
        assert code == 0 and started["ok"], started
        record = launcher.registry.running()["vm-web"]
        assert record.token_serial == serial
        assert qmp_status(launcher, "vm-web") == "prelaunch"  # start leaves it held (-S)
        code, resumed = vm(socket_dir, "resume", "vm-web")
        assert code == 0 and resumed["data"]["status"] == "running", resumed

        # Pull the card out: within about two polls the VM is paused and the keys are gone.
        pinguard.set_removed(lab.pinguard_state, serial, True)
        try:
            took = wait_status(launcher, "vm-web", "paused", timeout=10 * INTERVAL)
            assert took < 3 * INTERVAL + 0.3, f"paused only after {took:.2f}s"
            deadline = time.monotonic() + 2
            while not records(lab, before, "card_removed"):
                assert time.monotonic() < deadline, "no card_removed record"
                time.sleep(0.02)
            removed = records(lab, before, "card_removed")
            assert [(r["vm"], r["user"], r["reason"]) for r in removed] == [
                ("vm-web", "alice", "paused")
            ]
            assert removed[0]["card"]["token_serial"] == serial
            assert "configured action pause" in removed[0]["detail"]
            # The session the card opened is locked through logind: its record names the
            # card (no logind runs where the suite does: then that is what it says).
            deadline = time.monotonic() + 2
            while not records(lab, before, "session_lock"):
                assert time.monotonic() < deadline, "no session_lock record"
                time.sleep(0.02)
            (lock,) = records(lab, before, "session_lock")
            assert (lock["user"], lock["card"]["token_serial"]) == ("alice", serial)
            assert lock["reason"] in ("locked", "no_logind_session", "session_lock_failed")
            # The keys were wiped first; their records come after the VMs' and sessions'.
            deadline = time.monotonic() + 2
            while len(wiped := [r for r in records(lab, before, "key_drop")
                                if r["reason"] == "card_removed"]) < 2:  # fmt: skip
                assert time.monotonic() < deadline, f"key_drop records: {wiped}"
                time.sleep(0.02)
            assert sorted(r["detail"].split("volume=")[-1] for r in wiped) == [
                "bank-a-data",
                "web-disk",
            ]
            code, listed = vm(socket_dir, "list")
            assert code == 0 and listed["data"]["keys_held"] == [], listed
            assert "vm-web" in listed["data"]["running"]
            code, other = vm(socket_dir, "start", "bank-a")
            assert code != 0 and other["reason"] == "volume_key_unavailable", other
            code, refused = vm(socket_dir, "resume", "vm-web")
            assert code != 0 and refused["reason"] == "volume_key_unavailable", refused
        finally:
            # Put it back: nothing resumes by itself (await a PIN login).
            pinguard.set_removed(lab.pinguard_state, serial, False)
        deadline = time.monotonic() + 10 * INTERVAL
        while not records(lab, before, "card_inserted"):
            assert time.monotonic() < deadline, "no card_inserted record"
            time.sleep(0.02)
        inserted = records(lab, before, "card_inserted")
        assert [(r["vm"], r["reason"]) for r in inserted] == [("vm-web", "await_pin")]
        time.sleep(3 * INTERVAL)
        assert qmp_status(launcher, "vm-web") == "paused"
        code, refused = vm(socket_dir, "resume", "vm-web")
        assert code != 0 and refused["reason"] == "volume_key_unavailable", refused

        # A new login with the card hands the keys over again; then resume runs the VM.
        with lab.login(reader, pin=PIN, user="alice", service=service_name,
                       session=True) as again:  # fmt: skip
            assert again.opened == 0, again.report
            assert launcher.keys.card_serials(ALICE_UID) == {serial}
            code, resumed = vm(socket_dir, "resume", "vm-web")
            assert code == 0 and resumed["ok"], resumed
            assert resumed["data"] == {"vm": "vm-web", "status": "running"}
            assert qmp_status(launcher, "vm-web") == "running"
            code, status = vm(socket_dir, "status", "vm-web")
            assert code == 0 and status["data"]["status"] == "running", status
            code, twice = vm(socket_dir, "resume", "vm-web")
            assert code != 0 and twice["reason"] == "vm_not_paused", twice
            # Another user cannot resume (or see) alice's VM.
            code, other = vm(socket_dir, "resume", "vm-web", uid=10002)
            assert code != 0 and other["reason"] == "not_owner", other
        resumes = records(lab, before, "vm_resume")
        assert [(r["vm"], r["user"], r["outcome"]) for r in resumes] == [
            ("vm-web", "alice", "success")
        ] * 2
        code, stopped = vm(socket_dir, "stop", "vm-web")
        assert code == 0 and stopped["ok"], stopped
    assert launcher.keys.card_serials() == set()
