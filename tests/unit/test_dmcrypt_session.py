"""volumes.mode = "dm-crypt" at session open and close, card removal, the launcher's disks.

The kernel is a stand-in (this host has no device-mapper): ``KernelCryptsetup`` is the real
adapters.luks.Cryptsetup with only its process runner replaced by a table of mappings, so the
argv each step builds (and that no key is in it) is the real one. The card is a stand-in too
(``Volumes.release``; tests/integration/test_volume_session.py runs a real card).
tests/integration/test_dmcrypt.py runs cryptsetup and dm for real where dm exists."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from pam_svmm import config
from pam_svmm.adapters.luks import Cryptsetup
from pam_svmm.adapters.qemu import LaunchFds, RawDisk, VmSpec, build_argv
from pam_svmm.domain.allowlist import VmAllowance
from pam_svmm.domain.audit_record import CardFacts, Outcome
from pam_svmm.errors import VolumeError
from pam_svmm.services.dmcrypt import DmcryptVolumes, mapping_name
from tests.unit.key_release_fixtures import (  # the clock, the allowlist, login and card
    NOW,
    VMS,
    Login,
    Volumes,
    allowlist,
)

ALL = ["db-disk", "db-logs", "web-disk"]


@dataclass
class Mapping_:
    suspended: bool = False
    deferred: bool = False
    busy: bool = False  # a QEMU has it open


@dataclass
class KernelCryptsetup(Cryptsetup):
    """Cryptsetup whose children are a dict of mappings; every call's argv is recorded."""

    dm: bool = True
    table: dict[str, Mapping_] = field(default_factory=dict)
    calls: list[list[str]] = field(default_factory=list)
    stdin: list[bytes] = field(default_factory=list)  # keys seen on stdin, in order
    fail_open: set[str] = field(default_factory=set)
    secured: list[str] = field(default_factory=list)

    def require_dm(self) -> None:
        if not self.dm:
            raise VolumeError(
                "device-mapper is not available on this host (no /dev/mapper/control)",
                reason="dm_unavailable",
            )

    def secure_mapping(self, name: str) -> Path:
        self.secured.append(name)
        return Path("/dev/mapper") / name

    def _run(
        self,
        what: str,
        target: Path | str,
        args: Sequence[str],
        *,
        stdin_key: bytes | bytearray | memoryview | None = None,
        fd_keys: Sequence[bytes | bytearray | memoryview] = (),
        refused: str | None = None,
    ) -> str:
        argv = [self.binary, *args]
        self.calls.append(argv)
        if stdin_key is not None:
            self.stdin.append(bytes(stdin_key))
        verb, name = args[0], args[-1]
        m = self.table.get(name)
        if verb == "open":
            if name in self.fail_open:
                raise VolumeError(
                    f"{refused} (No key available with this passphrase.)",
                    reason="volume_key_refused",
                )
            if m is not None:
                raise VolumeError(f"cryptsetup open failed on {target}: Device {name} exists")
            self.table[name] = Mapping_()
        elif m is None:
            raise VolumeError(f"cryptsetup {what} failed on {name}: Device {name} not found")
        elif verb == "close" and "--cancel-deferred" in args:
            m.deferred = False
        elif verb == "close" and "--deferred" in args:
            m.deferred = True
        elif verb == "close":
            if m.busy:
                raise VolumeError(f"cryptsetup close failed on {name}: Device {name} is busy.")
            del self.table[name]
        elif verb == "luksSuspend":
            m.suspended = True
        elif verb == "luksResume":
            m.suspended = False
        return ""

    def verbs(self) -> list[str]:
        return [" ".join(c[1:]) for c in self.calls if c[1] != "status"]


@pytest.fixture
def cfg(tmp_path: Path) -> config.Config:
    vols = tmp_path / "volumes"
    vols.mkdir()
    for name in (*ALL, "secret-disk"):
        (vols / f"{name}.img").write_bytes(b"LUKS")
    return config.parse(
        {
            "policy": {"enabled": True},
            "volumes": {"enabled": True, "dir": str(vols), "mode": "dm-crypt"},
            "session": {
                "state_dir": str(tmp_path / "sessions"),
                "allowlist_dir": str(tmp_path / "allowlists"),
            },
        }
    )


