"""A strict RFC 4515 reader: the ground truth for "the filter's structure did not change" in
the certificate mapping tests (test_certmap, test_properties_certmap)."""

from __future__ import annotations

import re

_ITEM = re.compile(
    r"([A-Za-z][A-Za-z0-9-]*(?:;[A-Za-z0-9-]+)*)=((?:[^()*\\\x00]|\\[0-9a-fA-F]{2})*)"
)


def parse_filter(text: str) -> object:
    """(&..)/(|..)/(!..) as nested tuples, equality items as (attr, raw value bytes).

    Refuses anything else (substrings, presence, stray characters), so an injected ``*``
    or ``)`` shows up as a parse error or as a different tree.
    """
    pos = 0

    def node() -> object:
        nonlocal pos
        if text[pos] != "(":
            raise ValueError(f"expected ( at {pos}")
        pos += 1
        if text[pos] in "&|!":
            op = text[pos]
            pos += 1
            kids = []
            while text[pos] == "(":
                kids.append(node())
            out: object = (op, *kids)
        else:
            m = _ITEM.match(text, pos)
            if not m or text[m.end()] != ")":
                raise ValueError(f"not an equality item at {pos}: {text[pos:]!r}")
            raw = re.sub(
                rb"\\([0-9a-fA-F]{2})",
                lambda x: bytes([int(x.group(1), 16)]),
                m.group(2).encode(),
            )
            out = (m.group(1), raw)
            pos = m.end()
        if text[pos] != ")":
            raise ValueError(f"expected ) at {pos}")
        pos += 1
        return out

    tree = node()
    if pos != len(text):
        raise ValueError(f"trailing text {text[pos:]!r}")
    return tree
