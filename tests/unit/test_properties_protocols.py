"""Properties of both socket protocols: svmm-pam/1 frames (pam/shim.py) round-trip and any
bytes read as frames are fields or a ValueError; a svmm-launcher/1 line (any bytes, any JSON)
is a request or a LauncherRefused, whoever the peer is."""

from __future__ import annotations

import contextlib
import io
import json
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pam_svmm.errors import LauncherRefused
from pam_svmm.pam.shim import MAX_FRAME, decode, encode, read_frame
from pam_svmm.services.launcher import KEY_OPS, OPS, PROTOCOL, Request, parse_request

PROPS = settings(
    max_examples=200,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
keys = st.text(min_size=1, max_size=12).filter(lambda k: "\0" not in k and "=" not in k)
field_values = st.text(max_size=40).filter(lambda v: "\0" not in v) | st.integers()


@PROPS
@given(fields=st.dictionaries(keys, field_values | st.none(), max_size=6))
def test_frames_round_trip(fields: dict[str, Any]) -> None:
    wire = encode(fields)
    got = read_frame(io.BytesIO(wire).read)
    assert got == {k: str(v) for k, v in fields.items() if v is not None}


@PROPS
@given(fields=st.dictionaries(st.text(max_size=6), st.text(max_size=6), max_size=4))
def test_encode_refuses_what_cannot_be_sent_with_value_error_only(fields: dict[str, Any]) -> None:
    try:
        wire = encode(fields)
    except ValueError:
        return
    assert read_frame(io.BytesIO(wire).read) == fields


@PROPS
@given(data=st.binary(max_size=300))
def test_any_bytes_read_as_a_frame_are_fields_or_a_value_error(data: bytes) -> None:
    for wire in (data, len(data).to_bytes(4, "big") + data):
        try:
            got = read_frame(io.BytesIO(wire).read)
        except ValueError:
            continue
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in got.items())
    with contextlib.suppress(ValueError):
        decode(data)


@PROPS
@given(size=st.integers(min_value=MAX_FRAME + 1, max_value=2**32 - 1))
def test_a_frame_longer_than_the_bound_is_refused_before_it_is_read(size: int) -> None:
    try:
        read_frame(io.BytesIO(size.to_bytes(4, "big")).read)
    except ValueError as e:
        assert "too large" in str(e)
    else:
        raise AssertionError("an oversized frame was accepted")


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12),
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=8), kids),
    max_leaves=10,
)
REQUEST_KEYS = ["version", "op", "vm", "uid", "user", "session", "volumes", "card_fingerprint",
                "card_serial", "session_closed", "x"]  # fmt: skip
request_keys = st.sampled_from(REQUEST_KEYS)
volume = st.fixed_dictionaries(
    {
        "name": st.sampled_from(["v1", "v2", "BAD", ""]) | json_values,
        "passphrase": st.text(max_size=8) | json_values,
    }
)
request_docs = st.fixed_dictionaries(
    {"version": st.just(PROTOCOL) | json_values, "op": st.sampled_from(OPS) | json_values},
    optional={
        "vm": st.sampled_from(["vm-a", "Bad VM", ""]) | json_values,
        "uid": st.integers(min_value=-1, max_value=2**40) | json_values,
        "user": st.sampled_from(["alice", "a b"]) | json_values,
        "session": st.sampled_from(["tty1:1:ab", "x" * 65]) | json_values,
        "card_fingerprint": st.just("ab" * 32) | json_values,
        "card_serial": st.just("1f") | json_values,
        "volumes": st.lists(volume, max_size=3) | json_values,
        "session_closed": st.booleans() | json_values,
    },
)


def _request_or_refused(line: bytes, peer: int | None) -> None:
    try:
        r = parse_request(line, peer)
    except LauncherRefused as e:
        assert e.reason
        return
    assert isinstance(r, Request) and r.op in OPS
    if r.op in KEY_OPS:
        assert peer == 0  # nobody else gets this far with a key op
    r.wipe()


@PROPS
@given(
    doc=request_docs | st.dictionaries(request_keys, json_values),
    peer=st.sampled_from([0, 1000, None]),
)
def test_any_json_request_is_a_request_or_refused(doc: dict[str, Any], peer: int | None) -> None:
    _request_or_refused(json.dumps(doc).encode(), peer)


@PROPS
@given(
    data=st.binary(max_size=300) | st.integers(0, 70_000).map(lambda n: b"[" * n),
    peer=st.sampled_from([0, 1000]),
)
def test_any_bytes_are_a_request_or_refused(data: bytes, peer: int) -> None:
    _request_or_refused(data, peer)
