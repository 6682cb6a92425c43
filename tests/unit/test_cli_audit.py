"""`svmm audit verify` and `svmm audit show` on logs written by the real writer."""

from __future__ import annotations

import datetime as dt
import json
import multiprocessing
from pathlib import Path

import pytest

from pam_svmm.adapters.audit_log import AuditLog, head_path
from pam_svmm.cli.main import main
from pam_svmm.domain.audit_record import AuditRecord, CardFacts, Outcome
from tests.unit import cli_schemas

T = dt.datetime(2026, 11, 27, 12, 0, tzinfo=dt.UTC)


def rec(i: int, *, user: str = "", vm: str = "", outcome: Outcome = Outcome.SUCCESS) -> AuditRecord:
    return AuditRecord(
        event="vm_start" if vm else "auth",
        outcome=outcome,
        reason="ok" if outcome is Outcome.SUCCESS else "denied",
        time=T + dt.timedelta(hours=i),
        host="h",
        service="login",
        user=user or f"user{i}",
        card=CardFacts(fingerprint=f"{i:02x}" * 32),
        vm=vm,
    )


@pytest.fixture
def written(tmp_path: Path) -> tuple[Path, Path]:
    path, key = tmp_path / "log" / "audit.jsonl", tmp_path / "seal.key"
    log = AuditLog(path, syslog_mirror=False, seal_key=key, seal_every=4)
    for i in range(10):
        log.write(rec(i))
    log.write(rec(10, user="alice", vm="vm-web"))
    log.write(rec(11, user="alice", vm="vm-bank", outcome=Outcome.FAILURE))
    return path, key


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_verify_passes_with_a_one_line_summary(
    written: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    path, key = written
    code, out, _ = run(capsys, "audit", "verify", "--path", str(path), "--key", str(key))
    assert code == 0
    assert out.count("\n") == 1
    assert "intact: 12 records, 3 seals, last seq 15" in out and "seals and head verified" in out


def test_verify_names_the_edited_record_and_exits_1(
    written: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    path, key = written
    lines = path.read_bytes().splitlines(keepends=True)
    lines[6] = lines[6].replace(b'"user5"', b'"user9"')  # line 7 holds seq 7 (a seal came at 5)
    path.write_bytes(b"".join(lines))
    code, out, err = run(capsys, "audit", "verify", "--path", str(path), "--key", str(key))
    assert code == 1 and not out
    assert "seq 7, line 7: edited" in err


def test_verify_reports_truncation_through_the_head(
    written: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    path, key = written
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:-2]))
    code, _, err = run(capsys, "audit", "verify", "--path", str(path), "--key", str(key))
    assert code == 1 and "seq 14, line 14: truncated" in err
    head_path(path).unlink()
    code, _, err = run(capsys, "audit", "verify", "--path", str(path), "--key", str(key))
    assert code == 1 and "bad_head" in err
    # Chain only: nothing to say, and the summary says what was not checked.
    code, out, _ = run(capsys, "audit", "verify", "--path", str(path), "--no-key")
    assert code == 0 and "NOT checked" in out


