"""VM start to a running guest CPU: through svmmd's launcher against bare QEMU, same arguments.

Run from the repository root, as root (the launcher runs QEMU as a VM uid of its own, and the
client must be another user, as `svmm vm` is: the launcher takes the caller's uid from
SO_PEERCRED):

    .venv/bin/python bench/vm_start.py              # 10 runs per row, a table
    .venv/bin/python bench/vm_start.py --runs 5 --json

The VM is tests/unit/launcher_fixtures.py's "plain" (no disks, no devices: the launcher runs
it on ``-machine none``, held with ``-S``); the guest needs no OS, "running CPU" is QMP
``query-status`` saying ``running``. The launcher is the real one (services/launcher.py with
svmmd's LauncherServer on a Unix socket, the tests' policy and an allowlist of ``nobody``
written through the real AllowlistStore), served from a thread of this process as the
integration tests and the demo serve it. Rows, each from nothing running to ``running``:

    svmm-cli      `svmm vm start plain` then `svmm vm resume plain` (start leaves the VM held
                  before its first instruction, -S, by design; resume is QMP "cont"), each a
                  fresh client process as nobody: what a person at the shell waits for
    svmm-socket   the same two requests from one client process that stays up (nobody):
                  the launcher's own cost, without the client interpreter's start
    bare-qemu     qemu-system-x86_64 with the argument list the launcher gave QEMU (read
                  from /proc/PID/cmdline of the launched VM; its QMP listener, an inherited
                  descriptor, becomes a path), started by this process, then QMP
                  qmp_capabilities, cont, query-status until running
    cli-list      (no VM start) one `svmm vm list` as nobody: the fixed cost of one `svmm`
                  client process, its interpreter's start and imports, twice in svmm-cli

Between runs the VM is stopped (untimed). Printed: median, p90, min (ms) per row, each
svmm row's overhead over bare-qemu (median minus median) and ratio, against issue 17's
target (overhead <= 50 ms).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

NOBODY = 65534
VM = "plain"
TARGET_OVERHEAD_MS = 50.0
CLIENT = """
import json, socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
f = s.makefile("rwb")
for line in sys.stdin.buffer:
    f.write(line); f.flush()
    sys.stdout.write(f.readline().decode()); sys.stdout.flush()
"""


def _request(op: str, vm: str = VM) -> bytes:
    return (json.dumps({"version": "svmm-launcher/1", "op": op, "vm": vm}) + "\n").encode()


class Service:
    """The launcher, served on a socket from a thread, with nobody allowed to boot "plain"."""

    def __init__(self, base: Path) -> None:
        from pam_svmm.adapters.allowlist_store import AllowlistStore
        from pam_svmm.daemon import server as server_mod
        from pam_svmm.daemon.server import bind_socket, serve
        from tests.unit.launcher_fixtures import (
            LocalPolicy,
            allowlist_bytes,
            live_session,
            make_launcher,
        )

        # A user's request rate limit (a defence: 30 at once, 2/s after) would answer this
        # bench's back-to-back starts "busy"; what is measured is a start, not the limiter.
        server_mod.REQUEST_BURST, server_mod.REQUESTS_PER_SECOND = 10_000, 10_000.0
        policy = LocalPolicy()
        self.launcher = make_launcher(base, policy)
        cfg = self.launcher.config
        AllowlistStore(cfg.session.allowlist_dir).write_bytes(
            NOBODY, allowlist_bytes(policy, user="nobody", uid=NOBODY)
        )
        live_session(cfg.session.state_dir, NOBODY, "nobody")
        self.socket = cfg.launcher.socket
        self.server = serve(self.launcher, bind_socket(self.socket))
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)
        for vm in list(self.launcher.registry.running()):
            self.launcher.registry.stop(vm, quit_timeout=2, term_timeout=2, kill_timeout=2)
        self.launcher.close()


class Client:
    """One client process as nobody, kept up: a request line in, its reply line out."""

    def __init__(self, sock: Path) -> None:
        from svmm_lab.userland import userland

        u = userland()
        self.proc = subprocess.Popen(
            u.argv("-c", CLIENT, str(sock)),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=u.env(),
            user=NOBODY,
            group=NOBODY,
            extra_groups=[],
            cwd="/",
        )

    def ask(self, op: str) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(_request(op))
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the client went away during {op}")
        return dict(json.loads(line))

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        self.proc.wait(timeout=10)


def _cli(sock: Path, *args: str) -> dict[str, Any]:
    from svmm_lab.userland import userland

    u = userland()
    p = subprocess.run(
        u.argv("-m", "pam_svmm.cli.main", "vm", "--socket", str(sock), "--json", *args),
        capture_output=True, text=True, timeout=120, check=False,
        user=NOBODY, group=NOBODY, extra_groups=[], env=u.env(), cwd="/",
    )  # fmt: skip
    try:
        doc = dict(json.loads(p.stdout))
    except ValueError:
        raise RuntimeError(f"svmm vm {' '.join(args)}: {p.stderr.strip()[-300:]}") from None
    if p.returncode != 0:
        raise RuntimeError(f"svmm vm {' '.join(args)} exited {p.returncode}: {doc}")
    return doc


def _running(reply: dict[str, Any]) -> bool:
    data = reply.get("data") or {}
    return bool(reply.get("ok", True)) and data.get("status") == "running"


def svmm_cli(service: Service) -> float:
    t0 = time.monotonic_ns()
    _cli(service.socket, "start", VM)
    resumed = _cli(service.socket, "resume", VM)
    ms = (time.monotonic_ns() - t0) / 1e6
    if not _running(resumed):
        raise RuntimeError(f"after svmm vm resume: {resumed}")
    return ms


def svmm_socket(service: Service, client: Client) -> float:
    t0 = time.monotonic_ns()
    start = client.ask("start")
    resumed = client.ask("resume")
    ms = (time.monotonic_ns() - t0) / 1e6
    if not start.get("ok") or not _running(resumed):
        raise RuntimeError(f"start {start}, resume {resumed}")
    return ms


def stop(client: Client) -> None:
    reply = client.ask("stop")
    if not reply.get("ok"):
        raise RuntimeError(f"stop: {reply}")


def launched_argv(service: Service) -> list[str]:
    """QEMU's argument list as the launcher started it (the VM must be running)."""
    handle = service.launcher.registry.get(VM)
    if handle is None:
        raise RuntimeError(f"{VM} is not running")
    pid = handle.record.pid
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return [a.decode() for a in f.read().split(b"\0") if a]


