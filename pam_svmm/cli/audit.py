"""`svmm audit verify` and `svmm audit show`: check the audit trail's chain, read its records.

`verify` checks the hash chain, every seal and the head file with the seal key and exits 0
with a one-line summary, or 1 (AuditTampered) naming the first broken record: its seq, its
line and what is wrong. A torn write (disk full) that the next record notes in a gap record
is no tampering: the summary names it as a gap. `show` prints the records as a table (or
JSON lines), filtered.
"""

from __future__ import annotations

import argparse
import datetime as dt
import fcntl
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from .. import config as config_mod
from ..adapters.audit_log import head_path, load_seal_key
from ..domain import audit_chain
from ..domain.audit_record import Outcome
from ..errors import AuditTampered, SvmmError
from .common import add_json, print_json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("audit", help="verify and read the audit trail")
    s = p.add_subparsers(dest="cmd", required=True, metavar="SUBCOMMAND")

    v = s.add_parser("verify", help="check the hash chain, the seals and the head file")
    v.add_argument("--path", type=Path, help="audit log (default: audit.path)")
    v.add_argument("--key", type=Path, help="seal key file (default: audit.seal_key)")
    v.add_argument(
        "--no-key",
        action="store_true",
        help="check only the hash chain (seals and the head's MAC are not checked)",
    )
    add_json(v)
    v.set_defaults(func=verify)

    sh = s.add_parser("show", help="print audit records, filtered")
    sh.add_argument("--path", type=Path, help="audit log (default: audit.path)")
    sh.add_argument("--user", help="records about this user (decided on or asked for)")
    sh.add_argument("--vm", help="records about this VM")
    sh.add_argument("--outcome", choices=[o.value for o in Outcome])
    sh.add_argument("--event", help="auth, account, session_open, ...")
    sh.add_argument("--since", type=_timestamp, help="from this time (ISO 8601; UTC if no zone)")
    sh.add_argument("--until", type=_timestamp, help="before this time (ISO 8601)")
    sh.add_argument("--seals", action="store_true", help="also show seal records")
    sh.add_argument("--json", action="store_true", help="JSON lines, as stored")
    sh.set_defaults(func=show)


def _timestamp(text: str) -> dt.datetime:
    try:
        t = dt.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 time: {text!r}") from None
    return t if t.tzinfo else t.replace(tzinfo=dt.UTC)


def _config(args: argparse.Namespace) -> config_mod.Config:
    return config_mod.load(config_mod.resolve_path(args.config))


# --- verify ---------------------------------------------------------------------------------


def verify(args: argparse.Namespace) -> int:
    # The configuration is read only for what the options leave out.
    path: Path | None = args.path
    key_path: Path | None = None if args.no_key else args.key
    seal_every: int | None = None
    if path is None or (key_path is None and not args.no_key):
        cfg = _config(args).audit
        path = path or cfg.path
        key_path = None if args.no_key else key_path or cfg.seal_key
        seal_every = cfg.seal_every
    key = load_seal_key(key_path) if key_path else None
    try:
        with open(path, "rb") as f:
            # The head and the log's length as of one moment: writers change both under an
            # exclusive lock. The log is then read up to that length without the lock, so a
            # long verification never holds up logins.
            fcntl.flock(f, fcntl.LOCK_SH)
            try:
                size = os.fstat(f.fileno()).st_size
                head = _read_optional(head_path(path))
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
            result = audit_chain.verify(_lines_upto(f, size), key, head, seal_every=seal_every)
    except FileNotFoundError:
        head = _read_optional(head_path(path))
        if head is None:
            raise SvmmError(f"no audit log at {path}", reason="audit_missing") from None
        result = audit_chain.verify([], key, head)
    except OSError as e:
        raise SvmmError(f"cannot read audit log {path}: {e.strerror}") from None
    doc = verify_json(path, result)
    if args.json:
        print_json(doc)
    problem = result.first_problem
    if problem is not None:
        raise AuditTampered(
            f"audit log {path} is broken at seq {problem.seq}, line {problem.line_no}: "
            f"{problem.kind.value}: {problem.detail}"
        )
    if not args.json:
        print(summary(doc))
    return 0


def verify_json(path: Path, result: audit_chain.VerifyResult) -> dict[str, Any]:
    """`audit verify --json`: ``records`` and ``seals`` are those read before ``problem``."""
    p = result.first_problem
    return {
        "path": str(path),
        "intact": p is None,
        "records": result.records,
        "seals": result.seals,
        "last_seq": result.last_seq,
        "sealed": result.sealed,  # seals and head checked with the key (not --no-key)
        "legacy": result.legacy,
        # Torn writes (a failed write's remains, never a record) that a gap record names.
        "gaps": [
            {"line": g.line_no, "lines": g.lines, "bytes": g.torn_bytes, "seq": g.gap_seq}
            for g in result.gaps
        ],
        "problem": None
        if p is None
        else {"seq": p.seq, "line": p.line_no, "kind": p.kind.value, "detail": p.detail},
    }


