"""Properties of RFC 7512 URIs: any string parses or is an InvalidPkcs11Uri; a generated
valid URI parses back to what it says; matching never raises, whatever the token reports."""

from __future__ import annotations

from dataclasses import dataclass, fields
from urllib.parse import quote, quote_from_bytes

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pam_svmm.domain.pkcs11_uri import OBJECT_TYPES, InvalidPkcs11Uri, Pkcs11Uri, parse

PROPS = settings(
    max_examples=200,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
PATH_TEXT = {"token": "token", "manufacturer": "manufacturer", "serial": "serial",
             "model": "model", "library_manufacturer": "library-manufacturer",
             "library_description": "library-description",
             "slot_description": "slot-description", "slot_manufacturer": "slot-manufacturer",
             "object": "object"}  # fmt: skip
QUERY_TEXT = {"pin_source": "pin-source", "module_name": "module-name",
              "module_path": "module-path"}  # fmt: skip
ATTRS = [*PATH_TEXT.values(), *QUERY_TEXT.values(), "id", "type", "slot-id", "library-version",
         "pin-value", "x-vendor"]  # fmt: skip
text = st.text(max_size=12)


def _format(u: Pkcs11Uri) -> str:
    """The URI of ``u``: every value percent-encoded but the unreserved characters."""
    path = [f"{name}={quote(getattr(u, f), safe='')}" for f, name in PATH_TEXT.items()
            if getattr(u, f) is not None]  # fmt: skip
    if u.id is not None:
        path.append(f"id={quote_from_bytes(u.id, safe='')}")
    if u.type is not None:
        path.append(f"type={u.type}")
    if u.slot_id is not None:
        path.append(f"slot-id={u.slot_id}")
    if u.library_version is not None:
        path.append(f"library-version={u.library_version[0]}.{u.library_version[1]}")
    query = [f"{name}={quote(getattr(u, f), safe='')}" for f, name in QUERY_TEXT.items()
             if getattr(u, f) is not None]  # fmt: skip
    return "pkcs11:" + ";".join(path) + ("?" + "&".join(query) if query else "")


uris = st.builds(
    Pkcs11Uri,
    **{f: st.none() | text for f in [*PATH_TEXT, *QUERY_TEXT]},
    id=st.none() | st.binary(max_size=8),
    type=st.none() | st.sampled_from(sorted(OBJECT_TYPES)),
    slot_id=st.none() | st.integers(min_value=0, max_value=2**64 - 1),
    library_version=st.none() | st.tuples(st.integers(0, 255), st.integers(0, 255)),
)


@PROPS
@given(u=uris)
def test_a_generated_uri_parses_back_to_itself(u: Pkcs11Uri) -> None:
    assert parse(_format(u)) == u


uri_like = st.lists(
    st.sampled_from(["pkcs11:", "PKCS11:", ";", "=", "&", "?", "#", "%", "%2", "%ff", "%41", "a",
                     "9" * 30, "-1", ".", " ", "\0", "é", *ATTRS]),
    max_size=12,
).map("".join)  # fmt: skip


@PROPS
@given(s=st.text(max_size=60) | uri_like | uri_like.map(lambda t: "pkcs11:" + t))
def test_any_string_is_a_uri_or_invalid(s: str) -> None:
    try:
        u = parse(s)
    except InvalidPkcs11Uri as e:
        assert "pin-value=" not in str(e) or "pin-value=***" in str(e)
        return
    assert isinstance(u, Pkcs11Uri)
    assert u.slot_id is None or 0 <= u.slot_id < 2**64


@dataclass(frozen=True)
class Info:
    label: str
    manufacturer: str
    model: str
    serial: str


@PROPS
@given(u=uris, info=st.builds(Info, text, text, text, text), slot=st.none() | st.integers(0, 9))
def test_matching_never_raises(u: Pkcs11Uri, info: Info, slot: int | None) -> None:
    matched = u.matches_token(info, slot)
    if u.slot_id is not None and slot is None:
        assert not matched  # an unknown slot never matches a URI that names one
    u.matches_object(info.label, b"\x01", "cert")
    u.matches_slot(slot or 0, info.label, info.model)
    u.matches_library(info.manufacturer, info.model, (1, 2))
    assert {f.name for f in fields(u)} >= {"token", "slot_id"}
