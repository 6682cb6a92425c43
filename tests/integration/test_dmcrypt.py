"""volumes.mode = "dm-crypt" for real: cryptsetup maps LUKS2 images, the refcount and the
rollback act on real mappings, card removal suspends them, QEMU reads a mapping as a raw
disk by descriptor, and a card session through the real PAM stack opens (or, on a host
without device-mapper, clearly refuses) the user's volumes.

Most of this needs device-mapper (/dev/mapper/control and dm-crypt in the kernel); on a host
without it those tests skip, naming the cause, and the issue-7 guest runs them. What runs
everywhere: QEMU reading a RawDisk (a plain file standing in for the mapping) and the PAM
session that must fail with ``dm_unavailable`` where device-mapper is missing."""

from __future__ import annotations

import os
import secrets
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from pam_svmm import config
from pam_svmm.adapters.luks import Cryptsetup, Pbkdf, device_mapper_available
from pam_svmm.adapters.qemu import QemuVm, RawDisk, VmSpec, detect_accel
from pam_svmm.domain.allowlist import VmAllowance
from pam_svmm.errors import VolumeError
from pam_svmm.services.dmcrypt import DmcryptVolumes, mapping_name, mapping_path
from tests.integration import ldap_fixtures
from tests.unit.key_release_fixtures import Login, allowlist

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (cryptsetup, device nodes)"),
]
DM = device_mapper_available()
needs_dm = pytest.mark.skipif(
    not DM,
    reason="no device-mapper on this host (/dev/mapper/control missing or no device-mapper "
    "in /proc/misc): cryptsetup open cannot map volumes here; the issue-7 guest runs this",
)
needs_qemu = pytest.mark.skipif(
    shutil.which("qemu-system-x86_64") is None, reason="qemu-system-x86_64 not installed"
)
SIZE = 32 << 20  # LUKS2's header alone takes 16 MiB
# In the e2e guest QEMU runs under TCG inside a TCG guest: its QMP greeting took over 10 s
# there once (the default ready timeout), so these data-path tests wait longer for it.
QEMU_READY = 120.0
slapd = ldap_fixtures.slapd


# --- real mappings ------------------------------------------------------------------------


@dataclass
class Keys:
    """The card's part (services.volumes.Volumes.release): the passphrase of each image;
    the card itself is covered by test_volume_session.py."""

    keys: dict[str, bytes]
    wrong: set[str] = field(default_factory=set)

    def release(self, path: Path, unlock: Any) -> bytearray:
        key = self.keys[path.stem]
        return bytearray(b"wrong" + key if path.stem in self.wrong else key)


@dataclass
class Host:
    dm: DmcryptVolumes
    keys: Keys
    names: list[str]  # volume names, unique per test
    records: list[tuple[Any, ...]] = field(default_factory=list)

    def open(self, sid: str, volumes: list[str] | None = None) -> Any:
        vms = {f"vm-{i}": VmAllowance(("boot",), (v,)) for i, v in enumerate(volumes or self.names)}
        return self.dm.release(allowlist(vms), Login(), sid, lambda *r: self.records.append(r))


@pytest.fixture
def host(tmp_path: Path) -> Iterator[Host]:
    tag = secrets.token_hex(3)
    names = [f"t{tag}-{x}" for x in ("a", "b", "c")]
    vols = tmp_path / "volumes"
    vols.mkdir(mode=0o700)
    cs = Cryptsetup()
    keys: dict[str, bytes] = {}
    for name in names:
        image = vols / f"{name}.img"
        with open(image, "wb") as f:
            f.truncate(SIZE)
        keys[name] = secrets.token_urlsafe(32).encode()
        cs.format(image, keys[name], pbkdf=Pbkdf.fast(), luks_type="luks2")
    cfg = config.parse(
        {
            "policy": {"enabled": True},
            "volumes": {"enabled": True, "dir": str(vols), "mode": "dm-crypt"},
            "session": {"state_dir": str(tmp_path / "sessions")},
        }
    )
    k = Keys(keys)
    try:
        yield Host(DmcryptVolumes(cfg, cryptsetup=cs, volumes=k), k, names)
    finally:
        for name in names:  # whatever a failing test left mapped
            if DM and cs.mapping_active(mapping_name(name)):
                subprocess.run(["cryptsetup", "close", mapping_name(name)], check=False)


def _active(name: str) -> bool:
    r = subprocess.run(["cryptsetup", "status", mapping_name(name)], capture_output=True)
    return r.returncode == 0