@dataclass
class World:
    dm: DmcryptVolumes
    cs: KernelCryptsetup
    volumes: Volumes
    records: list[tuple[str, Outcome, str, str, str]] = field(default_factory=list)

    def open(
        self,
        sid: str,
        *,
        login: Any = None,
        user: str = "alice",
        pid: int | None = None,
        vms: Mapping[str, VmAllowance] = VMS,
    ) -> Any:
        return self.dm.release(
            allowlist(vms, user=user),
            login or Login(),
            sid,
            lambda *r: self.records.append(r),
            pid=pid,
        )

    def state(self) -> dict[str, Any]:
        path = self.dm.records.folder / "0.json"
        return json.loads(path.read_text())["sessions"] if path.exists() else {}


@pytest.fixture
def world(cfg: config.Config) -> World:
    cs, volumes = KernelCryptsetup(), Volumes()
    return World(DmcryptVolumes(cfg, cryptsetup=cs, volumes=volumes, now=lambda: NOW), cs, volumes)


def dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_open_maps_every_volume_of_a_bootable_vm_with_keys_on_stdin_only(world: World) -> None:
    out = world.open("s1")
    assert sorted(r.volume for r in out) == ALL
    assert sorted(world.cs.table) == ["svmm-db-disk", "svmm-db-logs", "svmm-web-disk"]
    assert sorted(world.cs.secured) == sorted(world.cs.table)  # node made root's 0600
    opens = [c for c in world.cs.calls if c[1] == "open"]
    assert opens[0][:5] == ["cryptsetup", "open", "--type", "luks", "--key-file=-"]
    assert opens[0][5].endswith("/db-disk.img") and opens[0][6] == "svmm-db-disk"
    assert sorted(world.cs.stdin) == [f"pass-{v}".encode() for v in ALL]
    assert not any("pass-" in a for c in world.cs.calls for a in c)  # never in argv
    assert all(set(b) == {0} for b in world.volumes.given)  # wiped
    entry = world.state()["s1"]
    assert entry["volumes"] == ALL and entry["uid"] == 10001 and entry["pid"] == os.getpid()
    assert entry["token_serial"] == "tok-alice"
    assert [(r[0], r[1], r[2], r[3]) for r in world.records] == [
        ("key_release", Outcome.SUCCESS, "opened", "vm-db"),
        ("key_release", Outcome.SUCCESS, "opened", "vm-db"),
        ("key_release", Outcome.SUCCESS, "opened", "vm-web"),
    ]
    assert not any("pass-" in r[4] for r in world.records)
    mode = os.stat(world.dm.records.folder / "0.json").st_mode & 0o777
    assert mode == 0o600 and os.stat(world.dm.records.folder).st_mode & 0o077 == 0


def test_a_volume_the_card_holds_no_key_for_is_skipped_and_audited(world: World) -> None:
    world.volumes.not_enrolled = ("db-disk",)
    out = world.open("s1")
    assert sorted(r.volume for r in out) == ["db-logs", "web-disk"]
    assert sorted(world.cs.table) == ["svmm-db-logs", "svmm-web-disk"]
    assert world.state()["s1"]["volumes"] == ["db-logs", "web-disk"]
    (skip,) = [r for r in world.records if r[2] == "card_not_enrolled"]
    assert skip[1] is Outcome.FAILURE and skip[3] == "vm-db" and "skipped" in skip[4]


def test_the_third_of_three_failing_closes_the_first_two(world: World) -> None:
    world.cs.fail_open = {"svmm-web-disk"}
    with pytest.raises(VolumeError) as e:
        world.open("s1")
    assert e.value.reason == "volume_key_refused"
    assert world.cs.table == {}  # the two opened are closed again
    assert world.cs.verbs()[-2:] == ["close svmm-db-logs", "close svmm-db-disk"]
    assert world.state() == {}  # nothing recorded
    assert all(set(b) == {0} for b in world.volumes.given)
    failed = [r for r in world.records if r[1] is Outcome.FAILURE]
    assert [r[2] for r in failed] == ["volume_key_refused"] * 3
    assert "rolled back" in failed[-1][4] and "closed /dev/mapper/svmm-db-disk" in failed[-1][4]


def test_a_card_release_failure_rolls_back_too(world: World) -> None:
    world.volumes.fail_on = "db-logs"
    with pytest.raises(VolumeError):
        world.open("s1")
    assert world.cs.table == {} and world.state() == {}


