"""The CRL store: signature checks, the on-disk index, freshness, and safe file handling."""

from __future__ import annotations

import json
import os
import random
import stat
from datetime import timedelta
from pathlib import Path

import pytest
from certfactory import NOW, make_ca, make_crl, make_leaf, pki
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from pam_svmm.adapters import crl_store
from pam_svmm.adapters.crl_store import CrlStore, index_name
from pam_svmm.domain.revocation import RevocationStatus
from pam_svmm.errors import ConfigError, FetchError, RevocationUnknown

P = pki("p256", "p256")
ISSUER = P.intermediate
MAX_SERIAL = (1 << 159) - 1  # the largest serial a 20-octet DER INTEGER holds


def leaf_with_serial(serial: int) -> x509.Certificate:
    """A certificate of ISSUER with a chosen serial (only the serial matters to the store)."""
    base = make_leaf(ISSUER).cert
    return (
        x509.CertificateBuilder()
        .subject_name(base.subject)
        .issuer_name(base.issuer)
        .public_key(base.public_key())  # type: ignore[arg-type]
        .serial_number(serial)
        .not_valid_before(base.not_valid_before_utc)
        .not_valid_after(base.not_valid_after_utc)
        .sign(ISSUER.key, hashes.SHA256())
    )


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "cache"


def store(cache: Path, **kw: object) -> CrlStore:
    return CrlStore(cache, skew=60, **kw)  # type: ignore[arg-type]


def status(s: CrlStore, serial: int, files: list[Path], *, at=NOW, urls=()) -> RevocationStatus:  # type: ignore[no-untyped-def]
    return s.check(leaf_with_serial(serial), ISSUER.cert, files=files, urls=urls, at=at).status


# --- the index answers what cryptography answers -------------------------------------------


def test_index_lookup_matches_cryptography(cache: Path) -> None:
    rng = random.Random(1234)  # noqa: S311 (reproducible test data)
    reasons = [None, *crl_store._REASON_CODES]
    revoked = {
        rng.getrandbits(rng.choice((16, 64, 159))) | 1: rng.choice(reasons) for _ in range(1500)
    }
    for edge in (1, 2, 255, 256, 1 << 64, MAX_SERIAL, MAX_SERIAL - 1, 1 << 158):
        revoked[edge] = x509.ReasonFlags.superseded
    revoked.pop(0, None)
    der = make_crl(ISSUER, revoked)
    reference = x509.load_der_x509_crl(der)
    idx = store(cache).load(der, ISSUER.cert, source="test")
    assert len(idx) == len(revoked)
    probes = list(revoked) + [rng.getrandbits(159) for _ in range(1500)]
    probes += [0, 3, MAX_SERIAL - 2, (1 << 160) - 1, 1 << 160, -5]
    for serial in probes:
        want = reference.get_revoked_certificate_by_serial_number(serial) if serial >= 0 else None
        got = idx.lookup(serial)
        if want is None:
            assert got is None, serial
            continue
        assert got is not None and got.serial == serial
        assert got.revoked_at == want.revocation_date_utc
        try:
            reason = want.extensions.get_extension_for_class(x509.CRLReason).value.reason
        except x509.ExtensionNotFound:
            reason = None
        assert got.reason is reason


def test_empty_crl(cache: Path) -> None:
    idx = store(cache).load(make_crl(ISSUER, {}), ISSUER.cert, source="test")
    assert len(idx) == 0 and idx.lookup(1) is None


def test_pem_crl_and_files_are_answered(cache: Path, tmp_path: Path) -> None:
    path = tmp_path / "issuing.crl"
    path.write_bytes(make_crl(ISSUER, {77: x509.ReasonFlags.key_compromise}, pem=True))
    s = store(cache)
    assert status(s, 77, [path]) is RevocationStatus.REVOKED
    assert status(s, 78, [path]) is RevocationStatus.GOOD


# --- what is refused -----------------------------------------------------------------------


