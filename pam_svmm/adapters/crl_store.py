"""The CRL cache: signature-checked CRLs turned into on-disk indexes answered by mmap.

Every login is a new process, so "warm" means on disk in a form that answers "is serial S
revoked" without parsing the CRL. When a CRL is loaded (a local file or a fetched
distribution point) its signature is checked against the issuer, then an index file is
written in ``cache_dir``, named by sha256(issuer subject DER + source)::

    SVMMCRL1 {"issuer_subject_sha256": ..., "this_update": ..., "count": N, ...}\\n
    N records sorted by serial: serial (20 bytes, big-endian) | reason (1 byte) | time (8 bytes)

Only a complete, direct CRL is indexed (``domain.revocation.crl_problem``); the header keeps
its scope (issuingDistributionPoint: user or CA certificates only, the distribution point),
and a CRL answers only for a certificate inside that scope: otherwise it is no evidence.

A lookup maps the file and binary-searches the records: O(log n) page touches, whatever
the CRL's size. Local files also get a small stamp (stat fields, sha256, issuer name hash)
so an unchanged file is neither read nor parsed again, even when it belongs to another CA.

Files are written atomically (temporary file, fsync, rename) with mode 0600, opened with
O_NOFOLLOW relative to a directory descriptor of a cache directory that must be owned by
root or us and not writable by group or others. A newer CRL (CRL number, then thisUpdate)
replaces an older one for the same source; an older one never replaces a newer one.
"""

from __future__ import annotations

import bisect
import datetime as dt
import hashlib
import json
import mmap
import os
import stat
import struct
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from ..domain.bounded import loads_json
from ..domain.revocation import (
    CrlEntry,
    CrlScope,
    RevocationResult,
    RevocationStatus,
    crl_problem,
    crl_scope,
    entry_problem,
    evaluate_crl,
    scope_problem,
)
from ..errors import FetchError, RevocationUnknown
from .fetch import CRL_MAX_BYTES, Fetcher
from .private_dir import open_private_dir, replace_file

MAGIC = b"SVMMCRL1 "
# 2: the header carries the CRL's scope; a version-1 index (no scope) is rebuilt.
FORMAT_VERSION = 2
RECORD = struct.Struct(">20sBq")
SERIAL_BYTES = 20
NO_REASON = 0xFF
_MAX_HEADER = 64 * 1024
_CONFIG_KEY = "revocation.cache_dir"

# RFC 5280 CRLReason codes (7 is unused).
_REASON_CODES = {
    x509.ReasonFlags.unspecified: 0,
    x509.ReasonFlags.key_compromise: 1,
    x509.ReasonFlags.ca_compromise: 2,
    x509.ReasonFlags.affiliation_changed: 3,
    x509.ReasonFlags.superseded: 4,
    x509.ReasonFlags.cessation_of_operation: 5,
    x509.ReasonFlags.certificate_hold: 6,
    x509.ReasonFlags.remove_from_crl: 8,
    x509.ReasonFlags.privilege_withdrawn: 9,
    x509.ReasonFlags.aa_compromise: 10,
}
_REASONS = {code: flag for flag, code in _REASON_CODES.items()}


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def issuer_key_id(issuer: x509.Certificate) -> str:
    return x509.SubjectKeyIdentifier.from_public_key(issuer.public_key()).digest.hex()


def index_name(issuer: x509.Certificate, source: str) -> str:
    return _sha256(issuer.subject.public_bytes() + source.encode()) + ".idx"


def parse_crl(data: bytes, source: str) -> x509.CertificateRevocationList:
    """DER or PEM."""
    from ..domain.certpolicy import PARSE_ERRORS

    try:
        if data.lstrip().startswith(b"-----BEGIN"):
            return x509.load_pem_x509_crl(data)
        return x509.load_der_x509_crl(data)
    except PARSE_ERRORS as e:  # a bad version is x509.InvalidVersion, no ValueError
        raise RevocationUnknown(
            f"CRL from {source} is malformed: {e}", reason="crl_invalid"
        ) from None


