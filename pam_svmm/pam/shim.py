"""The file a PAM rule names: the thin client of svmmd, else the product in this process.

    auth required pam_python.so /usr/lib/svmm/pam_svmm.py [venv=/opt/svmm/venv] [config=PATH]
        [daemon=auto|required|off] [socket=/run/svmm/launcher.sock]

The fast path: each call goes first to svmmd's PAM responder (daemon/pam_responder.py),
which runs the product's PAM functions with everything already loaded and relays the
conversation (the PIN prompt) back here. This file is that client, and it imports nothing
but `_socket` (C) on the way: a login through svmmd costs this process little more than
pam_python's own start. ``daemon=auto`` (default) runs the call in this process when svmmd
is not there or says before anything happened that it does not answer; ``required`` refuses
then (PAM_AUTHINFO_UNAVAIL; PAM_SESSION_ERR for sessions); ``off`` never asks svmmd. Only
root's PAM applications use svmmd (a screen locker running as its user runs in-process).
Once a call has gone to svmmd, any failure (svmmd gone, a broken reply) is an error code,
never a fallback and never a success: the PIN may already have been sent.

In this process: pam_python runs this with Debian's /usr/bin/python3, so the venv made from
that interpreter is put first on sys.path. If the product cannot be imported the answer is
PAM_SYSTEM_ERR: an import failure must never become a success (or a silent ignore).

The wire format ("svmm-pam/1", shared with svmmd, which imports it from here): a connection
starts with MAGIC; then frames both ways, each a 4-byte big-endian length and that many bytes
of UTF-8 ``key=value`` fields separated by NUL (PAM's strings are C strings: no NUL in them).
No JSON: json pulls in `re`, which alone costs more than the whole client.
"""

from __future__ import annotations

import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

DEFAULT_VENV = "/opt/svmm/venv"
DEFAULT_SOCKET = "/run/svmm/launcher.sock"  # launcher.socket's default (config.py)
MAGIC = b"SVMMPAM1"
MAX_FRAME = 65536
CONNECT_TIMEOUT = 2.0
CALL_TIMEOUT = 330.0  # svmmd waits 300 s for an answer at the keyboard
SESSION_CALLS = ("open_session", "close_session")
ITEMS = ("service", "user", "tty", "rhost", "xdisplay")
ENV_NAMES = ("SVMM_SESSION_ID", "XDG_SESSION_ID")
# svmmd's token for this process's transaction (what its calls share between authenticate
# and close_session), as the in-process path keeps that state in this process.
_token: str | None = None


# --- the wire ------------------------------------------------------------------------------


def encode(fields: dict[str, object]) -> bytes:
    """One frame; None values are left out. ValueError: a NUL, or a key with '='."""
    parts = []
    for key, value in fields.items():
        if value is None:
            continue
        text = str(value)
        if "\0" in text or "\0" in key or "=" in key or not key:
            raise ValueError(f"field {key!r} cannot be sent")
        parts.append(f"{key}={text}")
    body = "\0".join(parts).encode("utf-8")
    if len(body) > MAX_FRAME:
        raise ValueError("frame too large")
    return len(body).to_bytes(4, "big") + body


def decode(body: bytes) -> dict[str, str]:
    """A frame's fields. ValueError: not UTF-8, a field without '=', a key twice."""
    out: dict[str, str] = {}
    if not body:
        return out
    for part in body.decode("utf-8").split("\0"):
        key, sep, value = part.partition("=")
        if not sep or not key or key in out:
            raise ValueError("malformed frame")
        out[key] = value
    return out


def read_frame(recv: Any) -> dict[str, str]:
    """The next frame, from ``recv(n) -> bytes`` (b"" at the end: ValueError)."""
    size = int.from_bytes(_exactly(recv, 4), "big")
    if size > MAX_FRAME:
        raise ValueError("frame too large")
    return decode(_exactly(recv, size))