def test_bad_signature_rejected(cache: Path, tmp_path: Path) -> None:
    forger = make_ca("Forger", slot=60)
    der = make_crl(ISSUER, {5: None}, signer=forger)  # right issuer name, wrong key
    with pytest.raises(RevocationUnknown) as info:
        store(cache).load(der, ISSUER.cert, source="test")
    assert "signature" in info.value.message and info.value.reason == "crl_invalid"
    path = tmp_path / "forged.crl"
    path.write_bytes(der)
    r = store(cache).check(leaf_with_serial(6), ISSUER.cert, files=[path], at=NOW)
    assert r.status is RevocationStatus.UNKNOWN and "signature" in r.detail
    assert not any(p.name.endswith(".idx") for p in cache.iterdir())


def test_wrong_issuer_rejected(cache: Path, tmp_path: Path) -> None:
    other = make_ca("Other CA", slot=61)
    der = make_crl(other, {5: None})
    with pytest.raises(RevocationUnknown) as info:
        store(cache).load(der, ISSUER.cert, source="test")
    assert "is issued by" in info.value.message
    # As a configured file it belongs to another CA: it says nothing about ISSUER's certs.
    path = tmp_path / "other.crl"
    path.write_bytes(der)
    r = store(cache).check(leaf_with_serial(6), ISSUER.cert, files=[path], at=NOW)
    assert r.status is RevocationStatus.UNKNOWN and "no CRL for" in r.detail


def test_malformed_crl_rejected(cache: Path) -> None:
    with pytest.raises(RevocationUnknown):
        store(cache).load(b"\x30\x03\x02\x01\x01", ISSUER.cert, source="test")


def test_issuer_without_crl_sign_rejected(cache: Path) -> None:
    # A certificate with the same name and key as the CA, but KU without cRLSign.
    base = ISSUER.cert
    no_crl_sign = (
        x509.CertificateBuilder()
        .subject_name(base.subject)
        .issuer_name(base.issuer)
        .public_key(base.public_key())  # type: ignore[arg-type]
        .serial_number(99)
        .not_valid_before(base.not_valid_before_utc)
        .not_valid_after(base.not_valid_after_utc)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, True, False, False, False),
            critical=True,
        )
        .sign(P.root.key, hashes.SHA256())
    )
    with pytest.raises(RevocationUnknown) as info:
        store(cache).load(make_crl(ISSUER, {}), no_crl_sign, source="test")
    assert "cRLSign" in info.value.message


# --- freshness -----------------------------------------------------------------------------


def test_stale_crl_is_unknown_not_good(cache: Path, tmp_path: Path) -> None:
    path = tmp_path / "issuing.crl"
    path.write_bytes(make_crl(ISSUER, {5: x509.ReasonFlags.key_compromise}))
    late = NOW + timedelta(hours=2)
    s = store(cache)
    r = s.check(leaf_with_serial(6), ISSUER.cert, files=[path], at=late)
    assert r.status is RevocationStatus.UNKNOWN and "stale" in r.detail
    # A revocation listed in a stale CRL still stands.
    assert status(s, 5, [path], at=late) is RevocationStatus.REVOKED
    # Within the grace period the CRL is still used.
    graced = store(cache, grace=3 * 3600)
    assert status(graced, 6, [path], at=late) is RevocationStatus.GOOD


class StubFetcher:
    """Serves fixed bytes per URL (or raises FetchError): the real HTTP is tested elsewhere."""

    def __init__(self, answers: dict[str, bytes]) -> None:
        self.answers = answers
        self.calls: list[str] = []

    def get(self, url: str, *, max_bytes: int, timeout: float) -> bytes:
        self.calls.append(url)
        if url not in self.answers:
            raise FetchError(f"{url}: connection refused")
        return self.answers[url]

    def post(self, url: str, body: bytes, **kw: object) -> bytes:
        raise FetchError(f"{url}: not here")


