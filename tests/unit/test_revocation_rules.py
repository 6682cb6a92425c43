"""The revocation rule table and OCSP response evaluation (pure, fixed clock)."""

from __future__ import annotations

import itertools
from datetime import timedelta

import pytest
from certfactory import NOW, Issued, make_ca, make_leaf, pki
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp
from cryptography.x509.oid import ExtendedKeyUsageOID

from pam_svmm.config import RevocationRule
from pam_svmm.domain.revocation import (
    CrlEntry,
    Decision,
    Outcome,
    RevocationResult,
    RevocationStatus,
    build_ocsp_request,
    decide,
    evaluate_crl,
    evaluate_ocsp,
    rule_for,
)
from pam_svmm.errors import AuthFailed, CertificateRevoked, RevocationUnknown, Undecided

G = RevocationResult(RevocationStatus.GOOD, "ocsp", "good")
R = RevocationResult(
    RevocationStatus.REVOKED, "crl", "listed", revoked_at=NOW, reason="keyCompromise"
)
U = RevocationResult(RevocationStatus.UNKNOWN, "ocsp", "responder down")
U2 = RevocationResult(RevocationStatus.UNKNOWN, "crl", "stale CRL")

REQUIRE, SOFT, OFF = RevocationRule.REQUIRE, RevocationRule.SOFT_FAIL, RevocationRule.OFF

# (results) -> expected outcome per rule: an Outcome, or the error class raised.
TABLE: list[tuple[tuple[RevocationResult, ...], dict[RevocationRule, object]]] = [
    ((), {REQUIRE: RevocationUnknown, SOFT: Outcome.SOFT_FAILED, OFF: Outcome.NOT_CHECKED}),
    ((G,), {REQUIRE: Outcome.GOOD, SOFT: Outcome.GOOD, OFF: Outcome.NOT_CHECKED}),
    ((U,), {REQUIRE: RevocationUnknown, SOFT: Outcome.SOFT_FAILED, OFF: Outcome.NOT_CHECKED}),
    ((U, U2), {REQUIRE: RevocationUnknown, SOFT: Outcome.SOFT_FAILED, OFF: Outcome.NOT_CHECKED}),
    ((U, G), {REQUIRE: Outcome.GOOD, SOFT: Outcome.GOOD, OFF: Outcome.NOT_CHECKED}),
    ((G, U), {REQUIRE: Outcome.GOOD, SOFT: Outcome.GOOD, OFF: Outcome.NOT_CHECKED}),
    # A known revocation is never ignored, whatever the rule and whatever else was said.
    ((R,), {REQUIRE: CertificateRevoked, SOFT: CertificateRevoked, OFF: CertificateRevoked}),
    ((U, R), {REQUIRE: CertificateRevoked, SOFT: CertificateRevoked, OFF: CertificateRevoked}),
    ((G, R), {REQUIRE: CertificateRevoked, SOFT: CertificateRevoked, OFF: CertificateRevoked}),
    ((R, G), {REQUIRE: CertificateRevoked, SOFT: CertificateRevoked, OFF: CertificateRevoked}),
]


def test_table_covers_every_rule() -> None:
    for _, expected in TABLE:
        assert set(expected) == set(RevocationRule)


@pytest.mark.parametrize(
    ("rule", "results", "expected"),
    [(rule, results, exp[rule]) for results, exp in TABLE for rule in RevocationRule],
)
def test_decide_table(
    rule: RevocationRule, results: tuple[RevocationResult, ...], expected: object
) -> None:
    if isinstance(expected, type):
        with pytest.raises(expected) as info:  # type: ignore[call-overload]
            decide(rule, results, subject="CN=alice")
        assert "CN=alice" in info.value.message
        return
    d = decide(rule, results, subject="CN=alice")
    assert d.outcome is expected
    assert d.rule is rule
    assert d.results == results


def test_decide_errors_are_in_the_right_branch() -> None:
    with pytest.raises(AuthFailed):
        decide(REQUIRE, [R], subject="s")
    with pytest.raises(Undecided) as info:
        decide(REQUIRE, [U, U2], subject="s")
    assert "responder down" in info.value.message and "stale CRL" in info.value.message


