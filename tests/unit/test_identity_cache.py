"""The offline identity cache: freshness, root-only files, atomic writes, symlinks."""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path

import pytest

from pam_svmm.adapters.identity_cache import IdentityCache
from pam_svmm.domain.identity import (
    AccountState,
    AccountStatus,
    Identity,
    PosixAccount,
    PosixGroup,
)
from pam_svmm.errors import ConfigError

NOW = dt.datetime(2025, 6, 1, 12, 0, tzinfo=dt.UTC)
FP = "a" * 64
FP2 = "b" * 64
HOUR = 3600.0


def entries(folder: Path) -> list[Path]:
    """The cache's entries (the sweep marker is housekeeping, not an entry)."""
    return [p for p in folder.iterdir() if p.name != ".swept"]


def alice(**kw: object) -> Identity:
    base: dict[str, object] = {
        "dn": "uid=alice,ou=people,dc=demo,dc=example",
        "account": PosixAccount("alice", 10001, 10001, "Alice", "/home/alice", "/bin/bash"),
        "roles": ("vm-users", "vm-admins"),
        "groups": (PosixGroup("users", 10000, ("alice", "bob")),),
        "state": AccountState(AccountStatus.ACTIVE),
        "certificates": (b"\x30\x82\x01\x00der",),
        "fetched_at": NOW,
    }
    base.update(kw)
    return Identity(**base)  # type: ignore[arg-type]


@pytest.fixture
def cache(tmp_path: Path) -> IdentityCache:
    return IdentityCache(tmp_path / "cache", max_age=HOUR)


def test_round_trip_by_fingerprint_and_by_name(cache: IdentityCache) -> None:
    cache.store(alice(), fingerprints=[FP], now=NOW)
    later = NOW + dt.timedelta(minutes=10)
    got = cache.by_fingerprint(FP, now=later)
    assert got is not None
    assert got.source == "offline-cache" and got.fetched_at == NOW
    expected = alice()
    assert (got.dn, got.account, got.roles, got.groups, got.state, got.certificates) == (
        expected.dn,
        expected.account,
        expected.roles,
        expected.groups,
        expected.state,
        expected.certificates,
    )
    assert cache.by_name("alice", now=later) == got
    assert cache.by_fingerprint(FP2, now=later) is None
    assert cache.by_name("bob", now=later) is None


def test_state_is_kept(cache: IdentityCache) -> None:
    state = AccountState(AccountStatus.DISABLED, "svmmDisabled TRUE")
    cache.store(alice(state=state), fingerprints=[FP], now=NOW)
    got = cache.by_name("alice", now=NOW)
    assert got is not None and got.state == state


def test_modes_are_root_only(cache: IdentityCache) -> None:
    cache.store(alice(), fingerprints=[FP], now=NOW)
    assert oct(cache.folder.stat().st_mode & 0o777) == "0o700"
    files = sorted(p.name for p in entries(cache.folder))
    assert files == [f"f-{FP}.json", "u-alice.json"]  # no temporary left behind
    for p in entries(cache.folder):
        assert p.stat().st_mode & 0o777 == 0o600


def test_no_secrets_and_only_known_fields(cache: IdentityCache) -> None:
    cache.store(alice(), fingerprints=[FP], now=NOW)
    entry = json.loads((cache.folder / "u-alice.json").read_text())
    assert set(entry) == {"version", "stored_at", "fingerprints", "identity"}
    assert set(entry["identity"]) == {
        "dn",
        "account",
        "roles",
        "groups",
        "state",
        "certificates",
    }


@pytest.mark.parametrize("age", [HOUR + 1, 10 * HOUR])
def test_a_stale_entry_is_never_returned_and_is_deleted(cache: IdentityCache, age: float) -> None:
    cache.store(alice(), fingerprints=[FP], now=NOW)
    later = NOW + dt.timedelta(seconds=age)
    assert cache.by_fingerprint(FP, now=later) is None
    assert cache.by_name("alice", now=later) is None
    assert entries(cache.folder) == []


