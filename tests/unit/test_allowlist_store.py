"""The allowlist files and the session refcount (invariant 5): atomic, fixed owner and mode,
never written through a path a user could redirect, and race-free across processes."""

from __future__ import annotations

import json
import multiprocessing
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from pam_svmm.adapters import allowlist_store
from pam_svmm.adapters.allowlist_store import AllowlistStore, SessionRecords, UserSessions
from pam_svmm.errors import ConfigError, SessionFailed

NOBODY = 65534
DOC = {"format": "svmm-allowlist/1", "user": "alice", "uid": 10001, "vms": {}}
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown")


@pytest.fixture
def store(tmp_path: Path) -> AllowlistStore:
    return AllowlistStore(tmp_path / "run" / "allowlist")


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.lstat().st_mode)


def _nobodys_file(path: Path, text: str = "planted") -> None:
    path.write_text(text)
    os.chown(path, NOBODY, NOBODY)


# --- writing ---------------------------------------------------------------------------------


def test_write_creates_a_0755_folder_and_a_root_0644_file(store: AllowlistStore) -> None:
    store.write(10001, DOC)
    path = store.path(10001)
    assert path == store.folder / "10001.json"
    assert _mode(store.folder) == 0o755 and _mode(path) == 0o644
    st = path.stat()
    # Root's files are root's, whoever's umask or folder: the owner is fixed, not inherited.
    owner = (0, 0) if os.geteuid() == 0 else (os.geteuid(), os.getegid())
    assert (st.st_uid, st.st_gid) == owner
    assert json.loads(path.read_text()) == DOC
    assert store.read(10001) == DOC
    assert os.listdir(store.folder) == ["10001.json"]  # no temp file left


def test_umask_does_not_change_the_modes(store: AllowlistStore) -> None:
    old = os.umask(0o077)
    try:
        store.write(1, DOC)
    finally:
        os.umask(old)
    assert _mode(store.folder) == 0o755 and _mode(store.path(1)) == 0o644


def test_rewrite_replaces_the_inode_atomically(store: AllowlistStore) -> None:
    store.write(7, DOC)
    path = store.path(7)
    reader = path.open()  # a launcher reading the old version keeps a whole old file
    before = path.stat().st_ino
    store.write(7, {**DOC, "user": "bob"})
    assert path.stat().st_ino != before
    assert json.loads(reader.read()) == DOC
    reader.close()
    assert store.read(7) == {**DOC, "user": "bob"}


