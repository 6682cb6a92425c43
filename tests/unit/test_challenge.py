from __future__ import annotations

import itertools
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from certfactory import NOW, key, pki
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from pam_svmm.domain.challenge import (
    PURPOSE,
    Challenge,
    check_fresh,
    new_challenge,
    verify_possession,
)
from pam_svmm.domain.signing import SignatureScheme
from pam_svmm.errors import ProofOfPossessionFailed

NONCE = bytes(range(32))
S = SignatureScheme


def _challenge(**kw: Any) -> Challenge:
    args: dict[str, Any] = {"host": "vmm1", "service": "login", "at": NOW, "nonce": NONCE, **kw}
    return new_challenge(args.pop("host"), args.pop("service"), **args)


def _fields(tbs: bytes) -> list[bytes]:
    """Decode the length-prefixed encoding (the test's own reader, to prove it is injective)."""
    out, i = [], 0
    while i < len(tbs):
        n = int.from_bytes(tbs[i : i + 4], "big")
        out.append(tbs[i + 4 : i + 4 + n])
        i += 4 + n
        assert i <= len(tbs)
    return out


# --- encoding -----------------------------------------------------------------------------


def test_encoding_layout() -> None:
    tbs = _challenge().to_be_signed()
    assert tbs.startswith(len(PURPOSE).to_bytes(4, "big") + b"pam_svmm login v1")
    assert _fields(tbs) == [
        b"pam_svmm login v1",
        b"vmm1",
        b"login",
        b"2025-06-01T12:00:00.000000Z",
        NONCE,
    ]


def test_encoding_is_deterministic() -> None:
    assert _challenge().to_be_signed() == _challenge().to_be_signed()


@pytest.mark.parametrize(
    "change",
    [
        {"host": "vmm2"},
        {"service": "sudo"},
        {"nonce": bytes(31) + b"\x01"},
        {"at": NOW + timedelta(microseconds=1)},
    ],
    ids=["host", "service", "nonce", "time"],
)
def test_every_field_is_bound(change: dict[str, Any]) -> None:
    assert _challenge(**change).to_be_signed() != _challenge().to_be_signed()


def test_same_instant_in_any_time_zone_encodes_the_same() -> None:
    other_zone = NOW.astimezone(timezone(timedelta(hours=5, minutes=30)))
    assert _challenge(at=other_zone).to_be_signed() == _challenge().to_be_signed()


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (("a\nb", "c"), ("a", "b\nc")),
        (("ab", "c"), ("a", "bc")),
        (("a\x00", "b"), ("a", "\x00b")),
        (("a\x00\x00\x00\x01b", "c"), ("a", "b\x00\x00\x00\x01c")),
        (("a|b", "c"), ("a", "b|c")),
    ],
)
def test_host_service_boundaries_cannot_collide(a: tuple[str, str], b: tuple[str, str]) -> None:
    ta = _challenge(host=a[0], service=a[1]).to_be_signed()
    tb = _challenge(host=b[0], service=b[1]).to_be_signed()
    assert ta != tb
    assert _fields(ta)[1:3] == [a[0].encode(), a[1].encode()]


def test_encoding_is_injective_over_tricky_values() -> None:
    parts = ["a", "b", "a\nb", "\n", "\x00", "\x00\x00\x00\x04", "é", "login", "a:b", "x" * 300]
    nonces = [NONCE, NONCE[:16], NONCE + b"\n"]
    times = [NOW, NOW + timedelta(microseconds=1)]
    seen: dict[bytes, tuple[object, ...]] = {}
    for host, service, nonce, at in itertools.product(parts, parts, nonces, times):
        tbs = _challenge(host=host, service=service, nonce=nonce, at=at).to_be_signed()
        assert tbs not in seen, (host, service, nonce, at, seen.get(tbs))
        seen[tbs] = (host, service, nonce, at)
        assert _fields(tbs)[1:3] == [host.encode(), service.encode()]
        assert _fields(tbs)[4] == nonce