def _exactly(recv: Any, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = recv(n - len(buf))
        if not chunk:
            raise ValueError("connection closed mid-frame")
        buf += chunk
    return buf


# --- the client ----------------------------------------------------------------------------


# Every module argument the product reads (the shim: daemon, socket, venv; pam/entry.py:
# config). Anything else is an administrator's typo (`daemom=off`): refused, named.
ARGUMENTS = ("config", "daemon", "socket", "venv")


class ModuleOptions:
    """The module arguments read here: ``daemon=auto|required|off``, ``socket=PATH``; all of
    them checked: ``problem`` names the first unknown or malformed one."""

    def __init__(self, argv: list[str]) -> None:
        self.daemon = "auto"
        self.socket = DEFAULT_SOCKET
        self.problem = ""
        for arg in argv[1:]:
            key, eq, value = arg.partition("=")
            if key not in ARGUMENTS or not eq or not value:
                known = ", ".join(f"{k}=" for k in ARGUMENTS)
                self.problem = self.problem or f"unknown or malformed argument {arg!r} ({known})"
            elif key == "daemon":
                self.daemon = value
            elif key == "socket":
                self.socket = value
        if not self.problem and self.daemon not in ("auto", "required", "off"):
            self.problem = f"daemon={self.daemon!r} must be auto, required or off"

    @property
    def valid(self) -> bool:
        return not self.problem


def _request(name: str, pamh: Any, flags: int) -> dict[str, object]:
    fields: dict[str, object] = {"call": name, "flags": int(flags), "tx": _token}
    for item in ITEMS:
        try:
            value = getattr(pamh, item)
        except Exception:  # an item the application never set may raise in pam_python
            value = None
        if value:
            fields[f"item.{item}"] = value
    for env in ENV_NAMES:
        try:
            value = pamh.env[env]
        except Exception:  # unset, or no PAM environment in this application
            value = None
        if value:
            fields[f"env.{env}"] = value
    return fields


def _connect(path: str) -> Any:
    import _socket

    s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    s.settimeout(CONNECT_TIMEOUT)
    try:
        s.connect(path)
    except OSError as e:
        import errno

        s.close()
        # Only "nothing listens there" means no svmmd. A full listen backlog (a timeout or
        # EAGAIN), which any local user can cause, is svmmd busy: never a silent fallback
        # to the in-process path (invariant 14).
        if e.errno in (errno.ENOENT, errno.ECONNREFUSED, errno.ENOTDIR):
            return None
        raise ConnectionError(f"svmmd at {path} is busy or unreachable: {e}") from None
    # The socket is in a root-owned folder; it costs nothing to check who answers.
    cred = s.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, 12)  # pid, uid, gid
    if int.from_bytes(cred[4:8], sys.byteorder) != 0:
        s.close()
        raise PermissionError(f"{path} is not served by root")
    return s


def call(name: str, pamh: Any, flags: int, options: ModuleOptions) -> int | None:
    """Run ``pam_sm_<name>`` in svmmd; its PAM code, or None to run it in this process."""
    failed = int(pamh.PAM_SESSION_ERR if name in SESSION_CALLS else pamh.PAM_SYSTEM_ERR)
    try:
        s = _connect(options.socket)
    except (PermissionError, ConnectionError) as e:
        _syslog(f"pam_svmm: {e}")
        return failed
    if s is None:
        return None
    try:
        s.settimeout(CALL_TIMEOUT)
        _send(s, MAGIC + encode(_request(name, pamh, flags)))
        first = True
        while True:
            msg = read_frame(s.recv)
            if first and "unavailable" in msg:
                return None
            first = False
            if "result" in msg:
                return _finish(pamh, msg, failed)
            if "conv.style" in msg:
                _send(s, encode(_converse(pamh, msg)))
            elif "get_user" in msg:
                _send(s, encode(_get_user(pamh, msg["get_user"])))
            else:
                return failed
    except (OSError, ValueError):
        return failed
    finally:
        s.close()


def _send(s: Any, data: bytes) -> None:
    """sendall without SIGPIPE: this runs inside the PAM application (login, sshd), whose
    SIGPIPE may well be the default, so svmmd gone mid-call would kill it. MSG_NOSIGNAL
    makes that an EPIPE (BrokenPipeError): an OSError, so a PAM error code."""
    import _socket

    s.sendall(data, _socket.MSG_NOSIGNAL)


def _converse(pamh: Any, msg: dict[str, str]) -> dict[str, object]:
    style = msg["conv.style"]
    if style not in ("1", "2", "3", "4"):
        raise ValueError("svmmd sent an unknown message style")
    try:
        resp = pamh.conversation(pamh.Message(int(style), msg.get("conv.text", "")))
    except pamh.exception as e:
        return {"conv_error": _conv_error(pamh, e.pam_result)}
    answer = None if resp is None else resp.resp
    return {} if answer is None else {"resp": answer}


def _get_user(pamh: Any, prompt: str) -> dict[str, object]:
    try:
        user = pamh.get_user(prompt or None)
    except pamh.exception as e:
        return {"conv_error": _conv_error(pamh, e.pam_result)}
    return {"user": user or ""}


def _conv_error(pamh: Any, code: int) -> str:
    for name in ("PAM_CONV_ERR", "PAM_ABORT", "PAM_BUF_ERR", "PAM_SYSTEM_ERR"):
        if getattr(pamh, name, None) == code:
            return name
    return "PAM_CONV_ERR"


def _finish(pamh: Any, msg: dict[str, str], failed: int) -> int:
    global _token
    result = msg["result"]
    code = getattr(pamh, result, None) if result.startswith("PAM_") else None
    if not isinstance(code, int):
        return failed
    if msg.get("tx"):
        _token = msg["tx"]
    user = msg.get("user")
    if user and pamh.user != user:
        pamh.user = user
    for env in ENV_NAMES:
        value = msg.get(f"env.{env}")
        if value is not None:
            try:
                pamh.env[env] = value
            except Exception:  # noqa: S112 - no PAM environment: the id stays in svmmd
                continue
    return code


