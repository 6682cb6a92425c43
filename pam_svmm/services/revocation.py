"""Revocation checking of a validated chain: OCSP and CRL in the configured order.

The end-entity rule applies to chain[0], the CA rule to every intermediate; the trust anchor
(the chain's last certificate) is not checked. Each call has a bounded total time: network
operations get what is left of it, and none starts once it is spent.

A checker that lives long (svmmd's) reuses a good or revoked OCSP answer for
``ocsp_reuse`` seconds at most, and never past the validity the response states (its
nextUpdate); a login process asks every time anyway. Unknown answers are never reused.
"""

from __future__ import annotations

import datetime as dt
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import replace

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import AuthorityInformationAccessOID

from ..adapters.crl_store import CrlStore
from ..adapters.fetch import OCSP_MAX_BYTES, Fetcher
from ..config import RevocationConfig, RevocationMethod, RevocationRule
from ..domain.revocation import (
    Decision,
    RevocationResult,
    RevocationStatus,
    build_ocsp_request,
    decide,
    evaluate_ocsp,
    rule_for,
)
from ..errors import FetchError

NONCE_BYTES = 16


def ocsp_urls(cert: x509.Certificate) -> list[str]:
    try:
        aia = cert.extensions.get_extension_for_class(x509.AuthorityInformationAccess).value
    except x509.ExtensionNotFound:
        return []
    return [
        d.access_location.value
        for d in aia
        if d.access_method == AuthorityInformationAccessOID.OCSP
        and isinstance(d.access_location, x509.UniformResourceIdentifier)
        and d.access_location.value.startswith(("http://", "https://"))
    ]


def crl_urls(cert: x509.Certificate) -> list[str]:
    """Plain-http full-name distribution points of complete, direct CRLs."""
    try:
        dps = cert.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    except x509.ExtensionNotFound:
        return []
    urls = []
    for dp in dps:
        if dp.full_name is None or dp.crl_issuer or dp.reasons:
            continue
        urls += [
            n.value
            for n in dp.full_name
            if isinstance(n, x509.UniformResourceIdentifier) and n.value.startswith("http://")
        ]
    return urls


class RevocationChecker:
    def __init__(
        self,
        config: RevocationConfig,
        *,
        fetcher: Fetcher,
        store: CrlStore,
        clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
        trusted_responders: Sequence[x509.Certificate] = (),
        nonce: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self.config = config
        self._fetcher = fetcher
        self._store = store
        self._clock = clock
        self._trusted = tuple(trusted_responders)
        self._nonce = nonce
        # OCSP answers reused within ocsp_reuse (and their own validity): by (issuer, serial).
        self._ocsp_answers: dict[tuple[bytes, int], tuple[RevocationResult, dt.datetime]] = {}

    def check(
        self,
        chain: Sequence[x509.Certificate],
        *,
        at: dt.datetime | None = None,
        budget: float | None = None,
    ) -> list[tuple[x509.Certificate, Decision]]:
        """Decide each certificate of ``chain`` (leaf first, anchor last) but the anchor.

        ``budget``: seconds for the whole call (default: fetch_timeout per method per
        certificate). Raises CertificateRevoked or RevocationUnknown (see ``decide``).
        """
        at = at or self._clock()
        checked = list(chain[:-1])
        if budget is None:
            budget = self.config.fetch_timeout * max(1, len(self.config.methods) * len(checked))
        deadline = time.monotonic() + budget
        out = []
        for position, cert in enumerate(checked):
            rule = rule_for(self.config.end_entity, self.config.ca, position)
            results: list[RevocationResult] = []
            if rule is not RevocationRule.OFF:
                results = self._results(cert, chain[position + 1], at, deadline)
            out.append((cert, decide(rule, results, subject=cert.subject.rfc4514_string())))
        return out

    def _results(
        self, cert: x509.Certificate, issuer: x509.Certificate, at: dt.datetime, deadline: float
    ) -> list[RevocationResult]:
        results = []
        for method in self.config.methods:
            if method is RevocationMethod.OCSP:
                r = self._ocsp(cert, issuer, at, deadline)
            else:
                r = self._crl(cert, issuer, at, deadline)
            results.append(r)
            if r.status is not RevocationStatus.UNKNOWN:
                break
        return results

    def _left(self, deadline: float) -> float:
        return min(self.config.fetch_timeout, deadline - time.monotonic())

    def _ocsp(
        self, cert: x509.Certificate, issuer: x509.Certificate, at: dt.datetime, deadline: float
    ) -> RevocationResult:
        key = (issuer.fingerprint(hashes.SHA256()), cert.serial_number)
        kept = self._ocsp_answers.get(key)
        if kept is not None:
            answer, fetched = kept
            until = answer.valid_until
            reuse = dt.timedelta(seconds=self.config.ocsp_reuse)
            if until is not None and fetched <= at <= min(until, fetched + reuse):
                return replace(answer, detail=f"{answer.detail}; asked {fetched.isoformat()}")
            self._ocsp_answers.pop(key, None)  # another login may have dropped it too
        r = self._ask_ocsp(cert, issuer, at, deadline)
        if r.status is not RevocationStatus.UNKNOWN and self.config.ocsp_reuse > 0:
            self._ocsp_answers[key] = (r, at)
        return r

    def _ask_ocsp(
        self, cert: x509.Certificate, issuer: x509.Certificate, at: dt.datetime, deadline: float
    ) -> RevocationResult:
        urls = [self.config.ocsp_responder] if self.config.ocsp_responder else ocsp_urls(cert)
        if not urls:
            return RevocationResult.unknown("ocsp", "no OCSP responder for this certificate")
        problems = []
        for url in urls:
            left = self._left(deadline)
            if left <= 0:
                problems.append("time budget spent before asking the OCSP responder")
                break
            nonce = self._nonce(NONCE_BYTES) if self.config.ocsp_nonce else None
            try:
                der = self._fetcher.post(
                    url,
                    build_ocsp_request(cert, issuer, nonce),
                    content_type="application/ocsp-request",
                    max_bytes=OCSP_MAX_BYTES,
                    timeout=left,
                )
            except FetchError as e:
                problems.append(e.message)
                continue
            r = evaluate_ocsp(
                der,
                cert,
                issuer,
                nonce=nonce,
                at=at,
                skew=self.config.clock_skew,
                max_age=self.config.ocsp_max_age,
                trusted_responders=self._trusted,
            )
            if r.status is not RevocationStatus.UNKNOWN:
                return r
            problems.append(f"{url}: {r.detail}")
        return RevocationResult.unknown("ocsp", "; ".join(problems))

    def _crl(
        self, cert: x509.Certificate, issuer: x509.Certificate, at: dt.datetime, deadline: float
    ) -> RevocationResult:
        left = self._left(deadline)
        urls = crl_urls(cert) if self.config.crl_fetch else []
        # Cached indexes still answer when the budget is spent; only fetching is skipped.
        return self._store.check(
            cert, issuer, files=self.config.crl_files, urls=urls, at=at, timeout=max(left, 0.0)
        )
