"""The audit trail's hash chain, its seals and its head: line formats and verification. Pure.

The log is JSON lines. Every chain line carries ``seq`` (1, 2, ...) and ``prev``: the hex
SHA-256 of the previous line's exact bytes (its trailing newline included); the first
line's ``prev`` is 64 zeros. At fixed positions (every ``seal_every`` records: seq
``k * (seal_every + 1)``) the writer appends a seal line::

    {"event": "seal", "seq": n, "prev": <hash of line n-1>, "mac": HMAC-SHA256(key, m), "time"}
    m = b"svmm-audit-seal/1\\0" + ascii(n) + b"\\0" + ascii(prev)

A head file next to the log (``<log>.head``, root-only, replaced atomically on every write)
holds the last line's seq and hash, MACed the same way under its own label
``svmm-audit-head/1`` so that a seal's MAC can never pass as a head's or the reverse.

What an attacker who can edit the log (and the head) but cannot read the key can do:

* Edit, delete, insert or reorder lines: the next line's ``prev`` or ``seq`` no longer
  matches. Recomputing the hashes and seq numbers forward needs no key, but then the next
  seal's MAC (or, past the last seal, the head's MAC over the last hash) fails. Detected.
* Forge or drop a seal: a seal's MAC needs the key; a dropped seal shows as a seq gap, or,
  renumbered, as a later seal or the head failing; ``seal_every`` also bounds the gap.
* Truncate: cutting the tail back to just after a seal leaves a log that is consistent on its
  own; it is detected **only through the head file**, which says more records existed. A log
  verified without its head cannot show truncation after the last seal, nor an edit of
  the records after the last seal, rehashed.
* Replace the head by an older copy of itself (one they kept) and truncate the log to
  match: the MAC is valid, so this rollback is NOT detected here; the syslog mirror (seq
  numbers, seal hashes, shipped off the host) is the evidence for that. Likewise deleting the
  log and its head together leaves nothing to check locally.
* Append records after the head (records the writer never wrote): the head's seq is lower
  than the log's last seq; reported as inserted. A crash between the log write and the head
  update looks the same until the next record is written.

A key holder (root) can rewrite anything; sealing protects against edits by whoever can
write the file but not use the key, and makes any edit visible to a later verification.

Legacy lines (audit records written before the chain existed: JSON objects with an
``event`` but no ``seq``) may precede the chain; the first chain line's ``prev`` then hashes
the last legacy line. Only that last legacy line is protected; they are reported as such.

A torn tail (a write that failed part way: disk full, I/O error) is never a record and never
removed. The next writer closes it with ``TORN_CLOSE`` (so it can never parse, even when
only its newline was lost) and chains a gap record (event ``audit_torn_tail``) to the last
WHOLE line before it; the gap record binds the torn bytes, closing marks included, by their
length and SHA-256 (``torn_bytes``, ``torn_sha256``)::

    {..., "seq": 41}                       the last whole line (seq 41)
    {"event":"auth","us ~torn              the torn region: one or more lines, each ending
    {"event":"audit_torn_tail", ~torn      in TORN_CLOSE (a retry that tore too)
    [a seal at seq 42, if its slot]        chained to seq 41
    {"event":"audit_torn_tail", "seq": 42 or 43, "torn_bytes": n, "torn_sha256": h, ...}

Verification accepts exactly that pattern and reports it as a noted gap; any other line
that does not chain is still tampering. A gap cannot hide a deleted record: the gap record
is a chain record like any other (the next line's ``prev``, the seals and the head cover
it), so replacing a record by junk and a forged gap record means recomputing the chain,
which the next seal or the head exposes. The writer, for its part, notes a torn region only
when the head file agrees that the line before it is the last committed one (the head says
no later seq), so it never blesses records cut away under it.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeGuard

from ..errors import InputMalformed
from .bounded import loads_json

ZERO_HASH = "0" * 64
SEAL_LABEL = b"svmm-audit-seal/1"
HEAD_LABEL = b"svmm-audit-head/1"
HEAD_FORMAT = "svmm-audit-head/1"
SEAL_EVENT = "seal"
GAP_EVENT = "audit_torn_tail"  # the writer's note of a torn region (see above)
RESERVED_EVENTS = (SEAL_EVENT, GAP_EVENT)
# How the writer closes a torn fragment: not JSON whitespace, no quote or bracket, so a
# closed fragment never parses, whatever byte the write stopped at.
TORN_CLOSE = b" ~torn\n"
# A torn region longer than this (several lines of junk ending in TORN_CLOSE) is not one
# the writer made: a line is at most MAX_LINE_BYTES, and a retry adds a few closing marks.
MAX_TORN_BYTES = 2 * (1 << 20)
CHAIN_FIELDS = ("seq", "prev", "mac")  # the chain's own keys; a record may not carry them
# A line past these bounds (an edit, junk) is no record: verify reports it by line number and
# the writer hashes it and carries on, never a RecursionError that stops every login.
MAX_LINE_BYTES = 1 << 20
MAX_LINE_DEPTH = 8


class Tamper(enum.StrEnum):
    EDITED = "edited"
    DELETED = "deleted"
    REORDERED = "reordered"
    INSERTED = "inserted"
    TRUNCATED = "truncated"
    BAD_SEAL = "bad_seal"
    MISSING_SEAL = "missing_seal"
    BAD_HEAD = "bad_head"
    MALFORMED = "malformed"


class Problem(NamedTuple):
    """The first broken record: its seq (the one expected there), 1-based line, what, why."""

    seq: int
    line_no: int
    kind: Tamper
    detail: str


class Gap(NamedTuple):
    """A noted torn region: its first line, its length in bytes, the seq of its gap record."""

    line_no: int
    lines: int
    torn_bytes: int
    gap_seq: int


@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    records: int  # chain records (seals not counted) read before the first problem
    first_problem: Problem | None = None
    seals: int = 0
    last_seq: int = 0
    legacy: int = 0  # unchained lines before the chain (only the last one is protected)
    sealed: bool = False  # seals and head were checked with the key
    gaps: tuple[Gap, ...] = ()  # torn regions that a gap record names (not tampering)


@dataclass(frozen=True)
class Head:
    seq: int
    hash: str
    mac: str


# --- line formats ---------------------------------------------------------------------------


def line_hash(line: bytes) -> str:
    """The hash the next line's ``prev`` holds: SHA-256 of the exact bytes, newline included."""
    return hashlib.sha256(line).hexdigest()


