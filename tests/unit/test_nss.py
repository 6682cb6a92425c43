"""The NSS bridge's pure part: which directory records become passwd/group lines, and how."""

from __future__ import annotations

import random

import pytest

from pam_svmm.config import NssConfig
from pam_svmm.domain import nss
from pam_svmm.domain.identity import PosixAccount, PosixGroup
from pam_svmm.domain.nss import Skip

CFG = NssConfig(uid_min=10000, uid_max=59999, gid_min=10000, gid_max=59999)
LOCAL_PASSWD = """\
root:x:0:0:root:/root:/bin/bash
daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin
# a comment line
bob:x:1001:1001:Local Bob:/home/bob:/bin/bash
svc:x:10005:10005::/var/lib/svc:/usr/sbin/nologin

+nisuser::::::
broken-line
"""
LOCAL_GROUP = """\
root:x:0:
sudo:x:27:bob
users:x:100:
svc:x:10005:
"""


def acc(name: str, uid: int, gid: int | None = None, **kw: object) -> PosixAccount:
    fields: dict[str, object] = {"gecos": "", "home": f"/home/{name}", "shell": "/bin/bash"}
    fields.update(kw)
    return PosixAccount(name, uid, uid if gid is None else gid, **fields)  # type: ignore[arg-type]


def build(
    accounts: list[PosixAccount], groups: list[PosixGroup] | None = None, cfg: NssConfig = CFG
) -> nss.NssFiles:
    return nss.build(
        accounts, groups or [], local_passwd=LOCAL_PASSWD, local_group=LOCAL_GROUP, config=cfg
    )


def reasons(files: nss.NssFiles) -> dict[str, Skip]:
    return {s.name: s.reason for s in files.skipped}


def test_records_render_as_passwd_and_group_lines() -> None:
    files = build(
        [acc("alice", 10001, gecos="Alice Liddell")],
        [PosixGroup("vm-users", 20001, ("alice",)), PosixGroup("alice", 10001)],
    )
    # '*': no password through pam_unix and no shadow lookup (pam_unix's account phase would
    # refuse `su` for an 'x' without a shadow entry).
    assert files.passwd == "alice:*:10001:10001:Alice Liddell:/home/alice:/bin/bash\n"
    assert files.group == "alice:*:10001:\nvm-users:*:20001:alice\n"
    assert files.skipped == ()


def test_parse_local_reserves_names_and_ids_even_from_odd_lines() -> None:
    db = nss.parse_local(LOCAL_PASSWD)
    assert {"root", "daemon", "bob", "svc", "nisuser", "broken-line"} <= db.names
    assert {0, 1, 1001, 10005} == db.ids


def test_local_name_wins_and_is_reported_as_conflict() -> None:
    files = build([acc("bob", 10002), acc("alice", 10001)])
    assert [a.name for a in files.accounts] == ["alice"]
    assert reasons(files)["bob"] is Skip.LOCAL_NAME
    assert [c.name for c in files.conflicts] == ["bob"]
    assert "conflicts with local accounts: 1" in files.summary()


def test_local_uid_wins_even_under_another_name() -> None:
    files = build([acc("carol", 10005, gid=10010)])
    assert files.accounts == ()
    assert reasons(files)["carol"] is Skip.LOCAL_ID
    assert "10005" not in files.passwd


def test_local_group_name_and_gid_win() -> None:
    files = build(
        [],
        [
            PosixGroup("sudo", 20000),
            PosixGroup("svc-team", 10005),
            PosixGroup("ok", 20002),
        ],
    )
    assert [g.name for g in files.groups] == ["ok"]
    assert reasons(files) == {"sudo": Skip.LOCAL_NAME, "svc-team": Skip.LOCAL_ID}


@pytest.mark.parametrize(
    ("uid", "gid", "written", "reason"),
    [
        (10000, 10000, True, None),  # bounds are inclusive
        (59999, 59999, True, None),
        (9999, 10000, False, Skip.UID_OUT_OF_RANGE),
        (60000, 10000, False, Skip.UID_OUT_OF_RANGE),
        (0, 10000, False, Skip.UID_OUT_OF_RANGE),
        (-1, 10000, False, Skip.UID_OUT_OF_RANGE),
        # The primary gid counts too: a directory account never gets root's or a local group.
        (10001, 0, False, Skip.GID_OUT_OF_RANGE),
        (10001, 27, False, Skip.GID_OUT_OF_RANGE),
        (10001, 60000, False, Skip.GID_OUT_OF_RANGE),
    ],
)
def test_uid_and_gid_ranges(uid: int, gid: int, written: bool, reason: Skip | None) -> None:
    files = build([acc("alice", uid, gid)])
    assert bool(files.accounts) is written
    assert reasons(files).get("alice") is reason


