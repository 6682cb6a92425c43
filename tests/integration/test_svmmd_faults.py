"""Faults injected into the real svmmd and the real PAM application (issue 14, invariant 12).

svmmd runs as its own root process (``python -m pam_svmm.daemon.server``, svmm_lab.svmmd), the
PAM module is its thin client (``daemon=required``), logins go through the real PAM stack
(pam_wrapper, pamtester and svmm_lab's pamclient), SoftHSM2 cards behind pinguard, the lab CA
and OCSP responder, slapd, a signed policy, LUKS1 volumes, and QEMU guests (started held,
``-S``: no guest OS runs, so TCG costs nothing). Each test has its own audit trail and seal
key. After every fault: no VM starts without a new login (the refusal's reason is asserted,
not only the exit code), ``svmm audit verify`` (the real CLI) passes, and where the dead
session held keys they are dropped (audited ``session_lost``, with the count).

1. svmmd SIGKILLed while the PIN prompt is open (pamtester waits in the conversation).
2. svmmd SIGKILLed during open_session: between authenticate and open_session, and while
   open_session's key handover is in flight (svmmd held on the audit log's lock).
3. svmmd SIGKILLed with a VM running; the login ends while svmmd is down; the restarted
   svmmd reattaches the VM and applies ``launcher.on_session_lost`` (default pause). And the
   other side: restarted under a live login, the VM and the grant stay, the keys do not.
   And killed in the middle of a VM start (QEMU spawned, not yet answering): the registry's
   "starting" record lets the restarted svmmd kill that QEMU (audited vm_stop,
   start_unfinished) instead of leaving an unknown VM holding the key.
4. The PAM application SIGKILLed mid-session with a VM running: svmmd's own sweeper (no
   request needed) forgets the session, drops its keys and pauses the VM.

Covered elsewhere, not repeated: the PAM application killed with svmmd's launcher served from
the test process, refused at the next request (``no_live_session``) and swept by a direct
``sweep_sessions()`` call (test_volume_session.py: test_a_dead_login_is_no_grant,
test_the_sweeper_forgets_a_dead_login_without_a_request); svmmd gone mid-conversation is a
PAM error code, never SIGPIPE (tests/unit, a fake svmmd); a full disk under the audit log
(the audit tests).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from pam_svmm.adapters.processes import start_time
from svmm_lab.directory import Slapd
from svmm_lab.lab import Lab, Reader
from svmm_lab.pamclient import PamSession, build_client, pam_env, start_session
from svmm_lab.svmmd import SvmmdProcess
from svmm_lab.userland import userland
from svmm_lab.volumes import make_volume
from tests.integration import ldap_fixtures

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (svmmd, other uids)"),
    pytest.mark.skipif(
        shutil.which("qemu-system-x86_64") is None, reason="qemu-system-x86_64 not installed"
    ),
]
slapd = ldap_fixtures.slapd
ROOT = Path(__file__).resolve().parents[2]
ALICE_UID = 10001  # config/ldap/example-org.ldif
PIN = "123456"
SERVICE = "svmm-faults"  # daemon=required
AUTO_SERVICE = "svmm-faults-auto"  # daemon=auto: in this process when svmmd is not there
PAM_SUCCESS, PAM_SESSION_ERR = 0, 14
TIMEOUT = 60.0  # generous: a 2-core machine shared with other test runs, QEMU under TCG
SWEEP_TIMEOUT = 30.0  # svmmd sweeps at start and every 5 s


def wait_for(what: str, check: Callable[[], Any], timeout: float = TIMEOUT) -> Any:
    """Poll ``check`` until it gives something true; fail naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        assert time.monotonic() < deadline, f"{what}: not within {timeout:.0f} s"
        time.sleep(0.05)


