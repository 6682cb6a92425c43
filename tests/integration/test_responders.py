"""Revocation against real services: `openssl ocsp` and the lab's CRL server over HTTP."""

from __future__ import annotations

import http.server
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509

from pam_svmm.adapters.crl_store import CrlStore
from pam_svmm.adapters.fetch import HttpFetcher
from pam_svmm.config import RevocationConfig, RevocationMethod, RevocationRule
from pam_svmm.domain.revocation import Outcome, RevocationStatus
from pam_svmm.errors import CertificateRevoked, FetchError, RevocationUnknown
from pam_svmm.services.revocation import RevocationChecker
from svmm_lab.pki import LabCA, new_key
from svmm_lab.responders import CrlServer, OcspResponder, free_port

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed"),
]

OCSP, CRL = RevocationMethod.OCSP, RevocationMethod.CRL
REQUIRE, SOFT, OFF = RevocationRule.REQUIRE, RevocationRule.SOFT_FAIL, RevocationRule.OFF


@dataclass
class Lab:
    ca: LabCA
    alice: x509.Certificate
    bob: x509.Certificate  # revoked
    ocsp: OcspResponder
    crl: CrlServer
    cache: Path

    def chain(self, cert: x509.Certificate) -> list[x509.Certificate]:
        return [cert, self.ca.intermediate.cert, self.ca.root.cert]

    def checker(
        self, *, methods=(OCSP,), ee=REQUIRE, ca=OFF, timeout=2.0, reuse=0.0
    ) -> RevocationChecker:  # type: ignore[no-untyped-def]
        # reuse 0: each check asks the responder, as a login process does (svmmd reuses).
        cfg = RevocationConfig(
            end_entity=ee, ca=ca, methods=methods, cache_dir=self.cache, fetch_timeout=timeout,
            ocsp_reuse=reuse,
        )  # fmt: skip
        fetcher = HttpFetcher()
        store = CrlStore(cfg.cache_dir, fetcher=fetcher, skew=cfg.clock_skew)
        return RevocationChecker(cfg, fetcher=fetcher, store=store)


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    ocsp_port, crl_port = free_port(), free_port()
    folder = tmp_path / "ca"
    ca = LabCA.create(
        folder, crl_base=f"http://127.0.0.1:{crl_port}", ocsp_url=f"http://127.0.0.1:{ocsp_port}/"
    )
    alice = ca.issue_user("alice", new_key("p256").public_key())
    bob = ca.issue_user("bob", new_key("p256").public_key())
    ca.revoke(bob)
    ca.publish()
    with OcspResponder(folder, ocsp_port) as ocsp, CrlServer(folder, crl_port) as crl:
        yield Lab(ca, alice, bob, ocsp, crl, tmp_path / "cache")


def test_ocsp_good_and_revoked(lab: Lab) -> None:
    ((_, d),) = lab.checker().check(lab.chain(lab.alice))[:1]
    assert d.outcome is Outcome.GOOD and d.results[-1].method == "ocsp"
    with pytest.raises(CertificateRevoked) as info:
        lab.checker().check(lab.chain(lab.bob))
    assert "ocsp" in info.value.message and "keyCompromise" in info.value.message


def test_crl_fetched_over_http(lab: Lab) -> None:
    c = lab.checker(methods=(CRL,), ca=REQUIRE)
    out = c.check(lab.chain(lab.alice))
    assert [d.outcome for _, d in out] == [Outcome.GOOD, Outcome.GOOD]  # leaf and intermediate
    assert "intermediate.crl" in out[0][1].detail and "root.crl" in out[1][1].detail
    with pytest.raises(CertificateRevoked) as info:
        c.check(lab.chain(lab.bob))
    assert "intermediate.crl" in info.value.message
    # The indexes are on disk now: with the CRL server down a new checker still answers.
    lab.crl.stop()
    with pytest.raises(CertificateRevoked):
        lab.checker(methods=(CRL,), ca=REQUIRE).check(lab.chain(lab.bob))


def test_ocsp_down_under_require_is_unknown(lab: Lab) -> None:
    lab.ocsp.stop()
    with pytest.raises(RevocationUnknown) as info:
        lab.checker(ee=REQUIRE).check(lab.chain(lab.alice))
    assert lab.ocsp.url in info.value.message


def test_ocsp_down_under_soft_fail_is_accepted_with_a_note(lab: Lab) -> None:
    lab.ocsp.stop()
    ((_, d),) = lab.checker(ee=SOFT).check(lab.chain(lab.alice))[:1]
    assert d.outcome is Outcome.SOFT_FAILED and "soft-fail" in d.note
    # Soft-fail never hides a revocation another method knows about.
    lab.ocsp.start()
    with pytest.raises(CertificateRevoked):
        lab.checker(ee=SOFT).check(lab.chain(lab.bob))