def _count(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def summary(doc: dict[str, Any]) -> str:
    seals = _count(doc["seals"], "seal") if doc["seals"] else "no seals yet"
    text = (
        f"audit log {doc['path']} intact: {_count(doc['records'], 'record')}, {seals}, "
        f"last seq {doc['last_seq']}"
    )
    if not doc["sealed"]:
        text += "; hash chain only (seals and head NOT checked)"
    elif doc["seals"]:
        text += "; seals and head verified"
    else:  # fewer records than seal_every: the head's MAC is all there is to check
        text += "; head verified"
    if doc["legacy"]:
        text += f"; {doc['legacy']} legacy lines before the chain are not protected"
    for gap in doc["gaps"]:
        text += (
            f"; gap: {_count(gap['bytes'], 'byte')} of a failed write at line {gap['line']} "
            f"(no record), noted by seq {gap['seq']}"
        )
    return text


def _lines_upto(f: BinaryIO, size: int) -> Iterator[bytes]:
    """The file's lines within its first ``size`` bytes."""
    left = size
    for line in f:
        if left <= 0:
            return
        yield line[:left]
        left -= len(line)


def _read_optional(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise SvmmError(f"cannot read {path}: {e.strerror}") from None


# --- show -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Filter:
    user: str | None = None
    vm: str | None = None
    outcome: str | None = None
    event: str | None = None
    since: dt.datetime | None = None
    until: dt.datetime | None = None
    seals: bool = False

    def __call__(self, rec: dict[str, Any]) -> bool:
        if rec.get("event") == audit_chain.SEAL_EVENT:
            return self.seals and self._in_time(rec)
        if self.user is not None and self.user not in (rec.get("user"), rec.get("requested_user")):
            return False
        if self.vm is not None and rec.get("vm") != self.vm:
            return False
        if self.outcome is not None and rec.get("outcome") != self.outcome:
            return False
        if self.event is not None and rec.get("event") != self.event:
            return False
        return self._in_time(rec)

    def _in_time(self, rec: dict[str, Any]) -> bool:
        if self.since is None and self.until is None:
            return True
        t = _record_time(rec)
        if t is None:
            return False
        return (self.since is None or t >= self.since) and (self.until is None or t < self.until)


def _record_time(rec: dict[str, Any]) -> dt.datetime | None:
    try:
        t = dt.datetime.fromisoformat(str(rec.get("time", "")))
    except ValueError:
        return None
    return t if t.tzinfo else t.replace(tzinfo=dt.UTC)


COLUMNS = ("seq", "time", "event", "outcome", "user", "service", "vm", "card", "reason")


def row(rec: dict[str, Any]) -> tuple[str, ...]:
    t = _record_time(rec)
    card = rec.get("card")
    card = card if isinstance(card, dict) else {}
    if rec.get("event") == audit_chain.SEAL_EVENT:
        reason = f"mac {str(rec.get('mac', ''))[:16]}"
    else:
        reason = str(rec.get("reason", ""))
        if rec.get("detail"):
            reason += f" ({rec['detail']})"
    return (
        str(rec.get("seq", "-")),
        t.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ") if t else "-",
        str(rec.get("event", "-")),
        str(rec.get("outcome", "")) or "-",
        str(rec.get("user", "")) or "-",
        str(rec.get("service", "")) or "-",
        str(rec.get("vm", "")) or "-",
        str(card.get("fingerprint", ""))[:16] or "-",
        reason or "-",
    )


def records(path: Path) -> Iterator[tuple[int, bytes, dict[str, Any] | None]]:
    try:
        with open(path, "rb") as f:
            for line_no, raw in enumerate(f, start=1):
                yield line_no, raw, audit_chain.parse_line(raw)
    except FileNotFoundError:
        raise SvmmError(f"no audit log at {path}", reason="audit_missing") from None
    except OSError as e:
        raise SvmmError(f"cannot read audit log {path}: {e.strerror}") from None


def show(args: argparse.Namespace) -> int:
    path: Path = args.path or _config(args).audit.path
    keep = Filter(
        user=args.user,
        vm=args.vm,
        outcome=args.outcome,
        event=args.event,
        since=args.since,
        until=args.until,
        seals=args.seals,
    )
    rows: list[tuple[str, ...]] = []
    for line_no, raw, rec in records(path):
        if rec is None:
            torn = raw.endswith(audit_chain.TORN_CLOSE)
            what = "what a failed write left (no record)" if torn else "not a record"
            print(f"svmm: line {line_no} of {path} is {what}", file=sys.stderr)
            continue
        if not keep(rec):
            continue
        if args.json:
            sys.stdout.write(raw.decode("ascii", "replace").rstrip("\n") + "\n")
        else:
            rows.append(row(rec))
    if not args.json:
        print_table(rows)
    return 0


def print_table(rows: list[tuple[str, ...]]) -> None:
    widths = [len(c) for c in COLUMNS]
    for r in rows:
        # The last column (reason) is not padded, so long details do not widen the table.
        widths = [max(w, len(v)) for w, v in zip(widths, r, strict=True)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths[:-1]) + "  {}"
    print(fmt.format(*(c.upper() for c in COLUMNS)))
    for r in rows:
        print(fmt.format(*r))
