"""The QEMU command line is built only from validated names, fixed words and fd numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pam_svmm.adapters.qemu import (
    Accel,
    LaunchFds,
    LuksDisk,
    Machine,
    RunAs,
    VmSpec,
    _key_pipe,
    build_argv,
)
from pam_svmm.errors import VmError

FDS = LaunchFds(qmp_listener=10, images={"disk0": 11}, keys={"disk0": 12})


def _spec(**kw: object) -> VmSpec:
    return VmSpec("vm1", disks=(LuksDisk("disk0", Path("/srv/vm1.img")),), **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "name",
    ["", "Vm", "1vm", "vm,id=x", "vm=1", "vm 1", "vm\n", "-vm", "a" * 32, "vm/../x", "vm\x00"],
)
def test_names_outside_the_pattern_are_refused(name: str) -> None:
    with pytest.raises(VmError) as e:
        VmSpec(name)
    assert e.value.reason == "vm_spec_invalid"
    with pytest.raises(VmError):
        LuksDisk(name, Path("/x.img"))


def test_a_31_character_name_is_accepted() -> None:
    assert VmSpec("a" * 31).name == "a" * 31


def test_spec_values_are_checked() -> None:
    with pytest.raises(VmError):
        LuksDisk("disk0", Path("relative.img"))
    with pytest.raises(VmError):
        _spec(memory_mib=8)
    with pytest.raises(VmError):
        VmSpec("vm1", disks=(LuksDisk("d", Path("/a")), LuksDisk("d", Path("/b"))))
    with pytest.raises(VmError):
        RunAs.account("root").ids()
    with pytest.raises(VmError):
        RunAs.account("no-such-user-svmm")
    with pytest.raises(VmError):
        RunAs(1000, 0).ids()


def test_argv_names_descriptors_not_paths() -> None:
    argv = build_argv(_spec(accel=Accel.KVM), FDS, binary="/usr/bin/qemu-system-x86_64")
    assert argv[0] == "/usr/bin/qemu-system-x86_64"
    assert "/srv/vm1.img" not in " ".join(argv)
    assert argv[argv.index("-accel") + 1] == "kvm"
    assert argv[argv.index("-machine") + 1] == "none"
    assert "socket,id=qmp,fd=10,server=on,wait=off" in argv
    assert "fd=11,set=1,opaque=disk0-image" in argv
    assert "secret,id=disk0-key,format=raw,file=/proc/self/fd/12" in argv
    blockdev = json.loads(argv[argv.index("-blockdev") + 1])
    assert blockdev == {
        "driver": "luks",
        "node-name": "disk0",
        "key-secret": "disk0-key",
        "read-only": False,
        "file": {"driver": "file", "filename": "/dev/fdset/1", "read-only": False},
    }
    assert argv[-1] == "-S" and "-sandbox" in argv and "-device" not in argv


def test_a_q35_vm_attaches_disks_as_virtio() -> None:
    argv = build_argv(_spec(machine=Machine.Q35, paused=False, memory_mib=256), FDS)
    assert argv[argv.index("-device") + 1] == "virtio-blk-pci,drive=disk0,id=vd-disk0,share-rw=on"
    assert argv[argv.index("-m") + 1] == "256" and "-S" not in argv


def test_missing_or_low_descriptors_are_refused() -> None:
    with pytest.raises(VmError):
        build_argv(_spec(), LaunchFds(10, {}, {"disk0": 12}))
    with pytest.raises(VmError):
        build_argv(_spec(), LaunchFds(1, {"disk0": 11}, {"disk0": 12}))


@pytest.mark.parametrize("key", [b"", b"a\x00b", b"\xff\xfe", b"x" * 4097])
def test_keys_qemu_cannot_take_are_refused_before_launch(key: bytes) -> None:
    with pytest.raises(VmError) as e:
        _key_pipe(key, None)
    assert e.value.reason == "vm_spec_invalid"


def test_devices_console_and_networks_in_the_argv() -> None:
    from pam_svmm.adapters.qemu import NetKind, Nic, UsbHost, mac_for

    spec = VmSpec(
        "vm1",
        machine=Machine.Q35,
        usb=(UsbHost.parse("046D:C52B"),),
        nics=(Nic("lab", NetKind.USER, mac_for("vm1", "lab")),
              Nic("dmz", NetKind.TAP, mac_for("vm1", "dmz"))),
        console=True,
    )  # fmt: skip
    fds = LaunchFds(qmp_listener=10, images={}, keys={}, console_listener=13, taps={"dmz": 14})
    argv = build_argv(spec, fds)
    assert "socket,id=console,fd=13,server=on,wait=off" in argv
    assert "isa-serial,chardev=console,id=serial0" in argv
    assert "qemu-xhci,id=usb" in argv
    assert "usb-host,bus=usb.0,vendorid=0x046d,productid=0xc52b,id=usb-046d-c52b" in argv
    assert "user,id=net-lab,restrict=on" in argv and "tap,id=net-dmz,fd=14" in argv
    assert f"virtio-net-pci,netdev=net-dmz,id=nic-dmz,mac={mac_for('vm1', 'dmz')}" in argv
    assert mac_for("vm1", "dmz") != mac_for("vm1", "lab") == mac_for("vm1", "lab")
    assert 13 in fds.all() and 14 in fds.all()
    with pytest.raises(VmError):  # a tap nic needs its descriptor
        build_argv(spec, LaunchFds(10, {}, {}, 13))


@pytest.mark.parametrize("text", ["046d", "046d:c52", "g46d:c52b", "046d:c52b,id=x", ":"])
def test_bad_usb_ids_are_refused(text: str) -> None:
    from pam_svmm.adapters.qemu import UsbHost

    with pytest.raises(VmError):
        UsbHost.parse(text)


def test_devices_need_a_pci_machine_and_valid_names() -> None:
    from pam_svmm.adapters.qemu import NetKind, Nic, UsbHost

    with pytest.raises(VmError):
        VmSpec("vm1", usb=(UsbHost("046d", "c52b"),))  # machine none
    with pytest.raises(VmError):
        Nic("Lab,x=1", NetKind.USER, "52:54:00:00:00:01")
    with pytest.raises(VmError):
        Nic("lab", NetKind.USER, "02:00:00:00:00:01")


def test_each_vm_gets_a_free_uid_of_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    """The lowest uid of the range no process runs as and no account holds."""
    import pwd

    from pam_svmm.adapters import vm_registry

    monkeypatch.setattr(vm_registry, "_uids_in_use", lambda: {0, 64600, 64602})
    accounts = {64601}

    def getpwuid(uid: int) -> object:
        if uid in accounts:
            return object()
        raise KeyError(uid)

    monkeypatch.setattr(pwd, "getpwuid", getpwuid)
    assert vm_registry.free_uid(64600, 64605) == 64603
    with pytest.raises(VmError) as e:
        vm_registry.free_uid(64600, 64602)
    assert e.value.reason == "vm_uids_exhausted"


def test_the_isolated_start_drops_to_the_vms_uid_after_its_private_mounts() -> None:
    argv = RunAs(64601, 64601, (993,)).wrap(["/usr/bin/qemu-system-x86_64", "-S"])
    assert argv[:5] == ["/usr/bin/unshare", "--mount", "--propagation", "private", "--"]
    setpriv = argv.index("/usr/bin/setpriv")
    assert argv[setpriv + 1 : setpriv + 4] == ["--reuid=64601", "--regid=64601", "--groups=993"]
    assert "--no-new-privs" in argv and argv[-2:] == ["/usr/bin/qemu-system-x86_64", "-S"]
    assert "uid=64601,gid=64601" in argv[setpriv - 1]  # the tmpfs options ($0 of the script)
