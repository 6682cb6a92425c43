"""Card access in a helper process of its own (adapters/card_child.py), for the login paths.

The PAM module runs inside su, sudo and login as root with the caller's environment, and the
PKCS#11 stack reads that environment: OpenSC's $OPENSC_CONF names card-driver modules it
dlopen()s, p11-kit and pcsc-lite read variables that name modules and the reader socket. So
the login paths (the PAM module in-process and svmmd) never load the module themselves:
``CardHelper`` starts ``/usr/bin/python3 -I`` (no PYTHON* variables, no user site) under
``setpriv`` with no capabilities (bounding and inheritable sets emptied, so root's exec
gets none) and no_new_privs, optionally as ``[pkcs11] helper_user``, under a seccomp filter
it installs before loading the module (adapters/seccomp.py), with an environment
the product sets: PATH, a C locale, and only the variables ``[pkcs11] pass_environment``
names (empty by default; the demo lab names SoftHSM's, which is how its "readers" work).

One helper serves one login: it is its own PKCS#11 application, so a card logged in for one
transaction is never "already logged in" for another, and a crash or hang of vendor code
is that login's refusal (card_helper_failed), never the caller's crash. It sees the PIN and
the card's answers, which it must; the volume keys themselves are opened on this side
(services/custody.py) from what the card derives. ``CardHelper`` and ``RemoteSession`` offer
the part of ``Pkcs11Module`` and ``TokenSession`` that logging in and releasing keys use.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pwd
import select
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Mapping
from dataclasses import asdict
from typing import Any

from ..domain.pkcs11_uri import Pkcs11Uri
from ..domain.signing import SignatureScheme
from ..errors import ConfigError, PinTries, TokenError
from . import card_wire
from .card_wire import PID_MESSAGE, WireError
from .token import CardCertificate, TokenInfo

PYTHON = "/usr/bin/python3"  # the interpreter pam_python embeds; the venv is made from it
SETPRIV = "/usr/bin/setpriv"
BASE_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C.UTF-8"}
START_TIMEOUT = 20.0  # to import PyKCS11 and C_Initialize the module
_BOOT = (
    "import sys, json; sys.path[:0] = json.loads(sys.argv[1]);"
    " from pam_svmm.adapters.card_child import main; sys.exit(main())"
)


def helper_env(
    pass_environment: tuple[str, ...], environ: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The helper's whole environment: the product's, plus the named variables only."""
    source = os.environ if environ is None else environ
    env = dict(BASE_ENV)
    for name in pass_environment:
        if name in source:
            env[name] = source[name]
    return env


def helper_argv(fd: int, user: str | None = None, *, forker: bool = False) -> list[str]:
    drop = [SETPRIV, "--no-new-privs"]
    if os.geteuid() != 0:
        # A screen locker running as its user: that user has no capabilities to drop (and
        # may not touch the bounding set), nor another user to become.
        user = None
    else:
        drop += ["--inh-caps=-all", "--bounding-set=-all"]
    if user is not None:
        try:
            pw = pwd.getpwnam(user)
        except KeyError:
            raise ConfigError("pkcs11.helper_user", f"no user {user!r} on this host") from None
        drop += [f"--reuid={pw.pw_uid}", f"--regid={pw.pw_gid}", "--clear-groups"]
    paths = [p for p in sys.path if p and os.path.isabs(p)]
    mode = ["forker"] if forker else []
    return [*drop, PYTHON, "-I", "-S", "-c", _BOOT, json.dumps(paths), *mode, str(fd)]


def _token(doc: Any) -> TokenInfo:
    if not isinstance(doc, dict):
        raise WireError("the card helper sent a malformed token")
    try:
        t = TokenInfo(
            slot_id=doc["slot_id"],
            label=doc["label"],
            manufacturer=doc["manufacturer"],
            model=doc["model"],
            serial=doc["serial"],
            pin_tries=PinTries(doc["pin_tries"]),
            protected_auth_path=doc["protected_auth_path"],
            login_required=doc["login_required"],
        )
    except (KeyError, ValueError):
        raise WireError("the card helper sent a malformed token") from None
    texts = (t.label, t.manufacturer, t.model, t.serial)
    flags = (t.protected_auth_path, t.login_required)
    if (
        type(t.slot_id) is not int
        or not all(isinstance(x, str) and len(x) <= 64 for x in texts)
        or not all(type(f) is bool for f in flags)
    ):
        raise WireError("the card helper sent a malformed token")
    return t


