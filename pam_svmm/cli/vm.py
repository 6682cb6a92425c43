"""`svmm vm list|start|stop|status|resume|console`: the user's client of the launcher (svmmd).

It sends one "svmm-launcher/1" request over the launcher's Unix socket and prints the reply.
It sends no identity: the service learns who asks from the kernel. ``console`` gets the
VM's serial console connection from svmmd (SCM_RIGHTS) and attaches the terminal to it in
raw mode until Ctrl-] (or until the VM closes it).
"""

from __future__ import annotations

import argparse
import json
import os
import select
import socket
import sys
from pathlib import Path
from typing import Any

from ..errors import LauncherRefused

TIMEOUT = 60.0  # a start waits for QEMU to answer QMP
ESCAPE = b"\x1d"  # Ctrl-]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("vm", help="list, start, stop VMs through the launcher service")
    p.add_argument("--socket", type=Path, help="launcher socket (default: [launcher] socket)")
    p.add_argument("--json", action="store_true", help="print the service's reply as JSON")
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
    reply = call(sock_path, request)
    if args.json:
        print(json.dumps(reply, indent=1, sort_keys=True))
    if not reply["ok"]:
        raise LauncherRefused(
            f"{args.cmd}: {reply.get('message') or reply.get('reason')} [{reply.get('reason')}]",
            reason=str(reply.get("reason") or "launcher_refused"),
        )
    if not args.json:
        _print(args.cmd, reply.get("data") or {})
    return 0


def _print(cmd: str, data: dict[str, Any]) -> None:
    if cmd == "list":
        running = set(data.get("running", []))
        for vm in data.get("allowed", []):
            state = "running" if vm.get("vm") in running else "-"
            print(f"{vm.get('vm'):<32} {state:<8} {','.join(vm.get('permissions', []))}")
        for vm in sorted(running - {v.get("vm") for v in data.get("allowed", [])}):
            print(f"{vm:<32} running  (not in your allowlist)")
        if data.get("allowlist") not in (None, "ok"):
            print(f"(no usable allowlist: {data.get('allowlist')})")
        if data.get("keys_held"):
            print(f"volume keys held: {', '.join(data['keys_held'])}")
        if data.get("volumes_open"):
            print(f"volumes open (dm-crypt): {', '.join(data['volumes_open'])}")
    elif cmd == "start":
        print(f"{data.get('vm')}: started (pid {data.get('pid')})")
    elif cmd == "stop":
        print(f"{data.get('vm')}: stopped ({data.get('how')})")
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
