"""The card helper process: the PKCS#11 module runs here, never in the process that starts it.

Started by adapters/card_helper.py for one login (SSSD's p11_child is the model): its
environment is the one the product set, not the caller's (su and sudo run PAM modules as
root with the user's environment, and OpenSC, p11-kit and pcsc-lite read variables that
name configuration files, modules and sockets); it has no capabilities, no_new_privs and
a seccomp filter (adapters/seccomp.py: no programs, no network, no tracing or mounts).
One helper is one PKCS#11 application, so the card's login state (per token per
application) never carries over from another transaction. It reads requests on the
socketpair it was given and ends when the other end closes; nothing else reaches it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
from dataclasses import asdict, fields
from typing import Any

from ..domain.pkcs11_uri import Pkcs11Uri
from ..errors import SvmmError, TokenError
from . import card_wire, seccomp
from .token import CardCertificate, Pkcs11Module, TokenInfo, TokenSession

_URI_FIELDS = {f.name for f in fields(Pkcs11Uri)}
_CURVES = {"secp256r1": "SECP256R1", "secp384r1": "SECP384R1", "secp521r1": "SECP521R1"}


def token_doc(t: TokenInfo) -> dict[str, Any]:
    return {**asdict(t), "pin_tries": t.pin_tries.value}


def cert_doc(c: CardCertificate) -> dict[str, Any]:
    return {"label": c.label, "id": c.id, "der": c.der}


def _uri(doc: Any) -> Pkcs11Uri | None:
    if doc is None:
        return None
    if not isinstance(doc, dict) or not set(doc) <= _URI_FIELDS:
        raise TokenError("card helper: malformed URI in the request")
    if doc.get("library_version") is not None:
        doc = {**doc, "library_version": tuple(doc["library_version"])}
    return Pkcs11Uri(**doc)


class Child:
    def __init__(self) -> None:
        self.module: Pkcs11Module | None = None
        self.sessions: dict[int, TokenSession] = {}
        self._next = 0

    def _mod(self) -> Pkcs11Module:
        if self.module is None:
            raise TokenError("card helper: no module loaded")
        return self.module

    def _session(self, sid: Any) -> TokenSession:
        s = self.sessions.get(sid) if isinstance(sid, int) else None
        if s is None:
            raise TokenError("card helper: no such session")
        return s

    def handle(self, req: dict[str, Any]) -> Any:
        op = req.get("op")
        if op == "open":
            if self.module is not None:
                raise TokenError("card helper: module already loaded")
            self.module = Pkcs11Module(str(req["path"]))
            return {
                "manufacturer": self.module.library_manufacturer,
                "description": self.module.library_description,
                "version": list(self.module.library_version),
            }
        m = self._mod()
        if op == "tokens":
            return [token_doc(t) for t in m.tokens(_uri(req.get("uri")))]
        if op == "wait_for_token":
            return token_doc(m.wait_for_token(_uri(req.get("uri")), float(req["timeout"])))
        if op == "token_info":
            return token_doc(m.token_info(int(req["slot"])))
        if op == "mechanisms":
            return sorted(m.mechanisms(int(req["slot"])))
        if op == "certificates":
            token = m.token_info(int(req["slot"]))
            return [cert_doc(c) for c in m.certificates(token, _uri(req.get("uri")))]
        if op == "session":
            token = m.token_info(int(req["slot"]))
            self._next += 1
            self.sessions[self._next] = m.session(token, rw=bool(req.get("rw")))
            return self._next
        return self._session_op(op, req)

    def _session_op(self, op: Any, req: dict[str, Any]) -> Any:
        s = self._session(req.get("sid"))
        if op == "close":
            self.sessions.pop(req["sid"]).close()
            return None
        if op == "login":
            pin = req.get("pin")
            try:
                s.login(pin if isinstance(pin, str) else None)
            finally:
                req.pop("pin", None)
                del pin
            return None
        if op == "sign":
            scheme, signature = s.sign(bytes(req["key_id"]), bytes(req["data"]))
            return [scheme.value, signature]
        if op == "s_certificates":
            return [cert_doc(c) for c in s.certificates(_uri(req.get("uri")))]
        if op == "s_mechanisms":
            return sorted(s.mechanisms())
        if op == "decrypt_rsa_oaep":
            return _secret(s.decrypt_rsa_oaep(bytes(req["key_id"]), bytes(req["data"]),
                                              hash=str(req["hash"])))  # fmt: skip
        if op == "ecdh_derive":
            from cryptography.hazmat.primitives.asymmetric import ec

            curve = _CURVES.get(str(req["curve"]))
            if curve is None:
                raise TokenError(f"card helper: unknown curve {req['curve']!r}")
            peer = ec.EllipticCurvePublicKey.from_encoded_point(
                getattr(ec, curve)(), bytes(req["point"])
            )
            return _secret(s.ecdh_derive(bytes(req["key_id"]), peer))
        if op == "read_secret":
            oid = req.get("object_id")
            return _secret(s.read_secret(label=req.get("label"), object_id=oid))
        raise TokenError(f"card helper: unknown request {op!r}")

    def close(self) -> None:
        for s in self.sessions.values():
            s.close()
        self.sessions.clear()
        if self.module is not None:
            self.module.close()


def _secret(value: bytearray) -> bytes:
    # The JSON encoder copies it; the bytearray the module handed us is wiped at once.
    try:
        return bytes(value)
    finally:
        value[:] = b"\0" * len(value)


def serve(sock: socket.socket, refusal: str = "") -> None:
    """Answer requests until the other end hangs up; ``refusal``: answer each with it."""
    child = Child()
    try:
        while (req := card_wire.recv(sock)) is not None:
            try:
                if refusal:
                    raise TokenError(f"card helper: {refusal}", reason="card_helper_failed")
                reply: dict[str, Any] = {"ok": child.handle(req)}
            except SvmmError as e:
                reply = {"error": card_wire.error_doc(e)}
            except (KeyError, TypeError, ValueError) as e:
                reply = {"error": card_wire.error_doc(
                    TokenError(f"card helper: bad request ({type(e).__name__})"))}  # fmt: skip
            card_wire.send(sock, reply)
    finally:
        child.close()


def forker(control: socket.socket, refusal: str) -> int:
    """svmmd's forker: each descriptor svmmd sends on ``control`` is one login's socket,
    served by a child forked from here. This process has imported the card code once, so a
    login's helper costs a fork and the module's C_Initialize rather than an interpreter and
    its imports; it never loads a PKCS#11 module, so a child starts with no card state of
    another login's (nor of this process's: there is none). The children are not svmmd's:
    each sends svmmd a pidfd of itself, by which svmmd watches and kills it."""
    with contextlib.suppress(ImportError):
        import PyKCS11  # noqa: F401  - once here, instead of in every child

    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps them; svmmd has pidfds
    while True:
        try:
            _, fds, _, _ = socket.recv_fds(control, 1, 1)
        except OSError:
            return 1
        if not fds:
            return 0  # svmmd hung up
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                control.close()
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                code = _forked(socket.socket(fileno=fds[0]), refusal)
            finally:
                os._exit(code)  # never back into the forker's loop
        os.close(fds[0])


def _forked(sock: socket.socket, refusal: str) -> int:
    pidfd = os.pidfd_open(os.getpid())
    try:
        socket.send_fds(sock, [card_wire.PID_MESSAGE.pack(os.getpid())], [pidfd])
    finally:
        os.close(pidfd)
    try:
        serve(sock, refusal)
    except (card_wire.WireError, OSError):
        return 1
    return 0


def main() -> int:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the terminal's ^C is the PAM app's to handle
    fd = int(sys.argv[-1])
    sock = socket.socket(fileno=fd)
    devnull = os.open(os.devnull, os.O_RDWR)
    for n in (0, 1):
        os.dup2(devnull, n)  # vendor code printing to stdout must not reach the terminal
    refusal = ""
    try:
        seccomp.install()  # before any vendor code is loaded
    except seccomp.SeccompUnavailable as e:
        refusal = str(e)  # fail closed: no filter, no card access
    if sys.argv[-2:-1] == ["forker"]:
        return forker(sock, refusal)
    try:
        serve(sock, refusal)
    except card_wire.WireError:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