def _cert(doc: Any) -> CardCertificate:
    if (
        not isinstance(doc, dict)
        or not isinstance(doc.get("label"), str)
        or not isinstance(doc.get("id"), bytes)
        or not isinstance(doc.get("der"), bytes)
    ):
        raise WireError("the card helper sent a malformed certificate object")
    return CardCertificate(label=doc["label"], id=doc["id"], der=doc["der"])


def _list(doc: Any) -> list[Any]:
    if not isinstance(doc, list):
        raise WireError("the card helper sent a malformed list")
    return doc


def _uri(uri: Pkcs11Uri | None) -> dict[str, Any] | None:
    return None if uri is None else asdict(uri)


def start_helper_process(
    env: dict[str, str], user: str | None, *, forker: bool = False
) -> tuple[subprocess.Popen[bytes], socket.socket]:
    """A helper (or the forker) process, and our end of the socketpair it serves."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        proc = subprocess.Popen(
            helper_argv(theirs.fileno(), user, forker=forker),
            env=env,
            pass_fds=(theirs.fileno(),),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            close_fds=True,
            cwd="/",
        )
    except OSError:
        ours.close()
        raise
    finally:
        theirs.close()
    return proc, ours


class ForkedHelper:
    """A helper forked by svmmd's forker: not this process's child, so it is watched and
    killed through its pidfd (which names that process, never a later one with its pid)."""

    def __init__(self, pid: int, pidfd: int) -> None:
        self.pid = pid
        self._pidfd: int | None = pidfd
        self._fd_lock = threading.Lock()

    def poll(self) -> int | None:
        return None if not self._exited(0) else 0

    def wait(self, timeout: float | None = None) -> int:
        if not self._exited(timeout):
            raise subprocess.TimeoutExpired("card helper", timeout or 0)
        return 0

    def kill(self) -> None:
        with self._fd_lock:
            if self._pidfd is not None:
                with contextlib.suppress(ProcessLookupError):
                    signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)

    def _exited(self, timeout: float | None) -> bool:
        with self._fd_lock:
            fd = self._pidfd
        if fd is None:
            return True
        if not select.select([fd], [], [], timeout)[0]:  # a pidfd reads ready once it exits
            return False
        with self._fd_lock:
            if self._pidfd is not None:
                os.close(self._pidfd)
                self._pidfd = None
        return True


class HelperForker:
    """svmmd's card helper forker (card_child.forker): one process started like a helper
    (the same setpriv, user, environment and seccomp filter) that has imported the card
    code and forks each login's helper. A login's helper then costs a fork and the module's
    C_Initialize, not an interpreter and its imports (bench/parallel_logins.py prints the
    helpers' CPU per login). Each helper is still a process of its own that loads the module
    afresh, so nothing of one login's card state reaches another's. A forker that died is
    started again at the next login."""

    def __init__(self, *, pass_environment: tuple[str, ...] = (), user: str | None = None):
        self._env = helper_env(pass_environment)
        self._user = user
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._control: socket.socket | None = None

    def fork(self, theirs: socket.socket) -> None:
        """Have a helper forked to serve ``theirs`` (one end of a login's socketpair)."""
        with self._lock:
            for _ in range(2):
                if self._control is None or self._proc is None or self._proc.poll() is not None:
                    self._stop()
                    self._start()
                assert self._control is not None
                try:
                    socket.send_fds(self._control, [b"F"], [theirs.fileno()])
                    return
                except OSError:
                    self._stop()
            raise OSError(errno.EPIPE, "its forker went away")

    def _start(self) -> None:
        self._proc, self._control = start_helper_process(self._env, self._user, forker=True)

    def _stop(self) -> None:
        control, proc = self._control, self._proc
        self._control = self._proc = None
        if control is not None:
            control.close()  # it sees end of file and exits; its helpers run on
        if proc is not None:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def restart(self) -> None:
        """Stop this forker (it is started again at the next fork)."""
        with self._lock:
            self._stop()

    @property
    def pid(self) -> int | None:
        with self._lock:
            return None if self._proc is None else self._proc.pid

    def close(self) -> None:
        with self._lock:
            self._stop()


class CardHelper:
    """One helper process with one PKCS#11 module loaded. Close it (or use ``with``)."""

    def __init__(
        self,
        path: str,
        *,
        pass_environment: tuple[str, ...] = (),
        user: str | None = None,
        timeout: float = 30.0,
        forker: HelperForker | None = None,
        wait: bool = True,
    ) -> None:
        """``forker``: fork the helper from it (svmmd) instead of starting a process; it
        was started with its own ``pass_environment`` and ``user``, and these are unused.
        ``wait=False``: return once the process is started and asked to load the module;
        its answer is read at the first call (a PAM process starts its login's helper
        first, and the helper's interpreter start and imports overlap its own)."""
        self.path = path
        self.timeout = timeout
        self._lock = threading.Lock()
        self._open_lock = threading.Lock()
        self._opening = True
        self._sock: socket.socket | None = None
        self._proc: subprocess.Popen[bytes] | ForkedHelper
        if forker is None:
            ours = self._spawn(pass_environment, user)
        else:
            try:
                ours = self._fork(forker)
            except TokenError:
                # The forker died after it was last seen alive (the descriptor went down
                # with it): once more, from a forker started again.
                forker.restart()
                ours = self._fork(forker)
        with contextlib.suppress(OSError):  # a helper already gone: its answer says so
            card_wire.send(ours, {"op": "open", "path": path})
        if wait:
            self._finish_open()

    def _finish_open(self) -> None:
        """Read the answer to "open" (once; every call waits for it)."""
        with self._open_lock:
            if not self._opening:
                return
            self._opening = False
            try:
                info = self._exchange(None, START_TIMEOUT)
                version = _list(info["version"])
                self.library_manufacturer = str(info["manufacturer"])
                self.library_description = str(info["description"])
                self.library_version: tuple[int, int] = (int(version[0]), int(version[1]))
            except (KeyError, TypeError, IndexError, ValueError):
                self.close()
                raise WireError("the card helper sent a malformed module description") from None
            except BaseException:
                self.close()
                raise

    def _spawn(self, pass_environment: tuple[str, ...], user: str | None) -> socket.socket:
        try:
            self._proc, ours = start_helper_process(helper_env(pass_environment), user)
        except OSError as e:
            raise TokenError(f"cannot start the card helper: {e.strerror}",
                             reason="card_helper_failed") from None  # fmt: skip
        self._sock = ours
        return ours

    def _fork(self, forker: HelperForker) -> socket.socket:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            forker.fork(theirs)
        except OSError as e:
            ours.close()
            raise TokenError(f"cannot start the card helper: {e.strerror}",
                             reason="card_helper_failed") from None  # fmt: skip
        finally:
            theirs.close()
        self._proc = self._forked(ours)  # closes ours when it fails
        self._sock = ours
        return ours

    def _forked(self, sock: socket.socket) -> ForkedHelper:
        """The forked helper's first message: its pid and a pidfd of itself."""
        sock.settimeout(START_TIMEOUT)
        try:
            data, fds, _, _ = socket.recv_fds(sock, PID_MESSAGE.size, 1)
        except OSError as e:
            data, fds = b"", []
            why = f"({e.strerror or e})"
        else:
            why = "(it went away)"
        if len(data) != PID_MESSAGE.size or len(fds) != 1:
            for fd in fds:
                os.close(fd)
            sock.close()
            raise TokenError(f"cannot start the card helper {why}", reason="card_helper_failed")
        return ForkedHelper(PID_MESSAGE.unpack(data)[0], fds[0])

    @property
    def pid(self) -> int:
        return self._proc.pid

    def alive(self) -> bool:
        return self._sock is not None and self._proc.poll() is None

    def __enter__(self) -> CardHelper:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self, *, wait: bool = False) -> None:
        """Hang up: the helper closes its sessions (logging the card out) and exits. It is
        reaped by a thread of its own (killed after 5 s), so the login's answer does not
        wait for it; ``wait``: reap it here."""
        with self._lock:
            sock, self._sock = self._sock, None
        if sock is None:
            return
        sock.close()
        if wait:
            self._reap()
        else:
            threading.Thread(target=self._reap, name="svmm-card-reap", daemon=True).start()

    def _reap(self) -> None:
        try:
            self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()

    def _call(self, request: dict[str, Any], *, timeout: float | None = None) -> Any:
        if self._opening:
            self._finish_open()
        return self._exchange(request, timeout)

    def _exchange(self, request: dict[str, Any] | None, timeout: float | None) -> Any:
        """Send ``request`` (None: nothing) and read the answer."""
        with self._lock:
            sock = self._sock
            if sock is None:
                raise WireError("the card helper is closed")
            sock.settimeout(self.timeout if timeout is None else timeout)
            try:
                if request is not None:
                    card_wire.send(sock, request)
                reply = card_wire.recv(sock)
            except TimeoutError:
                reply, why = None, "did not answer in time"
            except OSError as e:
                reply, why = None, f"connection failed ({e.strerror or e})"
            else:
                why = "went away"
            finally:
                if request is not None:
                    request.pop("pin", None)
        if reply is None:
            self._abandon()
            raise WireError(f"the card helper {why}")
        if "error" in reply:
            raise card_wire.error_from(reply["error"])
        if "ok" not in reply:
            raise WireError("the card helper sent an answer without a result")
        return reply["ok"]

    def _abandon(self) -> None:
        with self._lock:
            sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()
        self._proc.kill()
        self._proc.wait()

    # --- the part of Pkcs11Module the login path uses -----------------------------------------

    def tokens(self, uri: Pkcs11Uri | None = None) -> list[TokenInfo]:
        return [_token(t) for t in _list(self._call({"op": "tokens", "uri": _uri(uri)}))]

    def wait_for_token(
        self, uri: Pkcs11Uri | None = None, timeout: float = 0.0, *, interval: float = 0.1
    ) -> TokenInfo:
        del interval  # the helper polls at its own pace
        doc = self._call({"op": "wait_for_token", "uri": _uri(uri), "timeout": timeout},
                         timeout=timeout + self.timeout)  # fmt: skip
        return _token(doc)

    def token_info(self, slot_id: int) -> TokenInfo:
        return _token(self._call({"op": "token_info", "slot": slot_id}))

    def mechanisms(self, slot_id: int) -> frozenset[str]:
        return frozenset(str(m) for m in _list(self._call({"op": "mechanisms", "slot": slot_id})))

    def certificates(self, token: TokenInfo, uri: Pkcs11Uri | None = None) -> list[CardCertificate]:
        doc = self._call({"op": "certificates", "slot": token.slot_id, "uri": _uri(uri)})
        return [_cert(c) for c in _list(doc)]

    def session(self, token: TokenInfo, *, rw: bool = False) -> RemoteSession:
        sid = self._call({"op": "session", "slot": token.slot_id, "rw": rw})
        if type(sid) is not int:
            raise WireError("the card helper sent a malformed session")
        return RemoteSession(self, token, sid)


class RemoteSession:
    """A session in the helper. ``owns_helper``: closing it ends the helper too (the login
    hands its helper over with the session it keeps for the session phase)."""

    def __init__(self, helper: CardHelper, token: TokenInfo, sid: int) -> None:
        self.helper = helper
        self.token = token
        self._sid: int | None = sid
        self._logged_in = False
        self.owns_helper = False

    def __enter__(self) -> RemoteSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _op(self, op: str, **fields: Any) -> Any:
        if self._sid is None:
            raise TokenError("the token session is closed")
        return self.helper._call({"op": op, "sid": self._sid, **fields})

    def close(self) -> None:
        if self._sid is not None:
            with contextlib.suppress(TokenError):  # the helper is gone: so is the session
                self._op("close")
            self._sid = None
            self._logged_in = False
        if self.owns_helper:
            self.helper.close()

    @property
    def logged_in(self) -> bool:
        return self._logged_in

    def login(self, pin: str | None) -> None:
        # A PIN pad may wait for the person: the whole login budget, not one call's.
        self._op("login", pin=pin)
        self._logged_in = True

    def mechanisms(self) -> frozenset[str]:
        return frozenset(str(m) for m in _list(self._op("s_mechanisms")))

    def sign(self, key_id: bytes, data: bytes) -> tuple[SignatureScheme, bytes]:
        doc = _list(self._op("sign", key_id=key_id, data=data))
        try:
            scheme, signature = SignatureScheme(doc[0]), doc[1]
        except (ValueError, IndexError):
            raise WireError("the card helper sent a malformed signature") from None
        if not isinstance(signature, bytes):
            raise WireError("the card helper sent a malformed signature")
        return scheme, signature

    def certificates(self, uri: Pkcs11Uri | None = None) -> list[CardCertificate]:
        return [_cert(c) for c in _list(self._op("s_certificates", uri=_uri(uri)))]

    def find_certificate(self, label: str) -> CardCertificate | None:
        for cert in self.certificates():
            if cert.label == label:
                return cert
        return None

    def _secret(self, doc: Any) -> bytearray:
        if not isinstance(doc, bytes):
            raise WireError("the card helper sent a malformed secret")
        return bytearray(doc)

    def decrypt_rsa_oaep(
        self, key_id: bytes, ciphertext: bytes, *, hash: str = "sha256"
    ) -> bytearray:
        return self._secret(self._op("decrypt_rsa_oaep", key_id=key_id, data=bytes(ciphertext),
                                     hash=hash))  # fmt: skip

    def ecdh_derive(self, key_id: bytes, peer_public_key: Any) -> bytearray:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec

        if not isinstance(peer_public_key, ec.EllipticCurvePublicKey):
            raise ValueError("ecdh_derive needs an EC public key")
        point = peer_public_key.public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
        doc = self._op("ecdh_derive", key_id=key_id, curve=peer_public_key.curve.name,
                       point=point)  # fmt: skip
        return self._secret(doc)

    def read_secret(self, *, label: str | None = None, object_id: bytes | None = None) -> bytearray:
        if label is None and object_id is None:
            raise ValueError("read_secret needs a label or an id")
        return self._secret(self._op("read_secret", label=label, object_id=object_id))


class WatchHelper:
    """svmmd's card watch's card access (adapters/card_watch.py ``TokenLister``): one
    long-lived helper, started again at the next poll after it failed, so vendor code that
    crashes or wedges costs one poll's "could not see", never the watch (or svmmd) for good.
    A software token that reads its folder once per process is read anew then too."""

    def __init__(
        self,
        path: str,
        *,
        pass_environment: tuple[str, ...] = (),
        user: str | None = None,
        timeout: float = 10.0,
    ) -> None:
        self.path = path
        self._args: dict[str, Any] = {
            "pass_environment": pass_environment, "user": user, "timeout": timeout,
        }  # fmt: skip
        self._lock = threading.Lock()
        self._helper: CardHelper | None = CardHelper(path, **self._args)  # fails loudly once

    def tokens(self) -> list[TokenInfo]:
        with self._lock:
            if self._helper is None or not self._helper.alive():
                self._helper = CardHelper(self.path, **self._args)
            try:
                return self._helper.tokens()
            except WireError:
                self._helper.close()
                self._helper = None
                raise

    def close(self) -> None:
        with self._lock:
            helper, self._helper = self._helper, None
        if helper is not None:
            helper.close(wait=True)
