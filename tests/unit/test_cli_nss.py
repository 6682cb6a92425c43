"""`svmm id` and `svmm nss sync` through the real entry point, over an in-memory directory:
they say what happened (nothing is "synced" or "written" that was not), and --json."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pam_svmm.cli import nss as nss_cli
from pam_svmm.cli.main import main
from tests.unit import cli_schemas
from tests.unit.nss_directory import ALICE, BOB, GROUPS, Directory

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the writer needs a root-owned folder")


class Env:
    def __init__(self, tmp: Path) -> None:
        self.dir = tmp / "eu"
        self.config = tmp / "svmm.toml"
        self.config.write_text(f'[nss]\ndir = "{self.dir}"\n')
        self.passwd, self.group = tmp / "passwd", tmp / "group"
        self.passwd.write_text("root:x:0:0::/root:/bin/bash\nbob:x:1000:1000::/:/bin/sh\n")
        self.group.write_text("root:x:0:\n")
        self.directory = Directory([ALICE, BOB], GROUPS)

    def local(self) -> list[str]:
        return ["--local-passwd", str(self.passwd), "--local-group", str(self.group)]


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Env:
    e = Env(tmp_path)
    monkeypatch.setattr(nss_cli, "identity_source", lambda cfg: e.directory)
    monkeypatch.setattr(nss_cli, "LOCAL_PASSWD", e.passwd)
    return e


def svmm(capsys: pytest.CaptureFixture[str], env: Env, *argv: str) -> tuple[int, str, str]:
    code = main(["--config", str(env.config), *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_id_says_synced_only_once_the_files_hold_the_account(
    env: Env, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = svmm(capsys, env, "id", "alice")
    assert code == 0
    assert "nss: not synced yet" in out and "run svmm nss sync" in out
    assert "synced by svmm nss sync" not in out
    assert svmm(capsys, env, "nss", "sync", *env.local())[0] == 0
    code, out, _ = svmm(capsys, env, "id", "alice")
    assert code == 0 and "nss: synced by svmm nss sync" in out
    # bob is a local account: never synced, and it says why
    code, out, _ = svmm(capsys, env, "id", "bob")
    assert "nss: not synced: local_name_conflict" in out


def test_a_dry_run_says_what_it_would_write(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = svmm(capsys, env, "nss", "sync", "--dry-run", *env.local())
    assert code == 0
    assert "written" not in out and "wrote" not in out
    assert "passwd: 1 to write, 1 skipped" in out and "dry run: nothing written" not in out
    assert f"dry run: {env.dir} left as it is" in out
    assert not env.dir.exists()
    code, out, _ = svmm(capsys, env, "nss", "sync", *env.local())
    assert code == 0 and "passwd: 1 written, 1 skipped" in out


def test_id_json(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = svmm(capsys, env, "id", "alice", "--json")
    doc = cli_schemas.parse(out, cli_schemas.ID)
    assert code == 0 and doc["user"] == "alice" and doc["uid"] == 10001
    assert doc["groups"] == [{"name": "alice", "gid": 10001}, {"name": "vm-users", "gid": 20001}]
    assert doc["nss"] == {"eligible": True, "synced": False, "problem": None, "detail": None}
    code, out, _ = svmm(capsys, env, "id", "bob", "--json")
    doc = cli_schemas.parse(out, cli_schemas.ID)
    assert doc["nss"]["problem"] == "local_name_conflict" and not doc["nss"]["eligible"]


@pytest.mark.parametrize("dry_run", [True, False])
def test_sync_json(env: Env, capsys: pytest.CaptureFixture[str], dry_run: bool) -> None:
    flags = ["--dry-run", "--show"] if dry_run else []
    code, out, _ = svmm(capsys, env, "nss", "sync", "--json", *flags, *env.local())
    doc = cli_schemas.parse(out, cli_schemas.NSS_SYNC)
    assert code == 0 and doc["dry_run"] is dry_run and doc["written"] is not dry_run
    assert doc["passwd"] == {"entries": 1, "skipped": 1}
    assert doc["group"] == {"entries": 2, "skipped": 0, "members_dropped": 1}
    assert doc["conflicts"] == 1
    bob = {"kind": "passwd", "name": "bob", "reason": "local_name_conflict"}
    assert [s for s in doc["skipped"] if s["kind"] == "passwd"] == [
        {**bob, "detail": "a local account has this name"}
    ]
    if dry_run:
        assert doc["text"]["passwd"].startswith("alice:*:10001:")
    else:
        assert doc["text"] is None and (env.dir / "passwd").exists()


def test_nss_status_json(env: Env, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = svmm(capsys, env, "nss", "status", "--json", *env.local())
    doc = cli_schemas.parse(out, cli_schemas.NSS_STATUS)
    assert code == 3 and [f["exists"] for f in doc["files"]] == [False, False]
    svmm(capsys, env, "nss", "sync", *env.local())
    code, out, _ = svmm(capsys, env, "nss", "status", "--json", *env.local())
    doc = cli_schemas.parse(out, cli_schemas.NSS_STATUS)
    assert code == 0 and doc["files"][0]["entries"] == 1 and doc["conflicts"] == []
