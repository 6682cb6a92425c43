"""svmmd's PAM responder: the fast login path.

The PAM module (pam/thin.py, loaded by pam_python in login, su, sudo, a display manager)
forwards each pam_sm_* call here instead of importing the product; svmmd runs the very same
functions (pam/entry.py) against a handle that relays the conversation back to the
application. What a process-per-login module pays on every login (imports of cryptography,
ldap3, PyKCS11; loading the PKCS#11 module; parsing CRLs and the policy; TLS to the
directory) is paid once here. The model is SSSD's pam responder with pam_sss as its client.

Protocol "svmm-pam/1" on svmmd's socket (the launcher socket; services/launcher.py documents
the other protocol), one PAM call per connection. The connection starts with MAGIC, then
frames (the codec is pam/shim.py's: a 4-byte length, NUL-separated ``key=value`` fields):

    client  call=authenticate|setcred|acct_mgmt|open_session|close_session  flags=N
            item.service= item.user= item.tty= item.rhost= item.xdisplay=
            env.SVMM_SESSION_ID= env.XDG_SESSION_ID=  tx=<token>            (absent: unset)
    daemon  conv.style=1..4 conv.text=...     client: resp=... (absent: no answer)
                                                      or conv_error=PAM_CONV_ERR
    daemon  get_user=<prompt>                 client: user=... or conv_error=...
    daemon  result=PAM_SUCCESS|PAM_AUTH_ERR|... user=... env.SVMM_SESSION_ID=... tx=<token>
    daemon  unavailable=<why>   (first frame only: nothing was done; the client may run the
                                 call in its own process)

Only root may call (the PAM applications that log people in run as root); anyone else gets
``unavailable``, so a screen locker running as its user falls back to its own process, where
it can read only what that user can. Result codes are names, the client turns them into its
pamh's numbers. A transaction token binds a PAM application process (pid and start time from
the kernel, never from the request) to the state its calls share (who authenticated, the
card session kept for the session's key release, the sessions it opened): the same as
pam_python's process-wide state in the in-process path. A token presented by another process
is ignored (a fresh transaction). Transactions go when their process has gone, or after
``IDLE_SECONDS`` unused.

svmmd serves one PAM call at a time (``_lock``) except while a call waits for the person at
the keyboard: the conversation releases the lock, so a slow PIN entry never holds up anyone.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ..adapters.processes import start_time
from ..pam.shim import ENV_NAMES, ITEMS, encode, read_frame

PROTOCOL = "svmm-pam/1"
CALLS = ("authenticate", "setcred", "acct_mgmt", "open_session", "close_session")
SESSION_CALLS = ("open_session", "close_session")
IDLE_SECONDS = 900.0  # a transaction unused this long (and its kept card session) goes
log = logging.getLogger(__name__)

# Linux-PAM's numbers (security/_pam_types.h): the handle this module gives pam/entry.py has
# them as pam_python's has; results go back to the client as names.
PAM_CODES: dict[str, int] = {
    "PAM_SUCCESS": 0,
    "PAM_SERVICE_ERR": 3,
    "PAM_SYSTEM_ERR": 4,
    "PAM_BUF_ERR": 5,
    "PAM_PERM_DENIED": 6,
    "PAM_AUTH_ERR": 7,
    "PAM_CRED_INSUFFICIENT": 8,
    "PAM_AUTHINFO_UNAVAIL": 9,
    "PAM_USER_UNKNOWN": 10,
    "PAM_MAXTRIES": 11,
    "PAM_NEW_AUTHTOK_REQD": 12,
    "PAM_ACCT_EXPIRED": 13,
    "PAM_SESSION_ERR": 14,
    "PAM_CRED_UNAVAIL": 15,
    "PAM_CRED_EXPIRED": 16,
    "PAM_CRED_ERR": 17,
    "PAM_CONV_ERR": 19,
    "PAM_AUTHTOK_ERR": 20,
    "PAM_IGNORE": 25,
    "PAM_ABORT": 26,
}
_NAMES = {v: k for k, v in PAM_CODES.items()}
STYLES = {"PAM_PROMPT_ECHO_OFF": 1, "PAM_PROMPT_ECHO_ON": 2, "PAM_ERROR_MSG": 3, "PAM_TEXT_INFO": 4}


class ProtocolError(Exception):
    """The client broke the protocol or went away mid-call."""


class RemotePamError(Exception):
    """What pam_python raises as ``pamh.exception``: a failed PAM library call."""

    def __init__(self, pam_result: int, text: str = "") -> None:
        super().__init__(text or _NAMES.get(pam_result, str(pam_result)))
        self.pam_result = pam_result


@dataclass(frozen=True)
class Message:
    msg_style: int
    msg: str


@dataclass(frozen=True)
class Response:
    resp: str | None
    resp_retcode: int = 0


class _Readable(Protocol):
    def read(self, size: int = ..., /) -> bytes: ...


class _Writable(Protocol):
    def write(self, data: bytes, /) -> int: ...

    def flush(self) -> None: ...


class Channel:
    """One client connection, after its MAGIC: frames each way."""

    def __init__(self, rfile: _Readable, wfile: _Writable) -> None:
        self._r = rfile
        self._w = wfile

    def send(self, fields: dict[str, object]) -> None:
        try:
            self._w.write(encode(fields))
            self._w.flush()
        except OSError as e:
            raise ProtocolError(f"the PAM client went away: {e}") from None

    def receive(self) -> dict[str, str]:
        try:
            return read_frame(self._r.read)
        except (OSError, TimeoutError) as e:
            raise ProtocolError(f"the PAM client went away: {e}") from None
        except ValueError as e:
            raise ProtocolError(f"the PAM client sent a bad frame: {e}") from None


class _Env:
    """``pamh.env``: what the client sent, and what the call sets (sent back)."""

    def __init__(self, given: dict[str, str]) -> None:
        self._given = given
        self.changed: dict[str, str] = {}

    def __getitem__(self, name: str) -> str:
        if name in self.changed:
            return self.changed[name]
        return self._given[name]

    def __setitem__(self, name: str, value: str) -> None:
        self.changed[name] = str(value)


class RemoteHandle:
    """The PAM handle pam/entry.py sees in svmmd: the client's items, its environment, and a
    conversation that goes back over the connection (releasing ``unlock`` while it waits)."""

    exception = RemotePamError
    Message = Message
    Response = Response

    def __init__(
        self,
        channel: Channel,
        items: dict[str, str],
        env: dict[str, str],
        transaction: Any,
        waiting: Callable[[], contextlib.AbstractContextManager[None]],
    ) -> None:
        self._channel = channel
        self._waiting = waiting
        self.service = items.get("service") or ""
        self.tty = items.get("tty") or ""
        self.rhost = items.get("rhost") or ""
        self.xdisplay = items.get("xdisplay") or None
        self._user = items.get("user") or None
        self.user_changed = False
        self.env = _Env(env)
        self.svmm_transaction = transaction

    def __getattr__(self, name: str) -> int:
        if name in PAM_CODES:
            return PAM_CODES[name]
        if name in STYLES:
            return STYLES[name]
        raise AttributeError(name)

    @property
    def user(self) -> str | None:
        return self._user

    @user.setter
    def user(self, value: str | None) -> None:
        self._user = value
        self.user_changed = True

    def _ask(self, fields: dict[str, object]) -> dict[str, str]:
        with self._waiting():
            self._channel.send(fields)
            answer = self._channel.receive()
        if "conv_error" in answer:
            code = PAM_CODES.get(answer["conv_error"], PAM_CODES["PAM_CONV_ERR"])
            raise RemotePamError(code)
        return answer

    def conversation(self, messages: Any) -> Any:
        one = not isinstance(messages, list | tuple)
        answers = []
        for m in [messages] if one else messages:
            try:
                answer = self._ask({"conv.style": int(m.msg_style), "conv.text": str(m.msg)})
            except ValueError:  # a NUL in the text: PAM could not show it either
                raise RemotePamError(PAM_CODES["PAM_CONV_ERR"], "unsendable message") from None
            answers.append(Response(answer.get("resp")))
        return answers[0] if one else answers

    def get_user(self, prompt: str | None = None) -> str | None:
        if self._user:
            return self._user
        answer = self._ask({"get_user": prompt or ""})
        user = answer.get("user")
        if not user:
            raise RemotePamError(PAM_CODES["PAM_CONV_ERR"], "no user name")
        self._user = user
        return user


@dataclass
class _Held:
    transaction: Any  # pam.entry.Transaction
    pid: int
    started: str  # the process's start time (/proc/PID/stat field 22): pids get reused
    used: float


def process_start(pid: int) -> str | None:
    """The start time of ``pid`` in clock ticks since boot; None when it is gone."""
    t = start_time(pid)
    return None if t is None else str(t)


class PamResponder:
    """Runs pam/entry.py's calls for PAM applications connected to svmmd."""

    def __init__(
        self, config_path: str | Path | None, *, clock: Callable[[], float] = time.monotonic
    ):
        from ..pam import entry

        self._entry = entry
        self._argv = ["svmmd"] + ([f"config={config_path}"] if config_path else [])
        self._clock = clock
        self._lock = threading.Lock()
        self._held: dict[str, _Held] = {}

    @contextlib.contextmanager
    def _waiting(self) -> Any:
        """Held while the person answers: others' PAM calls may run meanwhile."""
        self._lock.release()
        try:
            yield
        finally:
            self._lock.acquire()

    def serve(self, uid: int, pid: int, channel: Channel) -> None:
        """One PAM call on a connection whose MAGIC was read (the caller's uid and pid are
        the kernel's). Nothing of the request is read before the uid is checked."""
        if uid != 0:
            channel.send({"unavailable": "only root's PAM applications use svmmd's PAM path"})
            return
        first = channel.receive()
        call = first.get("call", "")
        if call not in CALLS:
            channel.send({"unavailable": f"unknown PAM call {call!r}"})
            return
        items = {k: first[f"item.{k}"] for k in ITEMS if f"item.{k}" in first}
        env = {k: first[f"env.{k}"] for k in ENV_NAMES if f"env.{k}" in first}
        flags = int(first["flags"]) if first.get("flags", "").isdigit() else 0
        session = call in SESSION_CALLS
        with self._lock:
            self._sweep()
            token, held = self._transaction(first.get("tx"), pid)
            handle = RemoteHandle(channel, items, env, held.transaction, self._waiting)
            try:
                code = getattr(self._entry, f"pam_sm_{call}")(handle, flags, self._argv)
            except ProtocolError as e:
                log.warning("PAM %s for pid %d: %s", call, pid, e)
                return
            held.used = self._clock()
        result = _NAMES.get(code, "PAM_SESSION_ERR" if session else "PAM_SYSTEM_ERR")
        reply: dict[str, object] = {"result": result, "tx": token}
        if handle.user_changed and handle.user:
            reply["user"] = handle.user
        for name, value in handle.env.changed.items():
            if name in ENV_NAMES:
                reply[f"env.{name}"] = value
        with contextlib.suppress(ProtocolError, ValueError):
            channel.send(reply)

    def _transaction(self, token: object, pid: int) -> tuple[str, _Held]:
        if isinstance(token, str):
            held = self._held.get(token)
            if held is not None and held.pid == pid and held.started == process_start(pid):
                return token, held
        started = process_start(pid) or ""
        token = secrets.token_hex(16)
        held = _Held(self._entry.Transaction(pid=pid), pid, started, self._clock())
        self._held[token] = held
        return token, held

    def _sweep(self) -> None:
        now = self._clock()
        for token, held in list(self._held.items()):
            gone = process_start(held.pid) != held.started
            if gone or now - held.used > IDLE_SECONDS:
                del self._held[token]
                _forget(held.transaction)

    def close(self) -> None:
        with self._lock:
            for held in self._held.values():
                _forget(held.transaction)
            self._held.clear()

    def __len__(self) -> int:
        return len(self._held)


def _forget(transaction: Any) -> None:
    """Log out the card sessions a transaction still keeps (authenticated, never opened)."""
    for login in transaction.logins.values():
        card_session = getattr(login, "card_session", None)
        if card_session is not None:
            with contextlib.suppress(Exception):
                card_session.close()
    transaction.logins.clear()