@dataclass
class Host:
    """svmmd (its config, audit trail, socket) and what a test started through it."""

    lab: Lab
    config: Path
    audit: Path
    daemon: SvmmdProcess
    # started here: name -> (QEMU pid, its start time)
    vms: dict[str, tuple[int, int | None]] = field(default_factory=dict)

    @property
    def socket(self) -> Path:
        return self.daemon.socket

    @property
    def pid(self) -> int:
        assert self.daemon.proc is not None
        return self.daemon.proc.pid

    def kill(self) -> None:
        """SIGKILL svmmd: no handler, no cleanup; its QEMU children live on."""
        proc = self.daemon.proc
        assert proc is not None and proc.poll() is None, "svmmd is not running"
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(TIMEOUT) == -signal.SIGKILL
        self.daemon.proc = None

    def restart(self) -> None:
        self.daemon.start(timeout=TIMEOUT)

    def records(self, since: int = 0, event: str | None = None) -> list[dict[str, Any]]:
        if not self.audit.exists():
            return []
        lines = self.audit.read_text().splitlines()
        found = [json.loads(line) for line in lines if line.strip()]
        found = [r for r in found if r["event"] != "seal"][since:]
        return [r for r in found if event is None or r["event"] == event]

    def vm(self, *args: str, uid: int = ALICE_UID) -> tuple[int, dict[str, Any]]:
        """`svmm vm --json ARGS` as ``uid`` (0: root) over svmmd's socket: (exit, reply)."""
        cmd = ("-m", "pam_svmm.cli.main", "vm", "--socket", str(self.socket), "--json", *args)
        if uid == 0:
            argv, kw = [sys.executable, *cmd], {}
        else:
            argv = userland().argv(*cmd)
            kw = {"user": uid, "group": uid, "extra_groups": [], "env": userland().env()}
        p = subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT, check=False,
                           cwd="/", **kw)  # type: ignore[call-overload]  # fmt: skip
        reply = json.loads(p.stdout) if p.stdout.strip() else {"stderr": p.stderr}
        return p.returncode, reply

    def refused(self, *args: str) -> str:
        """The reason svmmd gave for refusing ``svmm vm ARGS`` to alice (asserts it did)."""
        code, reply = self.vm(*args)
        assert code != 0 and reply.get("ok") is False, reply
        return str(reply.get("reason"))

    def start_vm(self, name: str) -> int:
        code, started = self.vm("start", name)
        assert code == 0 and started["ok"], started
        pid = int(started["data"]["pid"])
        self.vms[name] = (pid, start_time(pid))
        return pid

    def status(self, name: str) -> str:
        code, reply = self.vm("status", name, uid=0)
        assert code == 0 and reply["ok"], reply
        return str(reply["data"]["status"])

    def verify_audit(self) -> str:
        """`svmm audit verify` with this svmmd's configuration: must pass."""
        p = subprocess.run(
            [sys.executable, "-m", "pam_svmm.cli.main", "--config", str(self.config),
             "audit", "verify"],
            capture_output=True, text=True, timeout=TIMEOUT, check=False,
        )  # fmt: skip
        assert p.returncode == 0 and "intact" in p.stdout, (p.stdout, p.stderr)
        return p.stdout

    def login(self, *, pause: bool = False, reader: Reader | None = None) -> PamSession:
        """A PAM application (pamclient) logging in through svmmd and holding its session.
        Its own reader is empty unless ``reader``: only svmmd can have done a login."""
        env = (reader or self.lab.insert()).env
        client = build_client(self.lab.folder / "bin")
        return start_session(client, self.lab.pam_dir, SERVICE, "", PIN, env=env,
                             timeout=TIMEOUT, pause=pause)  # fmt: skip

    def session_file(self, uid: int = ALICE_UID) -> Path:
        return self.lab.folder / "run" / "sessions" / f"{uid}.json"

    def session_records(self, uid: int = ALICE_UID) -> dict[str, Any]:
        """The sessions svmmd's records hold for ``uid`` (the allowlist's refcount)."""
        path = self.session_file(uid)
        if not path.exists():
            return {}
        return dict(json.loads(path.read_text()).get("sessions", {}))