def test_group_gid_range() -> None:
    files = build([], [PosixGroup("low", 9999), PosixGroup("high", 60000), PosixGroup("ok", 10000)])
    assert [g.name for g in files.groups] == ["ok"]
    assert reasons(files) == {"low": Skip.GID_OUT_OF_RANGE, "high": Skip.GID_OUT_OF_RANGE}


def test_ranges_come_from_the_config() -> None:
    narrow = NssConfig(uid_min=20000, uid_max=20010, gid_min=30000, gid_max=30010)
    files = build([acc("a", 20000, 30000), acc("b", 10001, 30000)], cfg=narrow)
    assert [a.name for a in files.accounts] == ["a"]


@pytest.mark.parametrize(
    ("field", "value", "reason"),
    [
        ("name", "Alice", Skip.INVALID_NAME),
        ("name", "al:ice", Skip.INVALID_NAME),
        ("name", "alice\nroot", Skip.INVALID_NAME),
        ("name", "", Skip.INVALID_NAME),
        ("name", "-alice", Skip.INVALID_NAME),
        ("name", "a" * 33, Skip.INVALID_NAME),
        ("name", "al ice", Skip.INVALID_NAME),
        ("name", "ålice", Skip.INVALID_NAME),
        ("uid", "10001", Skip.INVALID_ID),
        ("uid", True, Skip.INVALID_ID),
        ("gid", None, Skip.INVALID_ID),
        ("home", "home/alice", Skip.INVALID_HOME),
        ("home", "", Skip.INVALID_HOME),
        ("home", "/home/../root", Skip.INVALID_HOME),
        ("home", "/home/alice/", Skip.INVALID_HOME),
        ("home", "//home/alice", Skip.INVALID_HOME),
        ("home", "/home/a:b", Skip.INVALID_HOME),
        ("home", "/home/alice\n", Skip.INVALID_HOME),
        ("home", "/home/al\x00ice", Skip.INVALID_HOME),
        ("shell", "bash", Skip.INVALID_SHELL),
        ("shell", "", Skip.INVALID_SHELL),
        ("shell", "/bin/bash\nroot::0:0::/:/bin/sh", Skip.INVALID_SHELL),
        ("shell", "/bin/ba:sh", Skip.INVALID_SHELL),
    ],
)
def test_invalid_fields_drop_the_account(field: str, value: object, reason: Skip) -> None:
    fields: dict[str, object] = {
        "name": "alice",
        "uid": 10001,
        "gid": 10001,
        "home": "/home/alice",
        "shell": "/bin/bash",
    }
    fields[field] = value
    files = build([PosixAccount(**fields), acc("zed", 10002)])  # type: ignore[arg-type]
    assert [a.name for a in files.accounts] == ["zed"]
    assert [s.reason for s in files.skipped] == [reason]
    assert files.passwd.count("\n") == 1


@pytest.mark.parametrize("name", ["Engineering", "eng:x", "eng\n", "", "a b"])
def test_invalid_group_names_are_dropped(name: str) -> None:
    files = build([], [PosixGroup(name, 20001)])
    assert files.groups == () and files.group == ""
    assert [s.reason for s in files.skipped] == [Skip.INVALID_NAME]


@pytest.mark.parametrize(
    "gecos",
    [
        "Eve\nroot::0:0:root:/root:/bin/bash",
        "Eve:0:0",
        "Eve\r\nmallory:*:10002:10002::/home/m:/bin/sh",
        "Eve\x00root",
        "Eve\u2028root::0:0",
        "Eve\x85next",
        "Eve\ud800",
    ],
)
def test_gecos_injection_is_neutralised(gecos: str) -> None:
    files = build([acc("eve", 10001, gecos=gecos)])
    assert [a.name for a in files.accounts] == ["eve"]
    lines = files.passwd.splitlines()
    assert len(lines) == 1
    fields = lines[0].split(":")
    assert len(fields) == 7
    assert fields[0] == "eve" and fields[2] == "10001" and fields[6] == "/bin/bash"
    assert fields[4].startswith("Eve")
    assert files.gecos_changed == ("eve",)
    files.passwd.encode("utf-8")  # a lone surrogate would not even encode


def test_gecos_keeps_ordinary_text_and_is_bounded() -> None:
    assert nss.sanitize_gecos("Ålice Müller, Room 4, +49 30 1234") == (
        "Ålice Müller, Room 4, +49 30 1234"
    )
    assert len(nss.sanitize_gecos("x" * 5000)) == nss.GECOS_MAX


def test_output_is_deterministic_and_sorted_by_id() -> None:
    accounts = [acc(f"user{i}", 10000 + (i * 7919) % 500) for i in range(200)]
    groups = [
        PosixGroup(f"grp{i}", 20000 + (i * 31) % 100, tuple(f"user{j}" for j in range(i, i + 5)))
        for i in range(100)
    ]
    first = build(accounts, groups)
    rng = random.Random(4)  # noqa: S311 (reproducible test data)
    for _ in range(5):
        a, g = accounts[:], groups[:]
        rng.shuffle(a)
        rng.shuffle(g)
        again = build(a, g)
        assert (again.passwd, again.group, again.skipped) == (
            first.passwd,
            first.group,
            first.skipped,
        )
    uids = [int(line.split(":")[2]) for line in first.passwd.splitlines()]
    assert uids == sorted(uids) and len(set(uids)) == len(uids)


