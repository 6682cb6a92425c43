"""CRLs fetched, verified and indexed ahead of need, so that no login waits for a cold CRL.

``svmm crl refresh`` (run by svmm-crl-refresh.timer) calls ``refresh_crls``: every CRL a login
could consult is brought into the on-disk cache of ``adapters/crl_store.py`` before a login
asks for it, and again before its nextUpdate, so the login path only looks up (an mmap and a
binary search). The sources, each with the CA whose CRL it is:

* every file of ``revocation.crl_files`` (indexed for the configured CA that issued it);
* the CRL distribution points of the trust anchors and intermediates (their issuers' CRLs);
* every distribution point already in the cache (the ones earlier logins met: an end
  entity's distribution point is in the end entity's certificate, which only a login sees);
* the URLs given on the command line (``--url``), for the CRLs of end entities no login has
  met yet; the CA is found by the CRL's issuer name (and its signature).

A URL is fetched when its CRL is not cached, is stale, or has passed half of its validity
(thisUpdate .. nextUpdate), so a CA's new CRL is picked up well before the old one expires;
``force`` fetches every URL. URLs are only fetched when ``revocation.crl_fetch`` is on (logins
use no URL otherwise). A fetched CRL whose bytes are those indexed already is not parsed
again. Every CRL is checked as a login checks it (signature by the CA's key, cRLSign, a
complete direct CRL) by ``CrlStore.load``; one that fails leaves the index it had in place.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509

from ..adapters.crl_store import CrlIndex, CrlStore, issuer_key_id, parse_crl
from ..adapters.fetch import CRL_MAX_BYTES, Fetcher
from ..domain.settings import RevocationConfig
from ..errors import FetchError, RevocationUnknown, SvmmError
from .revocation import crl_urls

# Past this share of its validity a cached CRL is fetched again (0.5: at half-life).
REFETCH_AT = 0.5


@dataclass(frozen=True)
class Refreshed:
    """What became of one CRL source."""

    source: str  # "file:/path" or the URL
    origin: str  # crl_files, ca_certificate, cache, command_line
    issuer: str | None  # the CA whose CRL it is (RFC 4514), when known
    action: str  # fetched, indexed, unchanged, fresh, skipped, failed
    detail: str = ""
    this_update: dt.datetime | None = None
    next_update: dt.datetime | None = None
    entries: int | None = None

    @property
    def ok(self) -> bool:
        return self.action != "failed"

    def to_json(self) -> dict[str, Any]:
        def iso(t: dt.datetime | None) -> str | None:
            return None if t is None else t.isoformat()

        return {
            "source": self.source,
            "origin": self.origin,
            "issuer": self.issuer,
            "action": self.action,
            "detail": self.detail,
            "this_update": iso(self.this_update),
            "next_update": iso(self.next_update),
            "entries": self.entries,
        }


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _due(idx: CrlIndex | None, now: dt.datetime) -> bool:
    """Should this cached CRL be fetched again now (ahead of its nextUpdate)?"""
    if idx is None or idx.next_update is None:
        return True
    start, end = idx.this_update, idx.next_update
    return now >= start + (end - start) * REFETCH_AT


def cached_url_sources(store: CrlStore) -> list[tuple[str, str, str]]:
    """(url, issuer subject sha256, issuer key id) of every URL-sourced index in the cache
    (files the cache would not use itself, e.g. not ours or group-writable, are skipped)."""
    out = []
    try:
        names = sorted(n for n in os.listdir(store._dir()) if n.endswith(".idx"))
    except OSError:
        return []
    for name in names:
        fd = store._open_file(name)
        if fd is None:
            continue
        try:
            idx = CrlIndex.from_fd(fd)
        finally:
            os.close(fd)
        if idx is None:
            continue
        h = idx.header
        idx.close()
        source = str(h.get("source", ""))
        if source.startswith(("http://", "https://")):
            out.append((source, str(h.get("issuer_subject_sha256")), str(h.get("issuer_key_id"))))
    return out


def refresh_crls(
    config: RevocationConfig,
    cas: Sequence[x509.Certificate],
    *,
    store: CrlStore,
    fetcher: Fetcher,
    urls: Sequence[str] = (),
    force: bool = False,
    now: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
) -> list[Refreshed]:
    """Bring every CRL a login could use into ``store``'s cache; one ``Refreshed`` per source.

    ``cas``: the trust anchors and intermediates (the CAs whose CRLs count)."""
    at = now()
    out: list[Refreshed] = []
    for path in config.crl_files:
        out.append(_refresh_file(store, Path(path), cas))
    # URL -> (origin, candidate issuers), in order of first mention, each URL once.
    # (None: find the issuer by the CRL's issuer name once fetched.)
    wanted: dict[str, tuple[str, list[x509.Certificate] | None]] = {}
    for url in urls:
        wanted.setdefault(url, ("command_line", None))
    for cert in cas:
        issuers = [c for c in cas if c.subject == cert.issuer and c is not cert]
        for url in crl_urls(cert):
            if issuers:
                wanted.setdefault(url, ("ca_certificate", issuers))
    for url, subject_sha, key_id in cached_url_sources(store):
        issuers = [
            c
            for c in cas
            if _sha256(c.subject.public_bytes()) == subject_sha and issuer_key_id(c) == key_id
        ]
        if not issuers:
            continue  # a CA no longer configured: nothing a login would ask
        origin, known = wanted.get(url, ("cache", None))
        wanted[url] = (origin, known or issuers)
    for url, (origin, candidates) in wanted.items():
        if not config.crl_fetch:
            out.append(
                Refreshed(
                    url,
                    origin,
                    None,
                    "skipped",
                    "revocation.crl_fetch is off: logins fetch no CRL, so none is refreshed",
                )
            )
            continue
        out.append(
            _refresh_url(
                store, fetcher, url, origin, candidates, cas, at, force, config.fetch_timeout
            )
        )
    return out


def _refresh_file(store: CrlStore, path: Path, cas: Sequence[x509.Certificate]) -> Refreshed:
    source = f"file:{path}"
    problems = []
    for ca in cas:
        try:
            idx = store._from_file(path, ca)  # indexes it when changed; None: another CA's
        except RevocationUnknown as e:
            problems.append(e.message)
            break  # unreadable or malformed: the same for every CA
        if idx is not None:
            return _done(source, "crl_files", ca, "indexed", idx)
    detail = "; ".join(problems) or "issued by none of the configured CAs"
    return Refreshed(source, "crl_files", None, "failed", detail)


def _refresh_url(
    store: CrlStore,
    fetcher: Fetcher,
    url: str,
    origin: str,
    issuers: list[x509.Certificate] | None,
    cas: Sequence[x509.Certificate],
    at: dt.datetime,
    force: bool,
    timeout: float,
) -> Refreshed:
    known = [store._open(ca, url) for ca in issuers or ()]
    # (an index is a sequence: an empty CRL's is falsy, hence "is not None")
    pairs = zip(issuers or (), known, strict=True)
    cached = next(((ca, i) for ca, i in pairs if i is not None), None)
    if cached is not None and not force and not _due(cached[1], at):
        return _done(url, origin, cached[0], "fresh", cached[1], "cached, not yet due")
    try:
        data = fetcher.get(url, max_bytes=CRL_MAX_BYTES, timeout=timeout)
    except FetchError as e:
        ca = cached[0] if cached else None
        kept = "; the cached CRL stays" if cached else ""
        return Refreshed(url, origin, _name(ca), "failed", f"{e.message}{kept}")
    if cached is not None and cached[1].header.get("crl_sha256") == _sha256(data):
        return _done(
            url, origin, cached[0], "unchanged", cached[1], "the CA publishes no newer CRL"
        )
    if issuers is None:  # a URL from the command line: the CA by the CRL's issuer name
        try:
            crl_issuer = parse_crl(data, url).issuer
        except RevocationUnknown as e:
            return Refreshed(url, origin, None, "failed", e.message)
        issuers = [c for c in cas if c.subject == crl_issuer]
        if not issuers:
            name = crl_issuer.rfc4514_string()
            return Refreshed(url, origin, name, "failed", "issued by none of the configured CAs")
    problems = []
    for ca in issuers:
        try:
            idx = store.load(data, ca, source=url)
        except (RevocationUnknown, SvmmError) as e:
            problems.append(e.message)
            continue
        return _done(url, origin, ca, "fetched", idx)
    return Refreshed(url, origin, _name(issuers[0]), "failed", "; ".join(problems))


def _name(ca: x509.Certificate | None) -> str | None:
    return None if ca is None else ca.subject.rfc4514_string()


def _done(
    source: str, origin: str, ca: x509.Certificate, action: str, idx: CrlIndex, detail: str = ""
) -> Refreshed:
    return Refreshed(
        source,
        origin,
        _name(ca),
        action,
        detail,
        this_update=idx.this_update,
        next_update=idx.next_update,
        entries=len(idx),
    )
