"""Properties of the parsers of records on disk and of signed policy bundles: any bytes, any
JSON and any damage to a good document end in the value or the parser's typed error; what a
parser lets through never crashes its readers."""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import functools
import json
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.serialization import Encoding
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pam_svmm.adapters import allowlist_store
from pam_svmm.adapters.allowlist_store import STATE_FORMAT, parse_sessions
from pam_svmm.adapters.processes import alive
from pam_svmm.adapters.vm_registry import VmRecord
from pam_svmm.domain import custody
from pam_svmm.domain.allowlist import parse_allowlist
from pam_svmm.domain.policy_bundle import make_bundle, parse_bundle, verify_bundle
from pam_svmm.errors import (
    AllowlistInvalid,
    KeyTokenInvalid,
    PolicyBundleInvalid,
    SessionFailed,
)
from pam_svmm.services import dmcrypt
from pam_svmm.services.session import session_alive
from tests.unit.certfactory import NOW, make_ca
from tests.unit.launcher_fixtures import LocalPolicy, allowlist_bytes

PROPS = settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12),
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=8), kids),
    max_leaves=10,
)


def _replace_one(doc: Any, path: list[Any], value: Any) -> Any:
    """``doc`` with the value at the path (followed as far as it goes) replaced."""
    if not path or not isinstance(doc, dict | list) or not doc:
        return value
    if isinstance(doc, dict):
        key = sorted(doc)[path[0] % len(doc)]
        return {**doc, key: _replace_one(doc[key], path[1:], value)}
    i = path[0] % len(doc)
    return [*doc[:i], _replace_one(doc[i], path[1:], value), *doc[i + 1 :]]


paths = st.lists(st.integers(min_value=0, max_value=50), max_size=4)


def _damaged(data: bytes, at: int, junk: bytes) -> bytes:
    at %= len(data) + 1
    return data[:at] + junk + data[at + len(junk) :]


# --- allowlists ----------------------------------------------------------------------------

ALLOWLIST = json.loads(allowlist_bytes(LocalPolicy()))
NOW_AL = dt.datetime(2026, 3, 1, 9, 30, tzinfo=dt.UTC)


def _allowlist_or_invalid(data: bytes) -> None:
    try:
        a = parse_allowlist(data)
    except AllowlistInvalid:
        return
    a.valid_at(NOW_AL)
    for vm in a.vms:
        a.permits(vm, "boot", now=NOW_AL)


@PROPS
@given(path=paths, value=json_values)
def test_an_allowlist_with_one_value_replaced_parses_or_is_allowlist_invalid(
    path: list[int], value: Any
) -> None:
    _allowlist_or_invalid(json.dumps(_replace_one(ALLOWLIST, path, value)).encode())


@PROPS
@given(data=st.binary(max_size=300), at=st.integers(0, 5000), junk=st.binary(max_size=3))
def test_any_or_damaged_allowlist_bytes_parse_or_are_allowlist_invalid(
    data: bytes, at: int, junk: bytes
) -> None:
    _allowlist_or_invalid(data)
    _allowlist_or_invalid(_damaged(json.dumps(ALLOWLIST).encode(), at, junk))


# --- session records -----------------------------------------------------------------------

SHOWN = Path("/run/svmm/sessions/1000.json")
entries = st.dictionaries(
    st.sampled_from(["pid", "pid_start", "uid", "user", "volumes", "token_serial",
                     "card_removed", "suspended", "deferred", "tty"]),
    json_values,
)  # fmt: skip


@PROPS
@given(
    sessions=st.dictionaries(st.text(max_size=8), entries | json_values, max_size=4),
    user=json_values,
    uid=st.sampled_from([1000, 0, "1000", 10**30]),
)
def test_session_records_parse_or_fail_and_what_is_kept_never_crashes_a_reader(
    sessions: dict[str, Any], user: Any, uid: Any
) -> None:
    doc = {"format": STATE_FORMAT, "uid": uid, "user": user, "sessions": sessions}
    try:
        state = parse_sessions(json.dumps(doc).encode(), 1000, SHOWN)
    except SessionFailed:
        return
    for entry in state.sessions.values():
        session_alive(entry)
        alive(entry.get("pid"), entry.get("pid_start"))
        dmcrypt._alive(entry.get("pid"))
        _ = [v for v in entry.get("volumes", ())]
        _ = str(entry.get("token_serial", "")) + str(entry.get("user", ""))
    st_ = dmcrypt._State(state, set(), set())
    st_.held()
    st_.holders("v1")


