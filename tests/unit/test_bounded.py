"""The bounded parsers: every bound refuses with InputMalformed (a ValueError too), and what
stays inside the bounds parses exactly as json / tomllib would."""

from __future__ import annotations

import json
import time
import tomllib

import pytest

from pam_svmm.domain.bounded import loads_json, loads_toml, value_depth
from pam_svmm.errors import InputMalformed, SvmmError


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (b"[" * 1000, "nested deeper"),
        (b'{"a":' * 40 + b"1" + b"}" * 40, "nested deeper"),
        (b"x" * 2000, "larger than"),
        ("é" * 600, "larger than"),  # 600 characters, 1200 bytes
        (b"\xff", "not UTF-8"),
        (b"NaN", "NaN"),
        (b"[-Infinity]", "Infinity"),
        (b"1e999", "finite"),
        (b"1" * 65, "digits"),
        (b'{"a": 1', "not valid JSON"),
    ],
)
def test_json_bounds(data: bytes | str, words: str) -> None:
    with pytest.raises(InputMalformed, match=words) as e:
        loads_json(data, max_bytes=1024, what="request")
    assert isinstance(e.value, ValueError) and isinstance(e.value, SvmmError)
    assert e.value.message.startswith("request: ")


@pytest.mark.parametrize(
    "doc",
    [b'{"a": [1, 2.5, "x[[[[{{{{\\"]]"], "b": {"c": null}}', b'"[["', b"[[[[[[[[]]]]]]]]", b"-12"],
)
def test_json_within_bounds_is_json(doc: bytes) -> None:
    assert loads_json(doc, max_bytes=1024, max_depth=8) == json.loads(doc)


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("x = " + "[" * 1000, "nested deeper"),
        ("x = " + "{a = " * 40 + "1" + "}" * 40, "nested deeper"),
        (".".join(["a"] * 40) + " = 1", "nested deeper"),  # dotted keys nest without brackets
        ("[" + ".".join(["a"] * 40) + "]", "nested deeper"),
        ("x = nan", "finite"),
        ("x = -inf", "finite"),
        ("x = 0x" + "f" * 70, "digits"),
        ("x = [", "not valid TOML"),
        ("x = 1\n" * 200, "larger than"),
    ],
)
def test_toml_bounds(text: str, words: str) -> None:
    with pytest.raises(InputMalformed, match=words):
        loads_toml(text, max_bytes=1024, max_depth=16)


@pytest.mark.parametrize(
    "text",
    [
        "a = \"[[[[[[[[[[[[[[[[[[[[[[[[\"\nb = '{{{{{{{{{{{{{{{{{{{{{'\n",
        'c = """\n[[[[[[[[[[[[[[[[[[[[[[[[\\"""\n"""\n',
        "d = '''[[[[[[[[[[[[[[[[[[[[[[['''\n# [[[[[[[[[[[[[[[[[[[[[[[[[\n",
        "[[t]]\nx = [[1, 2], [3]]\n[[t]]\ny = {z = [1]}\n",
    ],
)
def test_toml_within_bounds_is_toml(text: str) -> None:
    assert loads_toml(text, max_bytes=1024, max_depth=16) == tomllib.loads(text)


def test_toml_nan_can_be_left_to_the_reader() -> None:
    doc = loads_toml("x = nan", max_bytes=64, finite=False)
    assert doc["x"] != doc["x"]


def test_value_depth() -> None:
    assert value_depth(1, 5) == 0
    assert value_depth([], 5) == 1
    assert value_depth({"a": [{"b": []}]}, 5) == 4
    deep: list[object] = []
    for _ in range(100_000):  # no recursion, stops counting past the limit
        deep = [deep]
    assert value_depth(deep, 10) == 11


def test_a_large_document_scans_fast() -> None:
    doc = b"[" + b'"ab\\"c[{",' * 200_000 + b"1]"
    started = time.monotonic()
    assert len(loads_json(doc, max_bytes=len(doc))) == 200_001
    assert time.monotonic() - started < 2.0
