"""QEMU for VMs whose disks are LUKS volumes decrypted by QEMU's own LUKS driver.

How things reach QEMU (checked on QEMU 7.2):

* Volume keys: one pipe per disk, written and closed by us before exec, read by QEMU through
  ``-object secret,id=<node>-key,file=/proc/self/fd/N``. The secret object reads files with
  glib, not qemu_open, so ``/dev/fdset/N`` does NOT work for it. Reopening a pipe through
  /proc checks the pipe's owner, so when QEMU runs as another user the pipe is fchown'ed to
  that user. QEMU drains the pipe at start: the key is then only in QEMU's memory, never in
  argv, environment or a file.
* Images: opened by us and passed with ``-add-fd`` (the file driver uses qemu_open, which
  resolves ``/dev/fdset/N``), so an image can stay root-only 0600 and the unprivileged QEMU
  opens nothing by path. ``RawDisk`` (volumes.mode = "dm-crypt"): the host's mapping
  /dev/mapper/svmm-<volume>, already plaintext, goes the same way as a raw block node, no key.
* QMP: we create the listening unix socket in a private 0700 folder and hand QEMU its fd
  (``-chardev socket,fd=N,server=on,wait=off``): no race waiting for QEMU to create the
  socket, and the VM user needs no access to the folder. It keeps listening, so a restarted
  launcher can reconnect by path.

* Console: a second listening socket of ours, ``console.sock`` in the same private folder
  (``-chardev socket,id=console,fd=N``; an ``isa-serial`` on it when there is a machine).
  Only root connects to it; svmmd hands the connection to a user the policy lets in.
* Devices (need ``-machine q35``, still ``-nodefaults`` and ``-S``): ``usb-host`` by
  vendor/product id on one ``qemu-xhci`` (QEMU 7.2 starts without such a device present and
  lists it in ``info usb`` and under /machine/peripheral); ``virtio-net-pci`` on a
  ``user`` netdev (``restrict=on``) or a ``tap`` netdev whose descriptor we pass (``-netdev
  tap,fd=N``: no bridge helper, which ``-sandbox spawn=deny`` would forbid anyway). QEMU 7.2
  has no ``query-netdev``: HMP ``info network`` shows the netdevs.
* Secrets after the start: QMP ``object-del`` of a LUKS key secret succeeds while the LUKS
  node is open (checked on 7.2; the node keeps working: the driver holds the master key).

QEMU 7.2's LUKS driver reads LUKS1 only ("LUKS version 2 is not supported"): volumes meant
for this path are LUKS1 (``cryptsetup luksFormat --type luks1`` or ``qemu-img create -f
luks``), both of which dm-crypt opens too. Its passphrase must be UTF-8 text without NUL
("Data from secret ... is not valid UTF-8" otherwise): random keys are encoded before use.
QEMU 7.2 prints HMP ``qemu-io`` results on its stdout, not to the monitor, hence
``capture_stdout``.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import enum
import fcntl
import grp
import json
import os
import pwd
import re
import signal
import socket
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from ..errors import VmError, VolumeError
from .private_dir import open_private_dir

QEMU_BINARY = "/usr/bin/qemu-system-x86_64"
# QEMU ids and node names: a letter, then letters, digits, '-', '_'; node names are at most
# 31 characters. Lower case only, and nothing QEMU's option parser treats specially (',' '=').
NAME_PATTERN = re.compile(r"[a-z][a-z0-9_-]{0,30}")
MAX_KEY_BYTES = 4096  # below PIPE_BUF: the whole key fits the pipe before QEMU starts
KEY_REFUSED_TEXT = "Invalid password, cannot unlock any keyslot"
QMP_SOCKET = "qmp.sock"
GATE_SHELL = "/bin/sh"
# The gate is the shell's stdin. One line "go" lets the command run (in this process: the
# pid the launcher recorded), with /dev/null as its stdin; end of file (the launcher died)
# ends it before it started.
GATE_SCRIPT = 'IFS= read -r go || exit 75; [ "$go" = go ] || exit 75; exec "$@" </dev/null'
LOG_FILE = "qemu.log"
_KVM_GET_API_VERSION = 0xAE00
_KVM_API_VERSION = 12
# Any line qemu-io accepts here: read or write with an optional pattern or hex dump.
_QEMU_IO_COMMAND = re.compile(r"(read|write)( -P 0x[0-9a-f]{1,2}| -v)? [0-9]{1,15} [0-9]{1,9}")

T = TypeVar("T")


class Accel(enum.Enum):
    KVM = "kvm"
    TCG = "tcg"


class Machine(enum.Enum):
    NONE = "none"  # no guest at all: block layer and QMP only
    MICROVM = "microvm"
    Q35 = "q35"


def _check_name(what: str, value: str) -> str:
    if not isinstance(value, str) or not NAME_PATTERN.fullmatch(value):
        raise VmError(
            f"{what} {value!r} is not a valid name (a lower-case letter, then up to 30 "
            "lower-case letters, digits, '-' or '_')",
            reason="vm_spec_invalid",
        )
    return value


@dataclass(frozen=True)
class LuksDisk:
    """A LUKS1 image (file or block device) opened as block node ``node``."""

    node: str
    image: Path
    read_only: bool = False

    def __post_init__(self) -> None:
        _check_name("disk node", self.node)
        if not Path(self.image).is_absolute():
            raise VmError(
                f"disk {self.node}: image path must be absolute", reason="vm_spec_invalid"
            )

    @property
    def secret_id(self) -> str:
        return f"{self.node}-key"  # objects and block nodes are separate namespaces


@dataclass(frozen=True)
class RawDisk:
    """A plaintext block device (a dm-crypt mapping, /dev/mapper/svmm-<volume>, decrypted by
    the host kernel) opened as raw block node ``node``; passed by descriptor like an image,
    no key. ``block=False`` takes a regular file instead (tests on hosts without dm)."""

    node: str
    device: Path
    read_only: bool = False
    block: bool = True

    def __post_init__(self) -> None:
        _check_name("disk node", self.node)
        if not Path(self.device).is_absolute():
            raise VmError(
                f"disk {self.node}: device path must be absolute", reason="vm_spec_invalid"
            )

    @property
    def image(self) -> Path:  # what _open_image opens
        return self.device


_HEX4 = re.compile(r"[0-9a-f]{4}")
_MAC = re.compile(r"52:54:00(:[0-9a-f]{2}){3}")  # QEMU's locally administered prefix


@dataclass(frozen=True)
class UsbHost:
    """A host USB device passed through by vendor and product id (``usb-host``). QEMU
    attaches it when such a device is plugged in (libusb hotplug); until then the guest
    sees an empty port. The VM user needs access to the device node (a udev rule)."""

    vendor: str  # 4 lower-case hex digits
    product: str

    def __post_init__(self) -> None:
        if not (isinstance(self.vendor, str) and _HEX4.fullmatch(self.vendor)) or not (
            isinstance(self.product, str) and _HEX4.fullmatch(self.product)
        ):
            raise VmError(
                f"usb device {self.vendor!r}:{self.product!r}: vendor and product must be "
                "4 lower-case hex digits",
                reason="vm_spec_invalid",
            )

    @classmethod
    def parse(cls, text: str) -> UsbHost:
        """From the policy's ``VVVV:PPPP``."""
        vendor, _, product = str(text).lower().partition(":")
        return cls(vendor, product)

    @property
    def id(self) -> str:
        return f"usb-{self.vendor}-{self.product}"