def test_ocsp_down_crl_answers(lab: Lab) -> None:
    lab.ocsp.stop()
    c = lab.checker(methods=(OCSP, CRL))
    ((_, d),) = c.check(lab.chain(lab.alice))[:1]
    assert d.outcome is Outcome.GOOD and [r.method for r in d.results] == ["ocsp", "crl"]
    with pytest.raises(CertificateRevoked):
        c.check(lab.chain(lab.bob))


def test_slow_crl_server_times_out(lab: Lab) -> None:
    lab.crl.delay = 5.0
    url = f"{lab.ca.crl_base}/intermediate.crl"
    start = time.monotonic()
    with pytest.raises(FetchError) as info:
        HttpFetcher().get(url, max_bytes=1 << 20, timeout=0.5)
    assert time.monotonic() - start < 1.5
    assert url in info.value.message and "timed out" in info.value.message
    # Through the checker: unknown within its budget, accepted under soft-fail.
    start = time.monotonic()
    ((_, d),) = lab.checker(methods=(CRL,), ee=SOFT, timeout=0.5).check(lab.chain(lab.alice))[:1]
    assert time.monotonic() - start < 1.5
    assert d.outcome is Outcome.SOFT_FAILED and "timed out" in d.note


def test_revocation_after_start_is_seen_by_ocsp(lab: Lab) -> None:
    c = lab.checker()
    resident = lab.checker(reuse=300)  # svmmd's: reuses a good answer up to 300 s
    assert c.check(lab.chain(lab.alice))[0][1].outcome is Outcome.GOOD
    assert resident.check(lab.chain(lab.alice))[0][1].outcome is Outcome.GOOD
    lab.ca.revoke(lab.alice)
    lab.ca.publish()
    # openssl notices the new index.txt after serving one more request; from then on it
    # answers revoked (reload() exists to absorb that one request).
    first = c._results(lab.alice, lab.ca.intermediate.cert, c._clock(), time.monotonic() + 5)
    assert first[0].status in (RevocationStatus.GOOD, RevocationStatus.REVOKED)
    with pytest.raises(CertificateRevoked):
        c.check(lab.chain(lab.alice))
    # The price of reuse, bounded by ocsp_reuse and the response's nextUpdate.
    assert resident.check(lab.chain(lab.alice))[0][1].outcome is Outcome.GOOD


def test_reload_makes_the_next_answer_current(lab: Lab) -> None:
    carol = lab.ca.issue_user("carol", new_key("p256").public_key())
    lab.ca.revoke(carol)
    lab.ca.publish()
    lab.ocsp.reload()
    with pytest.raises(CertificateRevoked):
        lab.checker().check(lab.chain(carol))


def test_fetch_errors_name_the_url(lab: Lab) -> None:
    f = HttpFetcher()
    missing = f"{lab.ca.crl_base}/nothing.crl"
    with pytest.raises(FetchError, match="HTTP 404") as info:
        f.get(missing, max_bytes=1 << 20, timeout=2)
    assert missing in info.value.message
    with pytest.raises(FetchError, match="exceeds"):
        f.get(f"{lab.ca.crl_base}/intermediate.crl", max_bytes=100, timeout=2)
    with pytest.raises(FetchError, match="only http"):
        f.get(f"file://{lab.ca.folder}/intermediate.crl", max_bytes=1 << 20, timeout=2)
    lab.crl.stop()
    with pytest.raises(FetchError, match="refused"):
        f.get(f"{lab.ca.crl_base}/intermediate.crl", max_bytes=1 << 20, timeout=2)


class _Redirector(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        target = {
            "/to-file": "file:///etc/passwd",
            "/to-ftp": "ftp://127.0.0.1/x",
            "/to-http": "/ok",
            "/ok": None,
        }
        where = target.get(self.path, "/missing")
        if where is None:
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")
            return
        self.send_response(302)
        self.send_header("Location", where)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


def test_redirects_only_to_http() -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Redirector)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        f = HttpFetcher()
        assert f.get(f"{base}/to-http", max_bytes=100, timeout=2) == b"ok"
        with pytest.raises(FetchError, match="non-http"):
            f.get(f"{base}/to-ftp", max_bytes=100, timeout=2)
        with pytest.raises(FetchError, match="not allowed"):  # urllib's own refusal
            f.get(f"{base}/to-file", max_bytes=100, timeout=2)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _listening(port: int) -> list[str]:
    """Local addresses with a TCP socket listening on ``port`` (this network namespace)."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            address, hex_port = fields[1].rsplit(":", 1)
            if int(hex_port, 16) == port and fields[3] == "0A":  # LISTEN
                found.append(address)
    return found


LOOPBACK_HEX = {"0100007F", "00000000000000000000000001000000"}  # 127.0.0.1, ::1


def test_every_lab_responder_listens_on_loopback_only(lab: Lab) -> None:
    """The OCSP responder (OpenSSL 3.0 has no bind address) once listened on every interface
    of the host; it now lives in a network namespace of its own, reached through loopback."""
    for port in (lab.ocsp.port, lab.crl.port):
        addresses = _listening(port)
        assert addresses and set(addresses) <= LOOPBACK_HEX, (port, addresses)
    test_ocsp_good_and_revoked(lab)  # and it still answers