def bare_argv(launched: list[str], qmp_path: Path) -> list[str]:
    """The same arguments from QEMU itself on: the QMP and console listeners, descriptors
    QEMU inherits from the launcher, are paths here (the wrapper before the binary, setpriv,
    is dropped: bare QEMU runs as this process's user)."""
    qemu = next(i for i, a in enumerate(launched) if a.endswith("qemu-system-x86_64"))
    out = []
    for arg in launched[qemu:]:
        m = re.fullmatch(r"socket,id=(\w+),fd=\d+,(.*)", arg)
        if m:  # the QMP and console listeners
            path = (
                qmp_path if m.group(1) == "qmp" else qmp_path.with_name(f"bare-{m.group(1)}.sock")
            )
            path.unlink(missing_ok=True)
            arg = f"socket,id={m.group(1)},path={path},{m.group(2)}"
        out.append(arg)
    out[0] = shutil.which("qemu-system-x86_64") or out[0]
    return out


class _Qmp:
    def __init__(self, path: Path, deadline: float) -> None:
        while True:
            try:
                self.s = socket.socket(socket.AF_UNIX)
                self.s.connect(str(path))
                break
            except OSError:
                self.s.close()
                if time.monotonic() > deadline:
                    raise RuntimeError("bare QEMU's QMP socket did not appear") from None
                time.sleep(0.001)
        self.f = self.s.makefile("rwb")
        self.f.readline()  # the greeting

    def execute(self, command: str) -> Any:
        self.f.write(json.dumps({"execute": command}).encode() + b"\n")
        self.f.flush()
        while True:
            msg = json.loads(self.f.readline())
            if "return" in msg or "error" in msg:
                if "error" in msg:
                    raise RuntimeError(f"QMP {command}: {msg['error']}")
                return msg["return"]

    def close(self) -> None:
        self.f.close()
        self.s.close()


def bare_qemu(argv: list[str], workdir: Path) -> float:
    qmp_path = workdir / "bare-qmp.sock"
    qmp_path.unlink(missing_ok=True)
    cmd = bare_argv(argv, qmp_path)
    t0 = time.monotonic_ns()
    with (workdir / "bare-qemu.log").open("ab") as err:
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err
        )
    try:
        try:
            qmp = _Qmp(qmp_path, time.monotonic() + 20)
        except OSError as e:
            log = (workdir / "bare-qemu.log").read_text()[-300:]
            raise RuntimeError(f"bare QEMU ({' '.join(cmd)}): {e}; its stderr: {log}") from None
        qmp.execute("qmp_capabilities")
        qmp.execute("cont")
        while qmp.execute("query-status").get("status") != "running":
            time.sleep(0.001)
        ms = (time.monotonic_ns() - t0) / 1e6
        with contextlib.suppress(RuntimeError, OSError, ValueError):
            qmp.execute("quit")
        qmp.close()
    finally:
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return ms