def test_exactly_max_age_is_still_fresh_one_second_later_is_not(cache: IdentityCache) -> None:
    cache.store(alice(), fingerprints=[FP], now=NOW)
    assert cache.by_name("alice", now=NOW + dt.timedelta(seconds=HOUR)) is not None
    assert cache.by_name("alice", now=NOW + dt.timedelta(seconds=HOUR + 1)) is None


def test_a_future_stamp_does_not_extend_the_life(cache: IdentityCache) -> None:
    # Written while the clock was a day ahead: not trusted once the clock is right.
    cache.store(alice(), fingerprints=[FP], now=NOW + dt.timedelta(days=1))
    assert cache.by_name("alice", now=NOW) is None


def test_fingerprint_needs_a_fresh_index_and_a_listing_user_file(cache: IdentityCache) -> None:
    cache.store(alice(), fingerprints=[FP], now=NOW)
    # A second card, refreshed later: both listed, the first card's index ages on its own.
    cache.store(alice(), fingerprints=[FP2], now=NOW + dt.timedelta(minutes=50))
    t = NOW + dt.timedelta(minutes=70)
    assert cache.by_fingerprint(FP2, now=t) is not None
    assert cache.by_fingerprint(FP, now=t) is None  # its mapping is older than max_age
    # An index that points at a user whose file does not list the fingerprint: refused.
    (cache.folder / f"f-{'c' * 64}.json").write_text(
        json.dumps({"version": 1, "stored_at": t.isoformat(), "name": "alice"})
    )
    os.chmod(cache.folder / f"f-{'c' * 64}.json", 0o600)
    assert cache.by_fingerprint("c" * 64, now=t) is None


def test_store_sweeps_every_stale_file(cache: IdentityCache) -> None:
    cache.store(alice(), fingerprints=[FP], now=NOW)
    bob = alice(dn="uid=bob", account=PosixAccount("bob", 10002, 10002))
    cache.store(bob, fingerprints=[FP2], now=NOW + dt.timedelta(hours=2))
    assert sorted(p.name for p in entries(cache.folder)) == [f"f-{FP2}.json", "u-bob.json"]
    assert cache.prune(now=NOW + dt.timedelta(hours=4)) == 2
    assert entries(cache.folder) == []


def test_max_age_zero_disables(tmp_path: Path) -> None:
    cache = IdentityCache(tmp_path / "off", max_age=0)
    cache.store(alice(), fingerprints=[FP], now=NOW)
    assert cache.by_fingerprint(FP, now=NOW) is None
    assert cache.by_name("alice", now=NOW) is None
    assert not (tmp_path / "off").exists()


def test_planted_symlink_is_never_followed_nor_written_through(
    cache: IdentityCache, tmp_path: Path
) -> None:
    cache.store(alice(), fingerprints=[FP], now=NOW)
    # An attacker's file with a "valid" entry for mallory, linked in as alice's entry.
    forged = tmp_path / "forged.json"
    entry = json.loads((cache.folder / "u-alice.json").read_text())
    entry["identity"]["roles"] = ["vm-admins", "root"]
    forged.write_text(json.dumps(entry))
    os.chmod(forged, 0o600)
    (cache.folder / "u-alice.json").unlink()
    (cache.folder / "u-alice.json").symlink_to(forged)
    assert cache.by_name("alice", now=NOW) is None
    assert cache.by_fingerprint(FP, now=NOW) is None
    # A store replaces the link itself; the target is untouched.
    before = forged.read_bytes()
    cache.store(alice(), fingerprints=[FP], now=NOW)
    assert forged.read_bytes() == before
    assert not (cache.folder / "u-alice.json").is_symlink()
    got = cache.by_name("alice", now=NOW)
    assert got is not None and "root" not in got.roles