def test_fetched_crl_is_cached_until_stale_then_refetched(cache: Path) -> None:
    url = "http://crl.example/issuing.crl"
    fetcher = StubFetcher({url: make_crl(ISSUER, {5: None}, number=1)})
    s = store(cache, fetcher=fetcher)
    assert status(s, 6, [], urls=[url]) is RevocationStatus.GOOD
    assert status(s, 5, [], urls=[url]) is RevocationStatus.REVOKED
    assert status(store(cache, fetcher=fetcher), 6, [], urls=[url]) is RevocationStatus.GOOD
    assert fetcher.calls == [url]  # fresh on disk: no second fetch, even in a new store
    # Past nextUpdate the refetch fails: unknown, never good.
    late = NOW + timedelta(hours=2)
    fetcher.answers.clear()
    r = s.check(leaf_with_serial(6), ISSUER.cert, urls=[url], at=late)
    assert r.status is RevocationStatus.UNKNOWN
    assert "stale" in r.detail and "connection refused" in r.detail
    # The refetch succeeds with a newer CRL: its answer is used.
    fetcher.answers[url] = make_crl(
        ISSUER,
        {5: None, 6: None},
        number=2,
        this_update=late - timedelta(minutes=5),
        next_update=late + timedelta(hours=1),
    )
    assert status(s, 6, [], urls=[url], at=late) is RevocationStatus.REVOKED


def test_fetch_without_time_left_uses_cache_only(cache: Path) -> None:
    url = "http://crl.example/issuing.crl"
    fetcher = StubFetcher({url: make_crl(ISSUER, {})})
    r = store(cache, fetcher=fetcher).check(
        leaf_with_serial(6), ISSUER.cert, urls=[url], at=NOW, timeout=0
    )
    assert r.status is RevocationStatus.UNKNOWN and fetcher.calls == []


def test_older_crl_does_not_replace_newer(cache: Path) -> None:
    s = store(cache)
    newer = make_crl(ISSUER, {5: None, 6: None}, number=5)
    older = make_crl(ISSUER, {5: None}, number=4, this_update=NOW - timedelta(minutes=30))
    s.load(newer, ISSUER.cert, source="src")
    idx = s.load(older, ISSUER.cert, source="src")
    assert idx.header["crl_number"] == 5 and idx.lookup(6) is not None
    # Also in a new store (another process) reading the disk.
    idx = store(cache).load(older, ISSUER.cert, source="src")
    assert idx.header["crl_number"] == 5
    # A newer one does replace it.
    newest = make_crl(ISSUER, {}, number=6)
    assert s.load(newest, ISSUER.cert, source="src").header["crl_number"] == 6
    assert store(cache).load(older, ISSUER.cert, source="src").header["crl_number"] == 6


def test_changed_file_is_reindexed(cache: Path, tmp_path: Path) -> None:
    path = tmp_path / "issuing.crl"
    path.write_bytes(make_crl(ISSUER, {5: None}, number=1))
    s = store(cache)
    assert status(s, 6, [path]) is RevocationStatus.GOOD
    path.write_bytes(make_crl(ISSUER, {5: None, 6: None}, number=2))
    assert status(s, 6, [path]) is RevocationStatus.REVOKED
    assert status(store(cache), 6, [path]) is RevocationStatus.REVOKED