def _canonical(d: Mapping[str, Any]) -> bytes:
    text = json.dumps(d, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return (text + "\n").encode("ascii")


def chain_line(fields: Mapping[str, Any], seq: int, prev: str) -> bytes:
    """A record's line: its fields plus seq and prev, canonical JSON, one newline."""
    clash = [k for k in CHAIN_FIELDS if k in fields]
    if clash:
        raise ValueError(f"audit record may not carry the chain's own fields: {clash}")
    if fields.get("event") in RESERVED_EVENTS:
        raise ValueError(f"the event name {fields['event']!r} is reserved for the chain")
    return _canonical({**fields, "seq": seq, "prev": prev})


def gap_line(torn: bytes, after_seq: int, seq: int, prev: str, time: str, host: str) -> bytes:
    """The gap record for the torn region ``torn`` (closing marks included) that follows the
    whole line with seq ``after_seq``, chained to ``prev``."""
    digest = hashlib.sha256(torn).hexdigest()
    fields = {
        "event": GAP_EVENT,
        "outcome": "error",
        "reason": "torn_write",
        "time": time,
        "host": host,
        "torn_bytes": len(torn),
        "torn_sha256": digest,
        "detail": f"{len(torn)} bytes after seq {after_seq} are what is left of a write that "
        "failed (disk full or I/O error): no record, and no decision stood on it",
    }
    return _canonical({**fields, "seq": seq, "prev": prev})


def names_torn(gap: Mapping[str, Any], torn: bytes) -> bool:
    """Whether gap record ``gap`` binds exactly the bytes ``torn``."""
    digest = gap.get("torn_sha256")
    return (
        gap.get("event") == GAP_EVENT
        and _is_int(gap.get("torn_bytes"))
        and gap["torn_bytes"] == len(torn)
        and isinstance(digest, str)
        and hmac.compare_digest(digest, hashlib.sha256(torn).hexdigest())
    )


def _mac(label: bytes, key: bytes, seq: int, digest: str) -> str:
    msg = label + b"\0" + str(seq).encode("ascii") + b"\0" + digest.encode("ascii")
    return hmac.new(key, msg, hashlib.sha256).hexdigest()


def seal_mac(key: bytes, seq: int, prev: str) -> str:
    return _mac(SEAL_LABEL, key, seq, prev)


def seal_line(seq: int, prev: str, key: bytes, time: str) -> bytes:
    """A seal at ``seq``: a MAC over the hash of line ``seq - 1`` (and so the whole prefix)."""
    return _canonical(
        {
            "event": SEAL_EVENT,
            "seq": seq,
            "prev": prev,
            "mac": seal_mac(key, seq, prev),
            "time": time,
        }
    )


def is_seal_seq(seq: int, seal_every: int) -> bool:
    """Whether the writer puts a seal at ``seq``: after every ``seal_every`` records."""
    return seq % (seal_every + 1) == 0


def head_bytes(seq: int, last_hash: str, key: bytes) -> bytes:
    mac = _mac(HEAD_LABEL, key, seq, last_hash)
    return _canonical({"format": HEAD_FORMAT, "seq": seq, "hash": last_hash, "mac": mac})


def parse_head(data: bytes) -> Head | None:
    """The head's fields, or None if it is not a head (its MAC is not checked here)."""
    try:
        d = loads_json(data, max_bytes=4096, max_depth=2, what="audit head")
    except InputMalformed:
        return None
    if not isinstance(d, dict) or d.get("format") != HEAD_FORMAT:
        return None
    seq, h, mac = d.get("seq"), d.get("hash"), d.get("mac")
    if not (_is_int(seq) and _is_hex64(h) and _is_hex64(mac)):
        return None
    return Head(seq, h, mac)


def head_mac_ok(head: Head, key: bytes) -> bool:
    return hmac.compare_digest(head.mac, _mac(HEAD_LABEL, key, head.seq, head.hash))


def parse_line(line: bytes) -> dict[str, Any] | None:
    """A line's JSON object, or None if it is not one."""
    try:
        d = loads_json(line, max_bytes=MAX_LINE_BYTES, max_depth=MAX_LINE_DEPTH, what="line")
    except InputMalformed:
        return None
    return d if isinstance(d, dict) else None


def chain_fields(line: bytes) -> tuple[int, str] | None:
    """(seq, prev) of a chain line, or None."""
    d = parse_line(line) if line.endswith(b"\n") else None
    if d is None or not _is_int(d.get("seq")) or not _is_hex64(d.get("prev")):
        return None
    return d["seq"], d["prev"]


def next_link(last_line: bytes | None, fallback_seq: int = 0) -> tuple[int, str]:
    """(seq, prev) for the line after ``last_line`` (None: an empty log).

    A last line that is not a chain line (a legacy record, a torn write, junk) still gets
    hashed, so the chain binds it; its seq is unknown, so the caller's ``fallback_seq`` (the
    head's) is continued. Verification reports such a line; the writer must not stop.
    """
    if last_line is None:
        return 1, ZERO_HASH
    fields = chain_fields(last_line)
    seq = fields[0] if fields else fallback_seq
    return seq + 1, line_hash(last_line)


def split_lines(data: bytes) -> list[bytes]:
    """Lines with their newline kept (a last line without one is a cut-off write)."""
    # Not bytes.splitlines(): that also splits at \r, and our lines end only at \n.
    parts = data.split(b"\n")
    out = [p + b"\n" for p in parts[:-1]]
    if parts[-1]:
        out.append(parts[-1])
    return out


def _is_int(v: Any) -> TypeGuard[int]:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _is_hex64(v: Any) -> TypeGuard[str]:
    return isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v)