# --- in this process -----------------------------------------------------------------------


def _venv(argv: list[str]) -> str:
    for arg in argv[1:]:
        if arg.startswith("venv="):
            return arg[len("venv=") :]
    return DEFAULT_VENV


def _entry(argv: list[str]) -> Any:
    import site

    root = _venv(argv)
    lib = f"{root}/lib/python{sys.version_info[0]}.{sys.version_info[1]}/site-packages"
    if lib not in sys.path:
        # addsitedir appends (and runs the venv's .pth files); move what it added to the
        # front so the venv's packages win over Debian's dist-packages (whose cryptography,
        # for one, is too old).
        before = list(sys.path)
        site.addsitedir(lib)
        added = [p for p in sys.path if p not in before]
        sys.path[:] = added + before
    from pam_svmm.pam import entry

    return entry


def _syslog(text: str) -> None:
    import syslog

    syslog.openlog("svmm", syslog.LOG_PID, syslog.LOG_AUTHPRIV)
    syslog.syslog(syslog.LOG_ERR, text)


# A module that cannot run as configured (bad arguments here, a configuration that does not
# load in pam/entry.py) must never lock root out and never let a directory user in
# (invariant 15). Without a configuration it cannot ask the directory, so it decides by
# /etc/passwd:
#
#   call           local account (or no user yet)        any other user
#   authenticate   PAM_AUTHINFO_UNAVAIL (the profile      PAM_AUTH_ERR (the stack ends)
#                  ignores it: pam_unix asks root's
#                  password)
#   acct_mgmt      PAM_IGNORE                             PAM_AUTHINFO_UNAVAIL (refused)
#   setcred, open_session, close_session: PAM_IGNORE      PAM_SESSION_ERR / PAM_CRED_ERR
LOCAL_PASSWD = "/etc/passwd"  # noqa: S105 - the accounts file, not a password


def is_local(user: str | None) -> bool:
    """No user yet, root, or a name in /etc/passwd (unreadable: only root)."""
    if not user or user == "root":
        return True
    try:
        with open(LOCAL_PASSWD, encoding="utf-8", errors="replace") as f:
            return any(line.split(":", 1)[0].lstrip("+-") == user for line in f)
    except OSError:
        return False


def broken(pamh: Any, call: str) -> int:
    """The answer of a module that cannot run as configured, by the table above."""
    try:
        user = pamh.user
    except Exception:  # an application that never set PAM_USER: pam_python raises
        user = None
    if call == "authenticate":
        return int(pamh.PAM_AUTHINFO_UNAVAIL if is_local(user) else pamh.PAM_AUTH_ERR)
    if is_local(user):
        return int(pamh.PAM_IGNORE)
    if call == "acct_mgmt":
        return int(pamh.PAM_AUTHINFO_UNAVAIL)
    return int(pamh.PAM_CRED_ERR if call == "setcred" else pamh.PAM_SESSION_ERR)


def _call(name: str, pamh: Any, flags: int, argv: list[str]) -> int:
    import os

    session = name.endswith("_session")
    options = ModuleOptions(argv)
    if not options.valid:
        _syslog(f"pam_svmm: module arguments: {options.problem}")
        return broken(pamh, name[len("pam_sm_") :])
    if options.daemon != "off" and os.geteuid() == 0:
        try:
            code = call(name[len("pam_sm_") :], pamh, flags, options)
        except Exception as e:  # a bug here: never a success, never a fallback
            _syslog(f"pam_svmm cannot ask svmmd: {type(e).__name__}")
            return int(pamh.PAM_SESSION_ERR if session else pamh.PAM_SYSTEM_ERR)
        if code is not None:
            return code
        if options.daemon == "required":
            return int(pamh.PAM_SESSION_ERR if session else pamh.PAM_AUTHINFO_UNAVAIL)
    try:
        entry = _entry(argv)
    except Exception as e:
        _syslog(f"pam_svmm cannot be imported: {type(e).__name__}")
        return int(pamh.PAM_SESSION_ERR if session else pamh.PAM_SYSTEM_ERR)
    return int(getattr(entry, name)(pamh, flags, argv))


def pam_sm_authenticate(pamh: Any, flags: int, argv: list[str]) -> int:
    return _call("pam_sm_authenticate", pamh, flags, argv)


def pam_sm_setcred(pamh: Any, flags: int, argv: list[str]) -> int:
    return _call("pam_sm_setcred", pamh, flags, argv)


def pam_sm_acct_mgmt(pamh: Any, flags: int, argv: list[str]) -> int:
    return _call("pam_sm_acct_mgmt", pamh, flags, argv)


def pam_sm_open_session(pamh: Any, flags: int, argv: list[str]) -> int:
    return _call("pam_sm_open_session", pamh, flags, argv)


def pam_sm_close_session(pamh: Any, flags: int, argv: list[str]) -> int:
    return _call("pam_sm_close_session", pamh, flags, argv)