def test_warm_lookup_does_not_parse_the_crl(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "issuing.crl"
    path.write_bytes(make_crl(ISSUER, {5: None}))
    other_ca = make_ca("Other CA", slot=62)
    other = tmp_path / "other.crl"
    other.write_bytes(make_crl(other_ca, {5: None}))
    assert status(store(cache), 6, [path, other]) is RevocationStatus.GOOD

    def no_parsing(*a: object, **kw: object) -> None:
        raise AssertionError("the CRL was parsed on the warm path")

    monkeypatch.setattr(crl_store, "parse_crl", no_parsing)
    fresh = store(cache)  # as a new login process would
    assert status(fresh, 5, [path, other]) is RevocationStatus.REVOKED
    assert status(fresh, 6, [path, other]) is RevocationStatus.GOOD


# --- file safety ---------------------------------------------------------------------------


def test_files_are_0600_in_a_0700_dir(cache: Path, tmp_path: Path) -> None:
    path = tmp_path / "issuing.crl"
    path.write_bytes(make_crl(ISSUER, {5: None}))
    store(cache).check(leaf_with_serial(6), ISSUER.cert, files=[path], at=NOW)
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700
    names = os.listdir(cache)
    assert any(n.endswith(".idx") for n in names) and any(n.endswith(".stamp") for n in names)
    assert not any(n.endswith(".tmp") for n in names)
    for n in names:
        assert stat.S_IMODE((cache / n).stat().st_mode) == 0o600, n


def test_symlink_planted_at_index_path_is_not_followed(cache: Path, tmp_path: Path) -> None:
    cache.mkdir(mode=0o700)
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    link = cache / index_name(ISSUER.cert, "src")
    link.symlink_to(victim)
    idx = store(cache).load(make_crl(ISSUER, {5: None}), ISSUER.cert, source="src")
    assert idx.lookup(5) is not None
    assert victim.read_bytes() == b"precious"
    assert not link.is_symlink() and stat.S_IMODE(link.stat().st_mode) == 0o600


def test_symlink_to_a_valid_index_is_not_read(cache: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    store(elsewhere).load(make_crl(ISSUER, {5: None}), ISSUER.cert, source="src")
    cache.mkdir(mode=0o700)
    name = index_name(ISSUER.cert, "src")
    (cache / name).symlink_to(elsewhere / name)
    url = "src"
    r = store(cache).check(leaf_with_serial(5), ISSUER.cert, urls=[url], at=NOW)
    assert r.status is RevocationStatus.UNKNOWN  # the planted index was not used


def test_cache_dir_symlink_refused(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    link = tmp_path / "cache"
    link.symlink_to(real)
    with pytest.raises(ConfigError) as info:
        store(link).load(make_crl(ISSUER, {}), ISSUER.cert, source="src")
    assert info.value.key == "revocation.cache_dir" and "symlink" in info.value.message


@pytest.mark.parametrize("mode", [0o770, 0o777, 0o702])
def test_group_or_other_writable_cache_dir_refused(tmp_path: Path, mode: int) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    cache.chmod(mode)
    with pytest.raises(ConfigError) as info:
        store(cache).load(make_crl(ISSUER, {}), ISSUER.cert, source="src")
    assert "writable by group or others" in info.value.message


def test_cache_dir_owned_by_someone_else_refused(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to chown")
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    os.chown(cache, 4242, 4242)
    with pytest.raises(ConfigError) as info:
        store(cache).load(make_crl(ISSUER, {}), ISSUER.cert, source="src")
    assert "owned by uid 4242" in info.value.message


def test_corrupt_index_is_rebuilt(cache: Path) -> None:
    s = store(cache)
    s.load(make_crl(ISSUER, {5: None}), ISSUER.cert, source="src")
    path = cache / index_name(ISSUER.cert, "src")
    path.write_bytes(path.read_bytes()[:-3])  # truncated record
    idx = store(cache).load(make_crl(ISSUER, {5: None}), ISSUER.cert, source="src")
    assert idx.lookup(5) is not None


def test_rekeyed_ca_does_not_use_the_old_index(cache: Path) -> None:
    store(cache).load(make_crl(ISSUER, {}), ISSUER.cert, source="src")
    rekeyed = make_ca("Test Issuing CA", issuer=P.root, slot=63)  # same name, new key
    assert rekeyed.cert.subject == ISSUER.cert.subject
    r = store(cache).check(leaf_with_serial(5), rekeyed.cert, urls=["src"], at=NOW)
    assert r.status is RevocationStatus.UNKNOWN


# --- a CRL that does not cover the certificate is no evidence (RFC 5280 6.3.3) -------------

DP_URL = "http://crl.example/issuing.crl"
SUB_CA = make_ca("Sub CA", issuer=ISSUER, slot=64)  # a CA certificate ISSUER's CRLs cover


def leaf_with_dp(serial: int, *names: x509.GeneralName) -> x509.Certificate:
    """A certificate of ISSUER whose CRL distribution point names ``names``."""
    base = leaf_with_serial(serial)
    dp = x509.DistributionPoint(list(names), None, None, None)
    return (
        x509.CertificateBuilder()
        .subject_name(base.subject)
        .issuer_name(base.issuer)
        .public_key(base.public_key())  # type: ignore[arg-type]
        .serial_number(serial)
        .not_valid_before(base.not_valid_before_utc)
        .not_valid_after(base.not_valid_after_utc)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.CRLDistributionPoints([dp]), critical=False)
        .sign(ISSUER.key, hashes.SHA256())
    )


def idp(
    *,
    full_name: list[x509.GeneralName] | None = None,
    relative_name: x509.RelativeDistinguishedName | None = None,
    user: bool = False,
    ca: bool = False,
    attr: bool = False,
    reasons: frozenset[x509.ReasonFlags] | None = None,
    indirect: bool = False,
) -> tuple[x509.ExtensionType, bool]:
    value = x509.IssuingDistributionPoint(
        full_name=full_name,
        relative_name=relative_name,
        only_contains_user_certs=user,
        only_contains_ca_certs=ca,
        only_some_reasons=reasons,
        indirect_crl=indirect,
        only_contains_attribute_certs=attr,
    )
    return value, True


UNKNOWN_CRITICAL = x509.UnrecognizedExtension(
    x509.ObjectIdentifier("1.3.6.1.4.1.55555.1"), b"\x05\x00"
)
_URI = x509.UniformResourceIdentifier
_LEAF = leaf_with_serial(6)
_LEAF_DP = leaf_with_dp(6, _URI(DP_URL))

NOT_EVIDENCE: list[tuple[str, dict[str, object], x509.Certificate, str]] = [
    # (id, make_crl kwargs, the certificate asked about, a word of the detail). The CRL does
    # not list the certificate, so a store that took it as evidence would answer GOOD.
    ("unknown critical CRL extension", {"extensions": [(UNKNOWN_CRITICAL, True)]}, _LEAF,
     "critical extension"),
    ("unknown critical entry extension", {"entry_extensions": [(UNKNOWN_CRITICAL, True)]},
     _LEAF, "critical"),
    ("certificateIssuer entry (indirect)", {"entry_extensions": [(x509.CertificateIssuer(
        [x509.DirectoryName(ISSUER.cert.subject)]), True)]}, _LEAF, "indirect"),
    ("only CA certificates, asked about an end entity", {"extensions": [idp(ca=True)]}, _LEAF,
     "CA certificates"),
    ("only user certificates, asked about a CA", {"extensions": [idp(user=True)]}, SUB_CA.cert,
     "end-entity"),
    ("only attribute certificates", {"extensions": [idp(attr=True)]}, _LEAF, "attribute"),
    ("only some reasons", {"extensions": [idp(
        reasons=frozenset({x509.ReasonFlags.key_compromise}))]}, _LEAF, "reasons"),
    ("indirect CRL", {"extensions": [idp(indirect=True)]}, _LEAF, "indirect"),
    ("distribution point the certificate does not name", {"extensions": [idp(
        full_name=[_URI("http://crl.example/other.crl")])]}, _LEAF_DP, "distribution point"),
    ("distribution point, certificate without CRLDP", {"extensions": [idp(
        full_name=[_URI(DP_URL)])]}, _LEAF, "distribution point"),
    ("delta CRL", {"extensions": [(x509.DeltaCRLIndicator(1), True)]}, _LEAF, "delta"),
    ("no CRLNumber", {"number": None}, _LEAF, "CRLNumber"),
    ("critical CRLNumber", {"number_critical": True}, _LEAF, "CRLNumber"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("crl_kw", "cert", "word"), [n[1:] for n in NOT_EVIDENCE], ids=[n[0] for n in NOT_EVIDENCE]
)
def test_a_crl_that_does_not_cover_the_certificate_is_undetermined(
    cache: Path, tmp_path: Path, crl_kw: dict[str, object], cert: x509.Certificate, word: str
) -> None:
    path = tmp_path / "issuing.crl"
    path.write_bytes(make_crl(ISSUER, {5: None}, **crl_kw))  # type: ignore[arg-type]
    for s in (store(cache), store(cache)):  # cold, then warm from the index (a new process)
        r = s.check(cert, ISSUER.cert, files=[path], at=NOW)
        assert r.status is RevocationStatus.UNKNOWN, r
        assert word.lower() in r.detail.lower(), r.detail
    # A fetched CRL is judged the same way.
    fetcher = StubFetcher({DP_URL: make_crl(ISSUER, {5: None}, **crl_kw)})  # type: ignore[arg-type]
    r = store(tmp_path / "c2", fetcher=fetcher).check(cert, ISSUER.cert, urls=[DP_URL], at=NOW)
    assert r.status is RevocationStatus.UNKNOWN, r


def test_an_out_of_scope_crl_listing_the_serial_is_no_evidence_either(
    cache: Path, tmp_path: Path
) -> None:
    path = tmp_path / "ca-only.crl"
    path.write_bytes(make_crl(ISSUER, {6: None}, extensions=[idp(ca=True)]))
    r = store(cache).check(_LEAF, ISSUER.cert, files=[path], at=NOW)
    assert r.status is RevocationStatus.UNKNOWN and "CA certificates" in r.detail


COVERED: list[tuple[str, list[tuple[x509.ExtensionType, bool]], x509.Certificate]] = [
    ("only user certificates, an end entity", [idp(user=True)], _LEAF),
    ("only CA certificates, a CA", [idp(ca=True)], SUB_CA.cert),
    ("the certificate's own distribution point", [idp(full_name=[_URI(DP_URL)])], _LEAF_DP),
    ("one of its distribution points", [idp(full_name=[_URI("http://x/a"), _URI(DP_URL)])],
     leaf_with_dp(6, _URI("ldap://x/b"), _URI(DP_URL))),
    ("a relative distribution point name", [idp(relative_name=x509.RelativeDistinguishedName(
        [x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "CRL1")]))], leaf_with_dp(6,
        x509.DirectoryName(x509.Name([*ISSUER.cert.subject.rdns, x509.RelativeDistinguishedName(
            [x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "CRL1")])])))),
    ("a non-critical known extension", [(x509.AuthorityKeyIdentifier.from_issuer_public_key(
        ISSUER.key.public_key()), False)], _LEAF),  # type: ignore[arg-type]
]  # fmt: skip


@pytest.mark.parametrize(
    ("extensions", "cert"), [c[1:] for c in COVERED], ids=[c[0] for c in COVERED]
)
def test_a_crl_that_covers_the_certificate_still_answers(
    cache: Path,
    tmp_path: Path,
    extensions: list[tuple[x509.ExtensionType, bool]],
    cert: x509.Certificate,
) -> None:
    path = tmp_path / "issuing.crl"
    path.write_bytes(make_crl(ISSUER, {5: None}, extensions=extensions))
    for s in (store(cache), store(cache)):
        assert s.check(cert, ISSUER.cert, files=[path], at=NOW).status is RevocationStatus.GOOD
    listed = tmp_path / "listed.crl"
    listed.write_bytes(make_crl(ISSUER, {cert.serial_number: None}, extensions=extensions))
    r = store(tmp_path / "c3").check(cert, ISSUER.cert, files=[listed], at=NOW)
    assert r.status is RevocationStatus.REVOKED


def test_a_fresh_crl_that_does_not_cover_the_certificate_does_not_stop_the_fetch(
    cache: Path, tmp_path: Path
) -> None:
    path = tmp_path / "ca-only.crl"
    path.write_bytes(make_crl(ISSUER, {}, extensions=[idp(ca=True)]))
    fetcher = StubFetcher({DP_URL: make_crl(ISSUER, {6: None})})
    r = store(cache, fetcher=fetcher).check(
        _LEAF_DP, ISSUER.cert, files=[path], urls=[DP_URL], at=NOW
    )
    assert r.status is RevocationStatus.REVOKED and fetcher.calls == [DP_URL]


def test_an_index_of_the_previous_format_is_rebuilt(cache: Path) -> None:
    s = store(cache)
    s.load(make_crl(ISSUER, {5: None}), ISSUER.cert, source="src")
    path = cache / index_name(ISSUER.cert, "src")
    magic, rest = path.read_bytes().split(b" ", 1)
    head, records = rest.split(b"\n", 1)
    old = json.loads(head)
    old.pop("scope")
    old["version"] = 1
    path.write_bytes(magic + b" " + json.dumps(old).encode() + b"\n" + records)
    fd = os.open(path, os.O_RDONLY)
    try:
        assert crl_store.CrlIndex.from_fd(fd) is None
    finally:
        os.close(fd)
    idx = store(cache).load(make_crl(ISSUER, {5: None}), ISSUER.cert, source="src")
    assert idx.header["version"] == crl_store.FORMAT_VERSION and "scope" in idx.header
