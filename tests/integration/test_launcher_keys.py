"""svmmd holds the volume keys a PAM session released and boots the VM with its encrypted disk:
a root client hands over a LUKS1 volume's passphrase, a user (uid 10001, no passwd entry: the
kernel's uid is all that counts) starts the VM through the socket, QEMU (as nobody) reads the
decrypted disk (checked with qemu-io over QMP), a wrong key fails the start with nothing left
running, a non-root hold_keys is refused, drop_keys wipes, and the key is in no QEMU argv or
environment and not in the audit trail."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from pam_svmm.adapters.allowlist_store import AllowlistStore
from pam_svmm.adapters.vm_registry import proc_start_time
from pam_svmm.config import VolumesConfig
from pam_svmm.daemon.server import bind_socket
from pam_svmm.services.launcher import Launcher
from tests.integration.launcher_service import Running, ask
from tests.integration.launcher_volume import CRYPTSETUP, KEY, luks_template  # noqa: F401
from tests.unit.launcher_fixtures import (
    ALICE_UID,
    CARD,
    LocalPolicy,
    allowlist_bytes,
    live_session,
    make_launcher,
)

QEMU = shutil.which("qemu-system-x86_64")
VOLUME = "secret-data"  # the "secret" VM's volume in the fixtures' policy
WRONG = "Zz9vT2xHk4wYcN5sF6gA3eU0iO_-KjRQq7LDm1r0pZJ"

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (SO_PEERCRED as another user)"),
    pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 not installed"),
    pytest.mark.skipif(CRYPTSETUP is None, reason="cryptsetup not installed"),
]


@pytest.fixture
def base() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="svmmd-keys-", dir="/tmp"))
    os.chmod(d, 0o755)  # noqa: S103 - root's folder, readable so other uids reach the socket
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def service(base: Path, luks_template: Path) -> Iterator[Running]:  # noqa: F811
    volumes = base / "volumes"
    volumes.mkdir(mode=0o755)
    shutil.copyfile(luks_template, volumes / f"{VOLUME}.img")
    os.chmod(volumes / f"{VOLUME}.img", 0o600)
    policy = LocalPolicy()
    made = make_launcher(base, policy)
    config = replace(made.config, volumes=VolumesConfig(enabled=True, dir=volumes))
    launcher = Launcher(config, policy=policy, audit=made.audit, store=made.store, now=made.now)
    AllowlistStore(config.session.allowlist_dir).write_bytes(ALICE_UID, allowlist_bytes(policy))
    live_session(config.session.state_dir, ALICE_UID, "alice")
    running = Running(launcher, bind_socket(config.launcher.socket))
    yield running
    running.close()
    for vm in list(launcher.registry.running()):
        launcher.registry.stop(vm, quit_timeout=2, term_timeout=2, kill_timeout=2)
    launcher.close()


def _hold(key: str = KEY, session: str = "tty1:1", **kw: Any) -> dict[str, Any]:
    return {
        "op": "hold_keys",
        "uid": ALICE_UID,
        "user": "alice",
        "session": session,
        "card_fingerprint": CARD.fingerprint,
        "card_serial": CARD.serial,
        "volumes": [{"name": VOLUME, "passphrase": key}],
        **kw,
    }


def _alice(sock: Path, *requests: dict[str, Any]) -> list[dict[str, Any]]:
    return ask(sock, *requests, user=ALICE_UID)


def _root(sock: Path, *requests: dict[str, Any]) -> list[dict[str, Any]]:
    return ask(sock, *requests, user=None)


def _qemu_pids() -> list[int]:
    """QEMU processes for the "secret" VM, anywhere on the host."""
    pids = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                argv = (p / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"guest=secret" in argv:
                pids.append(int(p.name))
    return pids


def _audit_text(base: Path) -> str:
    return (base / "audit" / "audit.jsonl").read_text()


def test_held_key_boots_the_vm_with_its_decrypted_disk(service: Running, base: Path) -> None:
    sock = service.launcher.config.launcher.socket
    held = _root(sock, _hold())[0]
    assert held["ok"] and held["data"]["held"] == [VOLUME], held
    listed = _alice(sock, {"op": "list"})[0]
    assert listed["data"]["keys_held"] == [VOLUME]
    start = _alice(sock, {"op": "start", "vm": "secret"})[0]
    assert start["ok"], start
    assert start["data"]["volumes"] == [VOLUME]
    pid = start["data"]["pid"]
    assert 70000 <= os.stat(f"/proc/{pid}").st_uid <= 70255  # the VM's own uid

    # The key went through a pipe: not in QEMU's argv or environment.
    for what in ("cmdline", "environ"):
        data = Path(f"/proc/{pid}/{what}").read_bytes()
        assert KEY.encode() not in data and b"secret-data.img" not in data
    assert b"/dev/fdset/1" in Path(f"/proc/{pid}/cmdline").read_bytes()

    # Through QMP, the VM process reads the plaintext written with the key (and would say
    # "Pattern verification failed" for anything else); qemu-io prints on QEMU's stdout,
    # which is its log, flushed when it quits.
    handle = service.launcher.registry.get("secret")
    assert handle is not None
    qmp = handle.qmp
    assert qmp.hmp(f'qemu-io {VOLUME} "read -P 0x5a 0 4096"') == ""
    assert qmp.hmp(f'qemu-io {VOLUME} "read -P 0x00 0 4096"') == ""
    stop = _alice(sock, {"op": "stop", "vm": "secret"})[0]
    assert stop["ok"] and stop["data"]["how"] == "quit"
    log = (Path(handle.record.run_dir) / "qemu.log").read_text()
    # qemu-io reports "read 4096/4096" for both reads; only the 0x00 one fails to verify.
    first, failed = log.split("Pattern verification failed at offset 0, 4096 bytes\n")
    assert first.startswith("read 4096/4096 bytes at offset 0\n") and first.endswith("ops/sec)\n")
    assert failed.startswith("read 4096/4096 bytes at offset 0\n")

    # Keys stay held after a start: the VM can start again.
    again = _alice(sock, {"op": "start", "vm": "secret"}, {"op": "stop", "vm": "secret"})
    assert [r["ok"] for r in again] == [True, True], again

    audit = _audit_text(base)
    assert KEY not in audit
    events = [(r["event"], r["reason"]) for r in _records(base)]
    assert events[0] == ("key_hold", "ok")
    hold = _records(base)[0]
    assert hold["user"] == "alice" and hold["card"]["fingerprint"] == CARD.fingerprint
    assert f"volume={VOLUME}" in hold["detail"] and f"for uid={ALICE_UID}" in hold["detail"]
    starts = [r for r in _records(base) if r["event"] == "vm_start"]
    assert starts and all(f"volumes={VOLUME}" in r["detail"] for r in starts)


def _records(base: Path) -> list[dict[str, Any]]:
    from tests.unit.launcher_fixtures import audit_records

    return audit_records(base)


def test_a_wrong_held_key_fails_the_start_and_leaves_nothing(service: Running, base: Path) -> None:
    sock = service.launcher.config.launcher.socket
    assert _root(sock, _hold(WRONG))[0]["ok"]
    start = _alice(sock, {"op": "start", "vm": "secret"})[0]
    assert not start["ok"] and start["reason"] == "volume_key_refused", start
    assert "Invalid password" in start["message"] and WRONG not in start["message"]
    assert service.launcher.registry.running() == {}
    assert _qemu_pids() == []
    registry = base / "registry"
    assert not registry.exists() or list(registry.iterdir()) == []
    rec = [r for r in _records(base) if r["event"] == "vm_start"][-1]
    assert rec["outcome"] == "error" and rec["reason"] == "volume_key_refused"
    assert WRONG not in _audit_text(base)
    # The right key (same session: it replaces the wrong one) then works.
    assert _root(sock, _hold())[0]["ok"]
    assert _alice(sock, {"op": "start", "vm": "secret"})[0]["ok"]


def test_only_root_may_hand_over_or_drop_keys(service: Running, base: Path) -> None:
    sock = service.launcher.config.launcher.socket
    denied = _alice(sock, _hold(), {"op": "drop_keys", "uid": ALICE_UID, "session": None})
    assert [r["reason"] for r in denied] == ["not_permitted", "not_permitted"]
    assert service.launcher.keys.held(ALICE_UID) == set()
    start = _alice(sock, {"op": "start", "vm": "secret"})[0]
    assert start["reason"] == "volume_key_unavailable" and VOLUME in start["message"]
    # the user's ordinary requests still may not carry a uid
    assert _alice(sock, {"op": "list", "uid": 0})[0]["reason"] == "bad_request"
    recs = _records(base)
    assert [(r["event"], r["reason"]) for r in recs[:2]] == [("key_deny", "not_permitted")] * 2
    assert all(r["detail"].startswith(f"uid={ALICE_UID};") for r in recs[:2])
    assert KEY not in _audit_text(base)


def test_drop_keys_wipes_and_start_is_refused_after(service: Running, base: Path) -> None:
    sock = service.launcher.config.launcher.socket
    assert _root(sock, _hold(session="s1"), _hold(session="s2"))[1]["ok"]
    bufs = [s.keys[VOLUME] for s in service.launcher.keys._held[ALICE_UID].values()]
    assert [bytes(b) for b in bufs] == [KEY.encode()] * 2
    one = _root(sock, {"op": "drop_keys", "uid": ALICE_UID, "session": "s1"})[0]
    assert one["ok"] and one["data"]["dropped"] == [VOLUME] and one["data"]["held"] == [VOLUME]
    assert bytes(bufs[0]) == bytes(len(KEY)) and bytes(bufs[1]) == KEY.encode()
    # the other session still holds it: the VM starts
    assert _alice(sock, {"op": "start", "vm": "secret"}, {"op": "stop", "vm": "secret"})[0]["ok"]
    last = _root(sock, {"op": "drop_keys", "uid": ALICE_UID, "session": None})[0]
    assert last["ok"] and last["data"] == {"uid": ALICE_UID, "dropped": [VOLUME], "held": []}
    assert bytes(bufs[1]) == bytes(len(KEY))
    start = _alice(sock, {"op": "start", "vm": "secret"})[0]
    assert not start["ok"] and start["reason"] == "volume_key_unavailable"
    drops = [r for r in _records(base) if r["event"] == "key_drop"]
    assert [r["detail"].split("; ")[2:] for r in drops] == [
        [f"for uid={ALICE_UID}", "session=s1", f"volume={VOLUME}"],
        [f"for uid={ALICE_UID}", "session=s2", f"volume={VOLUME}"],
    ]
    assert all(r["card"]["fingerprint"] == CARD.fingerprint for r in drops)


def test_the_service_stopping_wipes_the_keys(service: Running) -> None:
    sock = service.launcher.config.launcher.socket
    assert _root(sock, _hold())[0]["ok"]
    buf = next(iter(service.launcher.keys._held[ALICE_UID].values())).keys[VOLUME]
    started = _alice(sock, {"op": "start", "vm": "secret"})[0]
    assert started["ok"]
    service.close()
    service.launcher.close()
    assert bytes(buf) == bytes(len(KEY)) and service.launcher.keys.held(ALICE_UID) == set()
    assert proc_start_time(started["data"]["pid"]) is not None  # the VM keeps running