def test_verify_with_the_wrong_key_fails(
    written: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, _ = written
    other = tmp_path / "other.key"
    other.write_bytes(b"z" * 32)
    other.chmod(0o600)
    code, _, err = run(capsys, "audit", "verify", "--path", str(path), "--key", str(other))
    assert code == 1 and "seq 5, line 5: bad_seal" in err


def test_verify_uses_the_configuration(
    written: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, key = written
    cfg = tmp_path / "svmm.toml"
    cfg.write_text(f'[audit]\npath = "{path}"\nseal_key = "{key}"\nseal_every = 4\n')
    code, out, _ = run(capsys, "--config", str(cfg), "audit", "verify")
    assert code == 0 and "intact" in out
    # The configured interval is enforced: a smaller one finds seals overdue.
    cfg.write_text(f'[audit]\npath = "{path}"\nseal_key = "{key}"\nseal_every = 2\n')
    code, _, err = run(capsys, "--config", str(cfg), "audit", "verify")
    assert code == 1 and "missing_seal" in err


def test_verify_of_no_log_or_an_unsafe_key_is_an_error(
    written: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, key = written
    code, _, err = run(capsys, "audit", "verify", "--path", str(tmp_path / "x"), "--no-key")
    assert code == 6 and "no audit log" in err
    key.chmod(0o644)
    code, _, err = run(capsys, "audit", "verify", "--path", str(path), "--key", str(key))
    assert code == 6 and str(key) in err and "0644" in err


def test_show_prints_a_table_without_seals(
    written: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    path, _ = written
    code, out, _ = run(capsys, "audit", "show", "--path", str(path))
    rows = out.splitlines()
    assert code == 0 and rows[0].split() == [
        "SEQ", "TIME", "EVENT", "OUTCOME", "USER", "SERVICE", "VM", "CARD", "REASON",
    ]  # fmt: skip
    assert len(rows) == 13 and "seal" not in out
    assert rows[1].split()[:5] == ["1", "2026-11-27", "12:00:00Z", "auth", "success"]
    code, out, _ = run(capsys, "audit", "show", "--path", str(path), "--seals")
    assert len(out.splitlines()) == 16 and "seal" in out


@pytest.mark.parametrize(
    ("filters", "users"),
    [
        (["--user", "alice"], ["alice", "alice"]),
        (["--vm", "vm-bank"], ["alice"]),
        (["--outcome", "failure"], ["alice"]),
        (["--event", "vm_start", "--outcome", "success"], ["alice"]),
        (["--since", "2026-11-27T20:00", "--until", "2026-11-27T22:00Z"], ["user8", "user9"]),
        (["--since", "2026-11-28"], []),
    ],
)  # fmt: skip
def test_show_filters_and_prints_json_lines(
    written: tuple[Path, Path],
    capsys: pytest.CaptureFixture[str],
    filters: list[str],
    users: list[str],
) -> None:
    path, _ = written
    code, out, _ = run(capsys, "audit", "show", "--path", str(path), "--json", *filters)
    assert code == 0
    assert [json.loads(line)["user"] for line in out.splitlines()] == users


def test_show_rejects_a_bad_time(written: tuple[Path, Path]) -> None:
    path, _ = written
    with pytest.raises(SystemExit) as e:
        main(["audit", "show", "--path", str(path), "--since", "yesterday"])
    assert e.value.code == 2


def _keep_writing(path: str, key: str, n: int) -> None:
    log = AuditLog(Path(path), syslog_mirror=False, seal_key=Path(key), seal_every=4)
    for i in range(n):
        log.write(rec(i))


def test_verify_while_logins_write_sees_a_consistent_moment(
    written: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    path, key = written
    writer = multiprocessing.get_context("fork").Process(
        target=_keep_writing, args=(str(path), str(key), 300)
    )
    writer.start()
    codes = []
    while writer.is_alive():
        codes.append(run(capsys, "audit", "verify", "--path", str(path), "--key", str(key)))
    writer.join()
    assert writer.exitcode == 0
    assert len(codes) > 1
    assert all(code == 0 for code, _, _ in codes), [c for c in codes if c[0]][:1]


@pytest.mark.parametrize(
    ("records", "says", "not_says"),
    [
        (2, "2 records, no seals yet", "seals and head verified"),
        (5, "5 records, 1 seal,", "1 seals"),
        (1, "1 record, no seals yet", "1 records"),
    ],
)
def test_verify_counts_seals_as_they_are(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], records: int, says: str, not_says: str
) -> None:
    path, key = tmp_path / "audit.jsonl", tmp_path / "seal.key"
    log = AuditLog(path, syslog_mirror=False, seal_key=key, seal_every=4)
    for i in range(records):
        log.write(rec(i))
    code, out, _ = run(capsys, "audit", "verify", "--path", str(path), "--key", str(key))
    assert code == 0, out
    assert says in out and not_says not in out and "0 seals" not in out
    if records < 4:  # nothing sealed yet: only the head's MAC was checked
        assert "head verified" in out and "seals and head" not in out


def test_verify_json_has_its_shape_intact_or_not(
    written: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    path, key = written
    code, out, _ = run(capsys, "audit", "verify", "--path", str(path), "--key", str(key), "--json")
    doc = cli_schemas.parse(out, cli_schemas.AUDIT_VERIFY)
    assert code == 0 and doc["intact"] and doc["problem"] is None
    assert (doc["records"], doc["seals"], doc["last_seq"], doc["sealed"]) == (12, 3, 15, True)
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join([*lines[:6], lines[6].replace(b'"user5"', b'"user9"'), *lines[7:]]))
    code, out, err = run(
        capsys, "audit", "verify", "--path", str(path), "--key", str(key), "--json"
    )
    doc = cli_schemas.parse(out, cli_schemas.AUDIT_VERIFY)
    assert code == 1 and not doc["intact"] and "edited" in err
    assert doc["problem"] == {
        "seq": 7,
        "line": 7,
        "kind": "edited",
        "detail": doc["problem"]["detail"],
    }
