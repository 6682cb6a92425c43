"""`svmm vm` says what svmmd and QMP say: a stopped VM's status is "stopped", a resume names
the state it left the VM in, and list/start show QMP's run state (``prelaunch`` after a start,
which holds QEMU with -S), not "running" for every VM svmmd has.

svmmd is a stand-in here (the replies of services/launcher.py, canned); the real service and
QEMU are in tests/integration/test_vm_cli_qemu.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pam_svmm.cli import vm as vm_cli
from pam_svmm.cli.main import main
from tests.unit import cli_schemas

PROTOCOL = "svmm-launcher/1"
STARTED = "2026-03-01T09:00:00+00:00"


def ok(data: dict[str, Any]) -> dict[str, Any]:
    return {"version": PROTOCOL, "ok": True, "reason": "ok", "message": "ok", "data": data}


def refused(reason: str, message: str) -> dict[str, Any]:
    return {"version": PROTOCOL, "ok": False, "reason": reason, "message": message, "data": {}}


class Svmmd:
    """Answers like the launcher: VMs it runs, with the QMP state of each."""

    def __init__(self) -> None:
        self.states: dict[str, str] = {}
        self.requests: list[dict[str, Any]] = []

    def __call__(self, sock: Path, request: dict[str, Any], **_: Any) -> dict[str, Any]:
        self.requests.append(request)
        op, vm = request["op"], request.get("vm", "")
        if op == "list":
            return ok({
                "allowed": [{"vm": v, "permissions": ["boot"], "running": v in self.states}
                            for v in ("vm-db", "vm-web")],
                "running": sorted(self.states), "allowlist": "ok", "keys_held": [],
            })  # fmt: skip
        if op == "start":
            self.states[vm] = "prelaunch"  # -S: held before the guest's first instruction
            return ok({"vm": vm, "pid": 4242, "volumes": [], "usb": [], "networks": []})
        if vm not in self.states:
            return refused("vm_not_running", f"{vm} is not running")
        if op == "status":
            state = self.states[vm]
            return ok({"vm": vm, "owner": "alice", "pid": 4242, "status": state,
                       "running": state == "running", "started_at": STARTED})  # fmt: skip
        if op == "resume":
            self.states[vm] = "running"
            return ok({"vm": vm, "status": "running"})
        if op == "stop":
            del self.states[vm]
            return ok({"vm": vm, "how": "quit"})
        raise AssertionError(op)


@pytest.fixture
def svmmd(monkeypatch: pytest.MonkeyPatch) -> Svmmd:
    fake = Svmmd()
    monkeypatch.setattr(vm_cli, "call", fake)
    return fake


def svmm(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["vm", "--socket", "/nonexistent/launcher.sock", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_the_status_of_a_stopped_vm_is_stopped_not_an_error(
    svmmd: Svmmd, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = svmm(capsys, "status", "vm-web")
    assert (code, out, err) == (0, "vm-web: stopped\n", "")
    code, out, _ = svmm(capsys, "--json", "status", "vm-web")
    doc = cli_schemas.parse(out, cli_schemas.VM_REPLY)
    assert code == 0 and doc["data"] == {"vm": "vm-web", "status": "stopped", "running": False}


def test_resume_says_the_state_it_left_the_vm_in(
    svmmd: Svmmd, capsys: pytest.CaptureFixture[str]
) -> None:
    svmmd.states["vm-web"] = "paused"
    code, out, _ = svmm(capsys, "resume", "vm-web")
    assert code == 0 and out == "vm-web: resumed, running\n"
    assert "None" not in out


def test_start_and_list_show_qmps_state_not_running(
    svmmd: Svmmd, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = svmm(capsys, "start", "vm-web")
    assert code == 0
    assert out.startswith("vm-web: started (pid 4242), prelaunch")
    assert "svmm vm resume vm-web" in out  # what lets it run
    code, out, _ = svmm(capsys, "list")
    rows = {line.split()[0]: line.split()[1] for line in out.splitlines()}
    assert rows == {"vm-db": "-", "vm-web": "prelaunch"}
    svmm(capsys, "resume", "vm-web")
    code, out, _ = svmm(capsys, "status", "vm-web")
    assert out.startswith("vm-web: running (owner alice, pid 4242, since 2026-03-01")
    code, out, _ = svmm(capsys, "--json", "list")
    doc = cli_schemas.parse(out, cli_schemas.VM_REPLY)
    cli_schemas.check(doc["data"], cli_schemas.VM_LIST_DATA)
    assert doc["data"]["states"] == {"vm-web": "running"}
    code, out, _ = svmm(capsys, "--json", "start", "vm-db")
    doc = cli_schemas.parse(out, cli_schemas.VM_REPLY)
    assert doc["data"]["status"] == "prelaunch" and doc["data"]["pid"] == 4242


def test_a_refusal_is_still_an_error(svmmd: Svmmd, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = svmm(capsys, "stop", "vm-web")
    assert code == 1 and "vm_not_running" in err
    code, _, err = svmm(capsys, "resume", "vm-web")
    assert code == 1 and "vm_not_running" in err
