"""The audit chain: every kind of tampering is found, at the right record; a clean chain passes.

The chain below has seal_every = 5 and 12 records, so seq and line numbers coincide:
records 1-5, seal 6, records 7-11, seal 12, records 13-14, and the head at seq 14.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from pam_svmm.domain import audit_chain as ac
from pam_svmm.domain.audit_chain import Tamper

KEY = b"k" * 32
OTHER_KEY = b"o" * 32
EVERY = 5


def build(n: int = 12, key: bytes = KEY, every: int = EVERY) -> tuple[list[bytes], bytes]:
    """What the writer produces: the lines and the head."""
    lines: list[bytes] = []
    last: bytes | None = None
    for i in range(n):
        seq, prev = ac.next_link(last)
        last = ac.chain_line({"event": "auth", "user": f"user{i}", "outcome": "success"}, seq, prev)
        lines.append(last)
        if ac.is_seal_seq(seq + 1, every):
            last = ac.seal_line(seq + 1, ac.line_hash(last), key, "2026-11-27T12:00:00+00:00")
            lines.append(last)
    assert last is not None
    seq = json.loads(last)["seq"]
    return lines, ac.head_bytes(seq, ac.line_hash(last), key)


def rechain(lines: list[bytes]) -> list[bytes]:
    """What an attacker without the key can do after an edit: renumber and rehash forward
    (seals keep their old MACs: those need the key)."""
    out: list[bytes] = []
    prev = ac.ZERO_HASH
    for seq, raw in enumerate(lines, start=1):
        d = json.loads(raw)
        d["seq"], d["prev"] = seq, prev
        line = (json.dumps(d, sort_keys=True, separators=(",", ":")) + "\n").encode()
        out.append(line)
        prev = ac.line_hash(line)
    return out


def edit(line: bytes, **changes: object) -> bytes:
    d = json.loads(line)
    d.update(changes)
    return (json.dumps(d, sort_keys=True, separators=(",", ":")) + "\n").encode()


def check(lines: list[bytes], head: bytes | None, key: bytes | None = KEY, **kw: int) -> ac.Problem:
    result = ac.verify(lines, key, head, **kw)
    assert not result.ok
    assert result.first_problem is not None
    return result.first_problem


def test_a_clean_chain_verifies() -> None:
    lines, head = build()
    assert [json.loads(line)["seq"] for line in lines] == list(range(1, 15))
    result = ac.verify(lines, KEY, head, seal_every=EVERY)
    assert result.ok, result.first_problem
    assert (result.records, result.seals, result.last_seq, result.sealed) == (12, 2, 14, True)
    assert json.loads(lines[0])["prev"] == "0" * 64
    assert json.loads(lines[1])["prev"] == ac.line_hash(lines[0])


def test_an_empty_log_without_a_head_verifies() -> None:
    assert ac.verify([], KEY, None).ok


def _swap(lines: list[bytes], i: int, j: int) -> list[bytes]:
    out = list(lines)
    out[i], out[j] = out[j], out[i]
    return out


def _insert(lines: list[bytes], at: int, line: bytes) -> list[bytes]:
    return [*lines[:at], line, *lines[at:]]


# (name, tampering of (lines), expected (seq, line_no, kind)); indexes are 0-based lines.
TAMPERING: list[tuple[str, Callable[[list[bytes]], list[bytes]], tuple[int, int, Tamper]]] = [
    (
        "edited record",
        lambda ls: [*ls[:2], edit(ls[2], user="mallory"), *ls[3:]],
        (3, 3, Tamper.EDITED),
    ),
    (
        "edited first record's prev",
        lambda ls: [edit(ls[0], prev="1" * 64), *ls[1:]],
        (1, 1, Tamper.EDITED),
    ),
    (
        "edited seq",
        lambda ls: [*ls[:3], edit(ls[3], seq=40), *ls[4:]],
        (4, 4, Tamper.EDITED),
    ),
    (
        "edited into junk",
        lambda ls: [*ls[:3], b"{not json\n", *ls[4:]],
        (4, 4, Tamper.EDITED),
    ),
    ("deleted record", lambda ls: ls[:3] + ls[4:], (4, 4, Tamper.DELETED)),
    ("deleted two records", lambda ls: ls[:7] + ls[9:], (8, 8, Tamper.DELETED)),
    ("deleted seal", lambda ls: ls[:5] + ls[6:], (6, 6, Tamper.DELETED)),
    ("deleted first record", lambda ls: ls[1:], (1, 1, Tamper.DELETED)),
    ("swapped neighbours", lambda ls: _swap(ls, 2, 3), (4, 3, Tamper.REORDERED)),
    ("moved back", lambda ls: [*ls[:2], ls[8], *ls[2:8], *ls[9:]], (9, 3, Tamper.REORDERED)),
    ("moved forward", lambda ls: [ls[0], *ls[2:8], ls[1], *ls[8:]], (3, 2, Tamper.REORDERED)),
    (
        "inserted with the next seq and a good prev",
        lambda ls: _insert(
            ls, 8, ac.chain_line({"event": "auth", "user": "ghost"}, 9, ac.line_hash(ls[7]))
        ),
        (9, 9, Tamper.INSERTED),
    ),
    (
        "inserted junk line",
        lambda ls: _insert(ls, 8, b"hello\n"),
        (9, 9, Tamper.INSERTED),
    ),
    (
        "inserted with a fresh seq",
        lambda ls: _insert(
            ls, 8, ac.chain_line({"event": "auth", "user": "ghost"}, 99, ac.line_hash(ls[7]))
        ),
        (9, 9, Tamper.INSERTED),
    ),
    (
        "duplicated record",
        lambda ls: _insert(ls, 8, ls[7]),
        (9, 9, Tamper.INSERTED),
    ),
    ("cut-off last line", lambda ls: [*ls[:-1], ls[-1][:40]], (14, 14, Tamper.TRUNCATED)),
    (
        "forged seal",
        lambda ls: [*ls[:5], edit(ls[5], mac="ab" * 32), *ls[6:]],
        (6, 6, Tamper.BAD_SEAL),
    ),
    (
        "seal without a MAC",
        lambda ls: [*ls[:11], edit(ls[11], mac=""), *ls[12:]],
        (12, 12, Tamper.BAD_SEAL),
    ),
    # An attacker who recomputes the chain after the change: the next seal gives it away.
    (
        "edited and rehashed",
        lambda ls: rechain([*ls[:2], edit(ls[2], user="mallory"), *ls[3:]]),
        (6, 6, Tamper.BAD_SEAL),
    ),
    ("deleted and rehashed", lambda ls: rechain(ls[:3] + ls[4:]), (5, 5, Tamper.BAD_SEAL)),
    ("reordered and rehashed", lambda ls: rechain(_swap(ls, 7, 8)), (12, 12, Tamper.BAD_SEAL)),
    (
        "inserted and rehashed",
        lambda ls: rechain(_insert(ls, 1, ls[0])),
        (6, 6, Tamper.MISSING_SEAL),  # six records before the first seal
    ),
    # After the last seal, rehashing is caught by the head.
    (
        "edited and rehashed after the last seal",
        lambda ls: rechain([*ls[:13], edit(ls[13], outcome="failure")]),
        (13, 13, Tamper.EDITED),
    ),
    ("edited last record", lambda ls: [*ls[:13], edit(ls[13], user="x")], (13, 13, Tamper.EDITED)),
    ("truncated after the last seal", lambda ls: ls[:12], (13, 13, Tamper.TRUNCATED)),
    ("truncated to nothing", lambda ls: [], (1, 1, Tamper.TRUNCATED)),
    (
        "appended after the head",
        lambda ls: [
            *ls,
            ac.chain_line({"event": "auth", "user": "ghost"}, 15, ac.line_hash(ls[-1])),
        ],
        (15, 15, Tamper.INSERTED),
    ),
]


@pytest.mark.parametrize(
    ("tamper", "expected"), [t[1:] for t in TAMPERING], ids=[t[0] for t in TAMPERING]
)
def test_tampering_is_detected_at_the_first_broken_record(
    tamper: Callable[[list[bytes]], list[bytes]], expected: tuple[int, int, Tamper]
) -> None:
    lines, head = build()
    problem = check(tamper(lines), head, seal_every=EVERY)
    assert (problem.seq, problem.line_no, problem.kind) == expected, problem.detail


def test_a_missing_seal_is_named_when_the_interval_is_known() -> None:
    lines, head = build()
    tampered = rechain(lines[:5] + lines[6:])  # the seal at 6 dropped, the rest renumbered
    problem = check(tampered, head, seal_every=EVERY)
    assert (problem.seq, problem.kind) == (6, Tamper.MISSING_SEAL)
    # Without the interval, the next seal (now at seq 11) still fails.
    problem = check(tampered, head)
    assert (problem.seq, problem.kind) == (11, Tamper.BAD_SEAL)


def test_a_log_written_without_a_key_fails_a_keyed_verification() -> None:
    lines = []
    last = None
    for i in range(7):
        seq, prev = ac.next_link(last)
        last = ac.chain_line({"event": "auth", "user": f"u{i}"}, seq, prev)
        lines.append(last)
    assert ac.verify(lines, None, None).ok
    problem = check(lines, None, seal_every=EVERY)
    assert (problem.seq, problem.kind) == (6, Tamper.MISSING_SEAL)
    assert check(lines, None).kind is Tamper.BAD_HEAD  # no head


def test_seals_made_with_another_key_fail() -> None:
    lines, head = build(key=OTHER_KEY)
    problem = check(lines, head)
    assert (problem.seq, problem.line_no, problem.kind) == (6, 6, Tamper.BAD_SEAL)
    assert ac.verify(lines, OTHER_KEY, head).ok


@pytest.mark.parametrize(
    "head",
    [
        None,  # deleted
        b"",
        b"{not json",
        b'{"format":"svmm-audit-head/1","seq":14}',
    ],
    ids=["missing", "empty", "junk", "incomplete"],
)
def test_a_broken_head_is_detected(head: bytes | None) -> None:
    lines, _ = build()
    problem = check(lines, head)
    assert problem.kind is Tamper.BAD_HEAD


def test_a_head_with_an_edited_seq_or_hash_fails_its_mac() -> None:
    lines, head = build()
    d = json.loads(head)
    for change in ({"seq": 12}, {"seq": 20}, {"hash": ac.line_hash(lines[11])}):
        forged = json.dumps({**d, **change}).encode()
        assert check(lines, forged).kind is Tamper.BAD_HEAD
    assert check(lines, ac.head_bytes(14, d["hash"], OTHER_KEY)).kind is Tamper.BAD_HEAD


def test_a_seal_mac_does_not_pass_as_a_head_mac() -> None:
    lines, _ = build()
    seal = json.loads(lines[11])  # seq 12: MAC over (12, hash of line 11)
    head = json.dumps(
        {"format": ac.HEAD_FORMAT, "seq": 12, "hash": seal["prev"], "mac": seal["mac"]}
    ).encode()
    assert check(lines[:12], head).kind is Tamper.BAD_HEAD


def test_truncation_after_the_last_seal_is_seen_only_through_the_head() -> None:
    lines, head = build()
    truncated = lines[:12]  # ends with the seal at 12: consistent on its own
    assert ac.verify(truncated, None, None).ok  # the documented limit without the head
    problem = check(truncated, head)
    assert (problem.seq, problem.kind) == (13, Tamper.TRUNCATED)
    assert "seq 14" in problem.detail


def test_an_older_head_with_a_longer_log_means_records_were_added() -> None:
    lines, _ = build()
    old_head = ac.head_bytes(12, ac.line_hash(lines[11]), KEY)
    problem = check(lines, old_head)
    assert (problem.seq, problem.line_no, problem.kind) == (13, 13, Tamper.INSERTED)


def test_without_a_key_the_chain_is_still_checked_and_the_result_says_so() -> None:
    lines, head = build()
    result = ac.verify(lines, None, head)
    assert result.ok and not result.sealed
    problem = check([*lines[:2], edit(lines[2], user="x"), *lines[3:]], head, key=None)
    assert (problem.seq, problem.kind) == (3, Tamper.EDITED)
    # The head's seq still counts without the key.
    assert check(lines[:12], head, key=None).kind is Tamper.TRUNCATED


def test_legacy_records_before_the_chain_are_accepted_and_counted() -> None:
    legacy = [b'{"event":"auth","user":"old1"}\n', b'{"event":"auth","user":"old2"}\n']
    seq, prev = ac.next_link(legacy[-1])
    assert (seq, prev) == (1, ac.line_hash(legacy[-1]))
    first = ac.chain_line({"event": "auth", "user": "new"}, seq, prev)
    head = ac.head_bytes(1, ac.line_hash(first), KEY)
    result = ac.verify([*legacy, first], KEY, head)
    assert result.ok and result.legacy == 2 and result.records == 1
    # The last legacy line is bound by the chain.
    problem = check([legacy[0], b'{"event":"auth","user":"evil"}\n', first], head)
    assert problem.kind is Tamper.EDITED and problem.line_no == 2
    # Legacy lines are only accepted before the chain.
    fresh = ac.chain_line({"event": "auth", "user": "new"}, 1, ac.ZERO_HASH)
    problem = check([fresh, legacy[0]], None, key=None)
    assert (problem.seq, problem.line_no, problem.kind) == (2, 2, Tamper.MALFORMED)


def test_lines_split_only_at_newlines() -> None:
    data = b'{"a":"x\rx"}\n{"b":1}\npartial'
    assert ac.split_lines(data) == [b'{"a":"x\rx"}\n', b'{"b":1}\n', b"partial"]


def test_records_may_not_carry_chain_fields_or_pose_as_seals() -> None:
    with pytest.raises(ValueError):
        ac.chain_line({"event": "auth", "seq": 3}, 1, ac.ZERO_HASH)
    with pytest.raises(ValueError):
        ac.chain_line({"event": "seal"}, 1, ac.ZERO_HASH)


def test_next_link_continues_after_a_non_chain_line() -> None:
    assert ac.next_link(None) == (1, ac.ZERO_HASH)
    assert ac.next_link(b"torn{\n", fallback_seq=41) == (42, ac.line_hash(b"torn{\n"))