def _stats(xs: list[float]) -> dict[str, float] | None:
    if not xs:
        return None
    s = sorted(xs)
    p90 = statistics.quantiles(s, n=10, method="inclusive")[8] if len(s) > 1 else s[0]
    return {"median": statistics.median(s), "p90": p90, "min": s[0]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--runs", type=int, default=10, help="timed starts per row (default 10)")
    p.add_argument("--warmup", type=int, default=1, help="untimed starts per row first")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    args = p.parse_args(argv)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    if os.geteuid() != 0:
        log("vm_start: run as root (the launcher runs QEMU as a VM uid; the client is nobody)")
        return 2
    if shutil.which("qemu-system-x86_64") is None:
        log("vm_start: qemu-system-x86_64 not found (package qemu-system-x86)")
        return 2
    # Not under a 0700 folder: nobody must reach the socket.
    base = Path(tempfile.mkdtemp(prefix="svmm-vmbench-", dir="/tmp"))
    os.chmod(base, 0o755)  # noqa: S103 - root's folder, readable so nobody reaches the socket
    samples: dict[str, list[float]] = {
        "svmm-cli": [],
        "svmm-socket": [],
        "bare-qemu": [],
        "cli-list": [],
    }
    info: dict[str, Any] = {}
    service = Service(base)
    client = Client(service.socket)
    try:
        # One start to learn QEMU's arguments and accelerator.
        svmm_socket(service, client)
        launched = launched_argv(service)
        info["qemu_argv"] = launched
        info["accel"] = launched[launched.index("-accel") + 1] if "-accel" in launched else None
        stop(client)
        for i in range(args.warmup + args.runs):
            timed = i >= args.warmup
            ms = svmm_cli(service)
            stop(client)
            if timed:
                samples["svmm-cli"].append(ms)
            ms = svmm_socket(service, client)
            stop(client)
            if timed:
                samples["svmm-socket"].append(ms)
            ms = bare_qemu(launched, base)
            if timed:
                samples["bare-qemu"].append(ms)
            t0 = time.monotonic_ns()
            _cli(service.socket, "list")
            if timed:
                samples["cli-list"].append((time.monotonic_ns() - t0) / 1e6)
            log(f"  round {i + 1}/{args.warmup + args.runs}" + ("" if timed else " (warm-up)"))
    finally:
        client.close()
        service.close()
        shutil.rmtree(base, ignore_errors=True)
    stats = {k: _stats(v) for k, v in samples.items()}
    bare = (stats["bare-qemu"] or {}).get("median")
    rows = []
    for key, st in stats.items():
        med = st["median"] if st else None
        svmm_row = key.startswith("svmm-")
        over = None if med is None or bare is None or not svmm_row else med - bare
        rows.append(
            {
                "key": key,
                "median_ms": med,
                "p90_ms": st["p90"] if st else None,
                "min_ms": st["min"] if st else None,
                "overhead_ms": over,
                "x_bare": None if med is None or not bare or not svmm_row else med / bare,
                "target_met": None if over is None else over <= TARGET_OVERHEAD_MS,
                "samples_ms": [round(x, 3) for x in samples[key]],
            }
        )
    result = {
        "runs": args.runs,
        "vm": VM,
        "machine": {
            "nproc": len(os.sched_getaffinity(0)),
            "kernel": platform.release(),
            "qemu": subprocess.run(
                ["qemu-system-x86_64", "--version"], capture_output=True, text=True, check=False
            ).stdout.splitlines()[0],
        },
        **info,
        "rows": rows,
    }
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    print(
        f"VM start to a running guest CPU (QMP query-status running), {args.runs} runs per row "
        f"(after {args.warmup} warm-up), interleaved; {result['machine']['qemu']}, "
        f"accel {info.get('accel')}, {result['machine']['nproc']} CPU"
    )
    print("QEMU arguments (the launcher's): " + " ".join(info["qemu_argv"]))
    head = f"{'row':<14}{'median':>9}{'p90':>9}{'min':>9}{'overhead':>10}{'x bare':>8}  target"
    print()
    print(head)
    print("-" * len(head))
    for r in rows:

        def num(x: object, fmt: str = ".1f") -> str:
            return format(x, fmt) if isinstance(x, float) else "-"

        verdict = "" if r["target_met"] is None else ("met" if r["target_met"] else "MISSED")
        print(
            f"{r['key']:<14}{num(r['median_ms']):>9}{num(r['p90_ms']):>9}{num(r['min_ms']):>9}"
            f"{num(r['overhead_ms']):>10}{num(r['x_bare'], '.2f'):>8}  {verdict}"
        )
    print(
        f"times in ms; overhead: median minus bare-qemu's median; target (issue 17): overhead "
        f"<= {TARGET_OVERHEAD_MS:.0f} ms. svmm-cli is two client processes (start, resume); "
        "cli-list is one client process that starts no VM."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
