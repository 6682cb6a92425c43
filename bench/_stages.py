"""Where a login's time goes, measured from outside: strace timelines of whole logins.

bench/login_latency.py --breakdown N runs, after its timed rounds, N more logins of the full
login on each path under ``strace -f -ttt -T`` (with --seccomp-bpf, so only the syscalls
named below stop the process): the in-process path (svmm-full: the PAM client and the card
helper it starts are traced) and the svmmd path (svmm-fast-crl: the PAM client is traced,
and svmmd with its threads and children is attached for the login). Nothing in the product
is instrumented. Each stage is found by the syscalls only it makes:

  spawn and imports   the client's execve -> the card helper's spawn (in-process) or the
                      connect() to svmmd's socket (svmmd path): starting pam_python's
                      interpreter, importing the shim and what the login imports
  IPC                 (svmmd path) the PAM process's round trips on svmmd's socket less
                      svmmd's own time on each (its receipt of a message -> its last
                      send before the client's next receipt): transport and wake-ups
  card helper start   the helper's clone -> the answer to its "open" request (its
                      interpreter, PyKCS11, C_Initialize); svmmd keeps one started ahead
                      (LoginService.prefork), so on that path it is only the handover
  card login          the "login" request on the helper's socketpair -> its answer
  card signature      the "sign" request -> its answer
  card helper exit    the caller's close of the helper's socket after its last request ->
                      the helper's exit_group (CardHelper.close waits for it to exit before
                      the login goes on: the audit record and the PAM answer wait too)
  chain               the certificates' answer -> the first directory or revocation
                      syscall: parsing, path building and checking (pure CPU)
  revocation          first -> last syscall on revocation.cache_dir or a crl_files path
  directory           connect() to the directory's port -> the last syscall on that socket
                      (search and bind; a kept connection's idle time is not counted)
  policy              first -> last syscall on the policy bundle or policy.state_dir
  audit write+fsync   the sum over the login's records of the audit log's open -> close:
                      the record's write and fdatasync, the .head beside it written,
                      fsynced and renamed, the folder fsynced (auth, session open, close)
  allowlist write     the allowlist folder's first open -> the fsync of the folder after
                      the new file's rename into it

Stages can overlap (the svmmd path works on the directory and revocation before the PIN while
the PAM process waits), so they are not meant to add up to the whole login; "whole login"
and "post-PIN" are the traced logins' own, slower than untraced ones by strace's stops.
"""

from __future__ import annotations

import os
import re
import signal
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STRACE = "/usr/bin/strace"
SYSCALLS = (
    "execve,clone,clone3,vfork,connect,sendto,recvfrom,sendmsg,recvmsg,read,write,pwrite64,"
    "openat,mkdirat,unlinkat,renameat,renameat2,rename,fdatasync,fsync,close,exit_group"
)
STRACE_ARGS = ("-f", "-ttt", "-T", "-qq", "-s", "48", "--seccomp-bpf", "-e", f"trace={SYSCALLS}")
# svmmd also: its CRL indexes stay mapped, and a lookup only stat()s the index file. (Not the
# PAM process: its imports stat hundreds of files, and each traced call slows it.)
DAEMON_ARGS = (*STRACE_ARGS[:-1], f"trace={SYSCALLS},newfstatat,statx")
PATHS = {"in-process": "svmm-full", "svmmd": "svmm-fast-crl"}
STAGES = (
    "spawn and imports",
    "IPC",
    "card helper start",
    "card login",
    "card signature",
    "card helper exit",
    "chain",
    "revocation",
    "directory",
    "policy",
    "audit write+fsync",
    "allowlist write",
)
ATTACH_TIMEOUT = 10.0


@dataclass
class Call:
    pid: int
    start: float  # wall clock, seconds
    name: str
    args: str
    result: str
    duration: float  # -T: seconds in the syscall (0 for an unfinished pair we could not join)

    @property
    def end(self) -> float:
        return self.start + self.duration

    @property
    def fd(self) -> int | None:
        m = re.match(r"(\d+)(?:,|$)", self.args)
        return int(m.group(1)) if m else None

    @property
    def ret(self) -> int | None:
        m = re.match(r"\s*(-?\d+)", self.result)
        return int(m.group(1)) if m else None


