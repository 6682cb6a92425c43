"""svmmd end to end: a real Unix socket, clients run as `nobody` (the uid is the kernel's),
real QEMU started as `nobody` (-machine none), QMP status, Chinese Wall against a running VM,
stop, and a restarted service that finds its VMs again."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import time
from pathlib import Path

import pytest

from pam_svmm.adapters.vm_registry import proc_start_time
from pam_svmm.daemon.server import bind_socket, peer_uid
from svmm_lab.userland import userland
from tests.integration.launcher_service import NOBODY, QEMU, Running, ask, base, service
from tests.unit.launcher_fixtures import LocalPolicy, audit_records, make_launcher

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (SO_PEERCRED as another user)"),
]
__all__ = ["base", "service"]  # fixtures
needs_qemu = pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 not installed")


def test_socket_folder_and_mode(service: Running) -> None:
    path = service.launcher.config.launcher.socket
    st = path.stat()
    assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o666 and st.st_uid == 0
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o755 and path.parent.stat().st_uid == 0


def test_the_uid_is_the_kernels(service: Running) -> None:
    sock = service.launcher.config.launcher.socket
    mine = ask(sock, {"op": "list"})[0]
    assert mine["ok"] and mine["data"]["allowlist"] == "ok"
    assert [v["vm"] for v in mine["data"]["allowed"]] == ["bank-a", "bank-b", "plain", "secret"]
    as_root = ask(sock, {"op": "list"}, user=None)[0]
    assert as_root["ok"] and as_root["data"] == {
        "allowed": [], "running": [], "allowlist": "no_allowlist", "keys_held": []}  # fmt: skip
    claim = ask(sock, {"op": "start", "vm": "plain", "uid": 0}, {"op": "list", "uid": 0})
    assert [r["reason"] for r in claim] == ["bad_request", "bad_request"]
    details = [r["detail"] for r in audit_records(service.launcher.config.launcher.run_dir.parent)]
    assert details[0].startswith(f"uid={NOBODY};") and details[1].startswith("uid=0;")
    assert all(d.startswith(f"uid={NOBODY};") for d in details[2:])


def test_peer_uid_of_a_socketpair() -> None:
    a, b = socket.socketpair(socket.AF_UNIX)
    with a, b:
        assert peer_uid(a) == os.getuid()


@needs_qemu
def test_start_status_wall_stop_through_the_socket(service: Running, base: Path) -> None:
    sock = service.launcher.config.launcher.socket
    start, status = ask(sock, {"op": "start", "vm": "bank-a"}, {"op": "status", "vm": "bank-a"})
    assert start["ok"], start
    pid = start["data"]["pid"]
    lc = service.launcher.config.launcher
    assert lc.vm_uid_min <= os.stat(f"/proc/{pid}").st_uid <= lc.vm_uid_max  # the VM's own uid
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        argv = f.read().split(b"\0")
    assert b"guest=bank-a" in argv and b"none" in argv
    assert status["ok"] and status["data"]["status"] == "prelaunch"
    assert status["data"]["owner"] == "nobody"
    # root may look; nobody else but the owner
    assert ask(sock, {"op": "status", "vm": "bank-a"}, user=None)[0]["ok"]
    wall = ask(sock, {"op": "start", "vm": "bank-b"})[0]
    assert not wall["ok"] and wall["reason"] == "conflict_of_interest"
    # Held before start (prelaunch): no guest code could answer the power button, so the
    # stop does not wait for it.
    stop = ask(sock, {"op": "stop", "vm": "bank-a"})[0]
    assert stop["ok"] and stop["data"]["how"] == "quit"
    assert proc_start_time(pid) is None
    replies = ask(sock, {"op": "start", "vm": "bank-b"}, {"op": "stop", "vm": "bank-b"})
    assert [r["ok"] for r in replies] == [True, True]
    events = [(r["event"], r["vm"], r["reason"]) for r in audit_records(base)]
    assert events == [
        ("vm_start", "bank-a", "ok"),
        ("vm_status", "bank-a", "ok"),
        ("vm_status", "bank-a", "ok"),
        ("vm_deny", "bank-b", "conflict_of_interest"),
        ("vm_stop", "bank-a", "ok"),
        ("vm_start", "bank-b", "ok"),
        ("vm_stop", "bank-b", "ok"),
    ]
    fp = audit_records(base)[0]["card"]["fingerprint"]
    assert fp == "ab" * 32 and all(r["card"]["fingerprint"] == fp for r in audit_records(base))


@needs_qemu
def test_a_restarted_service_finds_its_vms(service: Running, base: Path) -> None:
    sock = service.launcher.config.launcher.socket
    start = ask(sock, {"op": "start", "vm": "plain"})[0]
    assert start["ok"], start
    pid = start["data"]["pid"]
    # The service goes away (its QMP connections too); QEMU keeps running.
    service.close()
    service.launcher.registry.detach()
    assert proc_start_time(pid) is not None
    fresh = make_launcher(base, LocalPolicy())
    assert fresh.registry.reattach() == ["plain"]
    service.launcher = fresh
    again = Running(fresh, bind_socket(fresh.config.launcher.socket))
    try:
        listed, status, stop = ask(
            sock, {"op": "list"}, {"op": "status", "vm": "plain"}, {"op": "stop", "vm": "plain"}
        )
        assert listed["data"]["running"] == ["plain"]
        assert status["ok"] and status["data"]["pid"] == pid
        assert stop["ok"] and stop["data"]["how"] == "quit", stop
        assert proc_start_time(pid) is None
        assert list((base / "registry").iterdir()) == []
    finally:
        again.close()


@needs_qemu
def test_a_dead_vms_record_is_dropped_on_reattach(service: Running, base: Path) -> None:
    sock = service.launcher.config.launcher.socket
    pid = ask(sock, {"op": "start", "vm": "plain"})[0]["data"]["pid"]
    service.launcher.registry.detach()
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    fresh = make_launcher(base, LocalPolicy())
    assert fresh.registry.reattach() == []
    assert list((base / "registry").iterdir()) == []


def test_cli_client_as_nobody(service: Running) -> None:
    sock = service.launcher.config.launcher.socket
    env = userland().env()
    cmd = userland().argv("-m", "pam_svmm.cli.main", "vm", "--socket", str(sock))
    as_nobody: dict = dict(capture_output=True, text=True, env=env, timeout=60, user=NOBODY,
                           group=NOBODY, extra_groups=[], cwd="/")  # fmt: skip
    out = subprocess.run([*cmd, "list"], **as_nobody)
    assert out.returncode == 0, out.stderr
    assert "plain" in out.stdout and "boot,console" in out.stdout
    out = subprocess.run([*cmd, "start", "secret"], **as_nobody)
    assert out.returncode == 1 and "volume_key_unavailable" in out.stderr
    out = subprocess.run([*cmd, "start", "x,y"], **as_nobody)
    assert out.returncode == 1 and "vm_name_invalid" in out.stderr


@needs_qemu
def test_a_running_vm_gets_the_power_button_before_quit(service: Running) -> None:
    """-machine none runs no guest that could answer: the stop waits powerdown_timeout, then
    quits (a guest OS would have shut down: tests/unit/test_vm_powerdown.py)."""
    sock = service.launcher.config.launcher.socket
    assert ask(sock, {"op": "start", "vm": "bank-a"})[0]["ok"]
    service.launcher.registry.get("bank-a").qmp.execute("cont")
    t0 = time.monotonic()
    stop = ask(sock, {"op": "stop", "vm": "bank-a"})[0]
    waited = time.monotonic() - t0
    assert stop["ok"] and stop["data"]["how"] == "quit", stop
    assert waited >= service.launcher.config.launcher.powerdown_timeout


HOARDER = """
import json, socket, sys, time
n, path = int(sys.argv[1]), sys.argv[2]
held, busy = [], 0
for _ in range(n):
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    s.settimeout(0.2)
    try:
        line = s.recv(4096)  # admitted connections stay silent; refused ones say why
    except TimeoutError:
        line = b""
    if line and json.loads(line)["reason"] == "busy":
        busy += 1
    held.append(s)
