"""`svmm vm list|start|stop|status|resume`: the user's client of the launcher service (svmmd).

It sends one "svmm-launcher/1" request over the launcher's Unix socket and prints the reply.
It sends no identity: the service learns who asks from the kernel.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from ..errors import LauncherRefused

TIMEOUT = 60.0  # a start waits for QEMU to answer QMP


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
    elif cmd == "start":
        print(f"{data.get('vm')}: started (pid {data.get('pid')})")
    elif cmd == "stop":
        print(f"{data.get('vm')}: stopped ({data.get('how')})")
    else:
        print(f"{data.get('vm')}: {data.get('status')} (owner {data.get('owner')}, "
              f"pid {data.get('pid')}, since {data.get('started_at')})")  # fmt: skip
