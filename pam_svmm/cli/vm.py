"""`svmm vm list|start|stop|status`: the user's client of the launcher service (svmmd).

It sends one "svmm-launcher/1" request over the launcher's Unix socket and prints the reply.
It sends no identity: the service learns who asks from the kernel.
"""

from __future__ import annotations

import argparse
import json
import socket
from pathlib import Path
from typing import Any

from ..errors import LauncherRefused, LauncherUnavailable
from ..services.launcher import PROTOCOL

TIMEOUT = 60.0  # a start waits for QEMU to answer QMP


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("vm", help="list, start, stop VMs through the launcher service")
    p.add_argument("--socket", type=Path, help="launcher socket (default: [launcher] socket)")
    p.add_argument("--json", action="store_true", help="print the service's reply as JSON")
    s = p.add_subparsers(dest="cmd", required=True, metavar="SUBCOMMAND")
    s.add_parser("list", help="the VMs you may use and those you run").set_defaults(func=run)
    for name, text in (("start", "boot a VM"), ("stop", "stop a VM"), ("status", "a VM's state")):
        c = s.add_parser(name, help=text)
        c.add_argument("vm")
        c.set_defaults(func=run)


def call(sock_path: Path, request: dict[str, Any], *, timeout: float = TIMEOUT) -> dict[str, Any]:
    """One request, one reply (the reply as a dict, checked for the protocol's shape)."""
    line = (json.dumps({"version": PROTOCOL, **request}) + "\n").encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(sock_path))
            s.sendall(line)
            with s.makefile("rb") as f:
                answer = f.readline(1 << 20)
    except OSError as e:
        raise LauncherUnavailable(f"launcher {sock_path}: {e.strerror or e}") from None
    try:
        reply = json.loads(answer)
    except ValueError:
        raise LauncherUnavailable(f"launcher {sock_path}: no valid reply") from None
    if not isinstance(reply, dict) or reply.get("version") != PROTOCOL or "ok" not in reply:
        raise LauncherUnavailable(f"launcher {sock_path}: reply is not {PROTOCOL}")
    return reply


def run(args: argparse.Namespace) -> int:
    sock_path = args.socket
    if sock_path is None:
        from ..config import load

        sock_path = load(args.config).launcher.socket
    request: dict[str, Any] = {"op": args.cmd}
    if args.cmd != "list":
        request["vm"] = args.vm
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
    elif cmd == "start":
        print(f"{data.get('vm')}: started (pid {data.get('pid')})")
    elif cmd == "stop":
        print(f"{data.get('vm')}: stopped ({data.get('how')})")
    else:
        print(f"{data.get('vm')}: {data.get('status')} (owner {data.get('owner')}, "
              f"pid {data.get('pid')}, since {data.get('started_at')})")  # fmt: skip
