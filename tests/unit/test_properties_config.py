"""Properties of the configuration reader: whatever TOML-ish document it gets, the answer is a
Config or a ConfigError naming a key, never another exception; the same for the policy
document and for the bounded TOML and JSON parsers under them."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime as dt
import json
import math
import tomllib
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pam_svmm import config
from pam_svmm.domain.bounded import loads_json, loads_toml
from pam_svmm.domain.policy import load_policy
from pam_svmm.errors import ConfigError, InputMalformed, PolicyError

PROPS = settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
REPO = Path(__file__).resolve().parents[2]
EXAMPLE = tomllib.loads((REPO / "config" / "svmm.toml").read_text())
POLICY = (REPO / "config" / "policy.example.toml").read_text()

# What tomllib can hand the reader: every TOML value type, numbers at their edges.
scalars = st.one_of(
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(),  # nan and inf included
    st.text(max_size=20),
    st.sampled_from(["", "/abs/path", "rel", "pkcs11:", "{token}", "{token.x}", "(uid={cn})",
                     "a{99999999999}", "1.2.3", "clientAuth", "ldap://h", "require", "ocsp"]),
    st.datetimes(timezones=st.none() | st.just(dt.UTC)),
    st.dates(),
    st.times(),
)  # fmt: skip
keys = st.text(min_size=1, max_size=12) | st.sampled_from(
    ["rules", "map", "match", "issuer", "eku", "priority", "kind", "oid", "networks", "name"]
)
values = st.recursive(
    scalars,
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(keys, kids, max_size=3),
    max_leaves=8,
)


def _leaf_paths(doc: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix] if prefix else []
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += _leaf_paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += _leaf_paths(v, (*prefix, i))
    return out


EXAMPLE_PATHS = _leaf_paths(EXAMPLE)
SECTIONS = [k for k in EXAMPLE if isinstance(EXAMPLE[k], dict)]


def _walk(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        for f in dataclasses.fields(value):
            yield from _walk(getattr(value, f.name))
    elif isinstance(value, tuple):
        for v in value:
            yield from _walk(v)
    else:
        yield value


def _parse_or_config_error(doc: Any) -> None:
    try:
        cfg = config.parse(doc)
    except ConfigError as e:
        assert e.key  # names what is wrong
        return
    assert isinstance(cfg, config.Config)
    for v in _walk(cfg):  # what timeouts and C calls get: finite, bounded
        if isinstance(v, float):
            assert math.isfinite(v) and abs(v) <= config.MAX_SECONDS
        elif isinstance(v, int):
            assert abs(v) < 2**63
    cfg.pkcs11.pin_prompt.format(token="label", host="host")  # never raises at login


# Hostile values shaped like the ones they replace: what reaches the deeper checks.
hostile_text = st.one_of(
    st.text(max_size=20),
    st.builds("{{{}}}".format, st.text(max_size=12)),  # "{...}": a format field
    st.builds("{}{{{}}}".format, st.text(max_size=4), st.sampled_from(["token", "host"])),
    st.builds("a{{{}}}".format, st.integers(min_value=0, max_value=2**70)),  # a repetition
    st.builds("1.2.{}".format, st.integers(min_value=0, max_value=10**60)),  # an OID arc
)


def like(original: Any) -> st.SearchStrategy[Any]:
    if isinstance(original, bool):
        return values
    if isinstance(original, int | float):
        return st.floats() | st.integers(min_value=-(2**70), max_value=2**70)
    if isinstance(original, str):
        return hostile_text | st.sampled_from(
            ["{token.x}", "{token[0]}", "{host!r}", "{token:>999999999}", "{token:{host}}"]
        )
    if isinstance(original, list):
        return st.lists(like(original[0]) if original else values, max_size=3)
    return values


@st.composite
def replaced(draw: st.DrawFn) -> dict[str, Any]:
    path = draw(st.sampled_from(EXAMPLE_PATHS))
    doc = copy.deepcopy(EXAMPLE)
    target = doc
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = draw(like(target[path[-1]]) | values)
    return doc


@PROPS
@given(doc=replaced())
def test_the_example_with_one_value_replaced_is_a_config_or_a_config_error(
    doc: dict[str, Any],
) -> None:
    _parse_or_config_error(doc)


@PROPS
@given(doc=st.dictionaries(st.sampled_from(SECTIONS) | keys, values, max_size=4))
def test_any_document_is_a_config_or_a_config_error(doc: dict[str, Any]) -> None:
    _parse_or_config_error(doc)


@PROPS
@given(
    section=st.sampled_from(SECTIONS),
    table=st.dictionaries(st.sampled_from(sorted({k for s in SECTIONS for k in EXAMPLE[s]})),
                          values, max_size=4),
)  # fmt: skip
def test_known_keys_with_any_values_are_a_config_or_a_config_error(
    section: str, table: dict[str, Any]
) -> None:
    _parse_or_config_error({section: table})


@PROPS
@given(rules=st.lists(st.dictionaries(st.sampled_from(
    ["name", "map", "priority", "match"]), values, max_size=4), max_size=3))  # fmt: skip
def test_certmap_rules_of_any_shape_are_a_config_or_a_config_error(rules: list[Any]) -> None:
    _parse_or_config_error({"certmap": {"rules": rules}})


TOML_TOKENS = [*"[]{}=\"'#.,\n abc123_-+:", "nan", "inf", '"""', "'''", "true", "[[t]]"]
toml_text = st.lists(st.sampled_from(TOML_TOKENS), max_size=60).map("".join)


@PROPS
@given(text=st.one_of(st.text(max_size=200), toml_text))
def test_any_text_is_toml_or_input_malformed_and_then_a_config_or_a_config_error(
    text: str,
) -> None:
    try:
        doc = loads_toml(text, max_bytes=1 << 16, max_depth=8, finite=False)
    except InputMalformed:
        return
    # repr: the same document, nan included (nan != nan; hypothesis found "0=nan").
    assert repr(doc) == repr(tomllib.loads(text))
    _parse_or_config_error(doc)


@PROPS
@given(text=st.one_of(st.text(max_size=200), toml_text))
def test_any_text_is_a_policy_or_a_policy_error(text: str) -> None:
    with contextlib.suppress(PolicyError):
        load_policy(text)


@PROPS
@given(cut=st.integers(min_value=0, max_value=len(POLICY)), junk=st.text(max_size=10))
def test_a_damaged_example_policy_is_a_policy_or_a_policy_error(cut: int, junk: str) -> None:
    with contextlib.suppress(PolicyError):
        load_policy(POLICY[:cut] + junk + POLICY[cut:])


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**60), max_value=10**60)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=10),
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=5), kids),
    max_leaves=10,
)


@PROPS
@given(value=json_values)
def test_bounded_json_agrees_with_json_within_its_bounds(value: Any) -> None:
    text = json.dumps(value)
    assert loads_json(text, max_bytes=1 << 20) == json.loads(text)


JSON_CHARS = '[]{}",:\\ 0123456789.eE-tnul'


@PROPS
@given(data=st.binary(max_size=200) | st.text(alphabet=JSON_CHARS, max_size=200).map(str.encode))
def test_any_bytes_are_json_or_input_malformed(data: bytes) -> None:
    with contextlib.suppress(InputMalformed):
        loads_json(data, max_bytes=1 << 16, max_depth=8)
