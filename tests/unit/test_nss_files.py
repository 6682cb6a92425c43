"""Writing the extrausers files (atomic, all-or-nothing, never through a redirectable path) and
the `svmm id` / `svmm nss` commands over an in-memory directory."""

from __future__ import annotations

import argparse
import os
import stat
from pathlib import Path

import pytest

from pam_svmm.adapters import nss_files
from pam_svmm.adapters.nss_files import NssWriteError
from pam_svmm.cli import nss as nss_cli
from pam_svmm.cli.main import exit_code
from pam_svmm.domain.identity import PosixAccount
from pam_svmm.errors import SvmmError
from tests.unit.nss_directory import ALICE, BOB, GROUPS, Directory

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="checks root ownership")
FILES = {"passwd": "alice:*:10001:10001::/home/alice:/bin/bash\n", "group": "alice:*:10001:\n"}


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


# --- the writer --------------------------------------------------------------------------


@needs_root
def test_creates_the_folder_and_files_with_fixed_owner_and_mode(tmp_path: Path) -> None:
    d = tmp_path / "extrausers"
    old = os.umask(0o077)
    try:
        nss_files.write_files(d, FILES)
    finally:
        os.umask(old)
    assert mode(d) == 0o755
    for name, text in FILES.items():
        p = d / name
        assert p.read_text() == text
        assert mode(p) == 0o644
        assert (p.stat().st_uid, p.stat().st_gid) == (0, 0)
    assert sorted(os.listdir(d)) == ["group", "passwd"]  # no temporaries left


@needs_root
def test_replaces_by_rename_so_readers_see_old_or_new(tmp_path: Path) -> None:
    nss_files.write_files(tmp_path, FILES)
    before = (tmp_path / "passwd").stat().st_ino
    reader = (tmp_path / "passwd").open()  # a process reading during the sync
    nss_files.write_files(tmp_path, {"passwd": "bob:*:10002:10002::/home/bob:/bin/sh\n"})
    assert reader.read() == FILES["passwd"]  # still the complete old file
    reader.close()
    assert (tmp_path / "passwd").stat().st_ino != before
    assert (tmp_path / "passwd").read_text().startswith("bob:")
    assert (tmp_path / "group").read_text() == FILES["group"]  # not passed: untouched