@pytest.fixture(scope="module")
def bundle(lab: Lab) -> Path:
    policy = (ROOT / "config" / "policy.example.toml").read_bytes()
    services = f'"svmm-login", "{SERVICE}", "{AUTO_SERVICE}"]'
    policy = policy.replace(b'"svmm-login"]', services.encode())
    assert AUTO_SERVICE.encode() in policy
    for volume in ("web-disk", "bank-a-data"):  # the volumes of the VMs alice may boot
        make_volume(lab, volume, "alice")
    return lab.write_policy(policy, lab.folder / "policy-faults.bundle")


@pytest.fixture
def host(lab: Lab, slapd: Slapd, bundle: Path, tmp_path: Path) -> Iterator[Host]:
    sock_dir = Path(tempfile.mkdtemp(prefix="svmm-faults-", dir="/tmp"))
    os.chmod(sock_dir, 0o755)  # noqa: S103 - root's folder; every user reaches the socket
    sock = sock_dir / "launcher.sock"
    audit = tmp_path / "audit" / "audit.jsonl"
    overrides = (
        lab.directory_overrides(slapd)
        + lab.policy_overrides(bundle, state=lab.folder / "policy-state-faults")
        + lab.launcher_overrides(sock_dir)
        # This test's own chain and seal key: verify judges only what happened here.
        + f'\n[audit]\npath = "{audit}"\nsyslog = false\nseal_key = "{tmp_path / "seal.key"}"\n'
        + "seal_every = 8\n"
    )
    name = lab.variant(SERVICE.removeprefix("svmm-"), overrides,
                       args=f"daemon=required socket={sock}")  # fmt: skip
    auto = lab.variant(AUTO_SERVICE.removeprefix("svmm-"), overrides,
                       args=f"daemon=auto socket={sock}")  # fmt: skip
    assert (name, auto) == (SERVICE, AUTO_SERVICE)
    config = lab.folder / f"{name}.toml"
    # svmmd holds the card reader: alice's card is in it, the PAM applications' are empty.
    env = {"PYTHONPATH": str(ROOT), **lab.insert("alice").env}
    daemon = SvmmdProcess(config, sock, env, sock_dir / "svmmd.log")
    h = Host(lab, config, audit, daemon)
    assert lab.allowlist(ALICE_UID) is None, "an earlier test left alice's allowlist"
    daemon.start(timeout=TIMEOUT)
    try:
        yield h
    finally:
        if daemon.proc is not None and daemon.proc.poll() is None:
            for name in h.vms:
                with contextlib.suppress(Exception):
                    h.vm("stop", name, uid=0)
        daemon.stop()
        for pid, started in h.vms.values():  # a test that failed midway: nothing outlives it
            if start_time(pid) == started:
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
        # Nor a grant a failed test left behind (the next test would start with it).
        for left in (lab.allowlist_dir / f"{ALICE_UID}.json", h.session_file()):
            left.unlink(missing_ok=True)
        shutil.rmtree(sock_dir, ignore_errors=True)


def wait_session_lost(h: Host, since: int) -> dict[str, Any]:
    lost = wait_for(
        "session_lost for alice",
        lambda: [r for r in h.records(since, "session_lost") if r["user"] == "alice"],
        SWEEP_TIMEOUT,
    )
    assert len(lost) == 1, lost
    return dict(lost[0])


def flock_waiters(path: Path) -> set[int]:
    """Pids blocked in flock() on ``path`` (the ``->`` lines of /proc/locks)."""
    inode = os.stat(path).st_ino
    pids = set()
    for line in Path("/proc/locks").read_text().splitlines():
        parts = line.split()
        # "1: -> FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF": pid, then dev:inode
        if len(parts) > 6 and parts[1:3] == ["->", "FLOCK"] and parts[6].endswith(f":{inode}"):
            pids.add(int(parts[5]))
    return pids


# --- 1. svmmd killed while the PIN prompt is open ----------------------------------------