# --- verification ---------------------------------------------------------------------------


@dataclass
class _Line:
    raw: bytes
    line_no: int
    seq: int | None = None
    prev: str | None = None
    event: Any = None

    @classmethod
    def of(cls, raw: bytes, line_no: int) -> _Line:
        d = parse_line(raw) if raw.endswith(b"\n") else None
        if d is None or not _is_int(d.get("seq")) or not _is_hex64(d.get("prev")):
            return cls(raw, line_no, event=d.get("event") if d else None)
        return cls(raw, line_no, d["seq"], d["prev"], d.get("event"))

    @property
    def chained(self) -> bool:
        return self.seq is not None

    @property
    def legacy(self) -> bool:
        # An audit record from before the chain: JSON with an event, no chain fields.
        d = parse_line(self.raw) if self.raw.endswith(b"\n") else None
        return d is not None and "event" in d and not any(k in d for k in CHAIN_FIELDS)


def verify(
    lines: Iterable[bytes],
    key: bytes | None,
    head: bytes | None,
    *,
    seal_every: int | None = None,
) -> VerifyResult:
    """Check the chain, the seals (with ``key``) and the head; report the first problem.

    ``lines``: the log's lines with their newlines (a file opened in binary mode will do).
    ``key`` None: only the hash chain is checked (seals and head cannot be); the result says
    ``sealed=False``. ``head``: the head file's bytes, None if there is none (with a key, a
    log with chain records must have one). ``seal_every``: if given (with a key), more
    records than that between two seals is a missing seal.
    """
    it = _Ahead(enumerate(lines, start=1))
    v = _Verifier(key, seal_every)
    for line_no, raw in it:
        cur = _Line.of(raw, line_no)
        if not v.fits(cur) and raw.endswith(TORN_CLOSE):
            torn = v.noted_gap(cur, it)
            if torn:  # cur and the torn lines after it: named by the gap record that follows
                it.skip(torn - 1)
                continue
        problem = v.step(cur, it)
        if problem:
            return v.result(problem)
    return v.result(v.finish(head))