_LINE = re.compile(r"^(\d+)\s+(\d+\.\d+) (.*)$")
_CALL = re.compile(r"^(\w+)\((.*)\)\s+=\s+(.*?)(?: <(\d+\.\d+)>)?$")
_UNFINISHED = re.compile(r"^(\w+)\((.*) <unfinished \.\.\.>$")
_RESUMED = re.compile(r"^<\.\.\. (\w+) resumed>(.*)\)\s+=\s+(.*?)(?: <(\d+\.\d+)>)?$")


def parse(text: str) -> list[Call]:
    """strace -f -ttt -T output (pid-prefixed lines), unfinished/resumed pairs joined."""
    calls: list[Call] = []
    pending: dict[tuple[int, str], tuple[float, str]] = {}
    for line in text.splitlines():
        m = _LINE.match(line)
        if not m:
            continue
        pid, t, rest = int(m.group(1)), float(m.group(2)), m.group(3)
        if u := _UNFINISHED.match(rest):
            pending[(pid, u.group(1))] = (t, u.group(2))
            continue
        if r := _RESUMED.match(rest):
            start, args = pending.pop((pid, r.group(1)), (t, ""))
            dur = float(r.group(4)) if r.group(4) else 0.0
            calls.append(Call(pid, start, r.group(1), args + r.group(2), r.group(3), dur))
            continue
        if c := _CALL.match(rest):
            dur = float(c.group(4)) if c.group(4) else 0.0
            calls.append(Call(pid, t, c.group(1), c.group(2), c.group(3), dur))
    calls.sort(key=lambda c: c.start)
    return calls


@dataclass
class Paths:
    """The row's files and ports the stages are recognised by."""

    revocation: list[str]
    audit: str
    allowlist: str
    policy: list[str]
    directory_port: int | None
    svmmd_socket: str | None = None


def _span(calls: list[Call]) -> float | None:
    if not calls:
        return None
    return max(c.end for c in calls) - min(c.start for c in calls)


def _fd_paths(calls: list[Call]) -> dict[tuple[int, int], str]:
    """(pid, fd) -> path of the openat that returned it (the latest such open wins)."""
    out = {}
    for c in calls:
        if c.name == "openat" and c.ret is not None and c.ret >= 0:
            m = re.search(r'"([^"]*)"', c.args)
            if m:
                out[(c.pid, c.ret)] = m.group(1)
    return out


def _on_paths(calls: list[Call], prefixes: list[str]) -> list[Call]:
    """The syscalls naming a path under ``prefixes``, or using an fd opened from one."""
    fds = _fd_paths(calls)
    open_fds: dict[tuple[int, int], str] = {}
    out = []
    for c in calls:
        named = any(p and p in c.args for p in prefixes)
        if c.name == "openat" and named and c.ret is not None and c.ret >= 0:
            open_fds[(c.pid, c.ret)] = fds.get((c.pid, c.ret), "")
            out.append(c)
            continue
        fd = c.fd
        if fd is not None and (c.pid, fd) in open_fds:
            out.append(c)
            if c.name == "close":
                open_fds.pop((c.pid, fd), None)
            continue
        if named:
            out.append(c)
    return out


def _helper_exit(calls: list[Call]) -> float | None:
    """The caller's close of the card helper's socket -> the helper's exit_group."""
    sent = next(
        (c for c in calls if c.name in ("sendto", "write") and '{\\"op\\":\\"open\\"' in c.args),
        None,
    )
    if sent is None:
        return None
    got = next(
        (c for c in calls if c.pid != sent.pid and c.name in ("recvfrom", "read")
         and '{\\"op\\":\\"open\\"' in c.args),
        None,
    )  # fmt: skip
    if got is None:
        return None
    closed = next(
        (c for c in calls if c.pid == sent.pid and c.name == "close" and c.fd == sent.fd
         and c.start > sent.start),
        None,
    )  # fmt: skip
    exited = next((c for c in calls if c.pid == got.pid and c.name == "exit_group"), None)
    if closed is None or exited is None:
        return None
    return exited.start - closed.start


def _allowlist(calls: list[Call]) -> float | None:
    """open_session's write: the folder's first open -> the fsync of the folder that follows
    the file's rename into it (close_session's removal is not counted)."""
    rename = next((i for i, c in enumerate(calls) if c.name.startswith("rename")), None)
    if rename is None:
        return None
    fd = calls[rename].fd
    end = next((c for c in calls[rename:] if c.name == "fsync" and c.fd == fd), calls[rename])
    return end.end - calls[0].start


