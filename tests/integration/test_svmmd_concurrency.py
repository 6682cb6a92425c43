"""Logins side by side through svmmd (issue 14): one user's hung OCSP request or directory
request holds up nobody else; idle connections cost no threads; a full pool says "busy"
(audited), and the PAM module never takes "busy" for "no svmmd".

Real parts: svmmd as its own process (svmm_lab.svmmd.SvmmdProcess), the PAM stack through
pam_wrapper (svmm_lab.pamclient), SoftHSM2 cards of alice and bob in svmmd's reader (the
PAM application's own reader is empty: a success can only be svmmd's), the lab CA's
`openssl ocsp` and slapd, each behind a proxy that can hold ONE request for ever
(svmm_lab.stall). A serial svmmd fails the hung tests: the other login waits for the hung
one (its fetch_timeout / search_timeout, longer than the bound here).
"""

from __future__ import annotations

import json
import os
import select
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pam_svmm.pam import shim
from svmm_lab.directory import Slapd
from svmm_lab.lab import Lab
from svmm_lab.pamclient import PamReport
from svmm_lab.stall import StallingOcspProxy, StallingTcpProxy, fronted_variant
from svmm_lab.svmmd import SvmmdProcess
from svmm_lab.userland import userland
from tests.integration import ldap_fixtures
from tests.integration.logins import PIN

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (svmmd, other uids)"),
]
slapd = ldap_fixtures.slapd
ROOT = Path(__file__).resolve().parents[2]
LOGIN_TIMEOUT = 60.0
HANG = 35.0  # how long a held request keeps bob's login waiting (then it gives up)
BOUND = LOGIN_TIMEOUT / 3  # another login, while bob's hangs: generous, far below HANG
PAM_SUCCESS, PAM_SYSTEM_ERR = 0, 4


@dataclass
class Svmmd:
    daemon: SvmmdProcess
    service: str  # daemon=required
    auto: str  # the same configuration, daemon=auto
    ocsp: StallingOcspProxy
    ldap: StallingTcpProxy

    def threads(self) -> int:
        assert self.daemon.proc is not None
        status = Path(f"/proc/{self.daemon.proc.pid}/status").read_text()
        return int(next(ln for ln in status.splitlines() if ln.startswith("Threads:")).split()[1])


@pytest.fixture(scope="module")
def svmmd(lab: Lab, slapd: Slapd) -> Iterator[Svmmd]:
    sock_dir = Path(tempfile.mkdtemp(prefix="svmm-conc-", dir="/tmp"))
    os.chmod(sock_dir, 0o755)  # noqa: S103 - root's folder; every user reaches the socket
    bob = lab.card_cert("bob").serial_number
    with (
        StallingOcspProxy(lab.ca.ocsp_url, bob) as ocsp,
        StallingTcpProxy("127.0.0.1", slapd.port) as ldap,
    ):
        service, toml = fronted_variant(
            lab, slapd, ocsp, ldap, sock_dir, name="conc",
            search_timeout=HANG, fetch_timeout=HANG, login_timeout=LOGIN_TIMEOUT,
        )  # fmt: skip
        sock = sock_dir / "launcher.sock"
        auto = "svmm-conc-auto"
        lab.write_pam_service(name=auto, config=toml, args=f"daemon=auto socket={sock}")
        env = {"PYTHONPATH": str(ROOT), **lab.insert("alice", "bob").env}
        daemon = SvmmdProcess(toml, sock, env, sock_dir / "svmmd.log").start()
        try:
            yield Svmmd(daemon, service, auto, ocsp, ldap)
        finally:
            daemon.stop()
            shutil.rmtree(sock_dir, ignore_errors=True)


def _login(lab: Lab, svmmd: Svmmd, user: str) -> tuple[PamReport, float]:
    start = time.monotonic()
    report = lab.login(lab.insert(), pin=PIN, user=user, service=svmmd.service, timeout=120)
    return report, time.monotonic() - start


def _while_bob_hangs(lab: Lab, svmmd: Svmmd, proxy: StallingOcspProxy | StallingTcpProxy) -> None:
    """bob's login is held at the proxy; alice's must go through meanwhile, in its time."""
    assert _login(lab, svmmd, "alice")[0].ok  # warm: svmmd has loaded what a login needs
    proxy.arm()
    done: list[PamReport] = []
    bob = threading.Thread(target=lambda: done.append(_login(lab, svmmd, "bob")[0]))
    bob.start()
    try:
        assert proxy.stalled.wait(30), "bob's request never reached the proxy"
        report, took = _login(lab, svmmd, "alice")
        assert report.ok and report.user == "alice", report
        assert took < BOUND, f"alice waited {took:.1f} s behind bob's hung request"
        assert bob.is_alive()  # bob's is still held: alice did not just wait it out
    finally:
        proxy.release()
        bob.join(120)
    assert done, "bob's login never ended"


def test_a_hung_ocsp_request_holds_up_nobody_else(lab: Lab, svmmd: Svmmd) -> None:
    _while_bob_hangs(lab, svmmd, svmmd.ocsp)


def test_a_hung_directory_request_holds_up_nobody_else(lab: Lab, svmmd: Svmmd) -> None:
    _while_bob_hangs(lab, svmmd, svmmd.ldap)
    time.sleep(11)  # the server bob's request hung on is left aside for retry_interval


