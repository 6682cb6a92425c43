"""The pure parts of card issuing: request validation, the key URI, the openssl argv."""

from __future__ import annotations

import pytest

from pam_svmm.adapters.token import KeySpec, TokenInfo
from pam_svmm.domain.pkcs11_uri import parse
from pam_svmm.errors import IssueFailed, PinTries
from pam_svmm.services.issuing import IssueRequest, OpensslCsrSigner, key_uri

TOKEN = TokenInfo(
    slot_id=3,
    label="alice ID card",
    manufacturer="SoftHSM project",
    model="SoftHSM v2",
    serial="8d1f;x=1",
    pin_tries=PinTries.UNKNOWN,
    protected_auth_path=False,
    login_required=True,
)


@pytest.mark.parametrize(
    "fields",
    [
        {"common_name": "alice/CN=root"},  # -subj syntax
        {"common_name": "alice", "organisation": "Org+CN=x"},
        {"common_name": "alice", "upn": "alice@x,email:evil@x"},  # -addext syntax
        {"common_name": "alice", "email": "not-an-address"},
        {"common_name": ""},
        {"common_name": "a" * 65},
        {"common_name": "alice", "key_id": b""},
        {"common_name": "alice\nO=x"},
    ],
)
def test_requests_with_syntax_in_their_values_are_refused(fields: dict[str, object]) -> None:
    with pytest.raises(IssueFailed) as e:
        IssueRequest(**fields)  # type: ignore[arg-type]
    assert e.value.reason == "request_invalid"


def test_subject_and_san_arguments() -> None:
    r = IssueRequest(
        "alice", upn="alice@demo.example", email="a.b@demo.example", organisation="Demo Org"
    )
    assert r.subject_arg() == "/CN=alice/O=Demo Org"
    assert r.san_arg() == (
        "subjectAltName=otherName:1.3.6.1.4.1.311.20.2.3;UTF8:alice@demo.example,"
        "email:a.b@demo.example"
    )
    assert IssueRequest("bob").san_arg() is None


def test_key_uri_percent_encodes_every_value_and_parses_back() -> None:
    uri = key_uri(TOKEN, b"\x01\xff")
    assert uri == "pkcs11:token=alice%20ID%20card;serial=8d1f%3Bx%3D1;id=%01%FF;type=private"
    parsed = parse(uri)
    assert parsed.token == "alice ID card" and parsed.serial == "8d1f;x=1"
    assert parsed.id == b"\x01\xff"


@pytest.mark.parametrize(
    ("spec", "digest"),
    [(KeySpec.RSA_2048, "-sha256"), (KeySpec.EC_P256, "-sha256"), (KeySpec.EC_P384, "-sha384")],
)
def test_openssl_argv_takes_the_pin_from_a_descriptor_only(spec: KeySpec, digest: str) -> None:
    signer = OpensslCsrSigner("/usr/lib/softhsm/libsofthsm2.so", openssl="/usr/bin/openssl")
    r = IssueRequest("alice", upn="alice@demo.example", key_spec=spec)
    argv = signer.argv(key_uri(TOKEN, b"\x01"), r, passin_fd=7)
    assert argv[:3] == ["/usr/bin/openssl", "req", "-new"]
    assert digest in argv
    assert argv[argv.index("-passin") + 1] == "fd:7"
    assert not any(a.startswith(("pass:", "env:", "file:")) for a in argv)
    assert "-passin" not in signer.argv(key_uri(TOKEN, b"\x01"), r, passin_fd=None)  # PIN pad
