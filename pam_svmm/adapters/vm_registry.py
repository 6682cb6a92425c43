"""The launcher's running VMs: QEMU processes, their QMP connections, and a root-only record
per VM so that a restarted launcher finds them again.

``<registry_dir>/<vm>.json`` (0600 in a root-only 0700 folder, replaced atomically) holds the
pid, the process start time (from /proc: a recycled pid is never mistaken for the VM), the QMP
socket, the owner uid and user, and the card that started it. ``reattach()`` reads every
record, keeps those whose process is still the same QEMU and answers on QMP, and removes the
rest. One VM id runs at most once on the host: its run folder and disks are the VM's.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..domain.bounded import loads_json
from ..errors import SvmmError, VmError
from .private_dir import open_private_dir, replace_file
from .processes import start_time
from .qemu import CONSOLE_SOCKET, NAME_PATTERN, QMP_SOCKET, QemuVm, QmpSync, RunAs, VmSpec

FORMAT = "svmm-vm/1"
STARTING = ".starting"  # <vm>.starting: a start under way (QEMU runs, not yet answering)
_RECORD_MODE = 0o600
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VmRecord:
    vm: str
    uid: int
    user: str
    pid: int
    start_time: int  # /proc/<pid>/stat field 22 (clock ticks since boot)
    qmp_socket: str
    run_dir: str
    card_fingerprint: str = ""
    card_serial: str = ""  # the certificate's serial (the allowlist's card)
    started_at: str = ""  # ISO 8601, UTC
    # The token serial of the card whose session released the VM's keys: its removal
    # pauses or stops the VM (services/card_removal.py).
    token_serial: str = ""

    def to_json(self) -> bytes:
        return (json.dumps({"format": FORMAT, **asdict(self)}, sort_keys=True) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes) -> VmRecord:
        """ValueError (InputMalformed among them) for anything but a well-formed record."""
        doc = loads_json(data, max_bytes=1 << 16, max_depth=2, what="VM record")
        if not isinstance(doc, dict) or doc.pop("format", None) != FORMAT:
            raise ValueError(f"not a {FORMAT} record")
        unknown, missing = set(doc) - _FIELDS, _FIELDS - _OPTIONAL - set(doc)
        if unknown or missing or not all(isinstance(doc.get(k, ""), str) for k in _TEXT):
            raise ValueError("missing or unknown fields, or text fields that are not strings")
        rec = cls(**doc)
        # Bounded as the kernel's types are: a pid past pid_t is an OverflowError in waitpid.
        bounds = ((rec.uid, 2**32 - 1), (rec.pid, 1 << 22), (rec.start_time, 2**63))
        if any(isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < top
               for v, top in bounds):  # fmt: skip
            raise ValueError("uid, pid and start_time must be integers in their ranges")
        if not NAME_PATTERN.fullmatch(rec.vm) or rec.pid < 2:
            raise ValueError("bad VM name or pid")
        return rec


_FIELDS = frozenset(VmRecord.__dataclass_fields__)
_OPTIONAL = frozenset(("card_fingerprint", "card_serial", "started_at", "token_serial"))
_TEXT = ("vm", "user", "qmp_socket", "run_dir", "card_fingerprint", "card_serial", "started_at",
         "token_serial")  # fmt: skip


def _kill_started(record: VmRecord, timeout: float = 5.0) -> bool:
    """SIGKILL the process group an unfinished start's QEMU leads (and the process itself);
    True once that process is gone (or is another process now)."""
    for kill in (os.killpg, os.kill):
        with contextlib.suppress(ProcessLookupError):
            kill(record.pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while proc_start_time(record.pid) == record.start_time:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def proc_start_time(pid: int) -> int | None:
    """The start time of ``pid`` (None when it is gone or a zombie)."""
    return start_time(pid)


class VmHandle:
    """One running VM: its record, a QMP connection and (when we started it in this process)
    its Popen."""

    def __init__(
        self, record: VmRecord, qmp: QmpSync, process: subprocess.Popen[bytes] | None = None
    ) -> None:
        self.record = record
        self.qmp = qmp
        self.process = process

    def alive(self) -> bool:
        if self.process is not None:
            return self.process.poll() is None
        _reap_if_child(self.record.pid)
        return proc_start_time(self.record.pid) == self.record.start_time

    def status(self) -> dict[str, Any]:
        """QMP's view: ``query-status`` (running, paused, ...)."""
        answer = self.qmp.execute("query-status")
        if not isinstance(answer, dict):
            raise VmError(f"VM {self.record.vm}: query-status answered {answer!r}")
        return {"status": answer.get("status", ""), "running": bool(answer.get("running"))}

    def powerdown(self, timeout: float) -> bool:
        """Press the ACPI power button of a running guest and wait up to ``timeout`` for it
        to shut down (QEMU exits when the guest powers off). False when the VM is not running
        (paused, or held before start: no guest code could answer) or did not go in time."""
        try:
            if not self.alive() or self.status()["status"] != "running":
                return False
            self.qmp.execute("system_powerdown")
        except (VmError, OSError):
            return False  # quit / SIGTERM / SIGKILL follow
        return self._wait(timeout)

    def stop(self, *, quit_timeout: float, term_timeout: float, kill_timeout: float) -> str:
        """QMP quit, then SIGTERM, then SIGKILL; returns how it ended."""
        how = "exited"
        try:
            if self.alive():
                how = "quit"
                with contextlib.suppress(Exception):  # escalate on any failure
                    self.qmp.execute("quit", timeout=quit_timeout)
                if not self._wait(quit_timeout):
                    how = "term"
                    self._signal(signal.SIGTERM)
                    if not self._wait(term_timeout):
                        how = "kill"
                        self._signal(signal.SIGKILL)
                        if not self._wait(kill_timeout):
                            raise VmError(f"VM {self.record.vm}: pid {self.record.pid} survives")
        finally:
            self.qmp.close()
        with contextlib.suppress(OSError):
            os.unlink(self.record.qmp_socket)
        with contextlib.suppress(OSError):
            os.unlink(self.console_socket)
        return how

    @property
    def console_socket(self) -> Path:
        return Path(self.record.run_dir) / CONSOLE_SOCKET

    def _wait(self, timeout: float) -> bool:
        if self.process is not None:
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                return False
            return True
        deadline = time.monotonic() + timeout
        while self.alive():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)
        return True

    def _signal(self, sig: int) -> None:
        # Only the process we recorded: a recycled pid is left alone.
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.record.pid, sig)