print(json.dumps({"busy": busy}))
sys.stdout.flush()
sys.stdin.readline()  # hold them until told
"""


def test_one_user_cannot_take_svmmd_down_with_idle_connections(
    service: Running, base: Path
) -> None:
    """Invariant 14: a local user holding connections (once, 1024 took svmmd down: a thread
    and a descriptor each) gets "busy" past their budget, audited once; other users and
    root's PAM applications are still served meanwhile."""
    from pam_svmm.daemon import server as server_mod

    sock = service.launcher.config.launcher.socket
    n = server_mod.MAX_PER_UID + 5
    hoarder = subprocess.Popen(
        userland().argv("-c", HOARDER, str(n), str(sock)), env=userland().env(),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, user=NOBODY, group=NOBODY,
        extra_groups=[],
    )  # fmt: skip
    try:
        assert hoarder.stdout is not None
        got = json.loads(hoarder.stdout.readline())
        assert got["busy"] == n - server_mod.MAX_PER_UID
        # Another user (and root) still get answers while nobody's connections are held.
        assert ask(sock, {"op": "list"}, user=10001)[0]["reason"] != "busy"
        assert ask(sock, {"op": "list"}, user=None)[0]["reason"] != "busy"
        busy = [r for r in audit_records(base) if r.get("reason") == "busy"]
        assert len(busy) == 1 and busy[0]["user"] == "nobody", busy
    finally:
        hoarder.communicate(b"\n", timeout=30)
    assert ask(sock, {"op": "list"})[0]["ok"]  # released: nobody is served again


