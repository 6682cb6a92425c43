"""The real NSS stack sees synced directory users: getent, id and su through libnss-extrausers.

The files are built and written by the product (domain.nss + adapters.nss_files) into a tmp
folder. Each command then runs in a private mount namespace (`unshare --mount`, as root) in
which that folder is bind-mounted over /var/lib/extrausers, and tmp copies of nsswitch.conf
(`passwd: files extrausers`), /etc/passwd and /etc/group over the real ones; the host's files
are never touched (checked at the end). Where unshare is impossible the same getent/id checks
run through nss_wrapper (LD_PRELOAD) over the local file followed by ours.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pam_svmm.adapters import nss_files
from pam_svmm.cli import nss as nss_cli
from pam_svmm.config import NssConfig
from pam_svmm.domain import nss
from pam_svmm.domain.identity import PosixAccount, PosixGroup
from svmm_lab.directory import Slapd
from tests.integration.ldap_fixtures import slapd  # noqa: F401

pytestmark = pytest.mark.integration

EXTRAUSERS = Path("/var/lib/extrausers")
NSS_MODULE = Path("/usr/lib/libnss_extrausers.so.2")
NSS_WRAPPER = Path("/usr/lib/x86_64-linux-gnu/libnss_wrapper.so")
HOST_FILES = (Path("/etc/nsswitch.conf"), Path("/etc/passwd"), Path("/etc/group"))

LOCAL_PASSWD = """\
root:x:0:0:root:/root:/bin/bash
nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin
bob:x:1000:1000:Local Bob:/home/bob:/bin/sh
localsvc:x:10500:10500::/var/lib/localsvc:/usr/sbin/nologin
"""
LOCAL_GROUP = """\
root:x:0:
nogroup:x:65534:
bob:x:1000:
localsvc:x:10500:
"""
NSSWITCH = """\
# What a host using the bridge lists (libnss-extrausers after the local files):
passwd: files extrausers
group:  files extrausers
shadow: files
"""

DIRECTORY_ACCOUNTS = [
    PosixAccount("alice", 10001, 10001, "Alice Liddell", "/home/alice", "/bin/bash"),
    PosixAccount("bob", 10002, 10002, "Directory Bob", "/home/bob", "/bin/bash"),  # local name
    PosixAccount("carol", 10500, 10003, "Carol", "/home/carol", "/bin/bash"),  # local uid
    PosixAccount(
        "eve", 10005, 10005, "Eve\nroot::0:0:root:/root:/bin/bash", "/home/eve", "/bin/sh"
    ),
    PosixAccount("mallory", 0, 0, "Mallory", "/root", "/bin/bash"),  # uid 0: out of range
]
DIRECTORY_GROUPS = [
    PosixGroup("alice", 10001),
    PosixGroup("eve", 10005),
    PosixGroup("vm-users", 20001, ("alice", "bob", "eve", "evil,root")),
    PosixGroup("root", 20002, ("alice",)),  # a local group name
]


Runner = Callable[..., subprocess.CompletedProcess[str]]


@dataclass(frozen=True)
class World:
    extrausers: Path
    nsswitch: Path
    passwd: Path
    group: Path
    files: nss.NssFiles | None = None  # what the build reported


def _digest() -> dict[str, str]:
    out = {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in HOST_FILES}
    for p in sorted(EXTRAUSERS.iterdir()) if EXTRAUSERS.is_dir() else []:
        out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "?"
    out["extrausers-exists"] = str(EXTRAUSERS.is_dir())
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    if not NSS_MODULE.exists():
        pytest.skip("libnss-extrausers is not installed")
    host_before = _digest()
    tmp = tmp_path_factory.mktemp("nss")
    files = nss.build(
        DIRECTORY_ACCOUNTS,
        DIRECTORY_GROUPS,
        local_passwd=LOCAL_PASSWD,
        local_group=LOCAL_GROUP,
        config=NssConfig(),
    )
    eu = tmp / "extrausers"
    nss_files.write_files(eu, {"passwd": files.passwd, "group": files.group}, owner=os.geteuid())
    w = World(eu, tmp / "nsswitch.conf", tmp / "passwd", tmp / "group", files)
    w.nsswitch.write_text(NSSWITCH)
    w.passwd.write_text(LOCAL_PASSWD)
    w.group.write_text(LOCAL_GROUP)
    for p in (w.nsswitch, w.passwd, w.group):
        p.chmod(0o644)
    yield w
    assert _digest() == host_before, "the host's NSS files changed"


def _namespace_works(w: World) -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None or not EXTRAUSERS.is_dir():
        return False
    try:
        p = _in_namespace(w, "true")
    except (OSError, subprocess.TimeoutExpired):
        return False
    return p.returncode == 0


# Paths come in as positional parameters, never spliced into the script.
_SCRIPT = (
    'set -e; mount --bind "$1" /var/lib/extrausers; mount --bind "$2" /etc/nsswitch.conf;'
    ' mount --bind "$3" /etc/passwd; mount --bind "$4" /etc/group; shift 4; exec "$@"'
)


_UNSHARE = ("unshare", "--mount", "--propagation", "private", "--", "/bin/sh", "-c", _SCRIPT, "sh")


def _in_namespace(w: World, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*_UNSHARE, str(w.extrausers), str(w.nsswitch), str(w.passwd), str(w.group), *argv],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def _with_nss_wrapper(w: World, *argv: str) -> subprocess.CompletedProcess[str]:
    # nss_wrapper reads one passwd and one group file: the local ones, then ours (the order
    # nsswitch.conf gives "files extrausers").
    both_passwd, both_group = w.passwd.with_suffix(".all"), w.group.with_suffix(".all")
    both_passwd.write_text(LOCAL_PASSWD + (w.extrausers / "passwd").read_text())
    both_group.write_text(LOCAL_GROUP + (w.extrausers / "group").read_text())
    env = dict(
        os.environ,
        LD_PRELOAD=str(NSS_WRAPPER),
        NSS_WRAPPER_PASSWD=str(both_passwd),
        NSS_WRAPPER_GROUP=str(both_group),
    )
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=30, check=False)


@pytest.fixture(params=["namespace", "nss_wrapper"])
def run(request: pytest.FixtureRequest, world: World) -> Runner:
    if request.param == "namespace":
        if not _namespace_works(world):
            pytest.skip("no private mount namespace here (needs root and unshare)")
        return lambda *argv: _in_namespace(world, *argv)
    if not NSS_WRAPPER.exists():
        pytest.skip("libnss-wrapper is not installed")
    return lambda *argv: _with_nss_wrapper(world, *argv)


def out(p: subprocess.CompletedProcess[str]) -> str:
    assert p.returncode == 0, f"rc={p.returncode} stdout={p.stdout!r} stderr={p.stderr!r}"
    return p.stdout


def test_the_build_skipped_what_it_must(world: World) -> None:
    assert world.files is not None
    r = {s.name: s.reason.value for s in world.files.skipped}
    assert r == {
        "bob": "local_name_conflict",
        "carol": "local_id_conflict",
        "mallory": "uid_out_of_range",
        "root": "local_name_conflict",
        "vm-users/bob": "member_is_local_account",
        "vm-users/'evil,root'": "invalid_member_name",
    }


def test_getent_passwd_finds_a_directory_user_by_name_and_uid(run: Runner) -> None:
    line = "alice:*:10001:10001:Alice Liddell:/home/alice:/bin/bash\n"
    assert out(run("getent", "passwd", "alice")) == line
    assert out(run("getent", "passwd", "10001")) == line


def test_getent_group_shows_members(run: Runner) -> None:
    assert out(run("getent", "group", "vm-users")) == "vm-users:*:20001:alice,eve\n"
    assert out(run("getent", "group", "20001")) == "vm-users:*:20001:alice,eve\n"


def test_id_resolves_primary_and_supplementary_groups(run: Runner) -> None:
    assert out(run("id", "alice")) == (
        "uid=10001(alice) gid=10001(alice) groups=10001(alice),20001(vm-users)\n"
    )


def test_local_accounts_win(run: Runner) -> None:
    assert out(run("getent", "passwd", "bob")) == "bob:x:1000:1000:Local Bob:/home/bob:/bin/sh\n"
    assert out(run("id", "-G", "bob")) == "1000\n"  # not in the directory's vm-users
    assert run("getent", "passwd", "10002").returncode == 2  # directory bob: not written
    assert out(run("getent", "passwd", "10500")).startswith("localsvc:")
    assert out(run("getent", "group", "root")) == "root:x:0:\n"


def test_gecos_injection_adds_no_account(run: Runner) -> None:
    assert out(run("getent", "passwd", "eve")).startswith("eve:*:10005:10005:Eve root ")
    assert out(run("getent", "passwd", "0")) == "root:x:0:0:root:/root:/bin/bash\n"
    everyone = out(run("getent", "passwd")).splitlines()
    assert [line.split(":")[0] for line in everyone if line.split(":")[2] == "0"] == ["root"]
    assert run("getent", "passwd", "mallory").returncode == 2


def test_su_to_a_directory_user_passes_pams_account_phase(world: World) -> None:
    # The real /etc/pam.d/su (pam_rootok, pam_unix account): with '*' in the password field
    # pam_unix needs no shadow entry, so no shadow file is written.
    if not _namespace_works(world):
        pytest.skip("no private mount namespace here (needs root and unshare)")
    p = _in_namespace(world, "su", "alice", "-c", "id -un; id -u")
    assert out(p) == "alice\n10001\n"


# --- end to end: slapd -> DirectoryClient -> `svmm nss sync` -> NSS ------------------------


def test_sync_from_the_lab_directory_then_getent(
    slapd: Slapd,  # noqa: F811
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The example organisation, read by the real DirectoryClient through `svmm nss sync`."""
    host_before = _digest()
    eu = tmp_path / "extrausers"
    cfg = tmp_path / "svmm.toml"
    password_file = slapd.write_password_file(tmp_path / "bind.pw")
    cfg.write_text(
        f"""
[directory]
enabled = true
uris = ["{slapd.uri}"]
base_dn = "{slapd.base_dn}"
bind_dn = "{slapd.service_dn}"
bind_password_file = "{password_file}"
tls = "starttls"
ca_file = "{slapd.ca_file}"

[[certmap.rules]]
name = "upn"
map = "(svmmPrincipalName={{upn}})"

[nss]
dir = "{eu}"
"""
    )
    local = tmp_path / "local"
    local.mkdir()
    (local / "passwd").write_text(LOCAL_PASSWD)
    (local / "group").write_text(LOCAL_GROUP)
    parser = argparse.ArgumentParser()
    parser.add_argument("--config")
    nss_cli.register(parser.add_subparsers(dest="group", required=True))
    args = parser.parse_args(
        [
            *("--config", str(cfg), "nss", "sync"),
            *("--local-passwd", str(local / "passwd"), "--local-group", str(local / "group")),
        ]
    )
    assert args.func(args) == 0
    summary = capsys.readouterr().out
    assert "skipped passwd bob: local_name_conflict" in summary
    assert "dropped member engineering/bob: member_is_local_account" in summary
    with capsys.disabled():
        print(summary)  # what the example organisation gives (shown with -s)

    args = parser.parse_args(["--config", str(cfg), "id", "alice"])
    assert args.func(args) == 0
    shown = capsys.readouterr().out.splitlines()
    assert shown[0].startswith("uid=10001(alice) gid=10000(svmm-users) groups=10000(svmm-users),")
    assert "dn: uid=alice,ou=people,dc=demo,dc=example" in shown
    assert "source: directory" in shown

    w = World(eu, tmp_path / "nsswitch.conf", local / "passwd", local / "group")
    w.nsswitch.write_text(NSSWITCH)
    for p in (w.nsswitch, w.passwd, w.group):
        p.chmod(0o644)
    if not _namespace_works(w):
        pytest.skip("no private mount namespace here (needs root and unshare)")
    assert out(_in_namespace(w, "getent", "passwd", "alice")).startswith("alice:*:10001:10000:")
    ident = out(_in_namespace(w, "id", "alice"))
    assert ident.startswith("uid=10001(alice) gid=10000(svmm-users) groups=10000(svmm-users),")
    assert "10001(engineering)" in ident
    group = out(_in_namespace(w, "getent", "group", "engineering")).strip()
    assert group.split(":")[:3] == ["engineering", "*", "10001"]
    assert "alice" in group.split(":")[3].split(",") and "bob" not in group
    assert out(_in_namespace(w, "getent", "passwd", "bob")).startswith("bob:x:1000:")
    assert out(_in_namespace(w, "su", "paul", "-c", "id -un")) == "paul\n"
    assert _digest() == host_before, "the host's NSS files changed"
