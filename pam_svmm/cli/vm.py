"""`svmm vm list|start|stop|status|resume|console`: the user's client of the launcher (svmmd).

It sends one "svmm-launcher/1" request over the launcher's Unix socket and prints the reply.
It sends no identity: the service learns who asks from the kernel. ``console`` gets the
VM's serial console connection from svmmd (SCM_RIGHTS) and attaches the terminal to it in
raw mode until Ctrl-] (or until the VM closes it).
"""

from __future__ import annotations

import argparse
import os
import select
import socket
import sys
from pathlib import Path
from typing import Any

from ..errors import LauncherRefused
from .common import JSON_HELP, print_json

TIMEOUT = 60.0  # a start waits for QEMU to answer QMP
ESCAPE = b"\x1d"  # Ctrl-]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("vm", help="list, start, stop VMs through the launcher service")
    p.add_argument("--socket", type=Path, help="launcher socket (default: [launcher] socket)")
    p.add_argument("--json", action="store_true", help=f"{JSON_HELP} (the service's reply)")
    s = p.add_subparsers(dest="cmd", required=True, metavar="SUBCOMMAND")
    s.add_parser("list", help="the VMs you may use and those you run").set_defaults(func=run)
    for name, text in (
        ("start", "boot a VM"),
        ("stop", "stop a VM"),
        ("status", "a VM's state"),
        ("resume", "resume a VM paused when its card was pulled (log in with the card first)"),
        ("console", "attach the terminal to a VM's serial console (Ctrl-] leaves)"),
    ):
        c = s.add_parser(name, help=text)
        c.add_argument("vm")
        c.set_defaults(func=run)


def call(sock_path: Path, request: dict[str, Any], *, timeout: float = TIMEOUT) -> dict[str, Any]:
    """One request, one reply (see adapters.launcher_client)."""
    from ..adapters.launcher_client import call as launcher_call

    return launcher_call(sock_path, request, timeout=timeout)


def run(args: argparse.Namespace) -> int:
    sock_path = args.socket
    if sock_path is None:
        from ..config import load

        sock_path = load(args.config).launcher.socket
    request: dict[str, Any] = {"op": args.cmd}
    if args.cmd != "list":
        request["vm"] = args.vm
    if args.cmd == "console":
        return _console(sock_path, request)
    reply = vm_json(request, sock_path, call(sock_path, request))
    if args.json:
        print_json(reply)
    if not reply["ok"]:
        raise LauncherRefused(
            f"{args.cmd}: {reply.get('message') or reply.get('reason')} [{reply.get('reason')}]",
            reason=str(reply.get("reason") or "launcher_refused"),
        )
    if not args.json:
        _print(args.cmd, reply.get("data") or {})
    return 0


def vm_json(request: dict[str, Any], sock_path: Path, reply: dict[str, Any]) -> dict[str, Any]:
    """`svmm vm --json`: svmmd's reply (svmm-launcher/1, services/launcher.py), with QMP's
    run state added where svmmd's reply has none, asked of svmmd (its ``status`` op is QMP's
    query-status): ``start`` gets ``data.status`` (``prelaunch``: QEMU holds the guest with
    -S until ``svmm vm resume``), ``list`` gets ``data.states`` (vm -> state) for the VMs
    in ``running``. A ``status`` of a VM svmmd does not run is the answer ``stopped``, not
    an error (``reason`` keeps svmmd's ``vm_not_running``)."""
    cmd = request["op"]
    out = dict(reply)
    data = dict(reply.get("data") or {})
    if cmd == "status" and not reply["ok"] and reply.get("reason") == "vm_not_running":
        out["ok"] = True
        data = {"vm": request["vm"], "status": "stopped", "running": False}
    elif cmd == "start" and reply["ok"]:
        data["status"] = _qmp_state(sock_path, str(data.get("vm", "")))
    elif cmd == "list" and reply["ok"]:
        data["states"] = {vm: _qmp_state(sock_path, vm) for vm in data.get("running", [])}
    out["data"] = data
    return out