class _Ahead:
    """The numbered lines, with a look at those still to come."""

    def __init__(self, items: Iterator[tuple[int, bytes]]) -> None:
        self._it = items
        self._buf: list[tuple[int, bytes]] = []

    def __iter__(self) -> _Ahead:
        return self

    def __next__(self) -> tuple[int, bytes]:
        return self._buf.pop(0) if self._buf else next(self._it)

    def peek(self, i: int) -> _Line | None:
        """The ``i``-th line still to come (0: the next), None past the end."""
        while len(self._buf) <= i:
            item = next(self._it, None)
            if item is None:
                return None
            self._buf.append(item)
        line_no, raw = self._buf[i]
        return _Line.of(raw, line_no)

    def skip(self, n: int) -> None:
        for _ in range(n):
            next(self, None)


class _Verifier:
    def __init__(self, key: bytes | None, seal_every: int | None) -> None:
        self.key = key
        self.seal_every = seal_every
        self.expected_seq = 1
        self.expected_prev = ZERO_HASH
        self.started = False  # a chain line has been accepted
        self.last: _Line | None = None
        self.records = 0
        self.seals = 0
        self.legacy = 0
        self.since_seal = 0
        self.last_seal: _Line | None = None
        self.first_chain: _Line | None = None
        self.gaps: list[Gap] = []
        self.torn: Gap | None = None  # a torn region skipped, its gap record still to come

    def fits(self, cur: _Line) -> bool:
        """Whether ``cur`` is the next line of the chain (or a legacy line before it)."""
        if not self.started and not cur.chained and cur.legacy:
            return True
        return cur.seq == self.expected_seq and cur.prev == self.expected_prev

    def noted_gap(self, first: _Line, ahead: _Ahead) -> int:
        """How many lines from ``first`` on are a torn region that the gap record after
        them names (with a seal between when its slot came first); 0: none is."""
        region, size, i = [first], len(first.raw), 0
        while True:
            if not region[-1].raw.endswith(TORN_CLOSE) or size > MAX_TORN_BYTES:
                return 0
            nxt = ahead.peek(i)
            if nxt is None:
                return 0
            gap, seq, prev = nxt, self.expected_seq, self.expected_prev
            if nxt.event == SEAL_EVENT and (nxt.seq, nxt.prev) == (seq, prev):
                after = ahead.peek(i + 1)
                if after is None:
                    return 0
                gap, seq, prev = after, seq + 1, line_hash(nxt.raw)
            if gap.event == GAP_EVENT and (gap.seq, gap.prev) == (seq, prev):
                torn = b"".join(ln.raw for ln in region)
                if not names_torn(parse_line(gap.raw) or {}, torn):
                    return 0
                self.torn = Gap(first.line_no, len(region), len(torn), seq)
                return len(region)
            region.append(nxt)
            size += len(nxt.raw)
            i += 1

    def result(self, problem: Problem | None) -> VerifyResult:
        return VerifyResult(
            ok=problem is None,
            records=self.records,
            first_problem=problem,
            seals=self.seals,
            last_seq=self.expected_seq - 1 if self.started else 0,
            legacy=self.legacy,
            sealed=self.key is not None,
            gaps=tuple(self.gaps),
        )

    def step(self, cur: _Line, rest: Iterator[tuple[int, bytes]]) -> Problem | None:
        if not self.started and not cur.chained and cur.legacy:
            self.legacy += 1
            self.expected_prev = line_hash(cur.raw)
            self.last = cur
            return None
        if cur.seq != self.expected_seq or cur.prev != self.expected_prev:
            return self._classify(cur, [_Line.of(r, n) for n, r in rest])
        if cur.event == SEAL_EVENT:
            problem = self._seal(cur)
            if problem:
                return problem
        elif cur.event == GAP_EVENT:
            if self.torn is None or self.torn.gap_seq != cur.seq:
                return Problem(
                    cur.seq or 0, cur.line_no, Tamper.INSERTED, "a gap record with no torn write"
                )
            self.gaps.append(self.torn)
            self.torn = None
            self.since_seal += 1  # it takes a seq between two seals, as a record does
        else:
            self.records += 1
            self.since_seal += 1
            if self.key is not None and self.seal_every and self.since_seal > self.seal_every:
                since = self.last_seal.seq if self.last_seal and self.last_seal.seq else 0
                return Problem(
                    cur.seq,
                    cur.line_no,
                    Tamper.MISSING_SEAL,
                    f"{self.since_seal} records since "
                    + (f"the seal at seq {since}" if since else "the start")
                    + f" (a seal is due every {self.seal_every})",
                )
        if not self.started:
            self.first_chain = cur
        self.started = True
        self.last = cur
        self.expected_seq += 1
        self.expected_prev = line_hash(cur.raw)
        return None

    def _seal(self, cur: _Line) -> Problem | None:
        d = parse_line(cur.raw) or {}
        mac = d.get("mac")
        if not _is_hex64(mac):
            return Problem(cur.seq or 0, cur.line_no, Tamper.BAD_SEAL, "seal has no MAC")
        assert cur.seq is not None and cur.prev is not None
        if self.key is not None and not hmac.compare_digest(
            mac, seal_mac(self.key, cur.seq, cur.prev)
        ):
            after = self.last_seal.seq if self.last_seal else 0
            return Problem(
                cur.seq,
                cur.line_no,
                Tamper.BAD_SEAL,
                f"seal MAC does not verify: the seal is forged, or a record between seq {after} "
                f"and seq {cur.seq} was altered and the chain recomputed",
            )
        self.seals += 1
        self.since_seal = 0
        self.last_seal = cur
        return None

    def _classify(self, cur: _Line, rest: Sequence[_Line]) -> Problem:
        """Name what broke at ``cur``, looking at the lines after it."""
        e, p = self.expected_seq, cur.line_no
        nxt = rest[0] if rest else None
        later = {ln.seq: ln for ln in reversed(rest) if ln.seq is not None}  # first occurrence
        if (
            cur.seq is not None and cur.seq > e and cur.seq not in later and cur.seq - 1 in later
        ):  # the record that should precede this one comes later: moved
            return Problem(
                cur.seq,
                p,
                Tamper.REORDERED,
                f"seq {cur.seq} is at line {p}, before seq {e} (line {later[e].line_no})"
                if e in later
                else f"seq {cur.seq} is at line {p}, before seq {cur.seq - 1}",
            )
        if nxt and nxt.seq == e and nxt.prev == self.expected_prev:
            return Problem(
                e,
                p,
                Tamper.INSERTED,
                f"line {p} is not part of the chain; seq {e} continues at line {nxt.line_no}",
            )
        if not cur.chained:
            if not cur.raw.endswith(b"\n"):
                return Problem(
                    e,
                    p,
                    Tamper.TRUNCATED,
                    "the last line is cut off (a write that failed leaves this until the next "
                    "record notes it)",
                )
            if nxt and nxt.seq == e + 1:
                return Problem(e, p, Tamper.EDITED, "the record is no longer a valid chain line")
            return Problem(e, p, Tamper.MALFORMED, "not a chain record (no seq/prev)")
        assert cur.seq is not None
        if cur.seq == e:  # the seq fits but prev does not: the line before changed
            if self.last is None:
                return Problem(e, p, Tamper.EDITED, "the first record does not start the chain")
            return Problem(
                self.last.seq if self.last.seq is not None else e - 1,
                self.last.line_no,
                Tamper.EDITED,
                f"the record changed: its hash is not the prev of seq {e} (line {p})",
            )
        if nxt and nxt.seq == e + 1:
            return Problem(e, p, Tamper.EDITED, f"seq {e} was changed to {cur.seq}")
        if cur.seq > e:
            if cur.seq in later:
                return Problem(
                    cur.seq,
                    p,
                    Tamper.INSERTED,
                    f"seq {cur.seq} appears again at line {later[cur.seq].line_no}",
                )
            missing = f"seq {e}" if cur.seq == e + 1 else f"seq {e} to {cur.seq - 1}"
            return Problem(e, p, Tamper.DELETED, f"{missing} missing before line {p}")
        # cur.seq < e: a seq already seen. If cur and the line before share a predecessor
        # and the next line chains from cur, the line before was the intruder.
        before = self.last
        if (
            before is not None
            and before.seq == cur.seq
            and before.prev == cur.prev
            and nxt is not None
            and nxt.prev == line_hash(cur.raw)
        ):
            return Problem(
                cur.seq,
                before.line_no,
                Tamper.INSERTED,
                f"line {before.line_no} duplicates seq {cur.seq} (line {p} is chained)",
            )
        return Problem(cur.seq, p, Tamper.INSERTED, f"seq {cur.seq} appears again (expected {e})")

    def finish(self, head_data: bytes | None) -> Problem | None:
        last_seq = self.expected_seq - 1 if self.started else 0
        n_lines = self.last.line_no if self.last else 0
        if head_data is None:
            if self.key is not None and self.started:
                return Problem(last_seq, n_lines, Tamper.BAD_HEAD, "the head file is missing")
            return None
        head = parse_head(head_data)
        if head is None:
            return Problem(last_seq, n_lines, Tamper.BAD_HEAD, "the head file is not a head")
        if self.key is not None and not head_mac_ok(head, self.key):
            return Problem(
                head.seq, n_lines, Tamper.BAD_HEAD, "the head file's MAC does not verify"
            )
        if head.seq > last_seq:
            return Problem(
                last_seq + 1,
                n_lines + 1,
                Tamper.TRUNCATED,
                f"the head says seq {head.seq} was written; the log ends at seq {last_seq}",
            )
        if head.seq < last_seq:
            return Problem(
                head.seq + 1,
                self._line_of(head.seq + 1, n_lines),
                Tamper.INSERTED,
                f"records after seq {head.seq} (where the head file ends) were not written "
                "by the audit writer (or it crashed before updating the head)",
            )
        assert self.last is not None or last_seq == 0
        if self.last is not None and self.started and head.hash != line_hash(self.last.raw):
            # The chain is consistent and every seal verified: the change is after the last seal.
            seal_seq = self.last_seal.seq if self.last_seal else None
            first = min(seal_seq + 1 if seal_seq is not None else 1, last_seq)
            return Problem(
                first,
                self._line_of(first, n_lines),
                Tamper.EDITED,
                f"the records from seq {first} to {last_seq} do not match the head file: "
                "one of them was altered and the chain recomputed",
            )
        return None

    def _line_of(self, seq: int, n_lines: int) -> int:
        # Lines after the chain start map one to one onto seq numbers (no problem was found).
        if self.first_chain is None or self.first_chain.seq is None:
            return n_lines
        return self.first_chain.line_no + (seq - self.first_chain.seq)