class NetKind(enum.Enum):
    USER = "user"  # QEMU's user-mode stack
    TAP = "tap"  # a tap device svmmd opened; QEMU gets its descriptor


@dataclass(frozen=True)
class Nic:
    """A virtio-net device on a netdev named after the (policy, host) network."""

    network: str
    kind: NetKind
    mac: str
    restrict: bool = True  # user: no host or outside access (QEMU's restrict=on)

    def __post_init__(self) -> None:
        _check_name("network", self.network)
        if not isinstance(self.kind, NetKind):
            raise VmError("kind must be a NetKind", reason="vm_spec_invalid")
        if not isinstance(self.mac, str) or not _MAC.fullmatch(self.mac):
            raise VmError(f"network {self.network}: bad MAC {self.mac!r}", reason="vm_spec_invalid")

    @property
    def netdev_id(self) -> str:
        return f"net-{self.network}"

    @property
    def device_id(self) -> str:
        return f"nic-{self.network}"


def mac_for(vm: str, network: str) -> str:
    """A stable MAC per VM and network (52:54:00 + 3 bytes of a hash)."""
    import hashlib

    h = hashlib.sha256(f"{vm}\0{network}".encode()).digest()
    return "52:54:00:" + ":".join(f"{b:02x}" for b in h[:3])


CONSOLE_ID = "console"  # the serial console's chardev
CONSOLE_SOCKET = "console.sock"