def test_soft_fail_is_noted_for_the_audit_and_good_is_not() -> None:
    soft = decide(SOFT, [U], subject="CN=alice")
    assert "soft-fail" in soft.note and "responder down" in soft.note
    good = decide(REQUIRE, [U, G], subject="CN=alice")
    assert good.note == "" and "ocsp" in good.detail
    assert "rule off" in decide(OFF, [], subject="CN=alice").detail


# The end-entity rule for position 0 and the CA rule for every other position; every
# combination, so that reading one rule twice (pyhanko-certvalidator's bug) fails here.
@pytest.mark.parametrize(("ee", "ca"), list(itertools.product(RevocationRule, RevocationRule)))
def test_rule_for_position(ee: RevocationRule, ca: RevocationRule) -> None:
    assert rule_for(ee, ca, 0) is ee
    for position in (1, 2, 3):
        assert rule_for(ee, ca, position) is ca


@pytest.mark.parametrize(("ee", "ca"), list(itertools.product(RevocationRule, RevocationRule)))
def test_unknown_status_per_position(ee: RevocationRule, ca: RevocationRule) -> None:
    """The full path: an UNKNOWN result, decided under the rule of each position."""
    expected = {REQUIRE: RevocationUnknown, SOFT: Outcome.SOFT_FAILED, OFF: Outcome.NOT_CHECKED}
    for position, rule in ((0, ee), (1, ca), (2, ca)):
        chosen = rule_for(ee, ca, position)
        assert chosen is rule
        want = expected[rule]
        if isinstance(want, type):
            with pytest.raises(want):
                decide(chosen, [U], subject="s")
        else:
            assert decide(chosen, [U], subject="s").outcome is want


# --- CRL answers ---------------------------------------------------------------------------

NU = NOW + timedelta(hours=1)


def _crl(entry: CrlEntry | None, *, at=NOW, next_update=NU, grace=0.0) -> RevocationResult:  # type: ignore[no-untyped-def]
    return evaluate_crl(
        entry,
        this_update=NOW - timedelta(hours=1),
        next_update=next_update,
        at=at,
        skew=60,
        grace=grace,
        source="test",
    )


def test_crl_fresh_answers() -> None:
    assert _crl(None).status is RevocationStatus.GOOD
    r = _crl(CrlEntry(5, NOW, x509.ReasonFlags.key_compromise))
    assert r.status is RevocationStatus.REVOKED and r.reason == "keyCompromise"


def test_crl_stale_is_never_good_but_a_listed_serial_is_still_revoked() -> None:
    late = NU + timedelta(seconds=1)
    assert _crl(None, at=late).status is RevocationStatus.UNKNOWN
    assert "stale" in _crl(None, at=late).detail
    assert _crl(None, at=late, grace=10).status is RevocationStatus.GOOD
    assert _crl(None, next_update=None).status is RevocationStatus.UNKNOWN
    revoked = CrlEntry(5, NOW, x509.ReasonFlags.key_compromise)
    assert _crl(revoked, at=late).status is RevocationStatus.REVOKED
    on_hold = CrlEntry(5, NOW, x509.ReasonFlags.certificate_hold)
    assert _crl(on_hold, at=late).status is RevocationStatus.UNKNOWN
    assert _crl(on_hold).status is RevocationStatus.REVOKED


def test_crl_from_the_future_is_unknown() -> None:
    assert _crl(None, at=NOW - timedelta(hours=2)).status is RevocationStatus.UNKNOWN


# --- OCSP ----------------------------------------------------------------------------------

P = pki("p256", "p256")
ALICE = make_leaf(P.intermediate, cn="alice")
NONCE = b"\x01" * 16
OCSP_SIGNING = ExtendedKeyUsageOID.OCSP_SIGNING


def _delegate(issuer: Issued, *, eku=(OCSP_SIGNING,), slot: int = 7, **kw) -> Issued:  # type: ignore[no-untyped-def]
    return make_leaf(issuer, cn="OCSP responder", eku=eku, slot=slot, **kw)