def test_a_second_session_reuses_and_the_last_logout_closes(world: World) -> None:
    world.open("s1")
    before = len([c for c in world.cs.calls if c[1] == "open"])
    out = world.open("s2")
    assert sorted(r.volume for r in out) == ALL
    assert len([c for c in world.cs.calls if c[1] == "open"]) == before  # reused
    assert {r[2] for r in world.records[-3:]} == {"reused"}
    assert len(world.volumes.given) == 6  # the card released each key again
    assert world.dm.close_session("s1") == []  # s2 still holds them
    assert len(world.cs.table) == 3
    closed = world.dm.close_session("s2")
    assert sorted((e.volume, e.reason) for e in closed) == [(v, "closed") for v in ALL]
    assert world.cs.table == {} and world.state() == {}
    assert not (world.dm.records.folder / "0.json").exists()


def test_a_session_with_fewer_volumes_keeps_only_those(world: World) -> None:
    world.open("s1")
    world.open("s2", user="bob", vms={"vm-web": VMS["vm-web"]})  # shares web-disk
    world.dm.close_session("s1")
    assert sorted(world.cs.table) == ["svmm-web-disk"]
    assert world.dm.open_volumes(10002) == {"web-disk": frozenset({"tok-alice"})}
    assert world.dm.open_volumes(10001) == {}
    world.dm.close_session("s2")
    assert world.cs.table == {}


def test_a_mapping_we_did_not_open_is_refused_not_adopted(world: World) -> None:
    world.cs.table["svmm-db-logs"] = Mapping_()  # someone else's
    with pytest.raises(VolumeError) as e:
        world.open("s1")
    assert e.value.reason == "mapping_foreign"
    assert "not opened by svmm" in e.value.message and "svmm-db-logs" in e.value.message
    assert sorted(world.cs.table) == ["svmm-db-logs"]  # ours rolled back, theirs untouched
    assert world.state() == {}
    assert "close svmm-db-logs" not in world.cs.verbs()


def test_without_device_mapper_the_session_fails_before_any_key_is_released(
    world: World,
) -> None:
    world.cs.dm = False
    with pytest.raises(VolumeError) as e:
        world.open("s1")
    assert e.value.reason == "dm_unavailable"
    assert "dm-crypt" in e.value.message and "device-mapper" in e.value.message
    assert world.volumes.given == [] and world.cs.calls == []
    assert {(r[1], r[2]) for r in world.records} == {(Outcome.FAILURE, "dm_unavailable")}


def test_no_card_login_opens_nothing(world: World) -> None:
    assert world.open("s1", login=Login(method="password", card_session=None)) == []
    assert world.cs.calls == [] and {r[2] for r in world.records} == {"no_card"}


def test_card_removal_suspends_and_a_new_login_resumes_with_the_key(world: World) -> None:
    world.open("s1")
    assert set(world.dm.open_volumes(10001)) == set(ALL)
    assert world.dm.card_serials() == {"tok-alice"}
    events = world.dm.card_removed("tok-alice")
    assert sorted((e.volume, e.reason) for e in events) == [(v, "suspended") for v in ALL]
    assert all(m.suspended for m in world.cs.table.values())
    assert world.dm.open_volumes(10001) == {}  # the launcher says volume_not_open
    assert world.dm.card_serials() == set()
    world.cs.stdin.clear()
    out = world.open("s2")  # a new login with the card
    assert sorted(r.volume for r in out) == ALL
    assert {r[2] for r in world.records[-3:]} == {"resumed"}
    resumes = [c[1:] for c in world.cs.calls if c[1] == "luksResume"]
    assert resumes == [["luksResume", "--key-file=-", mapping_name(v)] for v in ALL]
    assert sorted(world.cs.stdin) == [f"pass-{v}".encode() for v in ALL]
    assert not any(m.suspended for m in world.cs.table.values())
    assert set(world.dm.open_volumes(10001)) == set(ALL)
    # The old session still counts for the refcount: closing s2 keeps the mappings.
    world.dm.close_session("s2")
    assert len(world.cs.table) == 3
    world.dm.close_session("s1")
    assert world.cs.table == {}


def test_card_removal_leaves_a_mapping_another_card_still_uses(world: World) -> None:
    world.open("s1")
    bob = Login(card=CardFacts(fingerprint="cd" * 32, token_serial="tok-bob"))
    world.open("s2", login=bob, user="bob", vms={"vm-web": VMS["vm-web"]})
    events = {e.volume: e.reason for e in world.dm.card_removed("tok-alice")}
    assert events == {"db-disk": "suspended", "db-logs": "suspended", "web-disk": "in_use"}
    assert not world.cs.table["svmm-web-disk"].suspended