@dataclass(frozen=True)
class VmSpec:
    name: str
    disks: tuple[LuksDisk | RawDisk, ...] = ()
    machine: Machine = Machine.NONE
    accel: Accel = Accel.TCG
    memory_mib: int = 64
    paused: bool = True  # -S: the guest CPU does not run until "cont"
    sandbox: bool = True  # seccomp: no spawning, no privilege changes, no obsolete syscalls
    usb: tuple[UsbHost, ...] = ()  # on one xHCI controller (needs a PCI machine)
    nics: tuple[Nic, ...] = ()  # virtio-net (needs a PCI machine)
    console: bool = False  # a serial console chardev on a socket of ours (console.sock)

    def __post_init__(self) -> None:
        _check_name("VM name", self.name)
        if (self.usb or self.nics) and self.machine is not Machine.Q35:
            raise VmError(
                f"VM {self.name}: USB and network devices need machine q35",
                reason="vm_spec_invalid",
            )
        usb_ok = all(isinstance(u, UsbHost) for u in self.usb)
        if not usb_ok or len(set(self.usb)) != len(self.usb):
            raise VmError(f"VM {self.name}: usb devices repeat", reason="vm_spec_invalid")
        nets = [n.network for n in self.nics if isinstance(n, Nic)]
        if len(nets) != len(self.nics) or len(set(nets)) != len(nets):
            raise VmError(f"VM {self.name}: networks repeat", reason="vm_spec_invalid")
        if not isinstance(self.machine, Machine) or not isinstance(self.accel, Accel):
            raise VmError("machine and accel must be Machine and Accel", reason="vm_spec_invalid")
        if isinstance(self.memory_mib, bool) or not 16 <= self.memory_mib <= 1 << 20:
            raise VmError(
                f"VM {self.name}: memory_mib must be between 16 and {1 << 20}",
                reason="vm_spec_invalid",
            )
        nodes = [d.node for d in self.disks]
        if len(set(nodes)) != len(nodes):
            raise VmError(f"VM {self.name}: disk nodes repeat", reason="vm_spec_invalid")


@dataclass(frozen=True)
class LaunchFds:
    """Descriptor numbers, as open in the launching process, that QEMU inherits."""

    qmp_listener: int
    images: Mapping[str, int]  # node -> image fd
    keys: Mapping[str, int]  # node -> read end of the key pipe
    console_listener: int | None = None
    taps: Mapping[str, int] = field(default_factory=dict)  # network -> tap fd

    def all(self) -> list[int]:
        console = [] if self.console_listener is None else [self.console_listener]
        return [self.qmp_listener, *console, *self.images.values(), *self.keys.values(),
                *self.taps.values()]  # fmt: skip


def build_argv(spec: VmSpec, fds: LaunchFds, *, binary: str = QEMU_BINARY) -> list[str]:
    """The QEMU command line: only validated names, fd numbers and fixed words; no paths."""
    for d in spec.disks:
        if d.node not in fds.images or (isinstance(d, LuksDisk) and d.node not in fds.keys):
            raise VmError(f"VM {spec.name}: no descriptors for disk {d.node}", reason="vm_failed")
    for n in spec.nics:
        if n.kind is NetKind.TAP and n.network not in fds.taps:
            raise VmError(f"VM {spec.name}: no tap for network {n.network}", reason="vm_failed")
    if spec.console and fds.console_listener is None:
        raise VmError(f"VM {spec.name}: no console socket", reason="vm_failed")
    for fd in fds.all():
        if isinstance(fd, bool) or not isinstance(fd, int) or fd < 3:
            raise VmError(f"VM {spec.name}: bad descriptor {fd!r}", reason="vm_failed")
    argv = [
        binary,
        "-name",
        f"guest={spec.name}",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-machine",
        spec.machine.value,
        "-accel",
        spec.accel.value,
        "-chardev",
        f"socket,id=qmp,fd={fds.qmp_listener},server=on,wait=off",
        "-mon",
        "chardev=qmp,mode=control",
    ]
    if spec.machine is not Machine.NONE:
        argv += ["-m", str(spec.memory_mib)]
    if spec.sandbox:
        argv += [
            "-sandbox",
            "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
        ]
    for fdset, d in enumerate(spec.disks, start=1):
        if isinstance(d, RawDisk):
            argv += ["-add-fd", f"fd={fds.images[d.node]},set={fdset},opaque={d.node}-device"]
            raw = {
                "driver": "raw",
                "node-name": d.node,
                "read-only": d.read_only,
                "file": {
                    "driver": "host_device" if d.block else "file",
                    "filename": f"/dev/fdset/{fdset}",
                    "read-only": d.read_only,
                },
            }
            argv += ["-blockdev", json.dumps(raw, separators=(",", ":"))]
        else:
            blockdev: dict[str, Any] = {
                "driver": "luks",
                "node-name": d.node,
                "key-secret": d.secret_id,
                "read-only": d.read_only,
                "file": {
                    "driver": "file",
                    "filename": f"/dev/fdset/{fdset}",
                    "read-only": d.read_only,
                },
            }
            argv += [
                "-add-fd",
                f"fd={fds.images[d.node]},set={fdset},opaque={d.node}-image",
                "-object",
                f"secret,id={d.secret_id},format=raw,file=/proc/self/fd/{fds.keys[d.node]}",
                "-blockdev",
                json.dumps(blockdev, separators=(",", ":")),
            ]
        if spec.machine is Machine.Q35:
            # share-rw: svmmd's own qemu-io (HMP, root's QMP only) may write the node the
            # guest's disk uses; nothing else can add a writer.
            argv += ["-device", f"virtio-blk-pci,drive={d.node},id=vd-{d.node},share-rw=on"]
        elif spec.machine is Machine.MICROVM:
            argv += ["-device", f"virtio-blk-device,drive={d.node},id=vd-{d.node}"]
    if spec.console:
        argv += [
            "-chardev",
            f"socket,id={CONSOLE_ID},fd={fds.console_listener},server=on,wait=off",
        ]
        if spec.machine is not Machine.NONE:
            argv += ["-device", f"isa-serial,chardev={CONSOLE_ID},id=serial0"]
    if spec.usb:
        argv += ["-device", "qemu-xhci,id=usb"]
        for u in spec.usb:
            argv += [
                "-device",
                f"usb-host,bus=usb.0,vendorid=0x{u.vendor},productid=0x{u.product},id={u.id}",
            ]
    for n in spec.nics:
        if n.kind is NetKind.USER:
            backend = f"user,id={n.netdev_id},restrict={'on' if n.restrict else 'off'}"
        else:
            backend = f"tap,id={n.netdev_id},fd={fds.taps[n.network]}"
        argv += [
            "-netdev",
            backend,
            "-device",
            f"virtio-net-pci,netdev={n.netdev_id},id={n.device_id},mac={n.mac}",
        ]
    if spec.paused:
        argv.append("-S")
    return argv