@needs_dm
def test_three_volumes_open_root_only_and_the_last_logout_closes(host: Host) -> None:
    assert sorted(r.volume for r in host.open("s1")) == host.names
    for name in host.names:
        node = mapping_path(name).resolve()
        st = os.stat(node)
        assert stat.S_ISBLK(st.st_mode) and st.st_uid == 0 and stat.S_IMODE(st.st_mode) == 0o600
    # Plaintext through the mapping, ciphertext in the image.
    with open(mapping_path(host.names[0]), "r+b", buffering=0) as f:
        f.write(b"\x5a" * 4096)
        os.fsync(f.fileno())
    assert b"\x5a" * 4096 not in (host.dm.config.volumes.dir / f"{host.names[0]}.img").read_bytes()
    host.open("s2")  # reused: refcount 2
    host.dm.close_session("s1")
    assert all(_active(n) for n in host.names)
    events = host.dm.close_session("s2")
    assert sorted(e.reason for e in events) == ["closed"] * 3
    assert not any(_active(n) for n in host.names)


@needs_dm
def test_the_third_failing_closes_the_first_two(host: Host) -> None:
    host.keys.wrong = {host.names[2]}
    with pytest.raises(VolumeError) as e:
        host.open("s1")
    assert e.value.reason == "volume_key_refused"
    assert not any(_active(n) for n in host.names)
    assert not (host.dm.records.folder / "0.json").exists()


@needs_dm
def test_a_mapping_opened_by_someone_else_is_refused(host: Host) -> None:
    name = host.names[1]
    image = host.dm.config.volumes.dir / f"{name}.img"
    subprocess.run(
        ["cryptsetup", "open", "--key-file=-", str(image), mapping_name(name)],
        input=host.keys.keys[name],
        check=True,
    )
    with pytest.raises(VolumeError) as e:
        host.open("s1")
    assert e.value.reason == "mapping_foreign"
    assert _active(name) and not _active(host.names[0])  # theirs kept, ours rolled back


@needs_dm
def test_card_removal_suspends_and_the_next_login_resumes(host: Host) -> None:
    host.open("s1", host.names[:1])
    events = host.dm.card_removed("tok-alice")
    assert [e.reason for e in events] == ["suspended"]
    assert host.dm.open_volumes(10001) == {}
    # luksResume refuses a mapping that is not suspended: "resumed" proves it was.
    host.open("s2", host.names[:1])
    assert host.records[-1][2] == "resumed"
    with open(mapping_path(host.names[0]), "rb", buffering=0) as f:
        assert len(f.read(4096)) == 4096  # I/O flows again
    host.dm.close_session("s1")
    host.dm.close_session("s2")
    assert not _active(host.names[0])


@needs_dm
@needs_qemu
def test_qemu_reads_the_mapping_as_a_raw_disk(host: Host, tmp_path: Path) -> None:
    name = host.names[0]
    host.open("s1", [name])
    with open(mapping_path(name), "r+b", buffering=0) as f:
        f.write(b"\x5a" * 4096)
        os.fsync(f.fileno())
    spec = VmSpec(
        "testvm", disks=(RawDisk("disk0", mapping_path(name)),), accel=detect_accel(), console=False
    )
    vm = QemuVm.launch(
        spec, {}, run_dir=tmp_path / "run", capture_stdout=True, ready_timeout=QEMU_READY
    )
    try:
        assert vm.read_matches("disk0", 0x5A, 0, 4096)
        assert str(mapping_path(name)).encode() not in Path(f"/proc/{vm.pid}/cmdline").read_bytes()
    finally:
        vm.stop()
    host.dm.close_session("s1")
    assert not _active(name)


# --- runs everywhere ----------------------------------------------------------------------


@needs_qemu
def test_qemu_reads_a_raw_disk_by_descriptor(tmp_path: Path) -> None:
    """The RawDisk path (-add-fd, raw driver) with a plain file standing in for a mapping."""
    plain = tmp_path / "plain.img"
    with open(plain, "wb") as f:
        f.write(b"\x5a" * 4096)
        f.truncate(1 << 20)
    os.chmod(plain, 0o600)
    spec = VmSpec(
        "testvm", disks=(RawDisk("disk0", plain, block=False),), accel=detect_accel(), console=False
    )
    vm = QemuVm.launch(
        spec, {}, run_dir=tmp_path / "run", capture_stdout=True, ready_timeout=QEMU_READY
    )
    try:
        assert vm.read_matches("disk0", 0x5A, 0, 4096)
        assert not vm.read_matches("disk0", 0x5A, 4096, 4096)
        vm.write_pattern("disk0", 0x33, 8192, 512)
        assert b"plain.img" not in Path(f"/proc/{vm.pid}/cmdline").read_bytes()
    finally:
        vm.stop()
    assert plain.read_bytes()[8192 : 8192 + 512] == b"\x33" * 512


# --- through the PAM stack ------------------------------------------------------------------

