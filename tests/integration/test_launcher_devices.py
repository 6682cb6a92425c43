"""svmmd's devices, console and session end, against real QEMU (as nobody) through the socket:
USB and networks exactly as granted (the argv QEMU runs with and QMP's view agree), a granted
network the host does not define is refused, the serial console's connection handed to its
owner (SCM_RIGHTS) and refused without the grant, the last logout's configured action, and
card removal that pauses the VM and removes its LUKS secrets from QEMU."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from pam_svmm.adapters.allowlist_store import AllowlistStore, SessionRecords, UserSessions
from pam_svmm.adapters.vm_registry import proc_start_time
from pam_svmm.config import (
    LastLogoutAction,
    NetworkBackend,
    NetworkKind,
    VolumesConfig,
)
from pam_svmm.daemon.server import bind_socket
from pam_svmm.services.launcher import Launcher
from svmm_lab.userland import userland
from tests.integration.launcher_service import NOBODY, Running, ask
from tests.integration.launcher_volume import KEY, luks_template  # noqa: F401
from tests.unit.launcher_fixtures import (
    CARD,
    LocalPolicy,
    allowlist_bytes,
    audit_records,
    live_session,
)
from tests.unit.launcher_fixtures import make_launcher as _make_launcher
from tests.unit.launcher_fixtures import request as _request

QEMU = shutil.which("qemu-system-x86_64")
BRIDGE = f"svtbr{os.getpid() % 100000}"
TOKEN = "tok-devices-1"  # the token serial hold_keys names (the card that released the key)

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (SO_PEERCRED, taps, bridges)"),
    pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 not installed"),
]

POLICY = """
version = 1
[hosts.lab-host]
login_roles = ["analysts"]
services = ["login"]

[networks.lab]
types = ["work"]
[networks.dmz]
types = ["work"]
[networks.ghost]
types = ["work"]

[vms.devbox]
type = "work"
usb = ["046d:c52b", "1050:0407"]
networks = ["lab", "dmz", "ghost"]

[vms.ghostbox]
type = "work"
networks = ["ghost"]

[vms.quiet]

[vms.vault]
volumes = ["secret-data"]

[[grants]]
role = "analysts"
vm = "devbox"
permissions = ["boot", "console", "usb:046d:c52b", "network:lab", "network:dmz"]

[[grants]]
role = "analysts"
vm = "ghostbox"
permissions = ["boot", "network:ghost"]

[[grants]]
role = "analysts"
vm = "quiet"
permissions = ["boot"]

[[grants]]
role = "analysts"
vm = "vault"
permissions = ["boot"]
"""

CONSOLE_CLIENT = """
import json, socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
s.sendall(json.dumps({"version": "svmm-launcher/1", "op": "console", "vm": sys.argv[2]}).encode()
          + b"\\n")
data, fds, _flags, _addr = socket.recv_fds(s, 65536, 1)
while not data.endswith(b"\\n"):
    data += s.recv(65536)
print(json.dumps({"reply": json.loads(data), "fds": len(fds)}), flush=True)
if fds:
    con = socket.socket(fileno=fds[0])
    con.sendall(b"hello console\\n")
    sys.stdin.readline()  # hold the console until the test is done looking