class _Serials:
    """The serial column of the records, as a sequence ``bisect`` can search."""

    def __init__(self, mm: mmap.mmap, offset: int, count: int) -> None:
        self._mm, self._offset, self._count = mm, offset, count

    def __len__(self) -> int:
        return self._count

    def __getitem__(self, i: int) -> bytes:
        start = self._offset + i * RECORD.size
        return self._mm[start : start + SERIAL_BYTES]


class CrlIndex:
    """An open index file."""

    def __init__(self, header: dict[str, Any], mm: mmap.mmap, offset: int, ident: tuple[int, int]):
        self.header = header
        self._mm = mm
        self._offset = offset
        self._serials = _Serials(mm, offset, header["count"])
        self.ident = ident  # (st_ino, st_mtime_ns) of the file it was opened from

    @classmethod
    def from_fd(cls, fd: int) -> CrlIndex | None:
        """None when the file is not a well-formed index of this format."""
        st = os.fstat(fd)
        if st.st_size <= len(MAGIC):
            return None
        mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
        try:
            end = mm.find(b"\n", 0, _MAX_HEADER)
            if not mm[: len(MAGIC)] == MAGIC or end < 0:
                raise ValueError("bad magic")
            header = loads_json(mm[len(MAGIC) : end], max_bytes=_MAX_HEADER, what="CRL index")
            count = header["count"]
            if (
                header.get("version") != FORMAT_VERSION
                or header.get("record_size") != RECORD.size
                or st.st_size != end + 1 + count * RECORD.size
            ):
                raise ValueError("bad header")
            CrlScope.from_json(header.get("scope"))
        except (ValueError, KeyError, TypeError):
            mm.close()
            return None
        return cls(header, mm, end + 1, (st.st_ino, st.st_mtime_ns))

    @property
    def this_update(self) -> dt.datetime:
        return dt.datetime.fromtimestamp(self.header["this_update"], dt.UTC)

    @property
    def next_update(self) -> dt.datetime | None:
        nu = self.header["next_update"]
        return None if nu is None else dt.datetime.fromtimestamp(nu, dt.UTC)

    @property
    def source(self) -> str:
        return str(self.header["source"])

    @property
    def scope(self) -> CrlScope:
        return CrlScope.from_json(self.header["scope"])  # checked in from_fd

    @property
    def newness(self) -> tuple[int, int]:
        number = self.header["crl_number"]
        return (-1 if number is None else int(number), self.header["this_update"])

    def __len__(self) -> int:
        return int(self.header["count"])

    def lookup(self, serial: int) -> CrlEntry | None:
        if not 0 <= serial < 1 << (8 * SERIAL_BYTES):
            return None  # an index only holds serials that fit; such a CRL was refused
        key = serial.to_bytes(SERIAL_BYTES, "big")
        i = bisect.bisect_left(self._serials, key)
        if i == len(self) or self._serials[i] != key:
            return None
        start = self._offset + i * RECORD.size
        _, code, when = RECORD.unpack(self._mm[start : start + RECORD.size])
        return CrlEntry(serial, dt.datetime.fromtimestamp(when, dt.UTC), _REASONS.get(code))

    def close(self) -> None:
        self._mm.close()


def _newer(a: tuple[int, int], b: tuple[int, int]) -> bool:
    """Is CRL ``a`` newer than ``b``? By CRL number when both have one, else thisUpdate."""
    if a[0] >= 0 and b[0] >= 0:
        return a > b
    return a[1] > b[1]


