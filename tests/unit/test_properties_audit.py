"""Properties of the audit trail's readers: any line is a record or none, any log (a good
chain with any line replaced, inserted or dropped, any head) verifies or names a broken
line within the log, and the writer always finds where to continue."""

from __future__ import annotations

import dataclasses

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pam_svmm.domain import audit_chain
from pam_svmm.domain.audit_chain import Tamper

PROPS = settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
KEY = b"k" * 32
SEAL_EVERY = 3


def _chain(n: int) -> tuple[list[bytes], bytes]:
    lines: list[bytes] = []
    seq, prev = 1, audit_chain.ZERO_HASH
    for i in range(n):
        line = audit_chain.chain_line({"event": "auth", "user": f"u{i}"}, seq, prev)
        lines.append(line)
        seq, prev = seq + 1, audit_chain.line_hash(line)
        if audit_chain.is_seal_seq(seq, SEAL_EVERY):
            line = audit_chain.seal_line(seq, prev, KEY, "2026-01-01T00:00:00+00:00")
            lines.append(line)
            seq, prev = seq + 1, audit_chain.line_hash(line)
    return lines, audit_chain.head_bytes(seq - 1, prev, KEY)


GOOD, HEAD = _chain(8)
hostile_lines = st.one_of(
    st.binary(max_size=80),
    st.binary(max_size=80).map(lambda b: b + b"\n"),
    st.integers(1, 3000).map(lambda n: b"[" * n + b"\n"),
    st.sampled_from([b"{}\n", b"null\n", b'{"seq": 1e999}\n', b'{"seq": -1, "prev": 5}\n',
                     b'{"event": "seal", "seq": 4}\n', b"NaN\n", b"\xff\xfe\n"]),
    st.sampled_from(GOOD),
)  # fmt: skip


@PROPS
@given(line=hostile_lines)
def test_any_line_is_a_record_or_none_and_the_writer_continues_after_it(line: bytes) -> None:
    d = audit_chain.parse_line(line)
    assert d is None or isinstance(d, dict)
    seq, prev = audit_chain.next_link(line, fallback_seq=7)
    assert seq >= 1 and len(prev) == 64
    assert audit_chain.parse_head(line) is None or line == HEAD


@st.composite
def damaged_logs(draw: st.DrawFn) -> list[bytes]:
    lines = list(GOOD)
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(lines)))
        how = draw(st.sampled_from(["replace", "insert", "drop"]))
        if how == "insert" or not lines:
            lines.insert(at, draw(hostile_lines))
        elif how == "replace":
            lines[min(at, len(lines) - 1)] = draw(hostile_lines)
        else:
            del lines[min(at, len(lines) - 1)]
    return lines


@PROPS
@given(lines=damaged_logs(), key=st.sampled_from([KEY, None]), head=st.sampled_from([HEAD, None]))
def test_a_damaged_log_verifies_only_if_unchanged_and_names_a_line_within_it(
    lines: list[bytes], key: bytes | None, head: bytes | None
) -> None:
    result = audit_chain.verify(lines, key, head, seal_every=SEAL_EVERY)
    if lines == GOOD:
        assert result.ok or (head is None and key is not None)
        return
    if result.ok:  # only what no check can see: an unkeyed, headless chain cut at its end
        assert key is None or head is None
        return
    problem = result.first_problem
    assert problem is not None and isinstance(problem.kind, Tamper)
    assert 1 <= problem.line_no <= len(lines) + 1


@PROPS
@given(head=st.binary(max_size=200) | hostile_lines)
def test_any_head_file_is_a_head_or_reported_bad(head: bytes) -> None:
    result = audit_chain.verify(GOOD, KEY, head, seal_every=SEAL_EVERY)
    if head != HEAD:
        assert not result.ok
        assert result.first_problem is not None


def test_the_good_chain_verifies() -> None:
    result = audit_chain.verify(GOOD, KEY, HEAD, seal_every=SEAL_EVERY)
    assert result.ok and result.sealed and result.records == 8
    assert dataclasses.replace(result, ok=False) != result
