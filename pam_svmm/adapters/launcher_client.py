"""The client side of the launcher socket (svmmd): one JSON request, one JSON reply.

Used by `svmm vm` as the user and by the PAM session hook as root (to hand over and drop the
volume keys a session released). The service learns who is asking from SO_PEERCRED, never
from the request.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

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
        reply = json.loads(answer)
    except ValueError:
        raise LauncherUnavailable(f"launcher {path}: no valid reply") from None
    if not isinstance(reply, dict) or reply.get("version") != PROTOCOL or "ok" not in reply:
        raise LauncherUnavailable(f"launcher {path}: reply is not {PROTOCOL}")
    return reply