MEM_PROBE = """
import sys
try:
    with open(f"/proc/{sys.argv[1]}/mem", "rb") as f:
        f.seek(int(sys.argv[2]))
        f.read(16)
    print("read")
except OSError as e:
    print(type(e).__name__)
"""


def _status(pid: int) -> dict[str, str]:
    text = Path(f"/proc/{pid}/status").read_text()
    return {k: v.strip() for k, v in (line.split(":", 1) for line in text.splitlines())}


@needs_qemu
def test_one_vm_cannot_read_another(service: Running) -> None:
    """Invariant 13. Every VM's QEMU once ran as one account: a process as that account (an
    escaped guest's QEMU) read another user's QEMU memory and found her LUKS master key. Now
    each running VM has a uid of its own, no new privileges, no capabilities and private
    /tmp, /var/tmp and /dev/shm: the other QEMU's memory is out of reach."""
    sock = service.launcher.config.launcher.socket
    first, second = ask(sock, {"op": "start", "vm": "plain"}, {"op": "start", "vm": "bank-a"})
    assert first["ok"] and second["ok"], (first, second)
    pid_a, pid_b = first["data"]["pid"], second["data"]["pid"]
    uid_a, uid_b = os.stat(f"/proc/{pid_a}").st_uid, os.stat(f"/proc/{pid_b}").st_uid
    assert uid_a != uid_b and 0 not in (uid_a, uid_b) and NOBODY not in (uid_a, uid_b)
    for pid, uid in ((pid_a, uid_a), (pid_b, uid_b)):
        st = _status(pid)
        assert st["NoNewPrivs"] == "1" and int(st["CapEff"], 16) == 0 and int(st["CapBnd"], 16) == 0
        mounts = Path(f"/proc/{pid}/mountinfo").read_text().splitlines()
        for folder in ("/tmp", "/var/tmp", "/dev/shm"):
            top = [m for m in mounts if m.split()[4] == folder][-1]  # the one QEMU sees
            assert " - tmpfs svmm-vm " in top and f"uid={uid}," in top, top
    heap = next(line for line in Path(f"/proc/{pid_b}/maps").read_text().splitlines()
                if "[heap]" in line).split("-")[0]  # fmt: skip
    # As VM A's uid (what an escaped guest in A would be): B's memory is not readable.
    probe = subprocess.run(
        ["/usr/bin/python3", "-I", "-c", MEM_PROBE, str(pid_b), str(int(heap, 16))],
        capture_output=True, text=True, timeout=30, user=uid_a, group=uid_a, extra_groups=[],
    )  # fmt: skip
    assert probe.stdout.strip() == "PermissionError", probe
    # The probe itself works: as B's own uid the same read succeeds.
    same = subprocess.run(
        ["/usr/bin/python3", "-I", "-c", MEM_PROBE, str(pid_b), str(int(heap, 16))],
        capture_output=True, text=True, timeout=30, user=uid_b, group=uid_b, extra_groups=[],
    )  # fmt: skip
    assert same.stdout.strip() == "read", same


def test_what_one_user_can_make_the_audit_write_is_bounded(service: Running, base: Path) -> None:
    """Every launcher request is an audit record with fsyncs: one connection once wrote
    10,697 records in 10 s. Past a burst, requests get "busy" (itself audited once)."""
    from pam_svmm.daemon import server as server_mod

    before = len(audit_records(base))
    n = 200
    replies = ask(sock := service.launcher.config.launcher.socket, *([{"op": "nonsense"}] * n))
    busy = sum(r["reason"] == "busy" for r in replies)
    assert len(replies) == n and busy >= n - server_mod.REQUEST_BURST - 10, busy
    written = len(audit_records(base)) - before
    assert written <= server_mod.REQUEST_BURST + 10 + 1, written  # the burst, a few refills, busy
    assert ask(sock, {"op": "list"}, user=None)[0]["reason"] != "busy"  # root is not limited