def build_index(
    crl: x509.CertificateRevocationList, issuer: x509.Certificate, der_sha256: str, source: str
) -> tuple[dict[str, Any], bytes]:
    """The header and sorted records of a CRL already checked against ``issuer``."""
    records = []
    for entry in crl:
        problem = entry_problem(entry)
        if problem is not None:
            raise RevocationUnknown(f"CRL from {source} {problem}", reason="crl_invalid")
        serial = entry.serial_number
        if not 0 <= serial < 1 << (8 * SERIAL_BYTES):
            raise RevocationUnknown(
                f"CRL from {source} lists serial {serial:X}, outside the 20-octet range",
                reason="crl_invalid",
            )
        try:
            reason = entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
        except x509.ExtensionNotFound:
            reason = None
        records.append(
            RECORD.pack(
                serial.to_bytes(SERIAL_BYTES, "big"),
                NO_REASON if reason is None else _REASON_CODES[reason],
                int(entry.revocation_date_utc.timestamp()),
            )
        )
    records.sort()  # big-endian fixed width: byte order is numeric order
    number = _number(crl)
    nu = crl.next_update_utc
    header = {
        "version": FORMAT_VERSION,
        "issuer_subject_sha256": _sha256(issuer.subject.public_bytes()),
        "issuer_key_id": issuer_key_id(issuer),
        "this_update": int(crl.last_update_utc.timestamp()),
        "next_update": None if nu is None else int(nu.timestamp()),
        "crl_number": number,
        "crl_sha256": der_sha256,
        "source": source,
        "count": len(records),
        "record_size": RECORD.size,
        "scope": crl_scope(crl).to_json(),
    }
    return header, b"".join(records)


def check_crl(crl: x509.CertificateRevocationList, issuer: x509.Certificate, source: str) -> None:
    """Refuse a CRL that is not a complete, direct CRL correctly signed by ``issuer``
    (its entries are checked while indexing)."""

    def refuse(why: str) -> RevocationUnknown:
        return RevocationUnknown(f"CRL from {source} {why}", reason="crl_invalid")

    if crl.issuer != issuer.subject:
        raise refuse(
            f"is issued by {crl.issuer.rfc4514_string()}, not {issuer.subject.rfc4514_string()}"
        )
    try:
        ku = issuer.extensions.get_extension_for_class(x509.KeyUsage).value
        if not ku.crl_sign:
            raise refuse("is signed by a certificate without the cRLSign key usage")
    except x509.ExtensionNotFound:
        pass
    if not crl.is_signature_valid(issuer.public_key()):  # type: ignore[arg-type]
        raise refuse(
            f"has a signature that does not verify with the key of "
            f"{issuer.subject.rfc4514_string()}"
        )
    problem = crl_problem(crl)
    if problem is not None:
        raise refuse(problem)