def _response(
    *,
    cert: x509.Certificate = ALICE.cert,
    issuer: Issued = P.intermediate,
    signer: Issued | None = None,
    include: bool = True,
    status: ocsp.OCSPCertStatus = ocsp.OCSPCertStatus.GOOD,
    this_update=NOW - timedelta(minutes=1),  # type: ignore[no-untyped-def]
    next_update=NOW + timedelta(hours=1),  # type: ignore[no-untyped-def]
    nonce: bytes | None = NONCE,
    other_cert: bool = False,
) -> bytes:
    signer = signer or issuer
    subject = make_leaf(issuer, cn="other", slot=3).cert if other_cert else cert
    b = ocsp.OCSPResponseBuilder().add_response(
        cert=subject,
        issuer=issuer.cert,
        algorithm=hashes.SHA1(),  # noqa: S303 (the CertID hash)
        cert_status=status,
        this_update=this_update,
        next_update=next_update,
        revocation_time=NOW - timedelta(days=1) if status is ocsp.OCSPCertStatus.REVOKED else None,
        revocation_reason=(
            x509.ReasonFlags.key_compromise if status is ocsp.OCSPCertStatus.REVOKED else None
        ),
    )
    b = b.responder_id(ocsp.OCSPResponderEncoding.HASH, signer.cert)
    if include and signer is not issuer:
        b = b.certificates([signer.cert])
    if nonce is not None:
        b = b.add_extension(x509.OCSPNonce(nonce), critical=False)
    resp = b.sign(signer.key, hashes.SHA256())
    return resp.public_bytes(serialization.Encoding.DER)


def _eval(
    der: bytes,
    *,
    nonce: bytes | None = NONCE,
    at=NOW,
    max_age: float = 3600,  # type: ignore[no-untyped-def]
    trusted=(),
) -> RevocationResult:
    return evaluate_ocsp(
        der,
        ALICE.cert,
        P.intermediate.cert,
        nonce=nonce,
        at=at,
        skew=300,
        max_age=max_age,
        trusted_responders=trusted,
    )


def test_ocsp_good_signed_by_issuer() -> None:
    r = _eval(_response())
    assert r.status is RevocationStatus.GOOD and r.method == "ocsp"


def test_ocsp_good_signed_by_delegated_responder() -> None:
    r = _eval(_response(signer=_delegate(P.intermediate)))
    assert r.status is RevocationStatus.GOOD


def test_ocsp_revoked() -> None:
    r = _eval(_response(status=ocsp.OCSPCertStatus.REVOKED))
    assert r.status is RevocationStatus.REVOKED
    assert r.reason == "keyCompromise" and r.revoked_at == NOW - timedelta(days=1)


def test_ocsp_unknown_status() -> None:
    r = _eval(_response(status=ocsp.OCSPCertStatus.UNKNOWN))
    assert r.status is RevocationStatus.UNKNOWN and "does not know" in r.detail


def test_ocsp_answer_for_another_serial() -> None:
    r = _eval(_response(other_cert=True))
    assert r.status is RevocationStatus.UNKNOWN and "exactly one" in r.detail


def test_ocsp_wrong_nonce() -> None:
    r = _eval(_response(nonce=b"\x02" * 16))
    assert r.status is RevocationStatus.UNKNOWN and "nonce does not match" in r.detail


def test_ocsp_missing_nonce_when_we_sent_one() -> None:
    r = _eval(_response(nonce=None))
    assert r.status is RevocationStatus.UNKNOWN and "omitted the nonce" in r.detail
    # Without a nonce in the request, none is expected.
    assert _eval(_response(nonce=None), nonce=None).status is RevocationStatus.GOOD


def test_ocsp_expired_next_update() -> None:
    der = _response(this_update=NOW - timedelta(hours=3), next_update=NOW - timedelta(hours=1))
    r = _eval(der)
    assert r.status is RevocationStatus.UNKNOWN and "expired" in r.detail
    # Within the clock skew it still counts.
    der = _response(next_update=NOW - timedelta(seconds=100))
    assert _eval(der).status is RevocationStatus.GOOD


def test_ocsp_future_this_update() -> None:
    r = _eval(_response(this_update=NOW + timedelta(hours=1), next_update=NOW + timedelta(hours=2)))
    assert r.status is RevocationStatus.UNKNOWN and "future" in r.detail


def test_ocsp_without_next_update_uses_max_age() -> None:
    der = _response(this_update=NOW - timedelta(hours=2), next_update=None)
    assert _eval(der).status is RevocationStatus.UNKNOWN
    assert "too old" in _eval(der).detail
    assert _eval(der, max_age=3 * 3600).status is RevocationStatus.GOOD