@needs_root
def test_a_failure_before_the_renames_leaves_every_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    nss_files.write_files(tmp_path, FILES)
    calls = {"n": 0}
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        calls["n"] += 1
        if calls["n"] == 2:  # the second file's temporary (the disk fills up, say)
            raise OSError(28, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(nss_files.os, "fsync", fsync)
    with pytest.raises(NssWriteError, match="No space left"):
        nss_files.write_files(
            tmp_path, {"passwd": "new:*:10009:10009::/home/new:/bin/sh\n", "group": "new:*:1:\n"}
        )
    assert {n: (tmp_path / n).read_text() for n in FILES} == FILES
    assert sorted(os.listdir(tmp_path)) == ["group", "passwd"]


@needs_root
def test_stale_temporaries_are_removed(tmp_path: Path) -> None:
    (tmp_path / ".svmm-tmp-passwd-dead").write_text("x")
    nss_files.write_files(tmp_path, FILES)
    assert sorted(os.listdir(tmp_path)) == ["group", "passwd"]


def test_refuses_a_symlinked_folder(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir(mode=0o755)
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(NssWriteError, match="symbolic link"):
        nss_files.write_files(tmp_path / "link", FILES, owner=os.geteuid())
    assert list(real.iterdir()) == []


@pytest.mark.parametrize("bad_mode", [0o777, 0o775, 0o757])
def test_refuses_a_folder_others_can_write(tmp_path: Path, bad_mode: int) -> None:
    d = tmp_path / "eu"
    d.mkdir()
    d.chmod(bad_mode)
    with pytest.raises(NssWriteError, match="writable by group or others"):
        nss_files.write_files(d, FILES, owner=os.geteuid())
    assert list(d.iterdir()) == []


@needs_root
def test_refuses_a_folder_owned_by_someone_else(tmp_path: Path) -> None:
    d = tmp_path / "eu"
    d.mkdir(mode=0o755)
    os.chown(d, 65534, 65534)
    with pytest.raises(NssWriteError, match="owned by uid 65534"):
        nss_files.write_files(d, FILES)


def test_refuses_a_folder_below_a_user_writable_ancestor(tmp_path: Path) -> None:
    (tmp_path / "open").mkdir()
    (tmp_path / "open").chmod(0o777)  # anyone could rename "eu" away and put their own
    (tmp_path / "open" / "eu").mkdir(mode=0o755)
    with pytest.raises(NssWriteError, match="can be changed by other users"):
        nss_files.write_files(tmp_path / "open" / "eu", FILES, owner=os.geteuid())


def test_a_sticky_ancestor_is_fine(tmp_path: Path) -> None:
    (tmp_path / "sticky").mkdir()
    (tmp_path / "sticky").chmod(0o1777)
    nss_files.write_files(tmp_path / "sticky" / "eu", FILES, owner=os.geteuid())
    assert (tmp_path / "sticky" / "eu" / "passwd").read_text() == FILES["passwd"]


def test_only_known_file_names(tmp_path: Path) -> None:
    with pytest.raises(NssWriteError, match="unexpected"):
        nss_files.write_files(tmp_path, {"../passwd": "x"}, owner=os.geteuid())


def test_status_counts_entries_and_ages(tmp_path: Path) -> None:
    nss_files.write_files(tmp_path, FILES, owner=os.geteuid())
    mtime = (tmp_path / "passwd").stat().st_mtime
    got = {s.name: s for s in nss_files.status(tmp_path, now=mtime + 90)}
    assert got["passwd"].exists and got["passwd"].entries == 1
    assert got["passwd"].age == pytest.approx(90, abs=1)
    (tmp_path / "group").unlink()
    got = {s.name: s for s in nss_files.status(tmp_path)}
    assert not got["group"].exists


# --- the commands ------------------------------------------------------------------------


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, object]:
    cfg = tmp_path / "svmm.toml"
    cfg.write_text(f'[nss]\ndir = "{tmp_path / "eu"}"\n')
    (tmp_path / "passwd").write_text("root:x:0:0::/root:/bin/bash\nbob:x:1000:1000::/:/bin/sh\n")
    (tmp_path / "group").write_text("root:x:0:\n")
    directory = Directory([ALICE, BOB], GROUPS)
    monkeypatch.setattr(nss_cli, "identity_source", lambda cfg: directory)
    if os.geteuid() != 0:
        pytest.skip("the writer requires a root-owned folder")
    return {"cfg": cfg, "dir": tmp_path / "eu", "tmp": tmp_path, "directory": directory}


def run(env: dict[str, object], *argv: str) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config")
    nss_cli.register(parser.add_subparsers(dest="group", required=True))
    tmp = env["tmp"]
    assert isinstance(tmp, Path)
    local = ["--local-passwd", str(tmp / "passwd"), "--local-group", str(tmp / "group")]
    args = parser.parse_args(
        ["--config", str(env["cfg"]), *argv, *(local if argv[0] == "nss" else [])]
    )
    try:
        return int(args.func(args))
    except SvmmError as e:
        print(f"svmm: {e.message}")
        return exit_code(e)


def test_sync_writes_and_reports(env: dict[str, object], capsys: pytest.CaptureFixture) -> None:
    assert run(env, "nss", "sync") == 0
    out = capsys.readouterr().out
    d = env["dir"]
    assert isinstance(d, Path)
    assert (d / "passwd").read_text() == "alice:*:10001:10001:Alice:/home/alice:/bin/bash\n"
    assert (d / "group").read_text() == "alice:*:10001:\nvm-users:*:20001:alice\n"
    assert "passwd: 1 written, 1 skipped" in out
    assert "skipped passwd bob: local_name_conflict" in out
    assert "dropped member vm-users/bob: member_is_local_account" in out


def test_dry_run_writes_nothing(env: dict[str, object], capsys: pytest.CaptureFixture) -> None:
    assert run(env, "nss", "sync", "--dry-run", "--show") == 0
    out = capsys.readouterr().out
    assert "alice:*:10001" in out and "dry run: " in out and "left as it is" in out
    d = env["dir"]
    assert isinstance(d, Path)
    assert not d.exists()


def test_directory_failure_mid_read_writes_nothing(env: dict[str, object]) -> None:
    assert run(env, "nss", "sync") == 0
    d, directory = env["dir"], env["directory"]
    assert isinstance(d, Path) and isinstance(directory, Directory)
    before = (d / "passwd").read_bytes(), (d / "passwd").stat().st_mtime_ns
    directory._accounts = [ALICE, PosixAccount("carol", 10003, 10003, "", "/home/c", "/bin/sh")]
    directory.fail_after = 1
    assert run(env, "nss", "sync") == 3  # Undecided
    assert ((d / "passwd").read_bytes(), (d / "passwd").stat().st_mtime_ns) == before


def test_refuses_to_empty_the_files_unless_told(
    env: dict[str, object], capsys: pytest.CaptureFixture
) -> None:
    assert run(env, "nss", "sync") == 0
    directory, d = env["directory"], env["dir"]
    assert isinstance(directory, Directory) and isinstance(d, Path)
    directory._accounts = []
    assert run(env, "nss", "sync") != 0
    assert "not emptying it" in capsys.readouterr().out
    assert "alice" in (d / "passwd").read_text()
    assert run(env, "nss", "sync", "--allow-empty") == 0
    assert (d / "passwd").read_text() == ""


def test_status_reports_counts_and_new_local_conflicts(
    env: dict[str, object], capsys: pytest.CaptureFixture
) -> None:
    assert run(env, "nss", "status") == 3  # nothing synced yet
    assert "missing" in capsys.readouterr().out
    assert run(env, "nss", "sync") == 0
    capsys.readouterr()
    assert run(env, "nss", "status") == 0
    out = capsys.readouterr().out
    assert "passwd: 1 entries" in out and "conflicts: 0" in out
    tmp = env["tmp"]
    assert isinstance(tmp, Path)
    with (tmp / "passwd").open("a") as f:  # a local alice appears after the sync
        f.write("alice:x:1001:1001::/home/alice:/bin/sh\n")
    assert run(env, "nss", "status") == 3
    assert "conflict: alice is also a local passwd entry" in capsys.readouterr().out


def test_id_prints_like_id1_plus_roles_and_entry(
    env: dict[str, object], capsys: pytest.CaptureFixture
) -> None:
    assert run(env, "id", "alice") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "uid=10001(alice) gid=10001(alice) groups=10001(alice),20001(vm-users)"
    assert "roles: vm-users" in lines
    assert "dn: uid=alice,ou=people,dc=demo,dc=example" in lines
    assert "source: directory" in lines
    assert "nss: not synced yet (run svmm nss sync)" in lines  # eligible, nothing synced yet


def test_id_unknown_user_is_a_refusal(env: dict[str, object]) -> None:
    assert run(env, "id", "nobody-here") == 1


def test_identity_source_needs_the_directory_enabled(tmp_path: Path) -> None:
    from pam_svmm import config as config_mod
    from pam_svmm.errors import ConfigError

    cfg = tmp_path / "svmm.toml"
    cfg.write_text("[nss]\n")
    with pytest.raises(ConfigError, match=r"directory\.enabled"):
        nss_cli.identity_source(config_mod.load(cfg))