@pytest.mark.parametrize("service", [SERVICE, AUTO_SERVICE])
def test_svmmd_killed_while_the_pin_prompt_is_open(host: Host, service: str) -> None:
    """pamtester asks for the PIN on its stderr and waits on stdin; svmmd, which sent the
    prompt, is SIGKILLed; then the PIN is typed. The PAM call must fail (the shim's error
    code), and never fall back to the process, not even with daemon=auto (the PIN went to
    svmmd already; this process's reader holds alice's card too and the PIN is typed
    twice, so a fallback would log her in). The restarted svmmd knows no grant of hers."""
    before = len(host.records())
    reader = host.lab.insert("alice")
    proc = subprocess.Popen(
        ["pamtester", service, "alice", "authenticate", "open_session"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=pam_env(host.lab.pam_dir, reader.env),
    )  # fmt: skip
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    shown = b""
    try:
        deadline = time.monotonic() + TIMEOUT
        while b"PIN for" not in shown:
            left = deadline - time.monotonic()
            assert left > 0 and proc.poll() is None, f"no PIN prompt: {shown!r}"
            ready, _, _ = select.select([proc.stdout, proc.stderr], [], [], left)
            for f in ready:
                shown += os.read(f.fileno(), 4096)
        host.kill()  # the prompt is open: svmmd's PAM call waits for the answer
        # Typed twice: a fallback to the process, which would ask again, could succeed.
        out, err = proc.communicate(f"{PIN}\n{PIN}\n".encode(), timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    said = (shown + out + err).decode(errors="replace")
    assert proc.returncode != 0 and "successfully" not in said, said
    # The shim's code for svmmd gone mid-call (PAM_SYSTEM_ERR), not a refusal it made up.
    assert "System error" in said, said

    host.restart()
    assert host.lab.allowlist(ALICE_UID) is None
    assert host.session_records() == {}
    assert host.refused("start", "vm-web") == "no_allowlist"
    assert not [r for r in host.records(before) if r["outcome"] == "success"
                and r["event"] in ("auth", "session_open", "key_hold")]  # fmt: skip
    host.verify_audit()

    # A new login through the restarted svmmd works: the card was left in a usable state.
    with host.login() as session:
        assert session.opened == PAM_SUCCESS, session.report
        code, listed = host.vm("list")
        assert code == 0 and listed["data"]["keys_held"] == ["bank-a-data", "web-disk"], listed
    host.verify_audit()


# --- 2. svmmd killed during open_session --------------------------------------------------


def test_svmmd_killed_between_authenticate_and_open_session(host: Host) -> None:
    """The login authenticated in svmmd (which keeps the card session for the key release);
    svmmd is SIGKILLed before open_session and restarted. The new svmmd has no transaction
    for this application: open_session writes no allowlist and releases no key (audited
    not_logged_in_by_svmm), so nothing starts without a new login."""
    session = host.login(pause=True)
    try:
        assert session.authenticated == PAM_SUCCESS, session.report
        host.kill()
        host.restart()
        before = len(host.records())
        session.resume(timeout=TIMEOUT)
        assert host.lab.allowlist(ALICE_UID) is None
        assert host.session_records() == {}
        opens = host.records(before, "session_open")
        assert [(r["outcome"], r["reason"]) for r in opens] == [
            ("failure", "not_logged_in_by_svmm")
        ], opens
        assert host.records(before, "key_hold") == []
        assert host.refused("start", "vm-web") == "no_allowlist"
        code, listed = host.vm("list")
        assert code == 0 and listed["data"]["keys_held"] == [], listed
    finally:
        session.close(signal=signal.SIGTERM, timeout=TIMEOUT)
    host.verify_audit()


def test_svmmd_killed_while_open_session_hands_over_the_keys(host: Host) -> None:
    """open_session in svmmd has written alice's allowlist and session record and had the
    card release her volume keys; the handover (audited key_hold before the keys are held)
    waits on the audit log's lock, which the test holds, when svmmd is SIGKILLed. The PAM
    application's open_session fails; the restarted svmmd forgets the orphaned grant
    (session_lost), and nothing starts."""
    session = host.login(pause=True)
    lock = -1
    try:
        assert session.authenticated == PAM_SUCCESS, session.report
        released_before = len(host.records(event="key_release"))
        lock = os.open(host.audit, os.O_RDWR | os.O_APPEND | os.O_CLOEXEC)
        fcntl.flock(lock, fcntl.LOCK_EX)
        assert session.proc.stdin is not None
        session.proc.stdin.write(b"\n")  # go on to open_session
        session.proc.stdin.flush()
        wait_for("svmmd waiting on the audit lock", lambda: host.pid in flock_waiters(host.audit))
        # What open_session did before its first audit record: the grant is on disk.
        allowlist = host.lab.allowlist(ALICE_UID)
        assert allowlist is not None and "vm-web" in json.dumps(allowlist), allowlist
        assert [r.get("pid") for r in host.session_records().values()] == [session.pid]
        host.kill()
        os.close(lock)
        lock = -1
        assert len(host.records(event="key_release")) == released_before  # none completed
        session._open(TIMEOUT)  # its open_session answers now: svmmd went away mid-call
        assert session.opened == PAM_SESSION_ERR, session.opened
        report = session.close(timeout=TIMEOUT)
        assert report.session_open == PAM_SESSION_ERR and report.session_close is None
    finally:
        if lock >= 0:
            os.close(lock)
        if session.report is None:
            session.close(signal=signal.SIGTERM, timeout=TIMEOUT)

    before = len(host.records())
    host.restart()
    lost = wait_session_lost(host, before)
    assert "allowlist removed" in lost["detail"] and "0 key(s) dropped" in lost["detail"], lost
    assert host.lab.allowlist(ALICE_UID) is None
    assert host.session_records() == {}
    assert host.refused("start", "vm-web") == "no_allowlist"
    host.verify_audit()


# --- 3. svmmd killed with a VM running ----------------------------------------------------


def test_svmmd_killed_with_a_vm_running_pauses_it_after_restart(host: Host) -> None:
    """alice's VM runs; svmmd is SIGKILLed (QEMU lives on); her login ends while svmmd is
    down, so her close_session cannot reach it and her session record stays. The restarted
    svmmd reattaches the VM, finds no live session of its owner, drops the grant and applies
    on_session_lost (pause); no start or resume without a new login."""
    with host.login() as session:
        assert session.opened == PAM_SUCCESS, session.report
        qemu = host.start_vm("vm-web")
        code, resumed = host.vm("resume", "vm-web")
        assert code == 0 and resumed["data"]["status"] == "running", resumed
        host.kill()
        assert os.path.exists(f"/proc/{qemu}"), "QEMU died with svmmd"
        report = session.close(timeout=TIMEOUT)  # the logout, with svmmd gone
    assert report.session_close == PAM_SESSION_ERR, report
    assert host.lab.allowlist(ALICE_UID) is not None  # nobody could remove it yet
    before = len(host.records())
    host.restart()
    lost = wait_session_lost(host, before)
    assert "allowlist removed" in lost["detail"], lost
    logout = wait_for("the on_session_lost action",
                      lambda: host.records(before, "last_logout"))  # fmt: skip
    assert [(r["vm"], r["reason"], r["outcome"]) for r in logout] == [
        ("vm-web", "paused", "success")
    ], logout
    assert "on_session_lost=pause" in logout[0]["detail"]
    assert host.status("vm-web") == "paused"
    assert os.path.exists(f"/proc/{qemu}")  # paused, not stopped: the policy's choice
    assert host.lab.allowlist(ALICE_UID) is None
    assert host.refused("resume", "vm-web") == "no_allowlist"
    assert host.refused("start", "bank-a") == "no_allowlist"
    assert host.status("vm-web") == "paused"
    code, stopped = host.vm("stop", "vm-web", uid=0)
    assert code == 0 and stopped["ok"], stopped
    host.verify_audit()


def test_svmmd_killed_under_a_live_login_keeps_the_vm_but_not_the_keys(host: Host) -> None:
    """The other side of the reconciliation: svmmd is SIGKILLed and restarted while alice's
    login lives on. Her session is provably alive (its process and start time), so her VM is
    neither paused nor stopped and her allowlist stays; but the keys died with svmmd, so no
    VM with a volume starts or resumes until a new login hands them over again. Her logout
    through the new svmmd closes the session the old one opened."""
    with host.login() as session:
        assert session.opened == PAM_SUCCESS, session.report
        host.start_vm("vm-web")
        code, resumed = host.vm("resume", "vm-web")
        assert code == 0 and resumed["data"]["status"] == "running", resumed
        host.kill()
        before = len(host.records())
        host.restart()
        code, listed = host.vm("list")
        assert code == 0 and listed["data"]["allowlist"] == "ok", listed
        assert listed["data"]["keys_held"] == [] and listed["data"]["running"] == ["vm-web"]
        assert host.refused("start", "bank-a") == "volume_key_unavailable"
        assert host.status("vm-web") == "running"
        with host.login() as again:  # a new login: the keys are held again
            assert again.opened == PAM_SUCCESS, again.report
            code, listed = host.vm("list")
            assert listed["data"]["keys_held"] == ["bank-a-data", "web-disk"], listed
        assert host.records(before, "session_lost") == []
        report = session.close(timeout=TIMEOUT)
    assert report.session_close == PAM_SUCCESS, report
    closes = host.records(before, "session_close")
    assert [(r["outcome"], r["reason"]) for r in closes][-1] == ("success", "allowlist_removed")
    assert host.lab.allowlist(ALICE_UID) is None and host.session_records() == {}
    assert host.refused("start", "bank-a") == "no_allowlist"
    code, stopped = host.vm("stop", "vm-web", uid=0)
    assert code == 0 and stopped["ok"], stopped
    host.verify_audit()


def qemu_child(parent: int, vm: str) -> int | None:
    """A child of ``parent`` that is (or is about to exec) the QEMU of ``vm``."""
    want = f"guest={vm}".encode()
    for tid in os.listdir(f"/proc/{parent}/task"):
        with contextlib.suppress(OSError):
            for pid in Path(f"/proc/{parent}/task/{tid}/children").read_text().split():
                with contextlib.suppress(OSError):
                    argv = Path(f"/proc/{pid}/cmdline").read_bytes()
                    if b"qemu-system" in argv and want in argv:
                        return int(pid)
    return None


def test_svmmd_killed_during_a_vm_start_leaves_no_orphan_vm(host: Host) -> None:
    """svmmd has spawned alice's QEMU (held with SIGSTOP by the test, so it cannot answer
    QMP and svmmd cannot have recorded it) when svmmd is SIGKILLed. The start was never
    answered nor audited; the restarted svmmd must not leave that QEMU running."""
    import threading

    with host.login() as session:
        assert session.opened == PAM_SUCCESS, session.report
        registry = host.lab.folder / "run" / "registry" / "vm-web.json"
        replies: list[tuple[int, dict[str, Any]]] = []
        asking = threading.Thread(target=lambda: replies.append(host.vm("start", "vm-web")))
        asking.start()
        child = wait_for("svmmd spawning QEMU", lambda: qemu_child(host.pid, "vm-web"))
        os.kill(child, signal.SIGSTOP)
        started = start_time(child)
        host.vms["vm-web"] = (child, started)  # the fixture kills it if it is left
        try:
            # A QEMU that cannot run cannot have answered QMP: the start is not finished.
            assert not registry.exists(), "the start finished before QEMU could be held"
            # svmmd records the start (<vm>.starting) before it lets the gate shell exec
            # QEMU; it needs nothing of the stopped child for that. Killed before it did, the
            # shell would just see end of file and exit: no QEMU, nothing to audit, not this
            # case (the fresh root's slower run once caught svmmd in that window).
            wait_for(
                "svmmd recording the start",
                lambda: registry.with_name("vm-web.starting").exists(),
            )
            host.kill()
        finally:
            os.kill(child, signal.SIGCONT)
        asking.join(TIMEOUT)
        assert replies and replies[0][0] != 0 and not replies[0][1].get("ok"), replies
        assert not [r for r in host.records(event="vm_start") if r["outcome"] == "success"]
        host.restart()
        code, listed = host.vm("list")
        assert code == 0 and listed["data"]["running"] == [], listed
        # The restarted svmmd stops the QEMU nobody answers for, and says so.
        wait_for("the orphaned QEMU gone", lambda: start_time(child) != started, SWEEP_TIMEOUT)
        try:
            stops = wait_for(
                "the unfinished start audited",
                lambda: [
                    r for r in host.records(event="vm_stop") if r["reason"] == "start_unfinished"
                ],
                SWEEP_TIMEOUT,
            )
        except AssertionError as e:
            raise AssertionError(f"{e}; svmmd's log ends: {host.daemon.tail()}") from None
        assert stops[0]["vm"] == "vm-web" and stops[0]["user"] == "alice", stops


# --- 4. the PAM application killed mid-session -------------------------------------------


def test_the_pam_application_killed_mid_session(host: Host) -> None:
    """alice's login process is SIGKILLed with her VM running. Nobody asks svmmd anything:
    its own sweeper (every 5 s) finds the session's process gone, removes the allowlist,
    drops the two volume keys, audits session_lost and pauses the VM (on_session_lost)."""
    session = host.login()
    try:
        assert session.opened == PAM_SUCCESS, session.report
        qemu = host.start_vm("vm-web")
        code, resumed = host.vm("resume", "vm-web")
        assert code == 0 and resumed["data"]["status"] == "running", resumed
        code, listed = host.vm("list")
        assert listed["data"]["keys_held"] == ["bank-a-data", "web-disk"], listed
        before = len(host.records())
        session.proc.send_signal(signal.SIGKILL)
        assert session.proc.wait(TIMEOUT) == -signal.SIGKILL
    finally:
        if session.proc.poll() is None:
            session.proc.kill()
            session.proc.wait()
    lost = wait_session_lost(host, before)
    assert "allowlist removed" in lost["detail"] and "2 key(s) dropped" in lost["detail"], lost
    # Each key held for the session is on record as dropped, with the card that released it.
    dropped = host.records(before, "key_drop")
    assert sorted((r["detail"].rsplit("volume=", 1)[-1], r["reason"]) for r in dropped) == [
        ("bank-a-data", "session_lost"),
        ("web-disk", "session_lost"),
    ], dropped
    holds = host.records(0, "key_hold")
    assert {r["card"]["fingerprint"] for r in dropped} == {r["card"]["fingerprint"] for r in holds}
    # The login ran in svmmd: its keys reached the launcher inside the process, as
    # bytearrays, not as JSON text over svmmd's own socket.
    assert holds and all("via svmmd's PAM responder" in r["detail"] for r in holds), holds
    logout = wait_for("the on_session_lost action",
                      lambda: host.records(before, "last_logout"))  # fmt: skip
    assert [(r["vm"], r["reason"]) for r in logout] == [("vm-web", "paused")], logout
    # Only the sweeper acted: no request reached svmmd between the kill and now.
    assert not [r for r in host.records(before) if r["event"].startswith("vm_")]
    assert host.status("vm-web") == "paused" and os.path.exists(f"/proc/{qemu}")
    assert host.lab.allowlist(ALICE_UID) is None and host.session_records() == {}
    code, listed = host.vm("list")
    assert code == 0 and listed["data"]["keys_held"] == [], listed
    assert host.refused("resume", "vm-web") == "no_allowlist"
    assert host.refused("start", "bank-a") == "no_allowlist"
    host.verify_audit()

    # A new login with the card gives the grant and the keys back: then it resumes.
    with host.login() as again:
        assert again.opened == PAM_SUCCESS, again.report
        code, resumed = host.vm("resume", "vm-web")
        assert code == 0 and resumed["data"]["status"] == "running", resumed
        code, stopped = host.vm("stop", "vm-web")
        assert code == 0 and stopped["ok"], stopped
    host.verify_audit()