# --- who runs it and with what ------------------------------------------------------------


@dataclass(frozen=True)
class RunAs:
    """Who one QEMU runs as: numbers, so every VM can have a uid of its own (invariant 13;
    libvirt's per-VM labels, systemd's DynamicUser). Supplementary groups are only those
    named. ``isolate``: also a private mount namespace with its own /tmp, /var/tmp and
    /dev/shm (tmpfs owned by that uid), no new privileges and no capabilities, so nothing
    writable is shared between VMs."""

    uid: int
    gid: int
    groups: tuple[int, ...] = ()
    isolate: bool = True

    @classmethod
    def account(
        cls, user: str, group: str | None = None, extra_groups: tuple[str, ...] = ()
    ) -> RunAs:
        """A named account (its primary group unless ``group``), as tools and tests use."""
        try:
            pw = pwd.getpwnam(user)
            gid = grp.getgrnam(group).gr_gid if group else pw.pw_gid
            extra = tuple(grp.getgrnam(g).gr_gid for g in extra_groups)
        except KeyError as e:
            raise VmError(f"unknown user or group: {e.args[0]}", reason="vm_spec_invalid") from None
        return cls(pw.pw_uid, gid, extra)

    @classmethod
    def for_vm(cls, uid: int) -> RunAs:
        """A VM's own uid, its gid the same number, plus the kvm group when there is one."""
        try:
            kvm: tuple[int, ...] = (grp.getgrnam("kvm").gr_gid,)
        except KeyError:
            kvm = ()
        return cls(uid, uid, kvm)

    def ids(self) -> tuple[int, int, tuple[int, ...]]:
        if self.uid <= 0 or self.gid <= 0 or 0 in self.groups:
            raise VmError("QEMU must not run as root (uid or gid 0)", reason="vm_spec_invalid")
        return self.uid, self.gid, self.groups

    def wrap(self, argv: list[str]) -> list[str]:
        """``argv`` started as root inside a new mount namespace that mounts the private
        tmpfs folders, then dropped to this uid by setpriv (util-linux), which execs QEMU:
        one process id throughout, so the pid we get is QEMU's."""
        uid, gid, groups = self.ids()
        opts = f"mode=0700,uid={uid},gid={gid},size=16m,nosuid,nodev,noexec"
        mounts = "; ".join(f'mount -t tmpfs -o "$0" svmm-vm "{d}"' for d in PRIVATE_DIRS)
        setpriv = [
            SETPRIV, f"--reuid={uid}", f"--regid={gid}",
            f"--groups={','.join(map(str, groups))}" if groups else "--clear-groups",
            "--no-new-privs", "--inh-caps=-all", "--bounding-set=-all", "--",
        ]  # fmt: skip
        script = f'set -e; {mounts}; exec "$@"'
        return [UNSHARE, "--mount", "--propagation", "private", "--",
                "/bin/sh", "-c", script, opts, *setpriv, *argv]  # fmt: skip