def _reap_if_child(pid: int) -> None:
    # A QEMU started by an earlier launcher object of this same process is still our child.
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def _uids_in_use() -> set[int]:
    """The real uid of every process on the host (a VM uid must be nobody else's)."""
    used: set[int] = set()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            used.add(os.stat(entry.path).st_uid)  # /proc/PID is owned by the process's uid
        except OSError:
            continue  # it ended meanwhile
    return used


def free_uid(low: int, high: int) -> int:
    """The lowest uid of [low, high] that no process runs as and no account has. Called
    under the registry's lock, so two starts never get the same one."""
    import pwd

    used = _uids_in_use()
    for uid in range(low, high + 1):
        if uid in used:
            continue
        try:
            pwd.getpwuid(uid)
            continue  # an account owns it (a reserved range that is not reserved)
        except KeyError:
            return uid
    raise VmError(f"no free VM uid in {low}-{high}: too many VMs running",
                  reason="vm_uids_exhausted")  # fmt: skip


class VmRegistry:
    """The running VMs (thread-safe), backed by the record folder."""

    def __init__(self, folder: Path, *, key: str = "launcher.registry_dir") -> None:
        self.folder = folder
        self.key = key
        self._lock = threading.RLock()
        self._vms: dict[str, VmHandle] = {}
        self._unfinished: list[VmRecord] = []

    def _dir(self) -> int:
        return open_private_dir(self.folder, key=self.key, private=True, check_parents=True)

    # --- views

    def running(self) -> dict[str, VmRecord]:
        """VM id -> record, for the VMs still alive (dead ones are forgotten)."""
        with self._lock:
            for vm in [vm for vm, h in self._vms.items() if not h.alive()]:
                self._forget(vm)
            return {vm: h.record for vm, h in self._vms.items()}

    def get(self, vm: str) -> VmHandle | None:
        with self._lock:
            h = self._vms.get(vm)
            if h is not None and not h.alive():
                self._forget(vm)
                return None
            return h

    # --- changes

    def launch(
        self,
        spec: VmSpec,
        keys: Mapping[str, bytes | bytearray],
        *,
        uid: int,
        user: str,
        run_dir: Path,
        run_as: RunAs | None,
        ready_timeout: float,
        card_fingerprint: str = "",
        card_serial: str = "",
        token_serial: str = "",
        now: dt.datetime | None = None,
        taps: Mapping[str, int] | None = None,
        vm_uids: tuple[int, int] | None = None,
    ) -> VmRecord:
        """``vm_uids``: run QEMU as a uid of its own from this range (``run_as`` ignored)."""
        with self._lock:
            if spec.name in self._vms:
                raise VmError(f"VM {spec.name} is already running", reason="vm_already_running")
            if vm_uids is not None:
                run_as = RunAs.for_vm(free_uid(*vm_uids))

            def record_for(pid: int) -> VmRecord:
                start_time = proc_start_time(pid)
                return VmRecord(
                    vm=spec.name,
                    uid=uid,
                    user=user,
                    pid=pid,
                    start_time=start_time if start_time is not None else 0,
                    qmp_socket=str(run_dir / QMP_SOCKET),
                    run_dir=str(run_dir),
                    card_fingerprint=card_fingerprint,
                    card_serial=card_serial,
                    started_at=(now or dt.datetime.now(dt.UTC)).isoformat(timespec="seconds"),
                    token_serial=token_serial,
                )

            # "Starting" is on disk before QEMU can answer: a launcher killed before the
            # start is finished leaves a record the next one stops the QEMU by.
            starting = lambda pid: self._save(record_for(pid), STARTING)  # noqa: E731
            try:
                vm = QemuVm.launch(
                    spec, keys, run_dir=run_dir, run_as=run_as, ready_timeout=ready_timeout,
                    taps=taps, on_started=starting,
                )  # fmt: skip
            except BaseException:
                self._unlink(f"{spec.name}{STARTING}")
                raise
            record = record_for(vm.pid)
            handle = VmHandle(record, vm.qmp, vm.process)
            try:
                self._save(record)
            except BaseException:
                handle.stop(quit_timeout=2, term_timeout=2, kill_timeout=2)
                raise
            finally:
                self._unlink(f"{spec.name}{STARTING}")
            self._vms[spec.name] = handle
            return record

    def take_unfinished(self) -> list[VmRecord]:
        """The starts ``reattach`` found unfinished (their QEMU killed), once."""
        with self._lock:
            out, self._unfinished = self._unfinished, []
            return out

    def stop(
        self,
        vm: str,
        *,
        quit_timeout: float,
        term_timeout: float,
        kill_timeout: float,
        powerdown_timeout: float = 0.0,
    ) -> str:
        """ACPI power button first (``powerdown_timeout`` > 0), then quit, SIGTERM, SIGKILL.
        Returns how it ended: powerdown, exited, quit, term or kill."""
        with self._lock:
            h = self._vms.get(vm)
            if h is None:
                raise VmError(f"VM {vm} is not running", reason="vm_not_running")
        # Outside the lock: a guest may take its time, the other VMs must not wait for it.
        powered_off = powerdown_timeout > 0 and h.powerdown(powerdown_timeout)
        with self._lock:
            if self._vms.get(vm) is not h:
                raise VmError(f"VM {vm} is not running", reason="vm_not_running")
            how = h.stop(
                quit_timeout=quit_timeout, term_timeout=term_timeout, kill_timeout=kill_timeout
            )
            self._forget(vm)
            return "powerdown" if powered_off and how == "exited" else how

    def reattach(self, *, timeout: float = 5.0) -> list[str]:
        """Load the records of VMs a previous launcher started; returns the VM ids found
        running. Records of VMs that are gone (or whose pid now is another process) go."""
        found = []
        with self._lock:
            fd = self._dir()
            try:
                self._stop_unfinished(fd)
                names = sorted(n for n in os.listdir(fd) if n.endswith(".json"))
                for name in names:
                    record = self._load(fd, name)
                    if record is None or record.vm in self._vms:
                        continue
                    handle = self._attach(record, timeout)
                    if handle is None:
                        with contextlib.suppress(OSError):
                            os.unlink(name, dir_fd=fd)
                        continue
                    self._vms[record.vm] = handle
                    found.append(record.vm)
            finally:
                os.close(fd)
        return found

    def detach(self) -> None:
        """Let go of every QMP connection without stopping anything (service shutdown)."""
        with self._lock:
            for h in self._vms.values():
                h.qmp.close()
            self._vms.clear()

    # --- records

    def _stop_unfinished(self, fd: int) -> None:
        """Starts a previous launcher did not live to finish: nobody was told of that QEMU
        and no start was audited, so it goes (SIGKILL to its process group, the session
        QEMU leads) unless the start did finish (its record is there too)."""
        for name in sorted(n for n in os.listdir(fd) if n.endswith(STARTING)):
            record = self._load(fd, name, suffix=STARTING)
            finished = os.path.exists(self.folder / f"{name.removesuffix(STARTING)}.json")
            if (
                record is not None
                and not finished
                and record.start_time != 0
                and (proc_start_time(record.pid) == record.start_time)
            ):
                if not _kill_started(record):
                    # Still there: the record stays, so the next reattach tries again and
                    # nothing is said to have stopped it.
                    log.error("cannot stop the QEMU (pid %d) of %s's unfinished start",
                              record.pid, record.vm)  # fmt: skip
                    continue
                self._unfinished.append(record)
            with contextlib.suppress(OSError):
                os.unlink(name, dir_fd=fd)

    def _unlink(self, name: str) -> None:
        fd = self._dir()
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=fd)
        finally:
            os.close(fd)

    def _attach(self, record: VmRecord, timeout: float) -> VmHandle | None:
        if record.start_time == 0 or proc_start_time(record.pid) != record.start_time:
            return None
        qmp = QmpSync(record.vm, timeout=timeout)
        try:
            qmp.connect(record.qmp_socket, timeout=timeout)
        except VmError:
            qmp.close()
            return None
        return VmHandle(record, qmp)

    def _load(self, fd: int, name: str, *, suffix: str = ".json") -> VmRecord | None:
        from .allowlist_store import read_file

        try:
            data = read_file(fd, name, mode=_RECORD_MODE, shown=self.folder / name)
            record = VmRecord.from_json(data or b"")
        except (SvmmError, ValueError, TypeError, KeyError):
            # Tampered, torn or foreign: not a VM this launcher may act on (it is skipped,
            # never trusted); a bug of ours still raises.
            return None
        return record if name == f"{record.vm}{suffix}" else None

    def _save(self, record: VmRecord, suffix: str = ".json") -> None:
        fd = self._dir()
        try:
            replace_file(fd, f"{record.vm}{suffix}", record.to_json(), mode=_RECORD_MODE)
        except OSError as e:
            raise VmError(f"cannot record VM {record.vm}: {e.strerror}") from None
        finally:
            os.close(fd)

    def _forget(self, vm: str) -> None:
        h = self._vms.pop(vm, None)
        if h is not None:
            h.qmp.close()
        fd = self._dir()
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{vm}.json", dir_fd=fd)
        finally:
            os.close(fd)
