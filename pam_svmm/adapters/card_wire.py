"""The card helper's wire format: length-prefixed JSON over a socketpair, and typed errors.

Both ends are ours, but the helper runs the PKCS#11 module (vendor code that reads cards)
and is trusted less than the process that started it: what it sends is read as data only
(JSON, never pickle), bounded in size, and checked field by field on the receiving side
(adapters/card_helper.py). Bytes travel as ``{"$b": base64}``; an error as its class name
from ``ERRORS``, message and reason, rebuilt as the same product error on the other end.
"""

from __future__ import annotations

import base64
import json
import socket
import struct
from typing import Any

from ..errors import (
    CertificateInvalid,
    ConversationFailed,
    KeyReleaseFailed,
    NoCard,
    PinIncorrect,
    PinInvalid,
    PinLocked,
    PinTries,
    SvmmError,
    TokenError,
)

MAX_MESSAGE = 4 << 20  # a card's certificates are kilobytes; anything near this is hostile
_LEN = struct.Struct(">I")
PID_MESSAGE = struct.Struct("=q")  # a forked helper's first message: its pid, with a pidfd
ERRORS: dict[str, type[SvmmError]] = {
    cls.__name__: cls
    for cls in (
        CertificateInvalid,
        ConversationFailed,
        KeyReleaseFailed,
        NoCard,
        PinIncorrect,
        PinInvalid,
        PinLocked,
        TokenError,
    )
}


class WireError(TokenError):
    """The card helper broke the protocol, went away or did not answer in time."""

    reason = "card_helper_failed"


def _to_json(value: Any) -> Any:
    if isinstance(value, bytes | bytearray):
        return {"$b": base64.b64encode(value).decode()}
    if isinstance(value, dict):
        return {str(k): _to_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_to_json(v) for v in value]
    return value


def _from_json(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {"$b"} and isinstance(value["$b"], str):
            return base64.b64decode(value["$b"], validate=True)
        return {k: _from_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_from_json(v) for v in value]
    return value


def send(sock: socket.socket, message: dict[str, Any]) -> None:
    data = json.dumps(_to_json(message), separators=(",", ":")).encode()
    if len(data) > MAX_MESSAGE:
        raise WireError(f"card helper message of {len(data)} bytes is over the limit")
    sock.sendall(_LEN.pack(len(data)) + data)


def _read_exact(sock: socket.socket, n: int) -> bytes | None:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            if buf:
                raise WireError("the card helper closed the connection mid-message")
            return None
        buf += chunk
    return bytes(buf)


def recv(sock: socket.socket) -> dict[str, Any] | None:
    """The next message; None when the other end closed the connection between messages."""
    head = _read_exact(sock, _LEN.size)
    if head is None:
        return None
    (n,) = _LEN.unpack(head)
    if n > MAX_MESSAGE:
        raise WireError(f"card helper message of {n} bytes is over the limit")
    body = _read_exact(sock, n)
    if body is None:
        raise WireError("the card helper closed the connection mid-message")
    try:
        message = _from_json(json.loads(body))
    except (ValueError, TypeError) as e:
        raise WireError(f"the card helper sent malformed data ({type(e).__name__})") from None
    if not isinstance(message, dict):
        raise WireError("the card helper sent a message that is not an object")
    return message


def error_doc(error: SvmmError) -> dict[str, Any]:
    name = type(error).__name__ if type(error).__name__ in ERRORS else "TokenError"
    doc: dict[str, Any] = {"type": name, "message": error.message, "reason": error.reason}
    if isinstance(error, PinIncorrect):
        doc["tries"] = error.tries.value
    return doc


def error_from(doc: Any) -> SvmmError:
    """The product error a helper's error document stands for (TokenError if unknown)."""
    if not isinstance(doc, dict):
        return WireError("the card helper sent a malformed error")
    message = doc.get("message")
    reason = doc.get("reason")
    message = message[:2000] if isinstance(message, str) else "card error"
    reason = reason[:64] if isinstance(reason, str) and reason.isidentifier() else None
    cls = ERRORS.get(str(doc.get("type")), TokenError)
    if cls is PinIncorrect:
        try:
            tries = PinTries(doc.get("tries"))
        except ValueError:
            tries = PinTries.UNKNOWN
        return PinIncorrect(tries, message)
    return cls(message, reason=reason)