UNSHARE = "/usr/bin/unshare"
SETPRIV = "/usr/bin/setpriv"
PRIVATE_DIRS = ("/tmp", "/var/tmp", "/dev/shm")  # noqa: S108 - replaced by private tmpfs


def kvm_usable(run_as: RunAs | None = None, device: Path = Path("/dev/kvm")) -> bool:
    """Whether QEMU, run as ``run_as`` (default: as us), can use KVM: the device answers the
    KVM API version ioctl and its mode bits give that user read and write."""
    try:
        fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        st = os.fstat(fd)
        if (
            not stat.S_ISCHR(st.st_mode)
            or fcntl.ioctl(fd, _KVM_GET_API_VERSION) != _KVM_API_VERSION
        ):
            return False
    except OSError:
        return False
    finally:
        os.close(fd)
    if run_as is None:
        return True
    uid, gid, extra = run_as.ids()
    if st.st_uid == uid:
        return st.st_mode & 0o600 == 0o600
    if st.st_gid == gid or st.st_gid in extra:
        return st.st_mode & 0o060 == 0o060
    return st.st_mode & 0o006 == 0o006


def detect_accel(run_as: RunAs | None = None) -> Accel:
    return Accel.KVM if kvm_usable(run_as) else Accel.TCG


# --- QMP, synchronously -------------------------------------------------------------------


class QmpSync:
    """A blocking facade over qemu.qmp's asyncio QMPClient, which runs on a private event loop
    in a daemon thread (so it also works when the caller has an event loop of its own).

    qemu.qmp logs every message at DEBUG level: never send a secret through QMP."""

    def __init__(self, name: str = "svmm", *, timeout: float = 10.0) -> None:
        from qemu.qmp import QMPClient

        self.timeout = timeout
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name=f"qmp-{name}", daemon=True
        )
        self._thread.start()
        self._client: QMPClient = self._run(self._make(name), timeout)

    @staticmethod
    async def _make(name: str) -> Any:
        from qemu.qmp import QMPClient

        return QMPClient(name)

    def _run(self, coro: Coroutine[Any, Any, T], timeout: float | None) -> T:
        if self._loop.is_closed():
            coro.close()
            raise VmError("QMP connection is closed", reason="qmp_failed")
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(self.timeout if timeout is None else timeout)
        except TimeoutError:
            future.cancel()
            raise

    def connect(self, address: str | Path, *, timeout: float | None = None) -> None:
        from qemu.qmp import QMPError

        try:
            self._run(self._client.connect(str(address)), timeout)
        except TimeoutError:
            raise VmError(f"QMP {address}: no greeting in time", reason="qmp_failed") from None
        except (QMPError, OSError) as e:
            raise VmError(f"QMP {address}: cannot connect: {e}", reason="qmp_failed") from None

    def execute(
        self,
        command: str,
        arguments: Mapping[str, object] | None = None,
        *,
        timeout: float | None = None,
    ) -> Any:
        from qemu.qmp import ExecuteError, QMPError

        try:
            return self._run(self._client.execute(command, arguments), timeout)
        except ExecuteError as e:
            raise VmError(f"QMP {command}: {e.error_class}: {e}", reason="qmp_failed") from None
        except TimeoutError:
            raise VmError(f"QMP {command}: no answer in time", reason="qmp_failed") from None
        except (QMPError, OSError) as e:
            raise VmError(f"QMP {command}: {type(e).__name__}: {e}", reason="qmp_failed") from None

    def hmp(self, command_line: str, *, timeout: float | None = None) -> str:
        out = self.execute("human-monitor-command", {"command-line": command_line}, timeout=timeout)
        if not isinstance(out, str):
            raise VmError("QMP human-monitor-command: answer is not text", reason="qmp_failed")
        return out

    def close(self) -> None:
        if self._loop.is_closed():
            return
        with contextlib.suppress(Exception):  # the disconnect re-raises what ended the session
            self._run(self._client.disconnect(), 5.0)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5.0)
        self._loop.close()

    def __enter__(self) -> QmpSync:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- the process --------------------------------------------------------------------------


