"""The PAM module as a thin client of svmmd (the fast login path).

pam_python loads the shim, the shim hands each pam_sm_* call here first: it goes to svmmd's
PAM responder (daemon/pam_responder.py documents the protocol), which runs the product's own
PAM functions with everything already loaded, and relays the conversation (the PIN prompt)
back to this application. This module imports only what the standard library starts with
(json, os, socket): a login through svmmd costs this process almost nothing beyond
pam_python itself.

``call`` answers None when svmmd is not there (no socket, nobody listening) or says it does
not answer PAM calls before anything happened: the shim then runs the call in this process
(module argument ``daemon=auto``, the default), or refuses (``daemon=required``). Once a call
is under way, any failure (svmmd gone, a broken reply) is an error code, never a fallback and
never a success: the PIN may already have been sent.
"""

from __future__ import annotations

import contextlib
import json
import socket
import struct
from typing import Any

PROTOCOL = "svmm-pam/1"
DEFAULT_SOCKET = "/run/svmm/launcher.sock"  # launcher.socket's default (config.py)
CONNECT_TIMEOUT = 2.0
CALL_TIMEOUT = 330.0  # the responder waits 300 s for an answer at the keyboard
MAX_LINE = 65536
SESSION_CALLS = ("open_session", "close_session")
ENV_NAMES = ("SVMM_SESSION_ID", "XDG_SESSION_ID")
_PEERCRED = struct.Struct("3i")
# svmmd's token for this process's transaction (its state between authenticate and
# close_session), as the in-process path keeps that state in this process.
_token: str | None = None


class ModuleOptions:
    """The shim's own module arguments: ``daemon=auto|required|off``, ``socket=PATH``."""

    def __init__(self, argv: list[str]) -> None:
        self.daemon = "auto"
        self.socket = DEFAULT_SOCKET
        for arg in argv[1:]:
            if arg.startswith("daemon="):
                self.daemon = arg[len("daemon=") :]
            elif arg.startswith("socket="):
                self.socket = arg[len("socket=") :]

    @property
    def valid(self) -> bool:
        return self.daemon in ("auto", "required", "off")


def _items(pamh: Any) -> dict[str, str]:
    out = {}
    for name in ("service", "user", "tty", "rhost", "xdisplay"):
        try:
            value = getattr(pamh, name)
        except Exception:  # an item the application never set may raise in pam_python
            value = None
        if value:
            out[name] = str(value)
    return out


def _env(pamh: Any) -> dict[str, str]:
    out = {}
    for name in ENV_NAMES:
        try:
            value = pamh.env[name]
        except Exception:  # unset, or no PAM environment in this application
            value = None
        if value:
            out[name] = str(value)
    return out


def _connect(path: str) -> socket.socket | None:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(CONNECT_TIMEOUT)
    try:
        s.connect(path)
    except OSError:
        s.close()
        return None
    return s


def call(name: str, pamh: Any, flags: int, options: ModuleOptions) -> int | None:
    """Run ``pam_sm_<name>`` in svmmd; its PAM code, or None to run it in this process."""
    session = name in SESSION_CALLS
    failed = int(pamh.PAM_SESSION_ERR if session else pamh.PAM_SYSTEM_ERR)
    s = _connect(options.socket)
    if s is None:
        return None
    with s:
        # The socket is in a root-owned folder, but it costs nothing to check who answers.
        _pid, server_uid, _gid = _PEERCRED.unpack(
            s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
        )
        if server_uid != 0:
            return failed
        request = {
            "version": PROTOCOL,  # first: svmmd dispatches on the line's first bytes
            "call": name,
            "flags": int(flags),
            "items": _items(pamh),
            "env": _env(pamh),
            "tx": _token,
        }
        s.settimeout(CALL_TIMEOUT)
        f = s.makefile("rwb")
        try:
            _send(f, request)
            first = True
            while True:
                doc = _receive(f)
                if first and "unavailable" in doc:
                    return None
                first = False
                if "result" in doc:
                    return _finish(pamh, doc, failed)
                if "conv" in doc:
                    _send(f, _converse(pamh, doc["conv"]))
                elif "get_user" in doc:
                    _send(f, _get_user(pamh, doc["get_user"]))
                else:
                    return failed
        except (OSError, ValueError):
            return failed
        finally:
            f.close()


def _send(f: Any, doc: dict[str, Any]) -> None:
    f.write((json.dumps(doc, separators=(",", ":")) + "\n").encode())
    f.flush()


def _receive(f: Any) -> dict[str, Any]:
    line = f.readline(MAX_LINE + 1)
    if not line.endswith(b"\n"):
        raise ValueError("svmmd closed the connection mid-call")
    doc = json.loads(line)
    if not isinstance(doc, dict):
        raise ValueError("svmmd sent no JSON object")
    return doc


def _converse(pamh: Any, conv: Any) -> dict[str, Any]:
    if not isinstance(conv, dict) or not isinstance(conv.get("text"), str):
        raise ValueError("svmmd sent a malformed conversation message")
    style = conv.get("style")
    if style not in (1, 2, 3, 4):
        raise ValueError("svmmd sent an unknown message style")
    try:
        resp = pamh.conversation(pamh.Message(style, conv["text"]))
    except pamh.exception as e:
        return {"conv_error": _name(pamh, e.pam_result) or "PAM_CONV_ERR"}
    return {"resp": None if resp is None else resp.resp}


def _get_user(pamh: Any, prompt: Any) -> dict[str, Any]:
    try:
        user = pamh.get_user(prompt if isinstance(prompt, str) else None)
    except pamh.exception as e:
        return {"conv_error": _name(pamh, e.pam_result) or "PAM_CONV_ERR"}
    return {"user": user or ""}


def _finish(pamh: Any, doc: dict[str, Any], failed: int) -> int:
    global _token
    result = doc.get("result")
    if not isinstance(result, str) or not result.startswith("PAM_"):
        return failed
    code = getattr(pamh, result, None)
    if not isinstance(code, int):
        return failed
    token = doc.get("tx")
    if isinstance(token, str):
        _token = token
    user = doc.get("user")
    if isinstance(user, str) and user and pamh.user != user:
        pamh.user = user
    env = doc.get("env")
    if isinstance(env, dict):
        for key, value in env.items():
            if key in ENV_NAMES and isinstance(value, str):
                # No PAM environment: the session id stays in svmmd's state alone.
                with contextlib.suppress(Exception):
                    pamh.env[key] = value
    return code


def _name(pamh: Any, code: int) -> str | None:
    for name in ("PAM_CONV_ERR", "PAM_ABORT", "PAM_BUF_ERR", "PAM_SYSTEM_ERR"):
        if getattr(pamh, name, None) == code:
            return name
    return None


__all__ = ["ModuleOptions", "call"]
