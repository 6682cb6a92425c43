"""RevocationChecker: which rule applies where, method order, fallbacks (no network)."""

from __future__ import annotations

import itertools
from datetime import timedelta
from pathlib import Path

import pytest
from certfactory import NOW, Issued, make_crl, make_leaf, pki
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509 import ocsp

from pam_svmm.adapters.crl_store import CrlStore
from pam_svmm.config import RevocationConfig, RevocationMethod, RevocationRule
from pam_svmm.domain.revocation import Outcome
from pam_svmm.errors import CertificateRevoked, FetchError, RevocationUnknown
from pam_svmm.services.revocation import RevocationChecker, crl_urls, ocsp_urls

P = pki("p256", "p256")
LEAF = make_leaf(P.intermediate, cn="alice")
CHAIN = [LEAF.cert, P.intermediate.cert, P.root.cert]
OCSP, CRL = RevocationMethod.OCSP, RevocationMethod.CRL
REQUIRE, SOFT, OFF = RevocationRule.REQUIRE, RevocationRule.SOFT_FAIL, RevocationRule.OFF


class OcspStub:
    """Answers OCSP requests like a responder signing with the issuer's key."""

    def __init__(self, issuers: dict[bytes, Issued], *, revoked: set[int] = frozenset()) -> None:  # type: ignore[assignment]
        self.issuers = issuers  # issuer key hash -> CA
        self.revoked = revoked
        self.posts = 0
        self.down = False

    def get(self, url: str, *, max_bytes: int, timeout: float) -> bytes:
        raise FetchError(f"{url}: no CRL server here")

    def post(
        self, url: str, body: bytes, *, content_type: str, max_bytes: int, timeout: float
    ) -> bytes:
        self.posts += 1
        if self.down:
            raise FetchError(f"{url}: connection refused")
        req = ocsp.load_der_ocsp_request(body)
        ca = self.issuers[req.issuer_key_hash]
        cert = next(c for c in CHAIN if c.serial_number == req.serial_number)
        revoked = req.serial_number in self.revoked
        b = (
            ocsp.OCSPResponseBuilder()
            .add_response(
                cert=cert,
                issuer=ca.cert,
                algorithm=hashes.SHA1(),  # noqa: S303 (CertID)
                cert_status=ocsp.OCSPCertStatus.REVOKED if revoked else ocsp.OCSPCertStatus.GOOD,
                this_update=NOW - timedelta(minutes=1),
                next_update=NOW + timedelta(hours=1),
                revocation_time=NOW - timedelta(days=1) if revoked else None,
                revocation_reason=None,
            )
            .responder_id(ocsp.OCSPResponderEncoding.HASH, ca.cert)
        )
        for ext in req.extensions:
            b = b.add_extension(ext.value, critical=ext.critical)
        return b.sign(ca.key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def key_hash(ca: Issued) -> bytes:
    return x509.SubjectKeyIdentifier.from_public_key(ca.key.public_key()).digest  # type: ignore[arg-type]


@pytest.fixture
def crl_files(tmp_path: Path) -> dict[str, Path]:
    files = {"inter": tmp_path / "inter.crl", "root": tmp_path / "root.crl"}
    files["inter"].write_bytes(make_crl(P.intermediate, {}))
    files["root"].write_bytes(make_crl(P.root, {}))
    return files


def checker(
    tmp_path: Path,
    *,
    ee: RevocationRule,
    ca: RevocationRule,
    files: list[Path],
    methods=(CRL,),
    fetcher=None,
    ocsp_reuse: float = 0.0,
    clock=lambda: NOW,
) -> RevocationChecker:  # type: ignore[no-untyped-def]
    cfg = RevocationConfig(
        end_entity=ee,
        ca=ca,
        methods=methods,
        crl_files=tuple(files),
        crl_fetch=False,
        cache_dir=tmp_path / "cache",
        ocsp_responder="http://ocsp.invalid/",
        ocsp_reuse=ocsp_reuse,
    )
    fetcher = fetcher or OcspStub({})
    store = CrlStore(cfg.cache_dir, skew=cfg.clock_skew)
    return RevocationChecker(cfg, fetcher=fetcher, store=store, clock=clock)


@pytest.mark.parametrize(("ee", "ca"), list(itertools.product(RevocationRule, RevocationRule)))
def test_each_position_gets_its_own_rule(
    tmp_path: Path, ee: RevocationRule, ca: RevocationRule, crl_files: dict[str, Path]
) -> None:
    """Only the end entity's CRL is at hand: the leaf is GOOD, the intermediate UNKNOWN."""
    c = checker(tmp_path, ee=ee, ca=ca, files=[crl_files["inter"]])
    if ca is REQUIRE:
        with pytest.raises(RevocationUnknown) as info:
            c.check(CHAIN)
        assert "Issuing CA" in info.value.message
        return
    out = c.check(CHAIN)
    assert [cert for cert, _ in out] == CHAIN[:2]  # the anchor is not checked
    leaf_d, inter_d = out[0][1], out[1][1]
    assert leaf_d.rule is ee and inter_d.rule is ca
    assert leaf_d.outcome is (Outcome.NOT_CHECKED if ee is OFF else Outcome.GOOD)
    assert inter_d.outcome is (Outcome.NOT_CHECKED if ca is OFF else Outcome.SOFT_FAILED)


@pytest.mark.parametrize(("ee", "ca"), list(itertools.product(RevocationRule, RevocationRule)))
def test_mirror_only_the_ca_crl_at_hand(
    tmp_path: Path, ee: RevocationRule, ca: RevocationRule, crl_files: dict[str, Path]
) -> None:
    c = checker(tmp_path, ee=ee, ca=ca, files=[crl_files["root"]])
    if ee is REQUIRE:
        with pytest.raises(RevocationUnknown) as info:
            c.check(CHAIN)
        assert "alice" in info.value.message
        return
    out = c.check(CHAIN)
    assert out[0][1].outcome is (Outcome.NOT_CHECKED if ee is OFF else Outcome.SOFT_FAILED)
    assert out[1][1].outcome is (Outcome.NOT_CHECKED if ca is OFF else Outcome.GOOD)


def test_revoked_intermediate_fails_under_soft_fail(
    tmp_path: Path, crl_files: dict[str, Path]
) -> None:
    crl_files["root"].write_bytes(make_crl(P.root, {P.intermediate.cert.serial_number: None}))
    c = checker(tmp_path, ee=REQUIRE, ca=SOFT, files=list(crl_files.values()))
    with pytest.raises(CertificateRevoked) as info:
        c.check(CHAIN)
    assert "Issuing CA" in info.value.message


def test_ocsp_first_then_crl_when_ocsp_is_down(tmp_path: Path, crl_files: dict[str, Path]) -> None:
    stub = OcspStub({key_hash(P.intermediate): P.intermediate, key_hash(P.root): P.root})
    c = checker(
        tmp_path,
        ee=REQUIRE,
        ca=REQUIRE,
        files=list(crl_files.values()),
        methods=(OCSP, CRL),
        fetcher=stub,
    )
    out = c.check(CHAIN)
    assert all("ocsp" in d.detail for _, d in out) and stub.posts == 2
    stub.down = True
    out = c.check(CHAIN)
    assert all(d.outcome is Outcome.GOOD and "crl" in d.detail for _, d in out)
    assert [r.method for r in out[0][1].results] == ["ocsp", "crl"]


def test_crl_first_skips_ocsp_when_the_crl_answers(
    tmp_path: Path, crl_files: dict[str, Path]
) -> None:
    stub = OcspStub({key_hash(P.intermediate): P.intermediate})
    c = checker(
        tmp_path,
        ee=REQUIRE,
        ca=OFF,
        files=list(crl_files.values()),
        methods=(CRL, OCSP),
        fetcher=stub,
    )
    c.check(CHAIN)
    assert stub.posts == 0


def test_ocsp_revoked_stops_the_login(tmp_path: Path, crl_files: dict[str, Path]) -> None:
    stub = OcspStub({key_hash(P.intermediate): P.intermediate}, revoked={LEAF.cert.serial_number})
    c = checker(
        tmp_path, ee=SOFT, ca=OFF, files=list(crl_files.values()), methods=(OCSP, CRL), fetcher=stub
    )
    with pytest.raises(CertificateRevoked):
        c.check(CHAIN)


def test_spent_budget_asks_nobody(tmp_path: Path) -> None:
    stub = OcspStub({key_hash(P.intermediate): P.intermediate})
    c = checker(tmp_path, ee=SOFT, ca=OFF, files=[], methods=(OCSP,), fetcher=stub)
    out = c.check(CHAIN, budget=0)
    assert stub.posts == 0 and out[0][1].outcome is Outcome.SOFT_FAILED
    assert "time budget" in out[0][1].note


def test_a_resident_checker_reuses_ocsp_answers_within_reuse_and_validity(
    tmp_path: Path,
) -> None:
    """svmmd's checker: the second login within ocsp_reuse asks nobody; past it, or past the
    response's nextUpdate (NOW + 1 h), the responder is asked again; unknown is never kept."""
    now = [NOW]
    stub = OcspStub({key_hash(P.intermediate): P.intermediate})
    c = checker(
        tmp_path, ee=REQUIRE, ca=OFF, files=[], methods=(OCSP,), fetcher=stub,
        ocsp_reuse=600, clock=lambda: now[0],
    )  # fmt: skip
    c.check(CHAIN)
    out = c.check(CHAIN)
    assert stub.posts == 1 and "asked" in out[0][1].results[0].detail
    now[0] = NOW + timedelta(seconds=601)  # past ocsp_reuse
    c.check(CHAIN)
    assert stub.posts == 2
    # A revocation published now is seen once the reuse window ends, not before.
    stub.revoked = {LEAF.cert.serial_number}
    now[0] = NOW + timedelta(seconds=900)
    c.check(CHAIN)  # reused (asked at +601 s)
    assert stub.posts == 2
    now[0] = NOW + timedelta(seconds=1202)
    with pytest.raises(CertificateRevoked):
        c.check(CHAIN)
    assert stub.posts == 3
    with pytest.raises(CertificateRevoked):  # a revoked answer is kept too
        c.check(CHAIN)
    assert stub.posts == 3


def test_ocsp_answers_are_not_reused_past_next_update(tmp_path: Path) -> None:
    now = [NOW]
    stub = OcspStub({key_hash(P.intermediate): P.intermediate})
    c = checker(
        tmp_path, ee=SOFT, ca=OFF, files=[], methods=(OCSP,), fetcher=stub,
        ocsp_reuse=86400, clock=lambda: now[0],
    )  # fmt: skip
    c.check(CHAIN)
    now[0] = NOW + timedelta(minutes=59)
    c.check(CHAIN)
    assert stub.posts == 1
    now[0] = NOW + timedelta(minutes=61)  # the response's nextUpdate has passed
    stub.down = True
    out = c.check(CHAIN)
    assert stub.posts == 2 and out[0][1].outcome is Outcome.SOFT_FAILED
    stub.down = False
    c.check(CHAIN)  # an unknown answer was not kept: asked again
    assert stub.posts == 3


def test_urls_from_extensions() -> None:
    from svmm_lab.pki import LabCA

    assert ocsp_urls(LEAF.cert) == [] and crl_urls(LEAF.cert) == []
    ca = LabCA.__new__(LabCA)
    ca.crl_base, ca.ocsp_url = "http://127.0.0.1:1", "http://127.0.0.1:2/"
    dp = ca._crl_dp("x.crl")
    aia = ca._aia()
    cert = (
        x509.CertificateBuilder()
        .subject_name(LEAF.cert.subject)
        .issuer_name(LEAF.cert.issuer)
        .public_key(LEAF.cert.public_key())  # type: ignore[arg-type]
        .serial_number(5)
        .not_valid_before(NOW)
        .not_valid_after(NOW + timedelta(days=1))
        .add_extension(dp, critical=False)
        .add_extension(aia, critical=False)
        .sign(P.intermediate.key, hashes.SHA256())
    )
    assert crl_urls(cert) == ["http://127.0.0.1:1/x.crl"]
    assert ocsp_urls(cert) == ["http://127.0.0.1:2/"]


# A CA-only CRL (an ARL) says nothing about end entities, a user-only CRL nothing about CAs.
_CA_ONLY = x509.IssuingDistributionPoint(None, None, False, True, None, False, False)
_USER_ONLY = x509.IssuingDistributionPoint(None, None, True, False, None, False, False)


@pytest.mark.parametrize(
    ("inter_scope", "root_scope", "who"),
    [(_CA_ONLY, None, "alice"), (None, _USER_ONLY, "Issuing CA")],
    ids=["CA-only CRL for the leaf", "user-only CRL for the intermediate"],
)
def test_a_crl_that_does_not_cover_the_certificate_could_not_decide_under_require(
    tmp_path: Path,
    crl_files: dict[str, Path],
    inter_scope: x509.IssuingDistributionPoint | None,
    root_scope: x509.IssuingDistributionPoint | None,
    who: str,
) -> None:
    for name, ca, scope in (("inter", P.intermediate, inter_scope), ("root", P.root, root_scope)):
        exts = [(scope, True)] if scope else []
        crl_files[name].write_bytes(make_crl(ca, {}, extensions=exts))
    c = checker(tmp_path, ee=REQUIRE, ca=REQUIRE, files=list(crl_files.values()))
    with pytest.raises(RevocationUnknown) as info:
        c.check(CHAIN)
    assert who in info.value.message and "does not cover" in info.value.message
    # Under soft-fail it is accepted, and the audit note says why.
    soft = checker(tmp_path, ee=SOFT, ca=SOFT, files=list(crl_files.values())).check(CHAIN)
    assert any(d.outcome is Outcome.SOFT_FAILED and "does not cover" in d.note for _, d in soft)