@PROPS
@given(data=st.binary(max_size=300))
def test_any_session_record_bytes_parse_or_fail(data: bytes) -> None:
    with contextlib.suppress(SessionFailed):
        parse_sessions(data, 1000, SHOWN)


@PROPS
@given(name=st.text(max_size=12))
def test_file_stems_are_uids_only_when_they_fit(name: str) -> None:
    if allowlist_store.is_uid_text(name):
        assert 0 <= int(name) < 2**32 - 1


# --- VM records and key tokens -------------------------------------------------------------

VM = json.loads(VmRecord("vm-a", 1000, "alice", 4242, 17, "/run/q.sock", "/run/vm-a").to_json())


@PROPS
@given(
    path=paths,
    value=json_values,
    data=st.binary(max_size=200),
    dropped=st.sets(st.sampled_from(sorted(VM))),
    extra=st.dictionaries(st.text(max_size=5), json_values, max_size=2),
)
def test_vm_records_parse_or_are_value_errors(
    path: list[int], value: Any, data: bytes, dropped: set[str], extra: dict[str, Any]
) -> None:
    partial = {k: v for k, v in VM.items() if k not in dropped} | extra
    for doc in (_replace_one(VM, path, value), partial):
        with contextlib.suppress(ValueError):
            VmRecord.from_json(json.dumps(doc).encode())
    for raw in (data, json.dumps(_replace_one(VM, path, value)).encode()):
        try:
            rec = VmRecord.from_json(raw)
        except ValueError:
            continue
        assert 0 < rec.pid < 1 << 22 and 0 <= rec.uid < 2**32
        assert all(isinstance(getattr(rec, f), str) for f in ("vm", "user", "run_dir"))


@PROPS
@given(data=st.binary(max_size=200) | json_values.map(lambda v: json.dumps(v).encode()))
def test_key_tokens_parse_or_are_key_token_invalid(data: bytes) -> None:
    with contextlib.suppress(KeyTokenInvalid):
        custody.parse_token(data)


# --- policy bundles ------------------------------------------------------------------------


@functools.cache
def _signed() -> tuple[Any, bytes]:
    ca = make_ca("Policy signer", key_kind="p256", slot=11)
    return ca, make_bundle(b'version = 1\n[vms.vm-a]\ntype = "t"\n', ca.key, [ca.cert])  # type: ignore[arg-type]


def _bundle_or_invalid(data: bytes) -> None:
    ca, _ = _signed()
    try:
        parse_bundle(data)
    except PolicyBundleInvalid:
        return
    with contextlib.suppress(PolicyBundleInvalid):
        verify_bundle(data, [ca.cert], at=NOW, eku="1.3.6.1.4.1.99999.1")


@PROPS
@given(data=st.binary(max_size=300), at=st.integers(0, 5000), junk=st.binary(max_size=3))
def test_any_or_damaged_bundle_bytes_are_a_bundle_or_bundle_invalid(
    data: bytes, at: int, junk: bytes
) -> None:
    _bundle_or_invalid(data)
    _bundle_or_invalid(_damaged(_signed()[1], at, junk))


@PROPS
@given(path=paths, value=json_values)
def test_a_bundle_with_one_value_replaced_is_a_bundle_or_bundle_invalid(
    path: list[int], value: Any
) -> None:
    _bundle_or_invalid(json.dumps(_replace_one(json.loads(_signed()[1]), path, value)).encode())


@PROPS
@given(at=st.integers(0, 2000), junk=st.binary(min_size=1, max_size=3))
def test_a_bundle_whose_certificate_der_is_damaged_is_a_bundle_or_bundle_invalid(
    at: int, junk: bytes
) -> None:
    ca, bundle = _signed()
    doc = json.loads(bundle)
    der = _damaged(ca.cert.public_bytes(Encoding.DER), at, junk)
    body = base64.encodebytes(der).decode()
    doc["certificates"] = [f"-----BEGIN CERTIFICATE-----\n{body}-----END CERTIFICATE-----\n"]
    _bundle_or_invalid(json.dumps(doc).encode())
