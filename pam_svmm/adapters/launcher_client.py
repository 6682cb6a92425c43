"""The client side of the launcher socket (svmmd): one JSON request, one JSON reply.

Used by `svmm vm` as the user and by the PAM session hook as root (to hand over and drop the
volume keys a session released). The service learns who is asking from SO_PEERCRED, never
from the request.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

from ..domain.bounded import loads_json
from ..errors import LauncherUnavailable

PROTOCOL = "svmm-launcher/1"
MAX_REPLY = 1 << 20


def call(path: Path, request: dict[str, Any], *, timeout: float = 30.0) -> dict[str, Any]:
    """One request, one reply (the reply as a dict, checked for the protocol's shape)."""
    line = (json.dumps({"version": PROTOCOL, **request}) + "\n").encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(path))
            s.sendall(line)
            with s.makefile("rb") as f:
                answer = f.readline(MAX_REPLY)
    except OSError as e:
        raise LauncherUnavailable(f"launcher {path}: {e.strerror or e}") from None
    finally:
        del line  # may carry key material (hold_keys)
    try:
        reply = loads_json(answer, max_bytes=MAX_REPLY, what="reply")
    except ValueError:
        raise LauncherUnavailable(f"launcher {path}: no valid reply") from None
    if not isinstance(reply, dict) or reply.get("version") != PROTOCOL or "ok" not in reply:
        raise LauncherUnavailable(f"launcher {path}: reply is not {PROTOCOL}")
    return reply


def call_with_fd(
    path: Path, request: dict[str, Any], *, timeout: float = 30.0
) -> tuple[dict[str, Any], socket.socket | None]:
    """One request whose reply may carry a descriptor (SCM_RIGHTS: ``console``): the reply
    and, when one came, a socket over it (the caller closes it)."""
    line = (json.dumps({"version": PROTOCOL, **request}) + "\n").encode()
    fds: list[int] = []
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(path))
            s.sendall(line)
            answer, fds, _flags, _addr = socket.recv_fds(s, MAX_REPLY, 1)
            while answer and not answer.endswith(b"\n") and len(answer) < MAX_REPLY:
                more = s.recv(MAX_REPLY)
                if not more:
                    break
                answer += more
    except OSError as e:
        for fd in fds:
            os.close(fd)
        raise LauncherUnavailable(f"launcher {path}: {e.strerror or e}") from None
    try:
        reply = loads_json(answer, max_bytes=MAX_REPLY, what="reply")
        if not isinstance(reply, dict) or reply.get("version") != PROTOCOL or "ok" not in reply:
            raise ValueError(PROTOCOL)
    except ValueError:
        for fd in fds:
            os.close(fd)
        raise LauncherUnavailable(f"launcher {path}: reply is not {PROTOCOL}") from None
    for fd in fds[1:]:
        os.close(fd)
    return reply, (socket.socket(fileno=fds[0]) if fds else None)