def _audit(calls: list[Call], audit: str) -> float | None:
    """Each audit record: the log's open -> that descriptor's close (the record's write and
    fdatasync, the .head written beside it, fsynced and renamed, the folder fsynced)."""
    total, seen = 0.0, False
    for i, c in enumerate(calls):
        if c.name != "openat" or f'"{audit}"' not in c.args or (c.ret or -1) < 0:
            continue
        end = next(
            (
                d.end
                for d in calls[i + 1 :]
                if d.pid == c.pid and d.name == "close" and d.fd == c.ret
            ),
            None,
        )
        if end is not None:
            total, seen = total + end - c.start, True
    return total if seen else None


def _card_ops(calls: list[Call]) -> dict[str, tuple[float, float]]:
    """The card helper requests (the socketpair's length-prefixed JSON, '{"op":"NAME"...'):
    op name -> (request sent, answer received), the first of each op."""
    out: dict[str, tuple[float, float]] = {}
    for i, c in enumerate(calls):
        if c.name not in ("sendto", "write", "sendmsg"):
            continue
        m = re.search(r'\{\\"op\\":\\"([\w.]+)\\"', c.args)
        if not m or m.group(1) in out:
            continue
        fd = c.fd
        reply = next(
            (
                d
                for d in calls[i + 1 :]
                if d.pid == c.pid
                and d.fd == fd
                and d.name in ("recvfrom", "read", "recvmsg")
                and (d.ret or 0) > 4
            ),
            None,
        )
        if reply is not None:
            out[m.group(1)] = (c.start, reply.end)
    return out


def stages(calls: list[Call], paths: Paths, path: str) -> dict[str, float | None]:
    """One login's stage durations (seconds; None: not seen) from its calls."""
    if not calls:
        return {}
    t0 = calls[0].start
    out: dict[str, float | None] = dict.fromkeys(STAGES)
    ops = _card_ops(calls)
    helper_spawn = next(
        (c.start for c in calls if c.name in ("clone", "clone3", "vfork") and "open" in ops),
        None,
    )
    if "open" in ops:
        # The first clone before the "open" request: the helper's spawn.
        spawns = [c for c in calls if c.name in ("clone", "clone3", "vfork")]
        before = [c for c in spawns if c.start <= ops["open"][0]]
        helper_spawn = before[-1].start if before else None
        out["card helper start"] = ops["open"][1] - (helper_spawn or ops["open"][0])
    out["card helper exit"] = _helper_exit(calls)
    for op, stage in (("login", "card login"), ("sign", "card signature")):
        for name, (sent, answered) in ops.items():
            if name == op or name.endswith("." + op):
                out[stage] = answered - sent
                break
    rev = _on_paths(calls, paths.revocation)
    out["revocation"] = _span(rev)
    out["audit write+fsync"] = _audit(calls, paths.audit)
    out["allowlist write"] = _allowlist(_on_paths(calls, [paths.allowlist]))
    out["policy"] = _span(_on_paths(calls, paths.policy))
    directory: list[Call] = []
    if paths.directory_port:
        port = f"sin_port=htons({paths.directory_port})"
        for i, c in enumerate(calls):
            if c.name == "connect" and port in c.args:
                fd, pid = c.fd, c.pid
                directory.append(c)
                for d in calls[i + 1 :]:
                    if d.pid == pid and d.fd == fd:
                        directory.append(d)
                        if d.name == "close":
                            break
        # Only the talk: the idle wait of a kept connection before its close is not counted.
        talk = [d for d in directory if d.name != "close"]
        out["directory"] = _span(talk)
    certs = next((v for k, v in ops.items() if k.endswith("certificates")), None)
    firsts = [x[0].start for x in (rev, directory) if x]
    if certs and firsts:
        after = [t for t in firsts if t >= certs[1]]
        if after:
            out["chain"] = min(after) - certs[1]
    if path == "in-process":
        out["spawn and imports"] = (helper_spawn - t0) if helper_spawn else None
    else:
        sock = paths.svmmd_socket or ""
        conn = next((c for c in calls if c.name == "connect" and sock and sock in c.args), None)
        out["spawn and imports"] = (conn.start - t0) if conn else None
    return out