"""


@pytest.fixture
def bridge() -> Iterator[str]:
    subprocess.run(["ip", "link", "add", BRIDGE, "type", "bridge"], check=True)
    yield BRIDGE
    subprocess.run(["ip", "link", "del", BRIDGE], check=False)


@pytest.fixture
def base() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="svmmd-dev-", dir="/tmp"))
    os.chmod(d, 0o755)  # noqa: S103 - root's folder, readable so nobody reaches the socket
    yield d
    shutil.rmtree(d, ignore_errors=True)


def make_service(
    base: Path, *, on_last_logout: LastLogoutAction = LastLogoutAction.KEEP
) -> Running:
    policy = LocalPolicy(POLICY)
    made = _make_launcher(base, policy)
    volumes = base / "volumes"
    volumes.mkdir(mode=0o755, exist_ok=True)
    lc = replace(
        made.config.launcher,
        on_last_logout=on_last_logout,
        networks=(
            NetworkBackend("lab", NetworkKind.USER),
            NetworkBackend("dmz", NetworkKind.BRIDGE, bridge=BRIDGE),
        ),
    )
    config = replace(made.config, launcher=lc, volumes=VolumesConfig(enabled=True, dir=volumes))
    launcher = Launcher(config, policy=policy, audit=made.audit, store=made.store, now=made.now)
    AllowlistStore(config.session.allowlist_dir).write_bytes(
        NOBODY, allowlist_bytes(policy, user="nobody", uid=NOBODY)
    )
    live_session(config.session.state_dir, NOBODY, "nobody")
    return Running(launcher, bind_socket(config.launcher.socket))


@pytest.fixture
def service(base: Path, bridge: str) -> Iterator[Running]:
    running = make_service(base)
    yield running
    _teardown(running)


def _teardown(running: Running) -> None:
    running.close()
    for vm in list(running.launcher.registry.running()):
        running.launcher.registry.stop(vm, quit_timeout=2, term_timeout=2, kill_timeout=2)
    running.launcher.close()


def _argv(pid: int) -> list[str]:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return [a.decode() for a in f.read().split(b"\0") if a]


def _after(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_usb_and_networks_exactly_as_granted(service: Running, bridge: str) -> None:
    sock = service.launcher.config.launcher.socket
    start = ask(sock, {"op": "start", "vm": "devbox"})[0]
    assert start["ok"], start
    assert start["data"]["usb"] == ["046d:c52b"] and start["data"]["networks"] == ["dmz", "lab"]
    pid = start["data"]["pid"]
    argv = _argv(pid)
    assert argv[argv.index("-machine") + 1] == "q35" and "-S" in argv and "-nodefaults" in argv
    devices = _after(argv, "-device")
    assert [d for d in devices if d.startswith("usb-host")] == [
        "usb-host,bus=usb.0,vendorid=0x046d,productid=0xc52b,id=usb-046d-c52b"
    ]
    assert not any("1050" in a or "0407" in a or "ghost" in a for a in argv)  # not granted
    netdevs = _after(argv, "-netdev")
    assert netdevs[1] == "user,id=net-lab,restrict=on"
    assert netdevs[0].startswith("tap,id=net-dmz,fd=") and len(netdevs) == 2
    nics = sorted(d.split(",")[0:3:2] for d in devices if d.startswith("virtio-net-pci"))
    assert nics == [["virtio-net-pci", "id=nic-dmz"], ["virtio-net-pci", "id=nic-lab"]]
    # QMP's view agrees: the same devices, no others.
    qmp = service.launcher.registry.get("devbox").qmp
    peripherals = {
        p["name"]: p["type"] for p in qmp.execute("qom-list", {"path": "/machine/peripheral"})
    }
    peripherals.pop("type", None)
    assert peripherals == {
        "usb": "child<qemu-xhci>",
        "usb-046d-c52b": "child<usb-host>",
        "nic-lab": "child<virtio-net-pci>",
        "nic-dmz": "child<virtio-net-pci>",
        "serial0": "child<isa-serial>",
    }
    usb = qmp.hmp("info usb")
    assert "ID: usb-046d-c52b" in usb and len(usb.strip().splitlines()) == 1
    network = qmp.hmp("info network")
    assert "net-lab: index=0,type=user" in network, network and "restrict=on" in network
    assert "net-dmz: index=0,type=tap" in network and "ghost" not in network
    # The tap svmmd made is on the bridge, and goes when QEMU does.
    on_bridge = subprocess.run(["ip", "-j", "link", "show", "master", bridge],
                               capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert len(json.loads(on_bridge)) == 1
    stop = ask(sock, {"op": "stop", "vm": "devbox"})[0]
    assert stop["ok"] and proc_start_time(pid) is None
    on_bridge = subprocess.run(["ip", "-j", "link", "show", "master", bridge],
                               capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert json.loads(on_bridge or "[]") == []
    rec = next(r for r in audit_records(service.launcher.config.launcher.run_dir.parent)
               if r["event"] == "vm_start")  # fmt: skip
    assert "usb=046d:c52b; networks=dmz,lab" in rec["detail"] and rec["user"] == "nobody"
    assert rec["card"]["fingerprint"] == CARD.fingerprint


def test_no_devices_no_machine(service: Running) -> None:
    sock = service.launcher.config.launcher.socket
    start = ask(sock, {"op": "start", "vm": "quiet"})[0]
    assert start["ok"], start
    argv = _argv(start["data"]["pid"])
    assert argv[argv.index("-machine") + 1] == "none"
    assert "-netdev" not in argv and not any(a.startswith("usb") for a in argv)


def test_a_network_the_host_does_not_define_is_refused(service: Running, base: Path) -> None:
    sock = service.launcher.config.launcher.socket
    reply = ask(sock, {"op": "start", "vm": "ghostbox"})[0]
    assert not reply["ok"] and reply["reason"] == "network_undefined"
    assert "launcher.networks.ghost" in reply["message"]
    assert service.launcher.registry.running() == {}
    assert audit_records(base)[-1]["event"] == "vm_deny"


def test_console_goes_to_its_owner_with_the_grant(service: Running, base: Path) -> None:
    sock = service.launcher.config.launcher.socket
    assert ask(sock, {"op": "start", "vm": "devbox"}, {"op": "start", "vm": "quiet"})[1]["ok"]
    qmp = service.launcher.registry.get("devbox").qmp

    def console() -> dict[str, Any]:
        (c,) = [c for c in qmp.execute("query-chardev") if c["label"] == "console"]
        return c

    assert console()["filename"].startswith("disconnected:")
    client = subprocess.Popen(
        userland().argv("-c", CONSOLE_CLIENT, str(sock), "devbox"),
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, user=NOBODY, group=NOBODY,
        extra_groups=[], env=userland().env(),
    )  # fmt: skip
    try:
        got = json.loads(client.stdout.readline())
        assert got["reply"]["ok"] and got["fds"] == 1, got
        assert got["reply"]["data"] == {"vm": "devbox", "escape": "^]"}
        assert not console()["filename"].startswith("disconnected:")  # QEMU's side is connected
        busy = ask(sock, {"op": "console", "vm": "devbox"})[0]
        assert not busy["ok"] and busy["reason"] == "console_busy"
    finally:
        client.communicate(b"\n", timeout=10)
    # No grant on "quiet"; no console on a VM not yours; none for a VM not running.
    quiet, other = ask(sock, {"op": "console", "vm": "quiet"}, {"op": "console", "vm": "vault"})
    assert not quiet["ok"] and quiet["reason"] == "not_in_allowlist"
    assert not other["ok"] and other["reason"] == "vm_not_running"
    AllowlistStore(service.launcher.config.session.allowlist_dir).write_bytes(
        10001, allowlist_bytes(LocalPolicy(POLICY), user="mallory", uid=10001)
    )
    live_session(service.launcher.config.session.state_dir, 10001, "mallory")
    theirs = ask(sock, {"op": "console", "vm": "devbox"}, user=10001)[0]
    assert not theirs["ok"] and theirs["reason"] == "not_owner"
    events = [(r["event"], r["vm"], r["reason"]) for r in audit_records(base)
              if r["event"] in ("vm_console", "vm_deny")]  # fmt: skip
    assert events == [
        ("vm_console", "devbox", "ok"),
        ("vm_console", "devbox", "console_busy"),
        ("vm_deny", "quiet", "not_in_allowlist"),
        ("vm_deny", "vault", "vm_not_running"),
        ("vm_deny", "devbox", "not_owner"),
    ]


def _open_session(state_dir: Path, uid: int, sessions: dict[str, Any]) -> None:
    with SessionRecords(state_dir).locked(uid) as held:
        held.save(UserSessions(uid, sessions, "nobody"))


def _closed(session: str) -> bytes:
    return _request("drop_keys", uid=NOBODY, session=session, session_closed=True)


@pytest.mark.parametrize("action", [LastLogoutAction.STOP, LastLogoutAction.PAUSE,
                                    LastLogoutAction.KEEP])  # fmt: skip
def test_the_last_logout_applies_the_configured_action(
    base: Path, bridge: str, action: LastLogoutAction
) -> None:
    running = make_service(base, on_last_logout=action)
    launcher = running.launcher
    state = launcher.config.session.state_dir
    try:
        sock = launcher.config.launcher.socket
        pid = ask(sock, {"op": "start", "vm": "quiet"})[0]["data"]["pid"]
        launcher.registry.get("quiet").qmp.execute("cont")  # running, not held in prelaunch
        # Another session is still open (its process, this one, alive): nothing happens.
        _open_session(state, NOBODY, {"tty2:2": {"pid": os.getpid()}})
        first = json.loads(launcher.handle(0, _closed("tty1:1")).to_json())
        assert first["ok"] and first["data"]["last_logout"]["last"] is False
        assert launcher.registry.get("quiet").status()["status"] == "running"
        # A non-root peer cannot claim a session closed.
        assert launcher.handle(NOBODY, _closed("tty2:2")).reason == "not_permitted"
        # The last one closes (a dead session's process does not count).
        _open_session(state, NOBODY, {"tty3:3": {"pid": 2**22 + 1}})
        last = json.loads(launcher.handle(0, _closed("tty2:2")).to_json())
        want = {LastLogoutAction.STOP: "stopped", LastLogoutAction.PAUSE: "paused",
                LastLogoutAction.KEEP: "kept"}[action]  # fmt: skip
        assert last["data"]["last_logout"] == {"last": True, "action": action.value,
                                               "vms": {"quiet": want}}  # fmt: skip
        if action is LastLogoutAction.STOP:
            assert proc_start_time(pid) is None and launcher.registry.running() == {}
        else:
            status = launcher.registry.get("quiet").status()["status"]
            assert status == ("paused" if action is LastLogoutAction.PAUSE else "running")
        rec = [r for r in audit_records(base) if r["event"] == "last_logout"]
        assert [(r["vm"], r["reason"], r["user"]) for r in rec] == [("quiet", want, "nobody")]
        assert (
            f"for uid={NOBODY}; session=tty2:2; on_last_logout={action.value}" in rec[0]["detail"]
        )
        assert rec[0]["card"]["fingerprint"] == CARD.fingerprint
    finally:
        _teardown(running)


def test_card_removal_pauses_and_removes_the_luks_secrets(
    base: Path,
    bridge: str,
    luks_template: Path,  # noqa: F811
) -> None:
    running = make_service(base)
    launcher = running.launcher
    volume = launcher.config.volumes.dir / "secret-data.img"
    shutil.copyfile(luks_template, volume)
    os.chmod(volume, 0o600)
    try:
        hold = _request(
            "hold_keys", uid=NOBODY, user="nobody", session="tty1:1",
            card_fingerprint=CARD.fingerprint, card_serial=TOKEN,
            volumes=[{"name": "secret-data", "passphrase": KEY}],
        )  # fmt: skip
        assert launcher.handle(0, hold).ok
        start = ask(launcher.config.launcher.socket, {"op": "start", "vm": "vault"})[0]
        assert start["ok"], start
        qmp = launcher.registry.get("vault").qmp
        qmp.execute("cont")
        objects = {o["name"]: o["type"] for o in qmp.execute("qom-list", {"path": "/objects"})}
        assert objects.get("secret-data-key") == "child<secret>"
        actions = launcher.card_policy.on_removed(TOKEN)
        assert [(a.vm_id, a.reason, a.ok) for a in actions] == [("vault", "paused", True)]
        assert launcher.registry.get("vault").status()["status"] == "paused"
        objects = {o["name"]: o["type"] for o in qmp.execute("qom-list", {"path": "/objects"})}
        assert "child<secret>" not in objects.values()
        # The volume is still open in QEMU (its master key): the node is there.
        assert [n["node-name"] for n in qmp.execute("query-named-block-nodes")
                if n["node-name"] == "secret-data"] == ["secret-data"]  # fmt: skip
        closed = [r for r in audit_records(base) if r["event"] == "volume_close"]
        assert len(closed) == 1 and closed[0]["reason"] == "secrets_removed"
        assert "secret-data-key" in closed[0]["detail"]
        assert "master keys stay in the paused QEMU's memory" in closed[0]["detail"]
        assert closed[0]["vm"] == "vault" and closed[0]["card"]["fingerprint"] == CARD.fingerprint
        assert KEY not in (base / "audit" / "audit.jsonl").read_text()
    finally:
        _teardown(running)


def test_svmm_vm_console_attaches_and_detaches(service: Running, base: Path) -> None:
    sock = service.launcher.config.launcher.socket
    assert all(r["ok"] for r in ask(sock, {"op": "start", "vm": "devbox"},
                                    {"op": "start", "vm": "quiet"}))  # fmt: skip
    cli = userland().argv("-m", "pam_svmm.cli.main", "vm", "--socket", str(sock), "console")
    env = userland().env()
    done = subprocess.run(
        [*cli, "devbox"], input=b"root\r\x1d", capture_output=True, timeout=30,
        user=NOBODY, group=NOBODY, extra_groups=[], env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert b"console attached" in done.stderr and b"console detached" in done.stderr
    refused = subprocess.run(
        [*cli, "quiet"], capture_output=True, timeout=30,
        user=NOBODY, group=NOBODY, extra_groups=[], env=env,
    )  # fmt: skip
    assert refused.returncode != 0 and b"not_in_allowlist" in refused.stderr
    # QEMU's side is free again once the client left.
    qmp = service.launcher.registry.get("devbox").qmp
    (c,) = [c for c in qmp.execute("query-chardev") if c["label"] == "console"]
    assert c["filename"].startswith("disconnected:")
