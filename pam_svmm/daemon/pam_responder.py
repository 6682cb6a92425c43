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

PAM calls run side by side, each on a worker of svmmd's pool (daemon/server.py). No lock is
held across card, network or directory I/O: the transaction table has a short lock of its
own; one PAM application's calls run one at a time (a lock per transaction); each call
into a card (svmmd's module handle or a login's card helper) holds that card's lock for the
call only, never while waiting; with svmmd's own handle a card also stays with one login
from C_Login until its session closes (a lease per token serial, waited for at most
``CARD_WAIT``: then C_Login answers card_busy as before). The other collaborators (a
directory connection is one call's at a time, then waits for the next call on any thread;
revocation and CRL caches; the audit log's flock) are safe to share: see ``SharedModule``
and adapters/directory.py.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import secrets
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ..adapters.processes import start_time
from ..adapters.token import TokenSession
from ..errors import ConversationFailed
from ..pam.shim import ENV_NAMES, ITEMS, encode, read_frame

PROTOCOL = "svmm-pam/1"
CALLS = ("authenticate", "setcred", "acct_mgmt", "open_session", "close_session")
SESSION_CALLS = ("open_session", "close_session")
IDLE_SECONDS = 900.0  # a transaction unused this long (and its kept card session) goes
SWEEP_EVERY = 1.0  # seconds between looks for transactions whose process has gone
# How long a login waits for another login that has the same card logged in (the other
# one's C_Login to C_Logout is milliseconds, unless it keeps the card for its session).
CARD_WAIT = 5.0
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


class ProtocolError(ConversationFailed):
    """The client broke the protocol or went away mid-call: to the login under way, its
    conversation failed (audited as such, "undecided", never as an internal error)."""


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
    conversation that goes back over the connection (inside ``waiting`` while it waits)."""

    exception = RemotePamError
    Message = Message
    Response = Response

    def __init__(
        self,
        channel: Channel,
        items: dict[str, str],
        env: dict[str, str],
        transaction: Any,
        waiting: Callable[[], contextlib.AbstractContextManager[None]] = contextlib.nullcontext,
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
    # One call of a PAM application at a time: its calls share the transaction's state.
    lock: threading.Lock = field(default_factory=threading.Lock)


def process_start(pid: int) -> str | None:
    """The start time of ``pid`` in clock ticks since boot; None when it is gone."""
    t = start_time(pid)
    return None if t is None else str(t)


class CardLocks:
    """A lock per token serial, made on first use."""

    def __init__(self, make: Callable[[], Any] = threading.Lock) -> None:
        self._make = make
        self._lock = threading.Lock()
        self._cards: dict[str, Any] = {}

    def __call__(self, serial: str) -> Any:
        with self._lock:
            lock = self._cards.get(serial)
            if lock is None:
                lock = self._cards[serial] = self._make()
            return lock


# svmmd's, for every module handle and card helper its logins use. CARDS: with svmmd's own
# module handle, a card stays with one login from C_Login until that login's session closes
# (two at once collide: C_Login answers "already logged in", card_busy). CARD_CALLS: one
# call at a time into a card, from whichever process (a helper per login): SoftHSM2's file
# store, for one, answers CKR_GENERAL_ERROR to a read while another process's C_Login
# rewrites the token.
CARDS = CardLocks()
CARD_CALLS = CardLocks(threading.RLock)


def _serial(args: tuple[Any, ...]) -> str | None:
    """The token serial a module call is about (its TokenInfo argument), if any."""
    for a in args:
        serial = getattr(a, "serial", None)
        if isinstance(serial, str) and hasattr(a, "slot_id"):
            return serial
    return None


class SharedSession:
    """A token session of a SharedModule: each call into it under the module's lock, and
    its card kept for this login from C_Login until close (``CardLocks``)."""

    def __init__(self, shared: SharedModule, session: Any) -> None:
        self._shared = shared
        self._session = session
        self._release: weakref.finalize[Any, Any] | None = None

    def login(self, pin: str | None) -> None:
        if not self._shared.lease:  # a helper: a PKCS#11 application of its own
            with self._calls():
                self._session.login(pin)
            return
        card = CARDS(str(getattr(self._session.token, "serial", "")))
        # Another login of this card that has not finished: wait for it a while; after
        # that C_Login says so (card_busy), never a success without a PIN check.
        mine = card.acquire(timeout=CARD_WAIT)
        try:
            with self._calls():
                self._session.login(pin)
        except BaseException:
            if mine:
                card.release()
            raise
        if mine:  # released at close, or when the session is dropped without one
            self._release = weakref.finalize(self, card.release)

    def _calls(self) -> contextlib.ExitStack:
        stack = contextlib.ExitStack()
        stack.enter_context(CARD_CALLS(str(getattr(self._session.token, "serial", ""))))
        stack.enter_context(self._shared.lock)
        return stack

    def close(self) -> None:
        try:
            with self._calls():
                self._session.close()
        finally:
            release, self._release = self._release, None
            if release is not None:
                release()

    def __enter__(self) -> SharedSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getattr__(self, name: str) -> Any:
        target = getattr(self._session, name)
        if not callable(target):
            return target

        @functools.wraps(target)
        def call(*args: Any, **kwargs: Any) -> Any:
            with self._calls():
                return target(*args, **kwargs)

        return call

    def __setattr__(self, name: str, value: Any) -> None:
        if name.startswith("_"):
            object.__setattr__(self, name, value)
        else:  # e.g. login.py's owns_helper: the session's own
            setattr(self._session, name, value)


class SharedModule:
    """A PKCS#11 module handle (or a card helper) shared by logins that run side by side.

    Loaded on first use. Every call into it, and into its sessions, holds ``lock`` for
    that call only; waiting for a card polls outside it. A call into a PKCS#11 module is
    local card I/O, never network or directory I/O."""

    def __init__(self, load: Callable[[], Any], *, lease: bool = True) -> None:
        self._load = load
        self._module: Any = None
        self.lock = threading.RLock()
        # svmmd's own handle is one PKCS#11 application for every login: a card logged in
        # for one is "already logged in" for all, so each login leases the card (CARDS).
        # A card helper is an application of its own: no lease, only CARD_CALLS.
        self.lease = lease

    def _target(self) -> Any:
        with self.lock:
            if self._module is None:
                self._module = self._load()
            return self._module

    def locked(self, target: Any) -> Any:
        if not callable(target):
            return target

        @functools.wraps(target)
        def call(*args: Any, **kwargs: Any) -> Any:
            serial = _serial(args)
            with contextlib.ExitStack() as stack:
                if serial is not None:
                    stack.enter_context(CARD_CALLS(serial))
                stack.enter_context(self.lock)
                result = target(*args, **kwargs)
            return SharedSession(self, result) if _is_session(result) else result

        return call

    def wait_for_token(
        self, uri: Any = None, timeout: float = 0.0, *, interval: float = 0.1
    ) -> Any:
        """Pkcs11Module.wait_for_token, polling without holding the lock while it waits."""
        from ..adapters.token import poll_for_token

        return poll_for_token(lambda u: self.locked(self._target().tokens)(u), uri, timeout,
                              interval)  # fmt: skip

    def __getattr__(self, name: str) -> Any:
        return self.locked(getattr(self._target(), name))


def _is_session(value: Any) -> bool:
    """A token session (this process's or a helper's): what ``session()`` returns."""
    return isinstance(value, TokenSession) or all(
        hasattr(value, a) for a in ("token", "login", "sign", "close")
    )


def share_service(svc: Any) -> None:
    """Make a LoginService safe for svmmd's concurrent calls, once: its PKCS#11 module
    becomes a SharedModule (built by LoginService's own ``module`` when first used), and
    so does each login's card access (``login_module``: a helper process per login)."""
    if svc.__dict__.get("_svmmd_shared"):
        return
    prop = type(svc).__dict__.get("module")
    if isinstance(prop, functools.cached_property) and "module" not in svc.__dict__:
        svc.__dict__["module"] = SharedModule(functools.partial(prop.func, svc))
    per_login = getattr(svc, "login_module", None)
    if callable(per_login) and "login_module" not in svc.__dict__:

        def login_module() -> Any:
            m = per_login()
            return m if isinstance(m, SharedModule) else SharedModule(lambda: m, lease=False)

        svc.__dict__["login_module"] = login_module
    svc.__dict__["_svmmd_shared"] = True


# What svmmd takes from its configuration once, at start: a changed file's values for these
# apply when svmmd restarts (its socket, the running VMs' folders, the held keys' sessions).
RESTART_SECTIONS = ("audit", "launcher", "session", "volumes")


def share_host(svc: Any, launcher: Any) -> None:
    """svmmd decides with one audit trail and one policy service: the LoginService its PAM
    calls use takes the launcher's (one chain, one flock holder, policy loads seen once).
    A LoginService built from a file changed since svmmd started applies the new login
    settings at once; what only a restart changes is logged, and the trail stays the one
    svmmd writes until it restarts."""
    mine, running = svc.config, launcher.config
    changed = sorted(n for n in vars(running) if getattr(mine, n, None) != getattr(running, n))
    later = [n for n in changed if n in RESTART_SECTIONS]
    if later:
        log.warning(
            "the configuration file changed since svmmd started: logins apply it now, but "
            "[%s] take effect when svmmd restarts (systemctl restart svmmd)",
            "], [".join(later),
        )
    from ..services.policy import PolicyService

    svc.__dict__.setdefault("audit", launcher.audit)
    if "policy" not in changed and isinstance(launcher.policy, PolicyService):
        svc.__dict__.setdefault("policy", launcher.policy)


class PamResponder:
    """Runs pam/entry.py's calls for PAM applications connected to svmmd."""

    def __init__(
        self,
        config_path: str | Path | None,
        *,
        clock: Callable[[], float] = time.monotonic,
        launcher: Any = None,
    ):
        """``launcher``: svmmd's Launcher. The logins' requests to it (their volume keys
        above all, as bytearrays) go to it directly, never over svmmd's own socket, and a
        card helper is kept started ahead of the next login (LoginService.prefork)."""
        from ..pam import entry

        self._entry = entry
        self._launcher = launcher
        self._argv = ["svmmd"] + ([f"config={config_path}"] if config_path else [])
        self._clock = clock
        self._lock = threading.Lock()  # the table of transactions, never across I/O
        self._wiring = threading.Lock()  # finding (or building) the LoginService
        self._held: dict[str, _Held] = {}
        self._swept = float("-inf")
        if launcher is not None:
            launcher.card_listeners.append(self._card_changed)

    def _card_changed(self) -> None:
        """A card left or came back: the helper started ahead for the next login loaded
        the module before (LoginService.card_changed)."""
        for svc in list(getattr(self._entry, "_services", {}).values()):
            changed = getattr(svc, "card_changed", None)
            if changed is not None:
                changed()

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
        self._sweep()
        with self._lock:
            token, held = self._transaction(first.get("tx"), pid)
        with held.lock:
            self._wire()
            handle = RemoteHandle(channel, items, env, held.transaction)
            try:
                code = getattr(self._entry, f"pam_sm_{call}")(handle, flags, self._argv)
            except ProtocolError as e:
                log.warning("PAM %s for pid %d: %s", call, pid, e)
                return
            finally:
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

    def _wire(self) -> None:
        """The LoginService pam/entry.py will use, made safe to share (a configuration that
        does not load is left for the call itself to report)."""
        from ..errors import ConfigError

        find = getattr(self._entry, "_service", None)
        if find is None:  # stand-ins for pam/entry.py (tests)
            return
        with self._wiring:
            try:
                svc = find(self._entry.ModuleArgs.parse(self._argv))
            except ConfigError:
                return
            share_service(svc)
            if self._launcher is not None and getattr(svc, "local_launcher", True) is None:
                share_host(svc, self._launcher)
                svc.local_launcher = self._launcher
                svc.prefork = True

    def _transaction(self, token: object, pid: int) -> tuple[str, _Held]:
        """Under ``_lock``."""
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
        """Forget transactions whose process has gone or that went unused: their kept card
        sessions are logged out outside the table's lock, and never under a running call."""
        now = self._clock()
        with self._lock:
            if now - self._swept < SWEEP_EVERY:
                return
            self._swept = now
            gone = [
                (token, held)
                for token, held in self._held.items()
                if now - held.used > IDLE_SECONDS or process_start(held.pid) != held.started
            ]
            gone = [(t, h) for t, h in gone if h.lock.acquire(blocking=False)]
            for token, _held in gone:
                del self._held[token]
        for _token, held in gone:
            try:
                _forget(held.transaction)
            finally:
                held.lock.release()

    def close(self) -> None:
        with self._lock:
            helds = list(self._held.values())
            self._held.clear()
        for held in helds:
            _forget(held.transaction)

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