def test_a_busy_mapping_closes_deferred_and_is_still_ours_at_the_next_login(
    world: World,
) -> None:
    world.open("s1", vms={"vm-web": VMS["vm-web"]})
    world.cs.table["svmm-web-disk"].busy = True  # QEMU still has it open
    (event,) = world.dm.close_session("s1")
    assert (event.volume, event.ok, event.reason) == ("web-disk", True, "close_deferred")
    assert world.cs.table["svmm-web-disk"].deferred
    out = world.open("s2", vms={"vm-web": VMS["vm-web"]})  # not "foreign"
    assert [r.volume for r in out] == ["web-disk"]
    assert "close --cancel-deferred svmm-web-disk" in world.cs.verbs()
    assert not world.cs.table["svmm-web-disk"].deferred


def test_a_session_whose_process_died_is_pruned_and_its_mappings_closed(world: World) -> None:
    world.open("s1", pid=dead_pid(), vms={"vm-db": VMS["vm-db"]})
    world.open("s2", vms={"vm-web": VMS["vm-web"]})
    assert sorted(world.cs.table) == ["svmm-web-disk"]
    assert list(world.state()) == ["s2"]
    closes = [r for r in world.records if r[0] == "volume_close"]
    assert sorted(r[4].split(":")[0] for r in closes) == ["volume db-disk", "volume db-logs"]


def test_a_closed_or_unknown_session_closes_nothing(world: World) -> None:
    assert world.dm.close_session("nope") == []
    world.open("s1")
    world.dm.close_session("s1")
    assert world.dm.close_session("s1") == []


@pytest.mark.parametrize("bad", ["", "Web", "../x", "a" * 32, "x y", "-x"])
def test_mapping_names_are_validated(bad: str) -> None:
    with pytest.raises(VolumeError):
        mapping_name(bad)
    assert mapping_name("web-disk") == "svmm-web-disk"


def test_the_launcher_gets_raw_mapped_disks_by_descriptor() -> None:
    spec = VmSpec(
        "vm1", disks=(RawDisk("web-disk", Path("/dev/mapper/svmm-web-disk")),), console=False
    )
    argv = build_argv(spec, LaunchFds(qmp_listener=10, images={"web-disk": 11}, keys={}))
    assert "/dev/mapper/svmm-web-disk" not in " ".join(argv)
    i = argv.index("-add-fd")
    assert argv[i + 1] == "fd=11,set=1,opaque=web-disk-device"
    blockdev = json.loads(argv[argv.index("-blockdev") + 1])
    assert blockdev == {
        "driver": "raw",
        "node-name": "web-disk",
        "read-only": False,
        "file": {"driver": "host_device", "filename": "/dev/fdset/1", "read-only": False},
    }
    assert "-object" not in argv  # no key: the host kernel decrypts


def test_the_launcher_refuses_a_volume_no_session_has_open(cfg: config.Config) -> None:
    from pam_svmm.errors import LauncherRefused
    from pam_svmm.services.launcher import Launcher

    class Policy:
        host = "h"

    class Audit:
        def write(self, record: Any) -> None:
            pass

    launcher = Launcher(cfg, policy=Policy(), audit=Audit())  # type: ignore[arg-type]
    world = World(launcher.dmcrypt, KernelCryptsetup(), Volumes())
    assert isinstance(world.dm, DmcryptVolumes)
    world.dm.cryptsetup = world.cs
    world.dm.volumes = world.volumes
    with pytest.raises(LauncherRefused) as e:
        launcher._disks(10001, ("web-disk",))
    assert e.value.reason == "volume_not_open"
    assert launcher._list(10001).data["volumes_open"] == []
    world.open("s1", vms={"vm-web": VMS["vm-web"]})
    assert launcher._list(10001).data["volumes_open"] == ["web-disk"]  # svmm vm list says so
    assert launcher._list(10002).data["volumes_open"] == []
    (disk,) = launcher._disks(10001, ("web-disk",))
    assert disk == RawDisk("web-disk", Path("/dev/mapper/svmm-web-disk"))
    assert launcher._token_serial(10001, ("web-disk",), "") == "tok-alice"
    with pytest.raises(LauncherRefused):
        launcher._disks(10002, ("web-disk",))  # bob's sessions opened nothing
    world.dm.card_removed("tok-alice")
    with pytest.raises(LauncherRefused) as e:
        launcher._disks(10001, ("web-disk",))  # suspended since the card left
    assert e.value.reason == "volume_not_open"
