"""The one way the product parses JSON and TOML it did not write in this process. Pure.

json and tomllib recurse once per nesting level: a line of 60 000 ``[`` raises RecursionError
(a bug's answer, ``internal_error``) instead of a refusal, and a huge document costs memory
before any check runs. So every parser of outside bytes goes through here, which refuses,
with ``InputMalformed`` (also a ValueError) naming the bound:

* more than ``max_bytes`` (checked before anything is decoded),
* nesting deeper than ``max_depth``: counted by a linear scan of the brackets outside strings
  (and comments, for TOML) before the parser runs; for TOML also on the parsed value, since
  dotted keys and table headers nest without brackets,
* text that is not UTF-8, or not well-formed,
* numbers that are not finite (NaN, Infinity, 1e999) or longer than ``max_int_digits``
  (Python ints have no size limit: a long one is an OverflowError waiting in a C call).

RecursionError is still caught as a last resort (a scan that misjudged an odd TOML string).
"""

from __future__ import annotations

import json
import math
import re
import tomllib
from typing import Any

from ..errors import InputMalformed

MAX_DEPTH = 32  # no document of ours nests deeper than 6
MAX_INT_DIGITS = 64  # a 160-bit certificate serial has 49 digits

_JSON_TOKENS = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{}]', re.S)
_TOML_TOKENS = re.compile(
    r'"""(?:[^"\\]|\\[\s\S]|"(?!""))*"""'  # multi-line basic string
    r"|'''[\s\S]*?'''"  # multi-line literal string
    r'|"(?:[^"\\\n]|\\.)*"'  # basic string
    r"|'[^'\n]*'"  # literal string
    r"|#[^\n]*"  # comment
    r"|[\[\]{}]"
)


def _bad(what: str, problem: str) -> InputMalformed:
    return InputMalformed(f"{what}: {problem}" if what else problem)


def _too_deep(text: str, tokens: re.Pattern[str], max_depth: int) -> bool:
    depth = 0
    for m in tokens.finditer(text):
        c = m.group()
        if c in ("[", "{"):
            depth += 1
            if depth > max_depth:
                return True
        elif c in ("]", "}"):
            depth -= 1
    return False


def value_depth(value: object, limit: int) -> int:
    """How deep ``value`` nests (a scalar 0, ``[]`` 1, ``{"a": []}`` 2), counted without
    recursion and only up to ``limit + 1``."""
    deepest = 0
    stack: list[tuple[object, int]] = [(value, 0)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, dict):
            children: Any = v.values()
        elif isinstance(v, list):
            children = v
        else:
            continue
        d += 1
        deepest = max(deepest, d)
        if deepest > limit:
            return deepest
        stack.extend((c, d) for c in children)
    return deepest


def _text(data: bytes | str, max_bytes: int, what: str) -> str:
    if isinstance(data, str):
        # A str can be 4 bytes a character; the bound is in bytes of UTF-8 text.
        if len(data) > max_bytes or len(data.encode("utf-8", "surrogatepass")) > max_bytes:
            raise _bad(what, f"larger than {max_bytes} bytes")
        return data
    if len(data) > max_bytes:
        raise _bad(what, f"larger than {max_bytes} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise _bad(what, "not UTF-8") from None


def loads_json(
    data: bytes | str,
    *,
    max_bytes: int,
    max_depth: int = MAX_DEPTH,
    max_int_digits: int = MAX_INT_DIGITS,
    what: str = "JSON",
) -> Any:
    """``json.loads`` of outside bytes within the bounds above; InputMalformed otherwise."""
    text = _text(data, max_bytes, what)
    if _too_deep(text, _JSON_TOKENS, max_depth):
        raise _bad(what, f"nested deeper than {max_depth} levels")

    def refuse_constant(name: str) -> Any:
        raise _bad(what, f"{name} is not a number here")

    def finite(s: str) -> float:
        f = float(s)
        if not math.isfinite(f):
            raise _bad(what, f"{s[:20]} is not a finite number")
        return f

    def short_int(s: str) -> int:
        if len(s.lstrip("-")) > max_int_digits:
            raise _bad(what, f"an integer longer than {max_int_digits} digits")
        return int(s)

    try:
        return json.loads(
            text, parse_constant=refuse_constant, parse_float=finite, parse_int=short_int
        )
    except InputMalformed:
        raise
    except RecursionError:
        raise _bad(what, "nested too deep") from None
    except ValueError as e:  # JSONDecodeError among them
        raise _bad(what, f"not valid JSON: {e}") from None


def loads_toml(
    data: bytes | str,
    *,
    max_bytes: int,
    max_depth: int = MAX_DEPTH,
    max_int_digits: int = MAX_INT_DIGITS,
    what: str = "TOML",
    finite: bool = True,
) -> dict[str, Any]:
    """``tomllib.loads`` of outside bytes within the bounds above; InputMalformed otherwise.
    ``finite`` False lets nan and inf through, for a reader that refuses them by key."""
    text = _text(data, max_bytes, what)
    if _too_deep(text, _TOML_TOKENS, max_depth):
        raise _bad(what, f"nested deeper than {max_depth} levels")

    def finite_float(s: str) -> float:
        f = float(s.replace("_", ""))
        if finite and not math.isfinite(f):
            raise _bad(what, f"{s[:20]} is not a finite number")
        return f

    try:
        doc = tomllib.loads(text, parse_float=finite_float)
    except InputMalformed:
        raise
    except RecursionError:
        raise _bad(what, "nested too deep") from None
    except ValueError as e:  # TOMLDecodeError among them
        raise _bad(what, f"not valid TOML: {e}") from None
    if value_depth(doc, max_depth) > max_depth:
        raise _bad(what, f"nested deeper than {max_depth} levels")
    _check_ints(doc, max_int_digits, what)
    return doc


def _check_ints(value: object, max_digits: int, what: str) -> None:
    # tomllib has no parse_int hook; TOML ints are 64-bit by the spec, but tomllib does not
    # enforce it (hex, octal and binary forms included).
    limit = 10**max_digits
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, dict):
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
        elif isinstance(v, int) and not isinstance(v, bool) and abs(v) >= limit:
            raise _bad(what, f"an integer longer than {max_digits} digits")
