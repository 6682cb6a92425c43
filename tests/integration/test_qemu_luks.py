"""QEMU's own LUKS driver opens a cryptsetup-made volume with a key handed through a pipe:
data written through one QEMU process reads back in a fresh one, a wrong key is refused, the
key is never in QEMU's argv or environment, QEMU runs as nobody with nothing open to it but
its descriptors, and stopping escalates quit -> SIGTERM -> SIGKILL with nothing left over."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pam_svmm.adapters.qemu import (
    Accel,
    LuksDisk,
    Machine,
    QemuVm,
    QmpSync,
    RunAs,
    VmSpec,
    detect_accel,
    kvm_usable,
)
from pam_svmm.errors import VmError, VolumeError

QEMU = shutil.which("qemu-system-x86_64")
CRYPTSETUP = shutil.which("cryptsetup")

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 not installed"),
    pytest.mark.skipif(CRYPTSETUP is None, reason="cryptsetup not installed"),
]


def _key() -> bytearray:
    # With a newline and non-ASCII: QEMU's raw secret and cryptsetup's key file must agree.
    return bytearray("\nsvmm-é-".encode() + secrets.token_hex(20).encode())


def _luks_format(image: Path, key: bytes | bytearray, luks_type: str = "luks1") -> None:
    with open(image, "wb") as f:
        f.truncate(16 << 20 if luks_type == "luks1" else 32 << 20)
    subprocess.run(
        [CRYPTSETUP, "luksFormat", "--batch-mode", "--type", luks_type, "--key-file=-",
         "--pbkdf-force-iterations", "1000", *(["--pbkdf", "pbkdf2"] if luks_type == "luks2"
                                                else []), str(image)],
        input=bytes(key), check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    os.chmod(image, 0o600)


@pytest.fixture
def key() -> bytearray:
    return _key()


@pytest.fixture
def image(tmp_path: Path, key: bytearray) -> Path:
    path = tmp_path / "images" / "vm.img"
    path.parent.mkdir()
    _luks_format(path, key)
    return path


def _spec(image: Path, **kw: object) -> VmSpec:
    return VmSpec("testvm", disks=(LuksDisk("disk0", image),), **kw)  # type: ignore[arg-type]


def _launch(tmp_path: Path, spec: VmSpec, key: bytearray, **kw: object) -> QemuVm:
    return QemuVm.launch(
        spec,
        {"disk0": key},
        run_dir=tmp_path / "run",
        capture_stdout=True,
        **kw,  # type: ignore[arg-type]
    )


def _gone(pid: int) -> bool:
    return not Path(f"/proc/{pid}").exists()


@pytest.fixture
def launched() -> Iterator[list[QemuVm]]:
    """VMs a test started; any still running at the end are killed (and the test fails)."""
    vms: list[QemuVm] = []
    yield vms
    left = [vm for vm in vms if vm.process.poll() is None]
    for vm in left:
        vm.stop(quit_timeout=1, term_timeout=1)
    assert not left, "a test left QEMU running"


def test_written_pattern_reads_back_in_a_fresh_process(
    tmp_path: Path, image: Path, key: bytearray, launched: list[QemuVm]
) -> None:
    accel = detect_accel()
    first = _launch(tmp_path, _spec(image, accel=accel), key)
    launched.append(first)
    assert first.accel is accel  # what QEMU reports (query-kvm) is what was detected
    assert first.read_matches("disk0", 0x5A, 0, 4096) is False  # fresh volume: not our pattern
    first.write_pattern("disk0", 0x5A, 0, 4096)
    assert first.read_matches("disk0", 0x5A, 0, 4096)
    assert first.stop().how == "quit"

    # The ciphertext on the host is not the pattern: QEMU encrypted it.
    data = image.read_bytes()
    assert b"\x5a" * 512 not in data

    second = _launch(tmp_path, _spec(image, accel=accel), key)
    launched.append(second)
    assert second.pid != first.pid
    assert second.read_matches("disk0", 0x5A, 0, 4096)
    assert not second.read_matches("disk0", 0x11, 0, 4096)
    dump = second.qemu_io("disk0", "read -v 0 512")
    assert "5a 5a 5a 5a" in dump
    assert second.stop().how == "quit"
    assert _gone(first.pid) and _gone(second.pid)


def test_the_key_is_not_in_argv_environ_or_files_and_its_pipe_is_drained(
    tmp_path: Path, image: Path, key: bytearray, launched: list[QemuVm]
) -> None:
    vm = _launch(tmp_path, _spec(image), key)
    launched.append(vm)
    secret = bytes(key)
    printable = secret[9:]  # the part a sloppy encoder would keep
    cmdline = Path(f"/proc/{vm.pid}/cmdline").read_bytes()
    environ = Path(f"/proc/{vm.pid}/environ").read_bytes()
    assert cmdline.split(b"\0")[:-1] == [a.encode() for a in vm.argv]
    for blob in (cmdline, environ, json.dumps(vm.argv).encode()):
        assert secret not in blob and printable not in blob
        assert printable.hex().encode() not in blob
    assert b"disk0" in cmdline and str(image).encode() not in cmdline  # image goes by fd
    for f in (tmp_path / "run").iterdir():
        if f.is_file():
            assert printable not in f.read_bytes()
    # The secret object's descriptor is a pipe QEMU has drained: nothing left to steal there.
    key_fd = next(a for a in vm.argv if a.startswith("secret,")).rsplit("/", 1)[1]
    fd = os.open(f"/proc/{vm.pid}/fd/{key_fd}", os.O_RDONLY | os.O_NONBLOCK)
    try:
        assert os.read(fd, 4096) == b""
    finally:
        os.close(fd)
    vm.stop()


def test_a_wrong_key_is_refused_by_qemu_and_nothing_is_left_running(
    tmp_path: Path, image: Path, key: bytearray
) -> None:
    wrong = _key()
    before = _qemu_pids()
    with pytest.raises(VolumeError) as e:
        QemuVm.launch(_spec(image), {"disk0": wrong}, run_dir=tmp_path / "run", capture_stdout=True)
    assert e.value.reason == "volume_key_refused"
    assert "Invalid password, cannot unlock any keyslot" in e.value.message
    assert bytes(wrong)[9:] not in e.value.message.encode()
    assert _qemu_pids() <= before


def test_luks2_is_not_opened_by_qemu_7_2(tmp_path: Path, key: bytearray) -> None:
    # The reason volumes for the QEMU path are LUKS1: this fails loudly the day QEMU learns LUKS2.
    image = tmp_path / "l2.img"
    _luks_format(image, key, "luks2")
    with pytest.raises(VmError) as e:
        _launch(tmp_path, _spec(image), key)
    assert e.value.reason == "vm_start_failed"
    assert "LUKS version 2 is not supported" in e.value.message


def test_runs_as_nobody_with_only_its_descriptors(
    tmp_path: Path, image: Path, key: bytearray, launched: list[QemuVm]
) -> None:
    if os.geteuid() != 0:
        pytest.skip("running QEMU as another user needs root")
    # Folders anyone may traverse, so that only the image's own mode keeps nobody out.
    os.chmod(tmp_path, 0o755)  # noqa: S103
    os.chmod(image.parent, 0o755)  # noqa: S103
    as_nobody = subprocess.run(
        ["/bin/cat", str(image)], user="nobody", capture_output=True, timeout=10, check=False
    )
    assert as_nobody.returncode != 0 and b"Permission denied" in as_nobody.stderr

    run_as = RunAs.account("nobody", "nogroup")
    accel = detect_accel(run_as)
    assert accel is (Accel.KVM if kvm_usable(run_as) else Accel.TCG)
    vm = _launch(tmp_path, _spec(image, accel=accel), key, run_as=run_as)  # fmt: skip
    launched.append(vm)
    status = Path(f"/proc/{vm.pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines())
    assert fields["Uid"].split() == ["65534"] * 4
    assert fields["Gid"].split() == ["65534"] * 4
    assert fields["Groups"].split() == []
    assert int(fields["Seccomp"]) == 2  # -sandbox on
    assert vm.accel is accel
    vm.write_pattern("disk0", 0xC3, 8192, 4096)
    assert vm.read_matches("disk0", 0xC3, 8192, 4096)
    # The run folder and socket are root's; the image stayed root-only.
    run = tmp_path / "run"
    assert (run.stat().st_uid, run.stat().st_mode & 0o777) == (0, 0o700)
    assert (vm.qmp_socket.stat().st_uid, vm.qmp_socket.stat().st_mode & 0o777) == (0, 0o600)
    assert (image.stat().st_uid, image.stat().st_mode & 0o777) == (0, 0o600)
    assert vm.stop().how == "quit"


def test_stop_escalates_to_sigterm_then_sigkill(
    tmp_path: Path, image: Path, key: bytearray, launched: list[QemuVm]
) -> None:
    # No QMP connection: quit cannot be sent, SIGTERM ends QEMU.
    vm = _launch(tmp_path, _spec(image), key)
    launched.append(vm)
    vm.qmp.close()
    result = vm.stop(quit_timeout=0.5, term_timeout=5)
    assert result.how == "term"
    assert "terminating on signal 15" in (tmp_path / "run" / "qemu.log").read_text()
    assert _gone(vm.pid)

    # A stopped (frozen) QEMU answers neither quit nor SIGTERM: SIGKILL it is.
    vm = _launch(tmp_path, _spec(image), key)
    launched.append(vm)
    os.kill(vm.pid, signal.SIGSTOP)
    started = time.monotonic()
    result = vm.stop(quit_timeout=0.5, term_timeout=0.5)
    assert (result.how, result.returncode) == ("kill", -signal.SIGKILL)
    assert time.monotonic() - started < 5
    assert _gone(vm.pid)
    assert not vm.qmp_socket.exists()


def test_a_restarted_launcher_reconnects_to_the_qmp_socket(
    tmp_path: Path, image: Path, key: bytearray, launched: list[QemuVm]
) -> None:
    vm = _launch(tmp_path, _spec(image), key)
    launched.append(vm)
    vm.qmp.close()
    with QmpSync("again", timeout=5) as qmp:
        qmp.connect(vm.qmp_socket)
        assert qmp.execute("query-status")["status"] == "prelaunch"
        names = [n["node-name"] for n in qmp.execute("query-named-block-nodes")]
        assert "disk0" in names
        with pytest.raises(VmError) as e:
            qmp.execute("no-such-command")
        assert e.value.reason == "qmp_failed" and "CommandNotFound" in e.value.message
    vm.qmp = QmpSync("stopper", timeout=5)
    vm.qmp.connect(vm.qmp_socket)
    assert vm.stop().how == "quit"


def test_qemu_img_luks_images_open_in_qemu_and_in_cryptsetup(
    tmp_path: Path, key: bytearray, launched: list[QemuVm]
) -> None:
    image = tmp_path / "qi.img"
    for _attempt in range(5):
        r, w = os.pipe()
        os.write(w, bytes(key))
        os.close(w)
        try:
            made = subprocess.run(
                ["qemu-img", "create", "-f", "luks", "--object",
                 f"secret,id=s0,format=raw,file=/proc/self/fd/{r}", "-o",
                 "key-secret=s0,iter-time=50", str(image), "8M"],
                pass_fds=[r], capture_output=True, timeout=60, check=False,
            )  # fmt: skip
        finally:
            os.close(r)
        # QEMU times its PBKDF on CPU usage; on a loaded machine that measurement can fail
        # ("Unable to get accurate CPU usage"): that is the benchmark, not the volume.
        if made.returncode == 0 or b"accurate CPU usage" not in made.stderr:
            break
    assert made.returncode == 0, made.stderr
    test = subprocess.run(
        [CRYPTSETUP, "luksOpen", "--test-passphrase", "--key-file=-", str(image)],
        input=bytes(key), capture_output=True, timeout=60, check=False,
    )  # fmt: skip
    assert test.returncode == 0, test.stderr
    vm = _launch(tmp_path, _spec(image), key)
    launched.append(vm)
    vm.write_pattern("disk0", 0x77, 0, 512)
    assert vm.read_matches("disk0", 0x77, 0, 512)
    vm.stop()


def test_a_q35_vm_gets_the_disk_as_a_virtio_device(
    tmp_path: Path, image: Path, key: bytearray, launched: list[QemuVm]
) -> None:
    spec = _spec(image, machine=Machine.Q35, accel=detect_accel(), memory_mib=64)
    vm = _launch(tmp_path, spec, key)
    launched.append(vm)
    blocks = vm.execute("query-block")
    seen = [(b["qdev"], b["inserted"]["node-name"], b["inserted"]["encrypted"]) for b in blocks]
    assert seen == [("/machine/peripheral/vd-disk0/virtio-backend", "disk0", True)]
    assert vm.execute("query-status")["status"] == "prelaunch"  # -S: no guest code ran
    vm.stop()


def _qemu_pids() -> set[int]:
    out = set()
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                exe = os.readlink(p / "exe")
            except OSError:
                continue
            if exe.endswith("qemu-system-x86_64"):
                out.add(int(p.name))
    return out