def test_identical_records_count_once() -> None:
    files = build([acc("alice", 10001), acc("alice", 10001)])
    assert [a.name for a in files.accounts] == ["alice"]
    assert files.skipped == ()


def test_conflicting_directory_records_are_all_dropped() -> None:
    files = build(
        [
            acc("alice", 10001),
            acc("alice", 10002),  # same name, other uid
            acc("bert", 10003),
            acc("bertha", 10003),  # same uid, other name
            acc("carl", 10004),
            acc("Carl", 10004, home="x"),  # invalid itself, but still claims the uid
        ]
    )
    assert files.accounts == ()
    r = [(s.name, s.reason) for s in files.skipped]
    assert r.count(("alice", Skip.DUPLICATE_NAME)) == 2
    assert ("bert", Skip.DUPLICATE_ID) in r and ("bertha", Skip.DUPLICATE_ID) in r
    assert ("carl", Skip.DUPLICATE_ID) in r and ("'Carl'", Skip.INVALID_NAME) in r


def test_duplicate_groups_are_dropped() -> None:
    files = build([], [PosixGroup("a", 20001), PosixGroup("b", 20001), PosixGroup("c", 20002)])
    assert [g.name for g in files.groups] == ["c"]


def test_group_members_are_valid_synced_accounts_only() -> None:
    files = build(
        [acc("alice", 10001), acc("carol", 10003), acc("bob", 10002)],  # bob: local name
        [
            PosixGroup(
                "vm-users",
                20001,
                (
                    "carol",
                    "alice",
                    "alice",  # twice
                    "bob",  # a local account: the directory's bob is not the local bob
                    "root",  # local
                    "ghost",  # not a synced account
                    "evil,root",  # would add root through the member separator
                    "x:y",
                    "a\nb",
                ),
            )
        ],
    )
    assert files.group == "vm-users:*:20001:alice,carol\n"
    dropped = {s.name: s.reason for s in files.skipped if s.kind == "member"}
    assert dropped == {
        "vm-users/bob": Skip.LOCAL_MEMBER,
        "vm-users/root": Skip.LOCAL_MEMBER,
        "vm-users/ghost": Skip.UNKNOWN_MEMBER,
        "vm-users/'evil,root'": Skip.INVALID_MEMBER,
        "vm-users/'x:y'": Skip.INVALID_MEMBER,
        "vm-users/'a\\nb'": Skip.INVALID_MEMBER,
    }


def test_summary_names_every_skip() -> None:
    files = build([acc("bob", 10002), acc("zz", 5)], [PosixGroup("g", 20001, ("nobody-x",))])
    text = "\n".join(files.summary())
    assert "passwd: 0 written, 2 skipped" in text
    assert "group: 1 written, 0 skipped, 1 members dropped" in text
    assert "passwd bob: local_name_conflict" in text
    assert "passwd zz: uid_out_of_range (uid 5 not in 10000-59999)" in text
    assert "member g/nobody-x: member_not_synced" in text


def test_random_records_never_break_the_file_format() -> None:
    rng = random.Random(7)  # noqa: S311 (reproducible test data)
    nasty = ":\n\r\x00,/ .é\u2028\ud800"

    def maybe_spoil(text: str) -> str:
        if rng.random() < 0.2:
            i = rng.randint(0, len(text))
            return text[:i] + rng.choice(nasty) + text[i:]
        return text

    accounts = [
        PosixAccount(
            maybe_spoil(f"u{i}"),
            10000 + rng.randint(-5, 5000),
            10000 + rng.randint(-5, 5000),
            "".join(rng.choice("ab " + nasty) for _ in range(rng.randint(0, 20))),
            maybe_spoil(f"/home/u{i}"),
            rng.choice(["/bin/sh", "/bin/sh", "/bin/s:h", "/bin/sh\n"]),
        )
        for i in range(500)
    ]
    files = build(accounts)
    assert len(files.accounts) > 150 and len(files.gecos_changed) > 50  # not vacuous
    seen_names, seen_ids = set(), set()
    for line in files.passwd.splitlines():
        f = line.split(":")
        assert len(f) == 7 and f[1] == "*"
        assert nss.is_clean_path(f[5]) and f[6] == "/bin/sh"
        assert CFG.uid_min <= int(f[2]) <= CFG.uid_max
        assert f[0] not in seen_names and f[2] not in seen_ids
        seen_names.add(f[0])
        seen_ids.add(f[2])
    assert files.passwd.count("\n") == len(files.accounts)
    assert len(files.accounts) + len(files.skipped) == len(set(accounts))
    files.passwd.encode("utf-8")
