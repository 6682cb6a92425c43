"""Is a lab port free, and if not, who holds it (from /proc: the listening socket's inode,
then the process with that socket open)."""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Mapping
from pathlib import Path

from pam_svmm.errors import SvmmError


class PortInUse(SvmmError):
    """A port the lab needs is taken; the message names the process and what to do."""

    reason = "port_in_use"


def _listening_inodes(port: int) -> set[str]:
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            # local_address is ADDR:PORT in hex; st 0A is LISTEN; field 9 the inode
            if (
                len(fields) > 9
                and fields[3] == "0A"
                and int(fields[1].rsplit(":", 1)[1], 16) == port
            ):
                inodes.add(fields[9])
    return inodes


def _cmdline(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return "?"
    return " ".join(a.decode(errors="replace") for a in raw.split(b"\0") if a) or "?"


def _parent(pid: int) -> int:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    return int(stat[stat.rindex(")") + 2 :].split()[1])


def holder(port: int) -> str | None:
    """'pid N (command line)' of the process listening on ``port``, with the process that
    started it when that is not init (a responder run by `svmm lab serve`); None when it
    cannot be told (another user's process without root, another network namespace)."""
    targets = {f"socket:[{inode}]" for inode in _listening_inodes(port)}
    if not targets:
        return None
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            fds = os.listdir(f"/proc/{entry.name}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"/proc/{entry.name}/fd/{fd}")
            except OSError:
                continue
            if link in targets:
                pid = int(entry.name)
                text = f"pid {pid} ({_cmdline(pid)})"
                parent = _parent(pid)
                if parent > 1 and "lab serve" not in text:
                    text += f", started by pid {parent} ({_cmdline(parent)})"
                return text
    return None


def in_use(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is not "in use"
        try:
            s.bind(("127.0.0.1", port))
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                return True
            raise
    return False


def ensure_free(ports: Mapping[str, int], *, advice: str) -> None:
    """PortInUse for the first of ``ports`` (what -> port) that is taken: which process holds
    it, and ``advice``."""
    for what, port in ports.items():
        if in_use(port):
            who = holder(port) or "another process"
            raise PortInUse(f"port {port} ({what}) is in use by {who}: {advice}")