ALICE_UID = 10001  # config/ldap/example-org.ldif


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="svmm-dm-", dir="/tmp"))
    os.chmod(d, 0o755)  # noqa: S103 - root's folder; every user reaches the socket in it
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _dm_service(lab: Any, slapd: Any, socket_dir: Path, *, volumes: bool) -> str:
    """A PAM service of the lab in dm-crypt mode (alice may boot vm-web: web-disk, and
    bank-a: bank-a-data)."""
    from tests.integration.volume_session import ROOT

    policy = (ROOT / "config" / "policy.example.toml").read_bytes()
    policy = policy.replace(b'"svmm-login"]', b'"svmm-login", "svmm-dmcrypt"]')
    bundle = lab.write_policy(policy, lab.folder / "policy-dmcrypt.bundle")
    if volumes:
        from svmm_lab.volumes import make_volume

        for volume in ("web-disk", "bank-a-data"):
            make_volume(lab, volume, "alice", luks_type="luks2")  # LUKS1 (made first) maps too
    launcher = lab.launcher_overrides(socket_dir).replace('mode = "vmm"', 'mode = "dm-crypt"')
    assert 'mode = "dm-crypt"' in launcher
    return str(
        lab.variant(
            "dmcrypt",
            lab.directory_overrides(slapd)
            + lab.policy_overrides(bundle, state=lab.folder / "policy-state-dmcrypt")
            + launcher,
        )
    )


@pytest.mark.skipif(DM, reason="this host has device-mapper (the refusal is for hosts without)")
def test_session_open_says_dm_crypt_is_unavailable(lab: Any, slapd: Any, socket_dir: Path) -> None:
    from tests.integration.logins import PIN

    service = _dm_service(lab, slapd, socket_dir, volumes=False)
    before = len(lab.audit_records())
    session = lab.login(lab.insert("alice"), pin=PIN, user="alice", service=service, session=True)
    try:
        assert session.opened == 14, session.report  # PAM_SESSION_ERR
    finally:
        session.close()
    new = lab.audit_records()[before:]
    assert [r["outcome"] for r in new if r["event"] == "auth"] == ["success"]
    released = [r for r in new if r["event"] == "key_release"]
    assert {(r["vm"], r["outcome"], r["reason"]) for r in released} == {
        ("bank-a", "failure", "dm_unavailable"),
        ("vm-web", "failure", "dm_unavailable"),
    }
    (opened,) = [r for r in new if r["event"] == "session_open"]
    assert (opened["outcome"], opened["reason"]) == ("error", "dm_unavailable")
    assert "dm-crypt" in opened["detail"] and "device-mapper" in opened["detail"]
    assert lab.allowlist(ALICE_UID) is None  # the session counted is closed again


@needs_dm
@needs_qemu
def test_a_card_session_opens_the_mapping_and_the_vm_reads_it(
    lab: Any, slapd: Any, socket_dir: Path
) -> None:
    from pam_svmm.config import load
    from pam_svmm.daemon.server import bind_socket, serving
    from pam_svmm.services.launcher import Launcher
    from tests.integration.logins import PIN
    from tests.integration.volume_session import vm

    service = _dm_service(lab, slapd, socket_dir, volumes=True)
    cfg = load(lab.folder / f"{service}.toml")
    launcher = Launcher.from_config(cfg, syslog_mirror=False)
    before = len(lab.audit_records())
    try:
        with serving(launcher, bind_socket(cfg.launcher.socket)):
            with lab.login(
                lab.insert("alice"), pin=PIN, user="alice", service=service, session=True
            ) as session:
                assert session.opened == 0, session.report
                assert _active("web-disk") and _active("bank-a-data")
                st = os.stat(mapping_path("web-disk").resolve())
                assert st.st_uid == 0 and stat.S_IMODE(st.st_mode) == 0o600
                code, started = vm(socket_dir, "start", "vm-web")
                assert code == 0 and started["ok"], started
                handle = launcher.registry.get("vm-web")
                assert handle is not None
                assert handle.qmp.hmp('qemu-io web-disk "write -P 0x5a 0 65536"') == ""
                assert handle.qmp.hmp('qemu-io web-disk "read -P 0x5a 0 65536"') == ""
                code, stopped = vm(socket_dir, "stop", "vm-web")
                assert code == 0 and stopped["ok"], stopped
                log = (Path(handle.record.run_dir) / "qemu.log").read_text()
                assert "Pattern verification failed" not in log
            # The last logout closed the mappings.
            assert not _active("web-disk") and not _active("bank-a-data")
            code, refused = vm(socket_dir, "start", "vm-web")
            assert code != 0 and refused.get("reason") in ("volume_not_open", "no_allowlist")
    finally:
        for running in list(launcher.registry.running()):
            launcher.registry.stop(running, quit_timeout=2, term_timeout=2, kill_timeout=2)
        launcher.close()
        for v in ("web-disk", "bank-a-data"):
            if _active(v):
                subprocess.run(["cryptsetup", "close", mapping_name(v)], check=False)
    new = lab.audit_records()[before:]
    opened = [r for r in new if r["event"] == "key_release" and r["outcome"] == "success"]
    assert sorted(r["reason"] for r in opened) == ["opened", "opened"]
    assert any(r["event"] == "volume_close" and r["reason"] == "closed" for r in new)