@dataclass
class Traced:
    whole: float
    post_pin: float | None
    prompt: float | None
    stages: dict[str, float | None] = field(default_factory=dict)


def _attach(pid: int, out: Path) -> subprocess.Popen[bytes]:
    """strace attached to ``pid`` and its threads (and the children they start)."""
    proc = subprocess.Popen(
        [STRACE, *DAEMON_ARGS, "-o", str(out), "-p", str(pid)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + ATTACH_TIMEOUT
    tids = os.listdir(f"/proc/{pid}/task")
    while time.monotonic() < deadline:
        traced = 0
        for tid in tids:
            try:
                status = Path(f"/proc/{pid}/task/{tid}/status").read_text()
            except OSError:
                traced += 1  # gone: nothing to wait for
                continue
            m = re.search(r"^TracerPid:\s+(\d+)", status, re.M)
            traced += bool(m and m.group(1) != "0")
        if traced == len(tids):
            return proc
        time.sleep(0.02)
    proc.kill()
    proc.wait()
    raise RuntimeError(f"strace did not attach to {pid} in {ATTACH_TIMEOUT:.0f} s")


def _detach(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _paths(b: Any, key: str) -> Paths:
    import tomllib

    doc = tomllib.loads((b.workdir / f"{key}.toml").read_text())
    rev = doc.get("revocation", {})
    port = None
    uris = doc.get("directory", {}).get("uris", [])
    if uris:
        m = re.search(r":(\d+)$", uris[0])
        port = int(m.group(1)) if m else None
    policy = doc.get("policy", {})
    launcher = doc.get("launcher", {})
    return Paths(
        revocation=[str(rev.get("cache_dir", "")), *map(str, rev.get("crl_files", []))],
        audit=str(doc["audit"]["path"]),
        allowlist=str(doc.get("session", {}).get("allowlist_dir", "")),
        policy=[str(policy.get("file", "")), str(policy.get("state_dir", ""))],
        directory_port=port,
        svmmd_socket=launcher.get("socket"),
    )


def run(b: Any, rows: list[Any], n: int, log: Callable[[str], None]) -> dict[str, Any]:
    """N traced logins per path whose row was timed; {path: {row, logins, stages, ...}}."""
    if not Path(STRACE).is_file():
        log(f"  breakdown: {STRACE} not found (package strace): skipped")
        return {"error": f"{STRACE} not found (package strace)"}
    live = {r.key: r for r in rows if r.plan is not None and r.error is None}
    out: dict[str, Any] = {}
    for path, key in PATHS.items():
        row = live.get(key)
        if row is None:
            continue
        log(f"  breakdown: {n} logins of {key} under strace...")
        paths = _paths(b, key)
        daemon = next((d for d in b.daemons if d.log.name == f"{key}-svmmd.log"), None)
        traced: list[Traced] = []
        problems = []
        for i in range(n):
            if row.plan.before_each:
                row.plan.before_each()
            # The traces hold the first bytes of every read and write, the PIN's among them
            # (stdin, the conversation, the card helper's request): they live in a folder
            # only root may enter, for as long as it takes to parse them, never longer.
            with tempfile.TemporaryDirectory(prefix="svmm-strace-") as tmp:
                client_log = Path(tmp) / "client"
                daemon_log = Path(tmp) / "svmmd"
                tracer = None
                if daemon is not None and daemon.proc is not None:
                    tracer = _attach(daemon.proc.pid, daemon_log)
                try:
                    res = b.login(
                        row.plan.service,
                        ops=row.plan.ops,
                        wrap=(STRACE, *STRACE_ARGS, "-o", str(client_log)),
                    )
                finally:
                    if tracer is not None:
                        _detach(tracer)
                calls = parse(client_log.read_text()) if res.ok else []
                if res.ok and tracer is not None:
                    calls += parse(daemon_log.read_text())
            if not res.ok:
                problems.append(f"traced login {i + 1} failed: {res.output}")
                continue
            if tracer is not None:
                calls = sorted(calls, key=lambda c: c.start)
                # The client's own clock starts the timeline (its execve is the first call).
                first = next((c.start for c in calls if c.name == "execve"), calls[0].start)
                calls = [c for c in calls if c.start >= first]
            prompt = next((t for what, t in res.timeline if what == "prompt"), None)
            traced.append(
                Traced(res.ms / 1000, _s(res.post_pin_ms), _s(prompt), stages(calls, paths, path))
            )
            if path == "svmmd":
                _ipc(traced[-1], calls, paths)
        out[path] = {
            "row": key,
            "logins": len(traced),
            "problems": problems,
            "whole_ms": _median([t.whole for t in traced]),
            "post_pin_ms": _median([t.post_pin for t in traced]),
            "prompt_ms": _median([t.prompt for t in traced]),
            "stages_ms": {s: _median([t.stages.get(s) for t in traced]) for s in STAGES},
        }
    return out


def _s(ms: float | None) -> float | None:
    return None if ms is None else ms / 1000


def _ipc(t: Traced, calls: list[Call], paths: Paths) -> None:
    """The PAM process's round trips on svmmd's socket less svmmd's time on each: for every
    message the client sends (cs) and the next it receives (cr), svmmd's receipt of it (sr,
    the first svmmd read of that data) and its last send on that connection before cr."""
    sock = paths.svmmd_socket or ""
    client = next((c for c in calls if c.name == "execve"), None)
    if client is None or not sock:
        return
    pid = client.pid
    conns = {c.fd for c in calls if c.pid == pid and c.name == "connect" and sock in c.args}
    sends = ("sendto", "write", "sendmsg")
    recvs = ("recvfrom", "read", "recvmsg")
    total, seen = 0.0, False
    for i, cs in enumerate(calls):
        if cs.pid != pid or cs.fd not in conns or cs.name not in sends:
            continue
        cr = next(
            (c for c in calls[i + 1 :] if c.pid == pid and c.fd == cs.fd and c.name in recvs),
            None,
        )
        head = re.match(r'\d+, ("(?:[^"\\]|\\.){1,24})', cs.args)
        if cr is None or head is None:
            continue
        sr = next(
            (
                c
                for c in calls
                if c.pid != pid
                and c.name in recvs
                and c.end >= cs.start
                and head.group(1) in c.args
            ),
            None,
        )
        if sr is None:
            continue
        ss = [
            c
            for c in calls
            if c.pid == sr.pid and c.fd == sr.fd and c.name in sends and sr.end <= c.end <= cr.end
        ]
        if not ss:
            continue
        total += (cr.end - cs.start) - (ss[-1].end - sr.end)
        seen = True
    if seen:
        t.stages["IPC"] = max(0.0, total)


def _median(values: list[float | None]) -> float | None:
    xs = [v for v in values if v is not None]
    return round(statistics.median(xs) * 1000, 2) if xs else None


def table(breakdown: dict[str, Any]) -> list[str]:
    if "error" in breakdown:
        return [f"per-stage breakdown: {breakdown['error']}"]
    paths = [p for p in PATHS if p in breakdown]
    if not paths:
        return []
    head = f"{'stage (median ms, traced logins)':<36}" + "".join(f"{p:>14}" for p in paths)
    lines = [
        "per-stage breakdown, measured from outside (strace -f -ttt -T of whole logins; see "
        "bench/_stages.py for what marks each stage; stages may overlap, strace slows them):",
        head,
        "-" * len(head),
    ]

    def num(x: object) -> str:
        return f"{x:.1f}" if isinstance(x, float | int) else "-"

    for stage in STAGES:
        lines.append(
            f"{stage:<36}"
            + "".join(f"{num(breakdown[p]['stages_ms'].get(stage)):>14}" for p in paths)
        )
    lines.append(
        f"{'whole login (traced)':<36}"
        + "".join(f"{num(breakdown[p]['whole_ms']):>14}" for p in paths)
    )
    lines.append(
        f"{'PIN prompt shown at (traced)':<36}"
        + "".join(f"{num(breakdown[p]['prompt_ms']):>14}" for p in paths)
    )
    lines.append(
        f"{'post-PIN (traced)':<36}"
        + "".join(f"{num(breakdown[p]['post_pin_ms']):>14}" for p in paths)
    )
    lines.append(
        "logins traced: "
        + ", ".join(f"{p} {breakdown[p]['logins']} ({breakdown[p]['row']})" for p in paths)
    )
    for p in paths:
        for problem in breakdown[p]["problems"]:
            lines.append(f"  {p}: {problem}")
    return lines