@pytest.mark.parametrize(
    "bad",
    [
        {"host": ""},
        {"service": ""},
        {"host": "\udc80"},
        {"nonce": bytes(15)},
        {"at": datetime(2025, 6, 1, 12, 0)},
    ],
    ids=["empty-host", "empty-service", "surrogate", "short-nonce", "naive-time"],
)
def test_invalid_challenges_are_refused(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        _challenge(**bad)


def test_new_challenge_copies_the_nonce() -> None:
    buf = bytearray(NONCE)
    c = _challenge(nonce=buf)
    buf[0] ^= 0xFF
    assert c.nonce == NONCE
    assert isinstance(c.nonce, bytes)


# --- freshness ----------------------------------------------------------------------------

MAX_AGE = timedelta(seconds=60)


@pytest.mark.parametrize(
    ("at", "reason"),
    [
        (NOW, None),
        (NOW + MAX_AGE, None),
        (NOW + MAX_AGE + timedelta(microseconds=1), "challenge_expired"),
        (NOW + timedelta(days=1), "challenge_expired"),
        (NOW - timedelta(microseconds=1), "challenge_from_future"),
    ],
    ids=["issued-now", "exactly-max-age", "just-too-old", "a-day-old", "from-future"],
)
def test_check_fresh(at: datetime, reason: str | None) -> None:
    c = _challenge()
    if reason is None:
        check_fresh(c, at, MAX_AGE)
    else:
        with pytest.raises(ProofOfPossessionFailed) as e:
            check_fresh(c, at, MAX_AGE)
        assert e.value.reason == reason


@pytest.mark.parametrize(
    ("at", "max_age"),
    [(datetime(2025, 6, 1, 12, 0), MAX_AGE), (NOW, timedelta(0)), (NOW, -MAX_AGE)],
)
def test_check_fresh_programming_errors(at: datetime, max_age: timedelta) -> None:
    with pytest.raises(ValueError):
        check_fresh(_challenge(), at, max_age)


# --- proof of possession ------------------------------------------------------------------


def _sign(key_kind: str, scheme: SignatureScheme, data: bytes, slot: int = 0) -> bytes:
    k = key(key_kind, slot)
    if isinstance(k, rsa.RSAPrivateKey):
        if scheme is S.RSA_PSS_SHA256:
            pad: padding.AsymmetricPadding = padding.PSS(
                mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.DIGEST_LENGTH
            )
        else:
            pad = padding.PKCS1v15()
        return k.sign(data, pad, hashes.SHA256())
    assert isinstance(k, ec.EllipticCurvePrivateKey)
    h = hashes.SHA384() if scheme is S.ECDSA_SHA384 else hashes.SHA256()
    return k.sign(data, ec.ECDSA(h))


def _cert(key_kind: str) -> Any:
    return pki().leaf(key_kind=key_kind).cert


DATA = _challenge().to_be_signed()

GOOD = [
    ("rsa2048", S.RSA_PKCS1_SHA256),
    ("rsa2048", S.RSA_PSS_SHA256),
    ("p256", S.ECDSA_SHA256),
    ("p256", S.ECDSA_SHA384),
    ("p384", S.ECDSA_SHA384),
    ("p384", S.ECDSA_SHA256),
]


@pytest.mark.parametrize(("key_kind", "scheme"), GOOD)
def test_valid_signature_proves_possession(key_kind: str, scheme: SignatureScheme) -> None:
    verify_possession(_cert(key_kind), scheme, DATA, _sign(key_kind, scheme, DATA))


def test_pss_with_any_salt_length_verifies() -> None:
    sig = key("rsa2048").sign(
        DATA,
        padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.MAX_LENGTH),
        hashes.SHA256(),
    )
    verify_possession(_cert("rsa2048"), S.RSA_PSS_SHA256, DATA, sig)


OTHER_DATA = _challenge(nonce=bytes(32)).to_be_signed()

BAD: list[tuple[str, str, SignatureScheme, bytes, str]] = [
    # (id, cert key kind, scheme claimed, signature, reason)
    *(
        (
            f"other-challenge-{k}-{s.value}",
            k,
            s,
            _sign(k, s, OTHER_DATA),
            "proof_of_possession_failed",
        )
        for k, s in GOOD
    ),
    *(
        (f"other-key-{k}-{s.value}", k, s, _sign(k, s, DATA, slot=1), "proof_of_possession_failed")
        for k, s in GOOD
    ),
    (
        "pkcs1-claimed-as-pss",
        "rsa2048",
        S.RSA_PSS_SHA256,
        _sign("rsa2048", S.RSA_PKCS1_SHA256, DATA),
        "proof_of_possession_failed",
    ),
    (
        "pss-claimed-as-pkcs1",
        "rsa2048",
        S.RSA_PKCS1_SHA256,
        _sign("rsa2048", S.RSA_PSS_SHA256, DATA),
        "proof_of_possession_failed",
    ),
    (
        "sha256-claimed-as-sha384",
        "p256",
        S.ECDSA_SHA384,
        _sign("p256", S.ECDSA_SHA256, DATA),
        "proof_of_possession_failed",
    ),
    ("empty-rsa", "rsa2048", S.RSA_PKCS1_SHA256, b"", "proof_of_possession_failed"),
    ("empty-ec", "p256", S.ECDSA_SHA256, b"", "proof_of_possession_failed"),
    (
        "garbage-ec",
        "p256",
        S.ECDSA_SHA256,
        b"\x30\x06\x02\x01\x01\x02\x01",
        "proof_of_possession_failed",
    ),
    (
        "truncated-rsa",
        "rsa2048",
        S.RSA_PKCS1_SHA256,
        _sign("rsa2048", S.RSA_PKCS1_SHA256, DATA)[:-1],
        "proof_of_possession_failed",
    ),
    # A valid signature in the wrong family never gets as far as verifying.
    (
        "ecdsa-scheme-rsa-cert",
        "rsa2048",
        S.ECDSA_SHA256,
        _sign("p256", S.ECDSA_SHA256, DATA),
        "scheme_mismatch",
    ),
    (
        "rsa-scheme-ec-cert",
        "p256",
        S.RSA_PKCS1_SHA256,
        _sign("rsa2048", S.RSA_PKCS1_SHA256, DATA),
        "scheme_mismatch",
    ),
    (
        "pss-scheme-ec-cert",
        "p384",
        S.RSA_PSS_SHA256,
        _sign("p384", S.ECDSA_SHA256, DATA),
        "scheme_mismatch",
    ),
]


@pytest.mark.parametrize(
    ("key_kind", "scheme", "signature", "reason"), [b[1:] for b in BAD], ids=[b[0] for b in BAD]
)
def test_bad_signature_is_refused(
    key_kind: str, scheme: SignatureScheme, signature: bytes, reason: str
) -> None:
    with pytest.raises(ProofOfPossessionFailed) as e:
        verify_possession(_cert(key_kind), scheme, DATA, signature)
    assert e.value.reason == reason


def test_unsupported_key_type_is_refused() -> None:
    sig = key("ed25519").sign(DATA)  # type: ignore[call-arg]
    for scheme in S:
        with pytest.raises(ProofOfPossessionFailed) as e:
            verify_possession(_cert("ed25519"), scheme, DATA, sig)
        assert e.value.reason == "unsupported_key"