class CrlStore:
    """CRLs by (issuer, source): memory, then the on-disk index, then the CRL itself."""

    def __init__(
        self,
        cache_dir: Path,
        *,
        fetcher: Fetcher | None = None,
        skew: float = 300.0,
        grace: float = 0.0,
    ) -> None:
        self.cache_dir = cache_dir
        self._fetcher = fetcher
        self._skew = skew
        self._grace = grace
        self._dir_fd: int | None = None
        self._mem: dict[str, CrlIndex] = {}

    # --- the question ---------------------------------------------------------------------

    def check(
        self,
        cert: x509.Certificate,
        issuer: x509.Certificate,
        *,
        files: Sequence[Path] = (),
        urls: Sequence[str] = (),
        at: dt.datetime,
        timeout: float = 3.0,
    ) -> RevocationResult:
        """Is ``cert`` revoked according to the CRLs of ``issuer`` from these sources?

        Local files are read when they changed; URLs are fetched when no fresh CRL for the
        issuer is at hand (missing or past nextUpdate + grace), within ``timeout`` seconds in
        all (0: cached answers only). Never GOOD from a stale CRL.
        """
        deadline = time.monotonic() + timeout
        problems: list[str] = []
        found: list[CrlIndex] = []
        for path in files:
            try:
                idx = self._from_file(path, issuer)
            except RevocationUnknown as e:
                problems.append(e.message)
                continue
            if idx is not None:
                found.append(idx)
        for url in urls:
            idx = self._open(issuer, url)
            # Only a CRL that covers this certificate makes fetching its own CRL needless.
            fresh_at_hand = any(
                self._fresh(i, at) and scope_problem(i.scope, cert) is None for i in found
            )
            left = deadline - time.monotonic()
            if (idx is None or not self._fresh(idx, at)) and not fresh_at_hand and self._fetcher:
                try:
                    if left <= 0:
                        raise FetchError(f"{url}: no time left to fetch the CRL")
                    data = self._fetcher.get(url, max_bytes=CRL_MAX_BYTES, timeout=left)
                    idx = self.load(data, issuer, source=url)
                except (FetchError, RevocationUnknown) as e:
                    problems.append(e.message)
            if idx is not None:
                found.append(idx)
        return self._answer(cert, issuer, found, problems, at)

    def _answer(
        self,
        cert: x509.Certificate,
        issuer: x509.Certificate,
        found: list[CrlIndex],
        problems: list[str],
        at: dt.datetime,
    ) -> RevocationResult:
        results = []
        for idx in sorted(found, key=lambda i: i.newness, reverse=True):
            out_of_scope = scope_problem(idx.scope, cert)
            if out_of_scope is not None:
                # Not evidence either way (RFC 5280 6.3.3), not even a listed serial.
                detail = f"CRL from {idx.source} does not cover this certificate: {out_of_scope}"
                results.append(RevocationResult.unknown("crl", detail))
                continue
            results.append(
                evaluate_crl(
                    idx.lookup(cert.serial_number),
                    this_update=idx.this_update,
                    next_update=idx.next_update,
                    at=at,
                    skew=self._skew,
                    grace=self._grace,
                    source=idx.source,
                )
            )
        # A permanent revocation seen in any CRL stands; otherwise the newest fresh CRL speaks.
        for r in results:
            if r.status is RevocationStatus.REVOKED and r.reason != "certificateHold":
                return r
        for r in results:
            if r.status is not RevocationStatus.UNKNOWN:
                return r
        details = [r.detail for r in results] + problems
        if not details:
            details = [f"no CRL for {issuer.subject.rfc4514_string()}"]
        return RevocationResult.unknown("crl", "; ".join(details))

    def _fresh(self, idx: CrlIndex, at: dt.datetime) -> bool:
        nu = idx.next_update
        return (
            idx.this_update <= at + dt.timedelta(seconds=self._skew)
            and nu is not None
            and at <= nu + dt.timedelta(seconds=self._grace)
        )

    # --- loading --------------------------------------------------------------------------

    def load(self, data: bytes, issuer: x509.Certificate, *, source: str) -> CrlIndex:
        """Check a CRL against ``issuer`` and index it (unless a newer one is indexed)."""
        crl = parse_crl(data, source)
        check_crl(crl, issuer, source)
        der = crl.public_bytes(Encoding.DER)
        digest = _sha256(der)
        existing = self._open(issuer, source)
        if existing is not None:
            number = _number(crl)
            new = (-1 if number is None else number, int(crl.last_update_utc.timestamp()))
            if existing.header["crl_sha256"] == digest or not _newer(new, existing.newness):
                return existing
        header, records = build_index(crl, issuer, digest, source)
        name = index_name(issuer, source)
        self._write(name, [MAGIC, json.dumps(header, sort_keys=True).encode(), b"\n", records])
        idx = self._open(issuer, source)
        if idx is None:
            raise RevocationUnknown(f"CRL cache: index for {source} unreadable after writing")
        return idx

    def _from_file(self, path: Path, issuer: x509.Certificate) -> CrlIndex | None:
        """The index of a configured CRL file if it is the issuer's (None if another CA's)."""
        source = f"file:{path}"
        try:
            st = os.stat(path)
        except OSError as e:
            raise RevocationUnknown(f"CRL file {path}: {e.strerror}") from None
        now_stat = [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]
        ours = _sha256(issuer.subject.public_bytes())
        stamp_name = _sha256(source.encode()) + ".stamp"
        stamp = self._read_json(stamp_name)
        if stamp is not None and stamp.get("stat") == now_stat:
            if stamp.get("issuer_subject_sha256") != ours:
                return None
            idx = self._open(issuer, source)
            if idx is not None and idx.header["crl_sha256"] == stamp.get("crl_sha256"):
                return idx
        # Changed or never seen: the cold path.
        try:
            data = path.read_bytes()
        except OSError as e:
            raise RevocationUnknown(f"CRL file {path}: {e.strerror}") from None
        crl = parse_crl(data, source)
        crl_issuer = _sha256(crl.issuer.public_bytes())
        digest = _sha256(crl.public_bytes(Encoding.DER))
        if crl_issuer == ours:
            idx = self.load(data, issuer, source=source)
            # The index that answers for this file (a newer one if the file was rolled back).
            digest = idx.header["crl_sha256"]
        else:
            idx = None
        stamp = {"stat": now_stat, "crl_sha256": digest, "issuer_subject_sha256": crl_issuer}
        self._write(stamp_name, [json.dumps(stamp).encode()])
        return idx

    # --- the cache directory --------------------------------------------------------------

    def _dir(self) -> int:
        if self._dir_fd is not None:
            return self._dir_fd
        # Readable by others is fine for CRLs (public data); writable is not.
        fd = open_private_dir(self.cache_dir, key=_CONFIG_KEY, private=False, check_parents=True)
        if self._dir_fd is not None:  # another thread (svmmd's logins) opened it meanwhile
            os.close(fd)
            return self._dir_fd
        self._dir_fd = fd
        return fd

    def _open_file(self, name: str) -> int | None:
        """A descriptor for a regular cache file we own; None if absent or unacceptable."""
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=self._dir())
        except OSError:  # absent, or a planted symlink (ELOOP): never followed
            return None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid not in (0, os.geteuid()) or st.st_mode & 0o077:
            os.close(fd)
            return None
        return fd

    def _open(self, issuer: x509.Certificate, source: str) -> CrlIndex | None:
        name = index_name(issuer, source)
        cached = self._mem.get(name)
        if cached is not None:
            try:
                st = os.stat(name, dir_fd=self._dir(), follow_symlinks=False)
                if (st.st_ino, st.st_mtime_ns) == cached.ident:
                    return cached
            except OSError:
                pass
            self._mem.pop(name, None)  # replaced on disk (by another process): reopen
        fd = self._open_file(name)
        if fd is None:
            return None
        try:
            idx = CrlIndex.from_fd(fd)
        finally:
            os.close(fd)
        if idx is None:
            return None
        h = idx.header
        if (
            h.get("issuer_subject_sha256") != _sha256(issuer.subject.public_bytes())
            or h.get("issuer_key_id") != issuer_key_id(issuer)
            or h.get("source") != source
        ):
            idx.close()
            return None  # e.g. the CA was re-keyed: the old index says nothing about it
        self._mem[name] = idx
        return idx

    def _read_json(self, name: str) -> dict[str, Any] | None:
        fd = self._open_file(name)
        if fd is None:
            return None
        try:
            with os.fdopen(fd, "rb") as f:
                value = loads_json(f.read(_MAX_HEADER), max_bytes=_MAX_HEADER, what=name)
        except ValueError:
            return None
        return value if isinstance(value, dict) else None

    def _write(self, name: str, parts: Sequence[bytes]) -> None:
        """Atomically replace ``name`` (a symlink there is replaced, never followed)."""
        try:
            replace_file(self._dir(), name, parts)
        except OSError as e:
            raise RevocationUnknown(f"CRL cache {self.cache_dir}: {e.strerror}") from None

    def close(self) -> None:
        for idx in self._mem.values():
            idx.close()
        self._mem.clear()
        if self._dir_fd is not None:
            os.close(self._dir_fd)
            self._dir_fd = None


def _number(crl: x509.CertificateRevocationList) -> int | None:
    try:
        return crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    except x509.ExtensionNotFound:
        return None