@dataclass(frozen=True)
class StopResult:
    how: str  # "quit" (QMP), "term" (SIGTERM), "kill" (SIGKILL), "exited" (already gone)
    seconds: float
    returncode: int


@dataclass
class QemuVm:
    """A running QEMU; use ``launch`` and stop it with ``stop`` (or ``with``)."""

    spec: VmSpec
    argv: list[str]
    process: subprocess.Popen[bytes]
    qmp: QmpSync
    run_dir: Path
    ready_seconds: float  # from exec to a negotiated QMP session
    accel: Accel = field(default=Accel.TCG)  # what QEMU reports, not what was asked
    stdout_fd: int | None = None  # read end of QEMU's stdout, when captured

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def qmp_socket(self) -> Path:
        return self.run_dir / QMP_SOCKET

    @classmethod
    def launch(
        cls,
        spec: VmSpec,
        keys: Mapping[str, bytes | bytearray | memoryview],
        *,
        run_dir: Path,
        run_as: RunAs | None = None,
        ready_timeout: float = 10.0,
        capture_stdout: bool = False,
        binary: str = QEMU_BINARY,
        taps: Mapping[str, int] | None = None,
        on_started: Callable[[int], None] | None = None,
    ) -> QemuVm:
        """Start QEMU for ``spec`` with ``keys`` (node -> volume key; the caller keeps and
        wipes its buffers) and wait until QMP answers. ``taps``: network -> an open tap
        descriptor for each TAP nic (QEMU inherits it; the caller closes its copy). ``run_dir``:
        a private 0700 folder (created if missing) for the QMP and console sockets and QEMU's
        log. A refused key raises
        VolumeError(reason="volume_key_refused"); anything else that stops QEMU, VmError.
        ``capture_stdout``: keep a pipe from QEMU's stdout, which ``qemu_io`` needs (QEMU 7.2
        prints qemu-io results there, not to the monitor); otherwise stdout goes to the log.
        ``on_started(pid)``: called as soon as QEMU runs, before it answers (the registry
        records the start there, so a launcher that dies meanwhile leaves no unknown QEMU);
        if it raises, QEMU is killed."""
        if set(keys) != {d.node for d in spec.disks if isinstance(d, LuksDisk)}:
            raise VmError(
                f"VM {spec.name}: keys must be given for exactly its LUKS disks",
                reason="vm_spec_invalid",
            )
        ids = run_as.ids() if run_as else None
        dir_fd = open_private_dir(run_dir, key="vm.run_dir", check_parents=True)
        to_close: list[int] = [dir_fd]
        listener: socket.socket | None = None
        console: socket.socket | None = None
        stdout_r: int | None = None
        try:
            listener = _listen(run_dir / QMP_SOCKET, dir_fd)
            if spec.console:
                # Root's socket in the private folder: only svmmd connects, and hands the
                # connection to a caller the policy lets in (services/launcher.py).
                console = _listen(run_dir / CONSOLE_SOCKET, dir_fd)
            log_fd = os.open(
                LOG_FILE,
                os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o600,
                dir_fd=dir_fd,
            )
            to_close.append(log_fd)
            out_fd = log_fd
            if capture_stdout:
                stdout_r, out_fd = os.pipe2(os.O_CLOEXEC)
                to_close.append(out_fd)
                os.set_blocking(stdout_r, False)
            images: dict[str, int] = {}
            pipes: dict[str, int] = {}
            for d in spec.disks:
                images[d.node] = fd = _open_image(d)
                to_close.append(fd)
                if isinstance(d, RawDisk):
                    continue
                pipes[d.node] = fd = _key_pipe(keys[d.node], ids)
                to_close.append(fd)
            fds = LaunchFds(
                listener.fileno(),
                images,
                pipes,
                console.fileno() if console is not None else None,
                dict(taps or {}),
            )
            argv = build_argv(spec, fds, binary=binary)
            user_kw: dict[str, Any] = {}
            if run_as is not None and run_as.isolate:
                command = run_as.wrap(argv)  # root only until setpriv drops to the VM's uid
            else:
                command = argv
                if ids:
                    user_kw = {"user": ids[0], "group": ids[1], "extra_groups": list(ids[2])}
            gate: tuple[int, int] | None = None
            if on_started is not None:
                # QEMU does not start before on_started has recorded it: a shell in front
                # waits for "go" on a pipe, and exits instead if the launcher died first.
                gate = os.pipe2(os.O_CLOEXEC)
                to_close.append(gate[0])  # the write end is closed once "go" is written
                command = [GATE_SHELL, "-c", GATE_SCRIPT, "svmm-gate", *command]
            started = time.monotonic()
            process = subprocess.Popen(
                command,
                pass_fds=fds.all(),
                stdin=gate[0] if gate else subprocess.DEVNULL,
                stdout=out_fd,
                stderr=log_fd,
                env={"PATH": "/usr/bin:/bin", "LC_ALL": "C"},  # C: error texts we can match
                umask=0o077,
                start_new_session=True,
                **user_kw,
            )
        except BaseException:
            if stdout_r is not None:
                os.close(stdout_r)
            if gate is not None:
                os.close(gate[1])
            raise
        finally:
            # Only QEMU keeps these: a dead QEMU then resets our pending QMP connection.
            if listener is not None:
                listener.close()
            if console is not None:
                console.close()
            for fd in to_close:
                os.close(fd)
        qmp: QmpSync | None = None
        if on_started is not None:
            try:
                on_started(process.pid)
                assert gate is not None
                os.write(gate[1], b"go\n")
            except BaseException:
                if stdout_r is not None:
                    os.close(stdout_r)
                process.kill()
                _reap(process)
                raise
            finally:
                if gate is not None:
                    os.close(gate[1])
        try:
            qmp = QmpSync(spec.name, timeout=ready_timeout)
            qmp.connect(run_dir / QMP_SOCKET, timeout=ready_timeout)
            ready = time.monotonic() - started
            kvm = qmp.execute("query-kvm")
            accel = Accel.KVM if isinstance(kvm, dict) and kvm.get("enabled") else Accel.TCG
        except VmError as e:
            if qmp is not None:
                qmp.close()
            if stdout_r is not None:
                os.close(stdout_r)
            _reap(process)
            raise _start_error(spec, run_dir, process.returncode, e) from None
        return cls(spec, argv, process, qmp, run_dir, ready, accel, stdout_r)

    # --- control

    def execute(self, command: str, arguments: Mapping[str, object] | None = None) -> Any:
        return self.qmp.execute(command, arguments)

    def qemu_io(self, node: str, command: str) -> str:
        """Run one qemu-io command on block node ``node`` inside the VM process (HMP) and
        return what it printed. Needs ``capture_stdout``: QEMU 7.2 prints qemu-io's results
        on its stdout, synchronously, before the command's QMP answer."""
        _check_name("disk node", node)
        if not _QEMU_IO_COMMAND.fullmatch(command):
            raise VmError(f"qemu-io command not allowed: {command!r}", reason="vm_spec_invalid")
        if self.stdout_fd is None:
            raise VmError(f"VM {self.spec.name}: qemu-io needs capture_stdout at launch")
        self._drain_stdout()
        answer = self.qmp.hmp(f'qemu-io {node} "{command}"')
        return answer + self._drain_stdout()

    def _drain_stdout(self) -> str:
        chunks = []
        while self.stdout_fd is not None:
            try:
                chunk = os.read(self.stdout_fd, 65536)
            except BlockingIOError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks).decode("utf-8", "replace")

    def write_pattern(self, node: str, pattern: int, offset: int, length: int) -> None:
        out = self.qemu_io(node, f"write -P 0x{pattern:02x} {offset} {length}")
        if f"wrote {length}/{length} bytes" not in out:
            raise VmError(f"VM {self.spec.name}: write to {node} failed: {out.strip()}")

    def read_matches(self, node: str, pattern: int, offset: int, length: int) -> bool:
        """Whether ``length`` bytes at ``offset`` of ``node``, read by QEMU through its LUKS
        driver, are all ``pattern``."""
        out = self.qemu_io(node, f"read -P 0x{pattern:02x} {offset} {length}")
        if "Pattern verification failed" in out:
            return False
        if f"read {length}/{length} bytes" in out:
            return True
        raise VmError(f"VM {self.spec.name}: read from {node} failed: {out.strip()}")

    # --- stopping

    def stop(
        self, *, quit_timeout: float = 5.0, term_timeout: float = 3.0, kill_timeout: float = 3.0
    ) -> StopResult:
        """QMP quit, then SIGTERM, then SIGKILL, each with its timeout; the process is reaped."""
        started = time.monotonic()
        how = "exited"
        try:
            if self.process.poll() is None:
                how = "quit"
                # Any failure here (the connection drops as QEMU exits, or was never there)
                # only means escalating: the process must end either way.
                with contextlib.suppress(Exception):
                    self.qmp.execute("quit", timeout=quit_timeout)
                if not _wait(self.process, quit_timeout):
                    how = "term"
                    _signal(self.process, signal.SIGTERM)
                    if not _wait(self.process, term_timeout):
                        how = "kill"
                        _signal(self.process, signal.SIGKILL)
                        if not _wait(self.process, kill_timeout):
                            raise VmError(f"VM {self.spec.name}: pid {self.pid} survives SIGKILL")
        finally:
            self.qmp.close()
            if self.stdout_fd is not None:
                os.close(self.stdout_fd)
                self.stdout_fd = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.qmp_socket)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.run_dir / CONSOLE_SOCKET)
        return StopResult(how, time.monotonic() - started, self.process.returncode)

    def __enter__(self) -> QemuVm:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