def test_idle_connections_cost_no_threads_and_logins_go_on(lab: Lab, svmmd: Svmmd) -> None:
    """Once, every connection was a thread: 1500 idle ones were 1500 threads. Silent ones,
    and ones that sent half a request (a PAM MAGIC, a JSON line), hold no worker either."""
    assert svmmd.daemon.proc is not None
    before = svmmd.threads()
    held = []
    try:
        for i in range(100):  # within root's budget (MAX_ROOT), with room for the login
            s = socket.socket(socket.AF_UNIX)
            s.connect(str(svmmd.daemon.socket))
            if i % 3 == 1:
                s.sendall(shim.MAGIC[:3])
            elif i % 3 == 2:
                s.sendall(b'{"op": "li')
            held.append(s)
        time.sleep(1.0)
        assert svmmd.threads() - before < 10, (before, svmmd.threads())
        report, took = _login(lab, svmmd, "alice")
        assert report.ok, report
        assert took < BOUND, took
        assert svmmd.daemon.proc.poll() is None
    finally:
        for s in held:
            s.close()


def _audit_until(lab: Lab, before: int, reason: str) -> list[dict[str, object]]:
    """The records since ``before``, once one has ``reason`` (svmmd audits "busy" on a
    thread of its own, after answering), or after 15 s."""
    end = time.monotonic() + 15
    while True:
        records = lab.audit_records()[before:]
        if any(r.get("reason") == reason for r in records) or time.monotonic() > end:
            return records
        time.sleep(0.2)


def test_busy_never_falls_back_to_the_pam_process(lab: Lab, svmmd: Svmmd) -> None:
    """root's connections all taken: the PAM module (daemon=auto, the card in the PAM
    application's own reader, so a login in its process would succeed) answers an error,
    audited as "busy" by svmmd, and never logs in by itself."""
    from pam_svmm.daemon import server as server_mod

    held: list[socket.socket] = []
    before = len(lab.audit_records())  # the probe's own busy counts: one record a minute

    def fill() -> None:
        while True:  # until root's budget is spent: the next connection is answered busy
            s = socket.socket(socket.AF_UNIX)
            s.connect(str(svmmd.daemon.socket))
            if len(held) >= server_mod.MAX_ROOT - 1 and select.select([s], [], [], 0.3)[0]:
                s.close()
                return
            held.append(s)

    try:
        fill()
        # Connections of earlier tests that svmmd had not yet seen close may free slots
        # meanwhile: take those too before the login.
        time.sleep(2)
        fill()
        report = lab.login(lab.insert("alice"), pin=PIN, user="alice", service=svmmd.auto)
        assert report.code == PAM_SYSTEM_ERR, (report, len(held), lab.audit_records()[before:])
        records = lab.audit_records()[before:]
        assert not [r for r in records if r["event"] == "auth"], records  # never in-process
        busy = [r for r in _audit_until(lab, before, "busy") if r.get("reason") == "busy"]
        assert busy and busy[0]["user"] == "root", records
    finally:
        for s in held:
            s.close()


HOARDER = """
import json, select, socket, sys, time
n, path = int(sys.argv[1]), sys.argv[2]
held, busy = [], 0
for _ in range(n):
    s = socket.socket(socket.AF_UNIX)
    s.connect(path)
    s.sendall(b'{"op": "list"}\\n')
    held.append(s)
waiting, end = list(held), time.monotonic() + 2.0  # the queued ones: no worker free yet
while waiting and (left := end - time.monotonic()) > 0:
    for s in select.select(waiting, [], [], left)[0]:
        waiting.remove(s)
        line = s.recv(4096)
        if line and json.loads(line)["reason"] == "busy":
            busy += 1
print(json.dumps({"busy": busy}))
sys.stdout.flush()
sys.stdin.readline()  # hold them until told
"""


def _park(svmmd: Svmmd) -> socket.socket:
    """A root PAM call that stops at the PIN prompt: it keeps a worker until closed."""
    s = socket.socket(socket.AF_UNIX)
    s.connect(str(svmmd.daemon.socket))
    call = {"call": "authenticate", "item.service": svmmd.service, "item.user": "alice"}
    s.sendall(shim.MAGIC + shim.encode(call))
    return s


def test_a_full_pool_answers_busy_audited(lab: Lab, svmmd: Svmmd) -> None:
    """Every worker waits for a PIN; users' requests queue up to the queue's size, past it
    the answer is "busy", audited. Nothing is lost meanwhile: once the workers are free
    again the queued requests are answered and logins go through."""
    from pam_svmm.daemon import server as server_mod

    parked = [_park(svmmd) for _ in range(server_mod.WORKERS)]
    hoarders: list[subprocess.Popen[bytes]] = []
    try:
        for p in parked:
            p.settimeout(30)
            assert "conv.style" in shim.read_frame(p.recv)  # its worker waits for the PIN
        before = len(lab.audit_records())
        per_uid = server_mod.MAX_PER_UID
        uids = range(20001, 20001 + server_mod.QUEUE_USERS // per_uid + 1)
        busy = 0
        for uid in uids:
            h = subprocess.Popen(
                userland().argv("-c", HOARDER, str(per_uid), str(svmmd.daemon.socket)),
                env=userland().env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                user=uid, group=uid, extra_groups=[], cwd="/",
            )  # fmt: skip
            hoarders.append(h)
            assert h.stdout is not None
            busy += json.loads(h.stdout.readline())["busy"]
        assert busy == len(uids) * per_uid - server_mod.QUEUE_USERS, busy
        records = [r for r in _audit_until(lab, before, "busy") if r.get("reason") == "busy"]
        assert records and all("queue is full" in r["detail"] for r in records), records
    finally:
        for p in parked:
            p.close()
        for h in hoarders:
            h.communicate(b"\n", timeout=30)
    report, _took = _login(lab, svmmd, "alice")
    assert report.ok, report