def _qmp_state(sock_path: Path, vm: str) -> str:
    """QMP's run state of ``vm`` as svmmd reports it; ``stopped`` if it ended meanwhile,
    ``unknown`` if svmmd would not say (the reason in brackets)."""
    reply = call(sock_path, {"op": "status", "vm": vm})
    if reply["ok"]:
        return str((reply.get("data") or {}).get("status") or "unknown")
    if reply.get("reason") == "vm_not_running":
        return "stopped"
    return f"unknown [{reply.get('reason')}]"


def _print(cmd: str, data: dict[str, Any]) -> None:
    if cmd == "list":
        running = data.get("running", [])
        states = data.get("states", {})
        for vm in data.get("allowed", []):
            name = vm.get("vm")
            state = states.get(name, "running") if name in running else "-"
            print(f"{name:<32} {state:<9} {','.join(vm.get('permissions', []))}")
        for name in sorted(set(running) - {v.get("vm") for v in data.get("allowed", [])}):
            print(f"{name:<32} {states.get(name, 'running'):<9} (not in your allowlist)")
        if data.get("allowlist") not in (None, "ok"):
            print(f"(no usable allowlist: {data.get('allowlist')})")
        if data.get("keys_held"):
            print(f"volume keys held: {', '.join(data['keys_held'])}")
        if data.get("volumes_open"):
            print(f"volumes open (dm-crypt): {', '.join(data['volumes_open'])}")
    elif cmd == "start":
        vm, state = data.get("vm"), data.get("status")
        line = f"{vm}: started (pid {data.get('pid')}), {state}"
        if state == "prelaunch":
            line += f": held before its first instruction; `svmm vm resume {vm}` lets it run"
        print(line)
    elif cmd == "stop":
        print(f"{data.get('vm')}: stopped ({data.get('how')})")
    elif cmd == "resume":
        print(f"{data.get('vm')}: resumed, {data.get('status')}")
    elif data.get("status") == "stopped":
        print(f"{data.get('vm')}: stopped")
    else:
        print(f"{data.get('vm')}: {data.get('status')} (owner {data.get('owner')}, "
              f"pid {data.get('pid')}, since {data.get('started_at')})")  # fmt: skip


def _console(sock_path: Path, request: dict[str, Any]) -> int:
    from ..adapters.launcher_client import call_with_fd

    reply, conn = call_with_fd(sock_path, request)
    if not reply["ok"] or conn is None:
        if conn is not None:
            conn.close()
        raise LauncherRefused(
            f"console: {reply.get('message') or reply.get('reason')} [{reply.get('reason')}]",
            reason=str(reply.get("reason") or "launcher_refused"),
        )
    print(f"{request['vm']}: console attached; Ctrl-] leaves", file=sys.stderr)
    with conn:
        attach(conn, sys.stdin.fileno(), sys.stdout.fileno())
    print(f"\r\n{request['vm']}: console detached", file=sys.stderr)
    return 0


def attach(conn: socket.socket, stdin: int, stdout: int, *, escape: bytes = ESCAPE) -> None:
    """Relay ``stdin`` to ``conn`` and ``conn`` to ``stdout`` until ``escape`` is typed or
    either side ends; a terminal on ``stdin`` is in raw mode meanwhile (restored after)."""
    import termios
    import tty

    saved = None
    if os.isatty(stdin):
        saved = termios.tcgetattr(stdin)
        tty.setraw(stdin)
    try:
        while True:
            ready, _, _ = select.select([stdin, conn.fileno()], [], [])
            if conn.fileno() in ready:
                data = conn.recv(65536)
                if not data:
                    return
                os.write(stdout, data)
            if stdin in ready:
                data = os.read(stdin, 65536)
                if not data:
                    return
                head, hit, _ = data.partition(escape)
                if head:
                    conn.sendall(head)
                if hit:
                    return
    finally:
        if saved is not None:
            termios.tcsetattr(stdin, termios.TCSADRAIN, saved)