# --- helpers ------------------------------------------------------------------------------


def _listen(path: Path, dir_fd: int) -> socket.socket:
    if len(os.fsencode(path)) >= 108:
        raise VmError(
            f"QMP socket path too long for a unix socket: {path}", reason="vm_spec_invalid"
        )
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path.name, dir_fd=dir_fd)  # a stale socket; the folder is private
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind(str(path))
        os.chmod(path.name, 0o600, dir_fd=dir_fd, follow_symlinks=False)
        sock.listen(4)
    except BaseException:
        sock.close()
        raise
    return sock


def _open_image(disk: LuksDisk | RawDisk) -> int:
    flags = (os.O_RDONLY if disk.read_only else os.O_RDWR) | os.O_CLOEXEC | os.O_NOFOLLOW
    if isinstance(disk, RawDisk) and disk.block:
        flags &= ~os.O_NOFOLLOW  # udev makes /dev/mapper/NAME a symlink to ../dm-N
    try:
        fd = os.open(disk.image, flags)
    except OSError as e:
        raise VolumeError(f"disk {disk.node}: {disk.image}: {e.strerror}") from None
    mode = os.fstat(fd).st_mode
    if isinstance(disk, RawDisk) and disk.block and not stat.S_ISBLK(mode):
        os.close(fd)
        raise VolumeError(f"disk {disk.node}: {disk.image} is not a block device")
    if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
        os.close(fd)
        raise VolumeError(f"disk {disk.node}: {disk.image} is not a file or block device")
    return fd