def test_symlink_to_a_victim_is_not_written(cache: IdentityCache, tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious")
    cache.folder.mkdir(mode=0o700)
    (cache.folder / f"f-{FP}.json").symlink_to(victim)
    cache.store(alice(), fingerprints=[FP], now=NOW)
    assert victim.read_text() == "precious"


def test_cache_folder_that_is_a_symlink_is_refused(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(real)
    cache = IdentityCache(tmp_path / "link", max_age=HOUR)
    with pytest.raises(ConfigError, match="symlink"):
        cache.store(alice(), fingerprints=[FP], now=NOW)
    assert entries(real) == []


def test_group_accessible_folder_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "open"
    folder.mkdir()
    os.chmod(folder, 0o750)  # noqa: S103 - the refused case
    with pytest.raises(ConfigError, match="0700"):
        IdentityCache(folder, max_age=HOUR).by_name("alice", now=NOW)


def test_group_readable_file_is_ignored(cache: IdentityCache) -> None:
    cache.store(alice(), fingerprints=[FP], now=NOW)
    os.chmod(cache.folder / "u-alice.json", 0o640)
    assert cache.by_name("alice", now=NOW) is None


@pytest.mark.parametrize("garbage", [b"", b"{", b"[]", b'{"version": 99}', b"\xff\xfe"])
def test_malformed_files_are_absent_and_removed(cache: IdentityCache, garbage: bytes) -> None:
    cache.store(alice(), fingerprints=[FP], now=NOW)
    path = cache.folder / "u-alice.json"
    path.write_bytes(garbage)
    assert cache.by_name("alice", now=NOW) is None
    assert not path.exists()


def test_wrong_shape_is_absent(cache: IdentityCache) -> None:
    cache.store(alice(), fingerprints=[FP], now=NOW)
    path = cache.folder / "u-alice.json"
    entry = json.loads(path.read_text())
    entry["identity"]["account"]["uid"] = "0"
    path.write_text(json.dumps(entry))
    assert cache.by_name("alice", now=NOW) is None


def test_entry_under_another_name_is_refused(cache: IdentityCache) -> None:
    cache.store(alice(), fingerprints=[FP], now=NOW)
    os.rename(cache.folder / "u-alice.json", cache.folder / "u-bob.json")
    assert cache.by_name("bob", now=NOW) is None


@pytest.mark.parametrize("bad", ["../etc/passwd", "A" * 64, "a" * 63, "a/b"])
def test_fingerprints_are_validated(cache: IdentityCache, bad: str) -> None:
    with pytest.raises(ValueError):
        cache.by_fingerprint(bad, now=NOW)


def test_names_are_validated(cache: IdentityCache) -> None:
    assert cache.by_name("../u-alice", now=NOW) is None
    with pytest.raises(ValueError):
        cache.store(alice(account=PosixAccount("../x", 1, 1)), fingerprints=[FP], now=NOW)


def test_an_unchanged_identity_is_not_rewritten_within_a_minute(cache: IdentityCache) -> None:
    """svmmd logs the same person in again and again: no rewrite (and fsync) each time, but
    any change, a new certificate or a minute passing writes again."""
    cache.store(alice(), fingerprints=[FP], now=NOW)

    def inodes() -> dict[str, int]:
        return {p.name: p.stat().st_ino for p in entries(cache.folder)}

    first = inodes()
    cache.store(alice(), fingerprints=[FP], now=NOW + dt.timedelta(seconds=30))
    assert inodes() == first  # nothing replaced
    assert cache.by_fingerprint(FP, now=NOW + dt.timedelta(seconds=30)).fetched_at == NOW  # type: ignore[union-attr]
    cache.store(alice(roles=("vm-users",)), fingerprints=[FP], now=NOW + dt.timedelta(seconds=31))
    changed = inodes()
    assert changed != first
    assert cache.by_name("alice", now=NOW + dt.timedelta(seconds=31)).roles == ("vm-users",)  # type: ignore[union-attr]
    cache.store(alice(roles=("vm-users",)), fingerprints=[FP2], now=NOW + dt.timedelta(seconds=32))
    assert inodes() != changed and "f-" + FP2 + ".json" in inodes()
    again = inodes()
    cache.store(alice(roles=("vm-users",)), fingerprints=[FP], now=NOW + dt.timedelta(seconds=93))
    assert inodes() != again  # over a minute since the last write: stamped anew
