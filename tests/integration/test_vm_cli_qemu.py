"""`svmm vm` as its user runs it, against the real svmmd and QEMU: the states it prints are
QMP's (query-status through svmmd's ``status``), from the start's ``prelaunch`` to
``stopped``."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from svmm_lab.userland import userland
from tests.integration.launcher_service import NOBODY, QEMU, Running, base, service
from tests.unit import cli_schemas

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (svmm vm as another user)"),
    pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 not installed"),
]
__all__ = ["base", "service"]  # fixtures


def svmm_vm(sock: Path, *args: str) -> tuple[int, str, str]:
    u = userland()
    p = subprocess.run(
        u.argv("-m", "pam_svmm.cli.main", "vm", "--socket", str(sock), *args),
        capture_output=True, text=True, timeout=120, check=False, env=u.env(), cwd="/",
        user=NOBODY, group=NOBODY, extra_groups=[],
    )  # fmt: skip
    return p.returncode, p.stdout, p.stderr


def state_in_list(sock: Path, vm: str) -> str:
    code, out, err = svmm_vm(sock, "list")
    assert code == 0, err
    return next(line.split()[1] for line in out.splitlines() if line.split()[0] == vm)


def test_the_states_svmm_vm_prints_are_qmps(service: Running) -> None:
    sock = service.launcher.config.launcher.socket
    code, out, err = svmm_vm(sock, "start", "plain")
    assert code == 0, err
    assert "started" in out and "prelaunch" in out and "svmm vm resume plain" in out
    assert state_in_list(sock, "plain") == "prelaunch"  # svmmd runs it; the guest does not
    code, out, _ = svmm_vm(sock, "status", "plain")
    assert code == 0 and out.startswith("plain: prelaunch (owner nobody")
    code, out, err = svmm_vm(sock, "resume", "plain")
    assert (code, out) == (0, "plain: resumed, running\n"), err
    assert state_in_list(sock, "plain") == "running"
    code, out, _ = svmm_vm(sock, "--json", "list")
    doc = cli_schemas.parse(out, cli_schemas.VM_REPLY)
    cli_schemas.check(doc["data"], cli_schemas.VM_LIST_DATA)
    assert doc["data"]["states"] == {"plain": "running"}
    code, out, err = svmm_vm(sock, "stop", "plain")
    assert code == 0, err
    assert svmm_vm(sock, "status", "plain")[:2] == (0, "plain: stopped\n")
    code, out, _ = svmm_vm(sock, "--json", "status", "plain")
    assert code == 0 and json.loads(out)["data"]["status"] == "stopped"
    assert state_in_list(sock, "plain") == "-"