def _key_pipe(
    key: bytes | bytearray | memoryview, ids: tuple[int, int, tuple[int, ...]] | None
) -> int:
    """The read end of a pipe that holds ``key`` and has no writer left."""
    view = memoryview(key).cast("B")
    if not 0 < len(view) <= MAX_KEY_BYTES:
        raise VmError(f"a volume key must be 1 to {MAX_KEY_BYTES} bytes", reason="vm_spec_invalid")
    if not _is_text(view):
        # QEMU's LUKS driver takes the passphrase as a C string it checks for valid UTF-8.
        raise VmError(
            "a volume key for QEMU must be UTF-8 text without NUL bytes (encode random keys, "
            "e.g. as base64, before using them as LUKS passphrases)",
            reason="vm_spec_invalid",
        )
    r, w = os.pipe2(os.O_CLOEXEC)
    try:
        if ids:
            os.fchown(r, ids[0], ids[1])  # QEMU reopens it via /proc, which checks the owner
        written = 0
        while written < len(view):
            written += os.write(w, view[written:])
    except BaseException:
        os.close(r)
        raise
    finally:
        os.close(w)
    return r


def _is_text(view: memoryview) -> bool:
    if 0 in view:
        return False
    try:
        codecs.utf_8_decode(view, "strict", True)  # decodes in place: no str copy is kept
    except UnicodeDecodeError:
        return False
    return True


def _wait(process: subprocess.Popen[bytes], timeout: float) -> bool:
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        return False
    return True


def _signal(process: subprocess.Popen[bytes], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        process.send_signal(sig)


def _reap(process: subprocess.Popen[bytes]) -> None:
    """A QEMU that failed to start: give it a moment to exit by itself, then kill it."""
    if not _wait(process, 2.0):
        _signal(process, signal.SIGKILL)
        process.wait(5.0)


def _start_error(spec: VmSpec, run_dir: Path, rc: int | None, cause: VmError) -> Exception:
    text = " ".join(_read_log(run_dir).split())[-600:]
    if KEY_REFUSED_TEXT in text:
        return VolumeError(
            f"VM {spec.name}: QEMU refused the volume key: {text}", reason="volume_key_refused"
        )
    detail = text or cause.message
    return VmError(
        f"VM {spec.name}: QEMU did not start (exit {rc}): {detail}", reason="vm_start_failed"
    )


def _read_log(run_dir: Path) -> str:
    try:
        fd = os.open(run_dir / LOG_FILE, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return ""
    with os.fdopen(fd, "rb") as f:
        return f.read(64 * 1024).decode("utf-8", "replace")
