"""RFC 7512 ``pkcs11:`` URIs: which tokens and objects the configuration selects.

Pure: parsing and matching only. The card adapter asks ``matches_library``, ``matches_slot``,
``matches_token`` and ``matches_object`` with what the module reports.

Deliberate strictness (a URI comes from the configuration, so a typo must be loud, not a
silently empty card list): unknown standard attributes, repeated attributes, malformed
percent-encoding and characters outside the RFC's sets are errors. ``pin-value`` is refused
because PINs never live in configuration (security invariant 4). Vendor attributes
(``x-...``) in the query are ignored as the RFC allows; in the path they would make the URI
match nothing (RFC 7512 section 2.3), so they are refused too.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import unquote_to_bytes

SCHEME = "pkcs11:"

# RFC 7512 section 2.3 character sets (besides pct-encoded).
_UNRESERVED = string.ascii_letters + string.digits + "-._~"
_PATH_CHARS = frozenset(_UNRESERVED + ":[]@!$'()*+,=&")
_QUERY_CHARS = frozenset(_UNRESERVED + ":[]@!$'()*+,=/?|")
_PCT = re.compile(r"%(?![0-9A-Fa-f]{2})")

_STRING_ATTRS = {
    "token": "token",
    "manufacturer": "manufacturer",
    "serial": "serial",
    "model": "model",
    "library-manufacturer": "library_manufacturer",
    "library-description": "library_description",
    "slot-description": "slot_description",
    "slot-manufacturer": "slot_manufacturer",
    "object": "object",
}
OBJECT_TYPES = frozenset({"public", "private", "cert", "secret-key", "data"})


class InvalidPkcs11Uri(ValueError):
    """The URI is malformed; the message says what and where (never contains a PIN)."""

    def __init__(self, uri: str, problem: str) -> None:
        super().__init__(f"invalid PKCS#11 URI {_redact(uri)!r}: {problem}")
        self.problem = problem


class TokenLike(Protocol):
    """What ``matches_token`` reads (the adapter's TokenInfo has these fields; a
    CK_TOKEN_INFO has no slot id: the caller then passes it)."""

    @property
    def label(self) -> str: ...
    @property
    def manufacturer(self) -> str: ...
    @property
    def model(self) -> str: ...
    @property
    def serial(self) -> str: ...


@dataclass(frozen=True)
class Pkcs11Uri:
    """A parsed URI; ``None`` means the attribute is absent (matches anything)."""

    token: str | None = None
    manufacturer: str | None = None
    serial: str | None = None
    model: str | None = None
    library_manufacturer: str | None = None
    library_description: str | None = None
    library_version: tuple[int, int] | None = None
    slot_description: str | None = None
    slot_manufacturer: str | None = None
    slot_id: int | None = None
    object: str | None = None
    id: bytes | None = None
    type: str | None = None
    # Query attributes: parsed so a URI from other tools is accepted; the product does not
    # act on them (the module path comes from [pkcs11] module, the PIN from the user).
    pin_source: str | None = None
    module_name: str | None = None
    module_path: str | None = None

    def matches_library(
        self, manufacturer: str, description: str, version: tuple[int, int]
    ) -> bool:
        return (
            _eq(self.library_manufacturer, manufacturer)
            and _eq(self.library_description, description)
            and (self.library_version is None or self.library_version == tuple(version))
        )

    def matches_slot(self, slot_id: int, description: str, manufacturer: str) -> bool:
        return (
            (self.slot_id is None or self.slot_id == slot_id)
            and _eq(self.slot_description, description)
            and _eq(self.slot_manufacturer, manufacturer)
        )

    def matches_token(self, info: TokenLike, slot_id: int | None = None) -> bool:
        """``slot_id``: the token's slot, when ``info`` does not carry it (PyKCS11's
        CK_TOKEN_INFO does not). A URI naming a slot never matches a token of unknown slot."""
        if slot_id is None:
            slot_id = getattr(info, "slot_id", None)
        return (
            (self.slot_id is None or (slot_id is not None and self.slot_id == slot_id))
            and _eq(self.token, info.label)
            and _eq(self.manufacturer, info.manufacturer)
            and _eq(self.serial, info.serial)
            and _eq(self.model, info.model)
        )

    def matches_object(self, label: str, id: bytes, type: str | None = None) -> bool:
        """``type`` None skips the type check (a certificate pairs with its key by id)."""
        return (
            _eq(self.object, label)
            and (self.id is None or self.id == bytes(id))
            and (type is None or self.type is None or self.type == type)
        )


def parse(uri: str) -> Pkcs11Uri:
    """Parse an RFC 7512 URI; raise InvalidPkcs11Uri naming the problem."""
    if not isinstance(uri, str):
        raise InvalidPkcs11Uri(str(uri), "must be a string")
    if uri[: len(SCHEME)].lower() != SCHEME:
        raise InvalidPkcs11Uri(uri, "must start with 'pkcs11:'")
    rest = uri[len(SCHEME) :]
    path, _, query = rest.partition("?")
    if "#" in rest:
        raise InvalidPkcs11Uri(uri, "a fragment ('#') is not allowed")

    values: dict[str, object] = {}
    for name, raw in _attributes(uri, path, ";", _PATH_CHARS, "path"):
        if name.startswith("x-"):
            raise InvalidPkcs11Uri(uri, f"vendor path attribute {name!r} is not supported")
        if name in _STRING_ATTRS:
            values[_STRING_ATTRS[name]] = _text(uri, name, raw)
        elif name == "id":
            values["id"] = unquote_to_bytes(raw)
        elif name == "type":
            t = _text(uri, name, raw)
            if t not in OBJECT_TYPES:
                allowed = ", ".join(sorted(OBJECT_TYPES))
                raise InvalidPkcs11Uri(uri, f"type must be one of {allowed}, got {t!r}")
            values["type"] = t
        elif name == "slot-id":
            t = _text(uri, name, raw)
            # A CK_SLOT_ID is a C unsigned long: a bigger one overflows in the module call.
            if not t.isascii() or not t.isdigit() or len(t) > 20 or int(t) >= 2**64:
                raise InvalidPkcs11Uri(
                    uri, f"slot-id must be a decimal number below 2**64, got {t[:40]!r}"
                )
            values["slot_id"] = int(t)
        elif name == "library-version":
            t = _text(uri, name, raw)
            # CK_VERSION's major and minor are bytes
            m = re.fullmatch(r"([0-9]{1,3})(?:\.([0-9]{1,3}))?", t)
            if not m or int(m.group(1)) > 255 or int(m.group(2) or 0) > 255:
                raise InvalidPkcs11Uri(
                    uri, f"library-version must be M or M.N (0 to 255), got {t[:40]!r}"
                )
            # RFC 7512: a missing minor version means 0.
            values["library_version"] = (int(m.group(1)), int(m.group(2) or 0))
        else:
            raise InvalidPkcs11Uri(uri, f"unknown path attribute {name!r}")

    if "?" in rest:
        for name, raw in _attributes(uri, query, "&", _QUERY_CHARS, "query"):
            if name.startswith("x-"):
                continue
            if name == "pin-value":
                raise InvalidPkcs11Uri(uri, "pin-value is not accepted: PINs never go in config")
            if name in ("pin-source", "module-name", "module-path"):
                values[name.replace("-", "_")] = _text(uri, name, raw)
            else:
                raise InvalidPkcs11Uri(uri, f"unknown query attribute {name!r}")
    return Pkcs11Uri(**values)  # type: ignore[arg-type]


def _attributes(
    uri: str, part: str, sep: str, allowed: frozenset[str], where: str
) -> list[tuple[str, str]]:
    if part == "":
        return []
    out: list[tuple[str, str]] = []
    seen: set[str] = set()
    for i, item in enumerate(part.split(sep)):
        name, eq, raw = item.partition("=")
        if not eq or not name:
            raise InvalidPkcs11Uri(uri, f"{where} attribute {i + 1} is not name=value")
        if not re.fullmatch(r"[a-z][a-z0-9-]*", name):
            raise InvalidPkcs11Uri(uri, f"{where} attribute name {name!r} is malformed")
        bad = sorted({c for c in raw if c not in allowed and c != "%"})
        if bad:
            raise InvalidPkcs11Uri(
                uri, f"attribute {name!r} has characters that must be percent-encoded: {bad}"
            )
        if _PCT.search(raw):
            raise InvalidPkcs11Uri(uri, f"attribute {name!r} has a malformed percent-encoding")
        if name in seen:
            raise InvalidPkcs11Uri(uri, f"attribute {name!r} appears more than once")
        seen.add(name)
        out.append((name, raw))
    return out


def _text(uri: str, name: str, raw: str) -> str:
    try:
        return unquote_to_bytes(raw).decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidPkcs11Uri(uri, f"attribute {name!r} is not UTF-8 text") from None


def _eq(wanted: str | None, actual: str) -> bool:
    # PKCS#11 pads its fixed-size text fields with spaces; the URI carries the unpadded value.
    return wanted is None or wanted.rstrip(" ") == actual.rstrip(" ")


def _redact(uri: str) -> str:
    # A URI may carry a pin-value from another tool; never echo it into an error.
    return re.sub(r"(pin-value=)[^&]*", r"\1***", uri)