def test_failed_write_leaves_the_old_file_and_no_temp(
    store: AllowlistStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.write(7, DOC)

    def broken_fsync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(allowlist_store.os, "fsync", broken_fsync)
    with pytest.raises(SessionFailed, match="Input/output error"):
        store.write(7, {**DOC, "user": "bob"})
    monkeypatch.undo()
    assert store.read(7) == DOC
    assert os.listdir(store.folder) == ["7.json"]


def test_remove(store: AllowlistStore) -> None:
    store.write(7, DOC)
    assert store.remove(7) is True
    assert store.remove(7) is False
    assert store.read(7) is None


@pytest.mark.parametrize("uid", [-1, True, "7", "../x"])
def test_invalid_uid_is_refused(store: AllowlistStore, uid: Any) -> None:
    with pytest.raises(SessionFailed):
        store.write(uid, DOC)


# --- tampering -------------------------------------------------------------------------------


def test_symlink_planted_at_the_target_is_replaced_not_followed(
    store: AllowlistStore, tmp_path: Path
) -> None:
    store.write(1, DOC)  # makes the folder
    victim = tmp_path / "victim"
    victim.write_text("precious")
    os.symlink(victim, store.path(7))
    with pytest.raises(SessionFailed, match="symlink") as info:
        store.read(7)
    assert info.value.reason == "allowlist_tampered"
    store.write(7, DOC)
    assert victim.read_text() == "precious"
    assert not store.path(7).is_symlink() and _mode(store.path(7)) == 0o644
    assert store.read(7) == DOC


@needs_root
def test_file_precreated_by_a_user_at_the_target_is_replaced(store: AllowlistStore) -> None:
    store.write(1, DOC)
    _nobodys_file(store.path(7), json.dumps({**DOC, "vms": {"vm-secret": {}}}))
    os.chmod(store.path(7), 0o644)
    with pytest.raises(SessionFailed, match="owner uid 65534") as info:
        store.read(7)  # the launcher would never believe it
    assert info.value.reason == "allowlist_tampered"
    store.write(7, DOC)
    st = store.path(7).stat()
    assert (st.st_uid, st.st_gid, _mode(store.path(7))) == (0, 0, 0o644)
    assert store.read(7) == DOC


def test_a_file_with_another_mode_is_not_believed(store: AllowlistStore) -> None:
    store.write(7, DOC)
    os.chmod(store.path(7), 0o666)  # noqa: S103 - the tampering under test
    with pytest.raises(SessionFailed, match="mode 666"):
        store.read(7)


@needs_root
def test_file_precreated_at_the_temp_name_is_left_alone(
    store: AllowlistStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.write(1, DOC)
    planted = store.folder / ".7.json.planted.tmp"
    _nobodys_file(planted)
    victim_link = store.folder / ".7.json.link.tmp"
    os.symlink(planted, victim_link)
    names = iter([planted.name, victim_link.name])
    real = allowlist_store._temp_name
    monkeypatch.setattr(
        allowlist_store, "_temp_name", lambda final: next(names, None) or real(final)
    )
    store.write(7, DOC)
    assert planted.read_text() == "planted" and planted.stat().st_uid == NOBODY
    assert victim_link.is_symlink()
    assert store.read(7) == DOC


def test_every_temp_name_taken_is_an_error_not_a_write_through(
    store: AllowlistStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.write(1, DOC)
    planted = store.folder / ".7.json.planted.tmp"
    planted.write_text("planted")
    monkeypatch.setattr(allowlist_store, "_temp_name", lambda final: planted.name)
    with pytest.raises(SessionFailed, match="every name was taken"):
        store.write(7, DOC)
    assert planted.read_text() == "planted" and store.read(7) is None


def test_a_directory_at_the_target_is_an_error(store: AllowlistStore) -> None:
    (store.folder).mkdir(parents=True, mode=0o755)
    store.path(7).mkdir()
    with pytest.raises(SessionFailed):
        store.write(7, DOC)
    assert [n for n in os.listdir(store.folder) if n.endswith(".tmp")] == []


@pytest.mark.parametrize("mode", [0o775, 0o757, 0o777])
def test_folder_writable_by_others_is_refused(store: AllowlistStore, mode: int) -> None:
    store.folder.mkdir(parents=True)
    os.chmod(store.folder, mode)
    with pytest.raises(ConfigError, match="writable by group or others") as info:
        store.write(7, DOC)
    assert info.value.key == "session.allowlist_dir" and str(store.folder) in info.value.message
    assert not store.path(7).exists()


@needs_root
def test_folder_owned_by_a_user_is_refused(store: AllowlistStore) -> None:
    store.folder.mkdir(parents=True, mode=0o755)
    os.chown(store.folder, NOBODY, NOBODY)
    with pytest.raises(ConfigError, match=f"{store.folder} is owned by uid 65534"):
        store.write(7, DOC)
    assert not store.path(7).exists()


def test_symlinked_folder_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir(mode=0o755)
    link = tmp_path / "allowlist"
    link.symlink_to(real)
    with pytest.raises(ConfigError, match="symlink") as info:
        AllowlistStore(link).write(7, DOC)
    assert str(link) in info.value.message
    assert os.listdir(real) == []


def test_user_writable_parent_is_refused(tmp_path: Path) -> None:
    parent = tmp_path / "run"
    parent.mkdir()
    os.chmod(parent, 0o777)  # noqa: S103 - not sticky: a user could rename our folder away
    with pytest.raises(ConfigError, match="writable by group or others"):
        AllowlistStore(parent / "allowlist").write(7, DOC)


# --- the refcount ----------------------------------------------------------------------------


def test_session_records_are_root_only_and_dropped_with_the_last(tmp_path: Path) -> None:
    records = SessionRecords(tmp_path / "sessions")
    with records.locked(7) as h:
        state = h.load()
        assert state.sessions == {}
        state.sessions["s1"] = {"pid": 1}
        state.user = "alice"
        h.save(state)
    folder = tmp_path / "sessions"
    assert _mode(folder) == 0o700 and _mode(folder / "7.json") == 0o600
    with records.locked(7) as h:
        assert h.load() == UserSessions(7, {"s1": {"pid": 1}}, "alice")
        h.save(UserSessions(7, {}, "alice"))
    assert os.listdir(folder) == []  # record and lock file gone


def test_session_folder_readable_by_others_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "sessions"
    folder.mkdir(mode=0o755)
    os.chmod(folder, 0o755)  # noqa: S103 - readable by others: refused
    with pytest.raises(ConfigError) as info, SessionRecords(folder).locked(7):
        pass
    assert info.value.key == "session.state_dir"


def _open_close(args: tuple[str, str, str, int]) -> None:
    """One process: open a session of uid 7, then close it; the allowlist exists while any
    session is open (the same read-modify-write the session manager does)."""
    state_dir, allow_dir, sid, rounds = args
    records = SessionRecords(Path(state_dir))
    store = AllowlistStore(Path(allow_dir))
    for i in range(rounds):
        me = f"{sid}-{i}"
        with records.locked(7) as h:
            state = h.load()
            state.sessions[me] = {"pid": os.getpid()}
            store.write(7, {**DOC, "sessions": sorted(state.sessions)})
            h.save(state)
        doc = store.read(7)
        assert doc is not None and me in doc["sessions"], doc
        with records.locked(7) as h:
            state = h.load()
            del state.sessions[me]
            if state.sessions:
                store.write(7, {**DOC, "sessions": sorted(state.sessions)})
            else:
                store.remove(7)
            h.save(state)


def _open_only(args: tuple[str, str, str]) -> None:
    state_dir, allow_dir, sid = args
    records = SessionRecords(Path(state_dir))
    store = AllowlistStore(Path(allow_dir))
    with records.locked(7) as h:
        state = h.load()
        state.sessions[sid] = {"pid": os.getpid()}
        store.write(7, {**DOC, "sessions": sorted(state.sessions)})
        h.save(state)


def test_parallel_opens_and_closes_are_race_free(tmp_path: Path) -> None:
    state_dir, allow_dir = str(tmp_path / "sessions"), str(tmp_path / "allowlist")
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(8) as pool:
        # 8 processes, each opening and closing 25 sessions: nothing lost, nothing left.
        pool.map(_open_close, [(state_dir, allow_dir, f"p{n}", 25) for n in range(8)])
        assert os.listdir(allow_dir) == [] and os.listdir(state_dir) == []
        # 16 sessions opened at once: every one is counted and named in the allowlist.
        pool.map(_open_only, [(state_dir, allow_dir, f"s{n:02d}") for n in range(16)])
    expected = [f"s{n:02d}" for n in range(16)]
    assert json.loads((Path(allow_dir) / "7.json").read_text())["sessions"] == expected
    with SessionRecords(Path(state_dir)).locked(7) as h:
        assert sorted(h.load().sessions) == expected