def test_ocsp_signed_by_unrelated_key() -> None:
    stranger = make_ca("Stranger CA", slot=50)
    r = _eval(_response(signer=stranger, include=False))
    assert r.status is RevocationStatus.UNKNOWN and "not signed by" in r.detail
    # Including the stranger's certificate does not help: it is not issued by the issuer.
    r = _eval(_response(signer=stranger))
    assert r.status is RevocationStatus.UNKNOWN


def test_ocsp_signed_by_configured_trusted_responder() -> None:
    stranger = make_ca("Trusted Responder", slot=51)
    der = _response(signer=stranger, include=False)
    assert _eval(der, trusted=(stranger.cert,)).status is RevocationStatus.GOOD


def test_ocsp_delegate_without_ocsp_signing_eku() -> None:
    r = _eval(_response(signer=_delegate(P.intermediate, eku=(ExtendedKeyUsageOID.CLIENT_AUTH,))))
    assert r.status is RevocationStatus.UNKNOWN and "OCSPSigning" in r.detail
    r = _eval(_response(signer=_delegate(P.intermediate, eku=None)))
    assert r.status is RevocationStatus.UNKNOWN and "OCSPSigning" in r.detail


def test_ocsp_delegate_not_issued_by_the_issuer() -> None:
    other_ca = make_ca("Other CA", slot=52)
    r = _eval(_response(signer=_delegate(other_ca)))
    assert r.status is RevocationStatus.UNKNOWN and "not issued by" in r.detail
    # A delegate of the root cannot answer for the intermediate's certificates either.
    r = _eval(_response(signer=_delegate(P.root)))
    assert r.status is RevocationStatus.UNKNOWN and "not issued by" in r.detail


def test_ocsp_delegate_expired() -> None:
    d = _delegate(
        P.intermediate, not_before=NOW - timedelta(days=10), not_after=NOW - timedelta(days=1)
    )
    r = _eval(_response(signer=d))
    assert r.status is RevocationStatus.UNKNOWN and "not valid" in r.detail


def test_ocsp_tampered_response() -> None:
    der = bytearray(_response(signer=_delegate(P.intermediate)))
    # Change the producedAt time inside the signed data (found by its exact text, not by
    # searching for a byte that random serials and key hashes may also contain).
    produced = ocsp.load_der_ocsp_response(bytes(der)).produced_at_utc
    stamp = produced.strftime("%Y%m%d%H%M%SZ").encode()
    i = der.find(stamp)
    assert i > 0  # producedAt (and maybe an equal thisUpdate): both are signed
    last_digit = i + len(stamp) - 2
    der[last_digit] = ord("0") if der[last_digit] != ord("0") else ord("1")
    r = _eval(bytes(der))
    assert r.status is RevocationStatus.UNKNOWN and "signature does not verify" in r.detail


def test_ocsp_error_status_and_garbage() -> None:
    unauthorized = ocsp.OCSPResponseBuilder.build_unsuccessful(
        ocsp.OCSPResponseStatus.UNAUTHORIZED
    ).public_bytes(serialization.Encoding.DER)
    r = _eval(unauthorized)
    assert r.status is RevocationStatus.UNKNOWN and "unauthorized" in r.detail
    assert _eval(b"not der").status is RevocationStatus.UNKNOWN
    assert _eval(b"").status is RevocationStatus.UNKNOWN


def test_build_ocsp_request_carries_the_cert_id_and_nonce() -> None:
    req = ocsp.load_der_ocsp_request(build_ocsp_request(ALICE.cert, P.intermediate.cert, NONCE))
    assert req.serial_number == ALICE.cert.serial_number
    assert req.extensions.get_extension_for_class(x509.OCSPNonce).value.nonce == NONCE
    req = ocsp.load_der_ocsp_request(build_ocsp_request(ALICE.cert, P.intermediate.cert, None))
    assert len(req.extensions) == 0


def test_decision_is_frozen() -> None:
    d = decide(SOFT, [U], subject="s")
    assert isinstance(d, Decision)
    with pytest.raises(AttributeError):
        d.outcome = Outcome.GOOD  # type: ignore[misc]
