"""svmmd's volume keys without QEMU: the in-memory store (per uid, session, volume; wiped on
drop, replacement and close), the root-only hold_keys/drop_keys requests and their validation,
their audit records (names and cards, never keys), and the volume image checks. (Booting with
the keys: tests/integration/test_launcher_keys.py.)"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from pam_svmm.errors import LauncherRefused
from pam_svmm.services.key_store import KeyStore
from pam_svmm.services.launcher import parse_request, volume_image
from tests.unit.launcher_fixtures import (
    ALICE_UID,
    BOB_UID,
    CARD,
    LocalPolicy,
    allowlist_bytes,
    audit_records,
    live_session,
    make_launcher,
    request,
)

KEY = "q7LDm1r0pZJ9b8vT2xHk4wYcN5sF6gA3eU0iO_-KjRQ"
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown")


def _hold(uid: int = ALICE_UID, session: str = "s1", **kw: Any) -> bytes:
    doc: dict[str, Any] = {
        "uid": uid,
        "user": "alice",
        "session": session,
        "card_fingerprint": CARD.fingerprint,
        "card_serial": CARD.serial,
        "volumes": [{"name": "secret-data", "passphrase": KEY}],
        **kw,
    }
    return request("hold_keys", **doc)


# --- the store ----------------------------------------------------------------------------


def test_a_key_two_sessions_hold_stays_until_both_drop() -> None:
    store = KeyStore()
    a, b = bytearray(b"key-a"), bytearray(b"key-b")
    store.hold(ALICE_UID, "s1", {"vol": a}, user="alice")
    store.hold(ALICE_UID, "s2", {"vol": b}, user="alice")
    assert store.held(ALICE_UID) == {"vol"} and store.held(BOB_UID) == set()
    borrowed = store.borrow(ALICE_UID, ["vol"])
    assert borrowed == {"vol": b"key-b"} and borrowed["vol"] is not b  # a copy, newest session
    dropped = store.drop(ALICE_UID, "s2")
    assert [(d.session, d.volume) for d in dropped] == [("s2", "vol")]
    assert b == bytes(5) and a == b"key-a" and store.held(ALICE_UID) == {"vol"}
    assert store.drop(ALICE_UID, "s1")[0].volume == "vol" and a == bytes(5)
    assert store.held(ALICE_UID) == set() and store.sessions(ALICE_UID) == []
    with pytest.raises(KeyError):
        store.borrow(ALICE_UID, ["vol"])
    assert store.drop(ALICE_UID, "s1") == []


def test_replacing_a_key_wipes_the_old_one_and_close_wipes_all() -> None:
    store = KeyStore()
    old, new, other = bytearray(b"old"), bytearray(b"new"), bytearray(b"bob")
    store.hold(ALICE_UID, "s1", {"vol": old}, user="alice")
    store.hold(ALICE_UID, "s1", {"vol": new}, user="alice")
    store.hold(BOB_UID, "t1", {"x": other}, user="bob")
    assert old == bytes(3) and store.borrow(ALICE_UID, ["vol"])["vol"] == b"new"
    store.close()
    assert new == bytes(3) and other == bytes(3)
    assert store.held(ALICE_UID) == set() and store.held(BOB_UID) == set()


def test_drop_all_sessions_of_a_uid_only() -> None:
    store = KeyStore()
    k1, k2, kb = bytearray(b"1"), bytearray(b"2"), bytearray(b"b")
    store.hold(ALICE_UID, "s1", {"v1": k1}, user="alice", card_fingerprint="ab")
    store.hold(ALICE_UID, "s2", {"v2": k2}, user="alice")
    store.hold(BOB_UID, "s1", {"v1": kb}, user="bob")
    dropped = store.drop(ALICE_UID, None)
    assert sorted((d.session, d.volume) for d in dropped) == [("s1", "v1"), ("s2", "v2")]
    assert dropped[0].card_fingerprint == "ab"
    assert k1 == b"\0" and k2 == b"\0" and kb == b"b" and store.held(BOB_UID) == {"v1"}


# --- the requests -------------------------------------------------------------------------


@pytest.mark.parametrize("peer", [ALICE_UID, BOB_UID, 65534, None])
def test_key_ops_are_roots_only(peer: int | None) -> None:
    for line in (_hold(), request("drop_keys", uid=ALICE_UID, session=None), _hold(bogus=1)):
        with pytest.raises(LauncherRefused) as e:
            parse_request(line, peer)
        assert e.value.reason == "not_permitted"


def test_a_hold_request_from_root() -> None:
    r = parse_request(_hold(), 0)
    assert (r.op, r.uid, r.user, r.session) == ("hold_keys", ALICE_UID, "alice", "s1")
    assert r.card_fingerprint == CARD.fingerprint and r.keys == {"secret-data": KEY.encode()}
    assert KEY not in repr(r)
    r.wipe()
    assert r.keys["secret-data"] == bytes(len(KEY))
    drop = parse_request(request("drop_keys", uid=ALICE_UID, session=None), 0)
    assert (drop.op, drop.uid, drop.session) == ("drop_keys", ALICE_UID, None)
    assert parse_request(request("drop_keys", uid=ALICE_UID, session="s1"), 0).session == "s1"
    sid = "-:4242:0123456789abcdef"  # what the PAM module makes when there is no tty
    assert parse_request(_hold(session=sid), 0).session == sid
    # ordinary ops still carry no uid, even from root
    with pytest.raises(LauncherRefused) as e:
        parse_request(request("start", "plain", uid=0), 0)
    assert e.value.reason == "bad_request"


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"uid": -1}, "bad_request"),
        ({"uid": True}, "bad_request"),
        ({"uid": "10001"}, "bad_request"),
        ({"session": "a b"}, "bad_request"),
        ({"session": ""}, "bad_request"),
        ({"user": "al;ice"}, "bad_request"),
        ({"card_fingerprint": "zz"}, "bad_request"),
        ({"vm": "plain"}, "bad_request"),
        ({"volumes": []}, "bad_request"),
        ({"volumes": [{"name": f"v{i}", "passphrase": "k"} for i in range(17)]}, "bad_request"),
        ({"volumes": [{"name": "Data", "passphrase": "k"}]}, "volume_name_invalid"),
        ({"volumes": [{"name": "a,b", "passphrase": "k"}]}, "volume_name_invalid"),
        ({"volumes": [{"name": "../x", "passphrase": "k"}]}, "volume_name_invalid"),
        ({"volumes": [{"name": "v", "passphrase": ""}]}, "bad_request"),
        ({"volumes": [{"name": "v", "passphrase": "a\0b"}]}, "bad_request"),
        ({"volumes": [{"name": "v", "passphrase": "\ud800"}]}, "bad_request"),
        ({"volumes": [{"name": "v", "passphrase": "é" * 257}]}, "bad_request"),
        ({"volumes": [{"name": "v", "passphrase": b"k".hex(), "x": 1}]}, "bad_request"),
        (
            {"volumes": [{"name": "v", "passphrase": "k"}, {"name": "v", "passphrase": "k"}]},
            "bad_request",
        ),
    ],
)
def test_malformed_hold_requests(change: dict[str, Any], reason: str) -> None:
    with pytest.raises(LauncherRefused) as e:
        parse_request(_hold(**change), 0)
    assert e.value.reason == reason
    assert KEY not in e.value.message


def test_the_longest_passphrase_and_several_volumes_fit() -> None:
    for text in ("é" * 256, "\x01" * 512):  # JSON escapes both to 6 characters a piece
        vols = [{"name": f"vol{i}", "passphrase": text} for i in range(16)]
        r = parse_request(_hold(volumes=vols), 0)
        assert len(r.keys) == 16 and all(len(k) == 512 for k in r.keys.values())


# --- through the service (in process) -------------------------------------------------------


def test_hold_list_drop_through_the_launcher(tmp_path: Path) -> None:
    policy = LocalPolicy()
    launcher = make_launcher(tmp_path, policy)
    from pam_svmm.adapters.allowlist_store import AllowlistStore

    AllowlistStore(launcher.config.session.allowlist_dir).write_bytes(
        ALICE_UID, allowlist_bytes(policy)
    )
    live_session(launcher.config.session.state_dir, ALICE_UID, "alice")
    assert launcher.handle(ALICE_UID, _hold()).reason == "not_permitted"
    held = launcher.handle(0, _hold())
    assert held.ok and held.data == {"uid": ALICE_UID, "session": "s1", "held": ["secret-data"]}
    listed = launcher.handle(ALICE_UID, request("list"))
    assert listed.data["keys_held"] == ["secret-data"]
    assert launcher.handle(BOB_UID, request("list")).data["keys_held"] == []
    # the key is held, but there is no image: refused, named
    start = launcher.handle(ALICE_UID, request("start", "secret"))
    assert (
        not start.ok and start.reason == "volume_image_invalid" and "secret-data" in start.message
    )
    dropped = launcher.handle(0, request("drop_keys", uid=ALICE_UID, session="s1"))
    assert dropped.ok and dropped.data["dropped"] == ["secret-data"]
    start = launcher.handle(ALICE_UID, request("start", "secret"))
    assert start.reason == "volume_key_unavailable"
    nothing = launcher.handle(0, request("drop_keys", uid=ALICE_UID, session=None))
    assert nothing.ok and nothing.data["dropped"] == []
    recs = audit_records(tmp_path)
    assert [(r["event"], r["reason"]) for r in recs] == [
        ("key_deny", "not_permitted"),
        ("key_hold", "ok"),
        ("vm_list", "ok"),
        ("vm_list", "ok"),
        ("vm_deny", "volume_image_invalid"),
        ("key_drop", "ok"),
        ("vm_deny", "volume_key_unavailable"),
        ("key_drop", "ok"),
    ]
    assert recs[1]["user"] == "alice" and recs[1]["card"]["fingerprint"] == CARD.fingerprint
    assert "volume=secret-data" in recs[1]["detail"] and "session=s1" in recs[1]["detail"]
    assert "volumes=secret-data" in recs[4]["detail"]
    assert KEY not in json.dumps(recs)
    launcher.close()


# --- the volume image ---------------------------------------------------------------------


@needs_root
@pytest.mark.parametrize("problem", ["missing", "symlink", "user_owned", "group_writable",
                                     "directory", "folder_user_owned", "ok"])  # fmt: skip
def test_the_volume_image_must_be_roots_regular_file(tmp_path: Path, problem: str) -> None:
    folder = tmp_path / "volumes"
    folder.mkdir(mode=0o755)
    image = folder / "vol.img"
    image.write_bytes(b"x")
    image.chmod(0o600)
    if problem == "missing":
        image.unlink()
    elif problem == "symlink":
        real = tmp_path / "real.img"
        image.rename(real)
        image.symlink_to(real)
    elif problem == "user_owned":
        os.chown(image, 65534, 65534)
    elif problem == "group_writable":
        image.chmod(0o660)
    elif problem == "directory":
        image.unlink()
        image.mkdir()
    elif problem == "folder_user_owned":
        os.chown(folder, 65534, 65534)
    if problem == "ok":
        assert volume_image(folder, "vol") == image
        return
    with pytest.raises(LauncherRefused) as e:
        volume_image(folder, "vol")
    assert e.value.reason == "volume_image_invalid" and "vol" in e.value.message
