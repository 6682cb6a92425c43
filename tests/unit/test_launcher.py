"""The launcher's decisions: only a root-owned, fresh allowlist for the kernel's uid counts, the
request names no identity, VM names are validated, the policy is asked again (Chinese Wall
against what the caller runs), keys it does not hold refuse the VM, and every request is
audited. (Starting QEMU itself: tests/integration/test_launcher_service.py.)"""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

import pytest

from pam_svmm.adapters.allowlist_store import AllowlistStore
from pam_svmm.adapters.vm_registry import VmRecord
from pam_svmm.errors import LauncherRefused
from pam_svmm.services.launcher import (
    check_allowlist,
    decide_control,
    decide_start,
    parse_request,
)
from tests.unit.launcher_fixtures import (
    ALICE_UID,
    BOB_UID,
    CARD,
    HOST,
    NOW,
    LocalPolicy,
    allowlist_bytes,
    audit_records,
    live_session,
    make_launcher,
    request,
)

NOBODY = 65534
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown")


def _rec(vm: str, uid: int = ALICE_UID) -> VmRecord:
    return VmRecord(vm, uid, "alice" if uid == ALICE_UID else "bob", 4242, 1, "/x", "/y")


@pytest.fixture
def policy() -> LocalPolicy:
    return LocalPolicy()


def _allowlist(policy: LocalPolicy, **kw: object):  # type: ignore[no-untyped-def]
    return check_allowlist(allowlist_bytes(policy, **kw), ALICE_UID, now=NOW, host=HOST)  # type: ignore[arg-type]


# --- the request --------------------------------------------------------------------------


def test_a_request_names_no_identity() -> None:
    for extra in ({"uid": 0}, {"user": "root"}, {"uid": BOB_UID, "user": "bob"}):
        with pytest.raises(LauncherRefused) as e:
            parse_request(request("start", "plain", **extra))
        assert e.value.reason == "bad_request" and "unknown request key" in e.value.message
    assert parse_request(request("start", "plain")).vm == "plain"
    assert parse_request(request("list")).op == "list"


@pytest.mark.parametrize(
    "name",
    ["plain,id=x", "plain -S", "-daemonize", "../etc", "Plain", "plain\n", "", "a" * 32, "é", 7],
)
def test_names_that_could_inject_are_refused(name: object) -> None:
    with pytest.raises(LauncherRefused) as e:
        parse_request(request("start", **{"vm": name}))  # type: ignore[arg-type]
    assert e.value.reason in ("vm_name_invalid", "bad_request")


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (b"not json", "bad_request"),
        (b"[1]", "bad_request"),
        (b'{"op": "list"}', "unsupported_version"),
        (b'{"version": "svmm-launcher/2", "op": "list"}', "unsupported_version"),
        (b'{"version": "svmm-launcher/1", "op": "reboot", "vm": "plain"}', "bad_request"),
        (b'{"version": "svmm-launcher/1", "op": "stop"}', "bad_request"),
        (b"x" * 70000, "bad_request"),
    ],
)
def test_malformed_requests(line: bytes, reason: str) -> None:
    with pytest.raises(LauncherRefused) as e:
        parse_request(line)
    assert e.value.reason == reason


# --- the allowlist ------------------------------------------------------------------------


def test_the_allowlist_must_be_this_uids_this_hosts_and_current(policy: LocalPolicy) -> None:
    assert _allowlist(policy).user == "alice"
    cases = [
        (None, ALICE_UID, NOW, "no_allowlist"),
        (b"{}", ALICE_UID, NOW, "allowlist_invalid"),
        (allowlist_bytes(policy, uid=BOB_UID), ALICE_UID, NOW, "allowlist_uid_mismatch"),
        (allowlist_bytes(policy), ALICE_UID, NOW + dt.timedelta(hours=2), "allowlist_expired"),
        (allowlist_bytes(policy), ALICE_UID, NOW - dt.timedelta(minutes=1), "allowlist_expired"),
        (allowlist_bytes(policy, host="elsewhere"), ALICE_UID, NOW, "allowlist_host_mismatch"),
    ]
    for data, uid, now, reason in cases:
        with pytest.raises(LauncherRefused) as e:
            check_allowlist(data, uid, now=now, host=HOST)
        assert e.value.reason == reason


@needs_root
@pytest.mark.parametrize("forgery", ["user_owned", "world_writable", "symlink"])
def test_a_forged_or_user_owned_allowlist_is_ignored(
    tmp_path: Path, policy: LocalPolicy, forgery: str
) -> None:
    launcher = make_launcher(tmp_path, policy)
    store = AllowlistStore(launcher.config.session.allowlist_dir)
    store.write_bytes(ALICE_UID, allowlist_bytes(policy))
    path = store.path(ALICE_UID)
    if forgery == "user_owned":
        os.chown(path, NOBODY, NOBODY)
    elif forgery == "world_writable":
        os.chmod(path, 0o666)  # noqa: S103 - the forgery under test
    else:
        real = tmp_path / "forged.json"
        real.write_bytes(allowlist_bytes(policy))
        os.chmod(real, 0o644)
        path.unlink()
        path.symlink_to(real)
    reply = launcher.handle(ALICE_UID, request("start", "plain"))
    assert not reply.ok and reply.reason == "allowlist_tampered"
    listed = launcher.handle(ALICE_UID, request("list"))
    assert (
        listed.ok
        and listed.data["allowed"] == []
        and listed.data["allowlist"] == ("allowlist_tampered")
    )
    events = [(r["event"], r["reason"]) for r in audit_records(tmp_path)]
    assert events == [("vm_deny", "allowlist_tampered"), ("vm_list", "ok")]


def test_the_allowlist_read_is_the_callers_not_the_one_a_request_names(
    tmp_path: Path, policy: LocalPolicy
) -> None:
    launcher = make_launcher(tmp_path, policy)
    store = AllowlistStore(launcher.config.session.allowlist_dir)
    store.write_bytes(ALICE_UID, allowlist_bytes(policy))
    # bob has no allowlist; asking "as alice" is refused before anything is read
    reply = launcher.handle(BOB_UID, request("start", "plain", uid=ALICE_UID))
    assert reply.reason == "bad_request"
    reply = launcher.handle(BOB_UID, request("start", "plain"))
    assert reply.reason == "no_allowlist"
    # alice's file copied to bob's name still says uid 10001
    store.write_bytes(BOB_UID, allowlist_bytes(policy))
    reply = launcher.handle(BOB_UID, request("start", "plain"))
    assert reply.reason == "allowlist_uid_mismatch"
    records = audit_records(tmp_path)
    assert [r["reason"] for r in records] == [
        "bad_request",
        "no_allowlist",
        "allowlist_uid_mismatch",
    ]
    assert all(f"uid={BOB_UID}" in r["detail"] for r in records)
    assert all(r["event"] == "vm_deny" and r["outcome"] == "failure" for r in records)


# --- the start decision ---------------------------------------------------------------------


def test_start_is_decided_by_allowlist_and_policy(policy: LocalPolicy) -> None:
    a = _allowlist(policy)
    ok = decide_start(ALICE_UID, "plain", a, policy, {}, now=NOW)
    assert ok.allowed and ok.reason == "ok" and ok.card is not None
    assert ok.card.fingerprint == CARD.fingerprint
    assert decide_start(ALICE_UID, "other", a, policy, {}, now=NOW).reason == "not_in_allowlist"
    later = NOW + dt.timedelta(hours=2)
    assert decide_start(ALICE_UID, "plain", a, policy, {}, now=later).reason == "not_in_allowlist"


def test_a_vm_the_policy_no_longer_grants_is_refused_despite_the_allowlist(
    policy: LocalPolicy,
) -> None:
    a = _allowlist(policy)
    newer = LocalPolicy(policy_text_without_plain())
    d = decide_start(ALICE_UID, "plain", a, newer, {}, now=NOW)
    assert not d.allowed and d.reason == "unknown_vm"


def policy_text_without_plain() -> str:
    from tests.unit.launcher_fixtures import POLICY_TOML

    text = POLICY_TOML.replace('[vms.plain]\nlabel = "no disks"\n', "")
    return text.replace('[[grants]]\nrole = "analysts"\nvm = "plain"\n', "[[grants]]\nrole = "
                        '"analysts"\nvm = "bank-a"\n')  # fmt: skip


def test_chinese_wall_refused_while_the_other_vm_runs_and_allowed_after(
    policy: LocalPolicy,
) -> None:
    a = _allowlist(policy)
    running = {"bank-a": _rec("bank-a")}
    d = decide_start(ALICE_UID, "bank-b", a, policy, running, now=NOW)
    assert not d.allowed and d.reason == "conflict_of_interest"
    assert decide_start(ALICE_UID, "bank-b", a, policy, {}, now=NOW).allowed
    # the wall is per user: bob running bank-a does not stop alice
    assert decide_start(ALICE_UID, "bank-b", a, policy, {"bank-a": _rec("bank-a", BOB_UID)},
                        now=NOW).allowed  # fmt: skip


def test_one_instance_per_vm(policy: LocalPolicy) -> None:
    a = _allowlist(policy)
    assert (
        decide_start(ALICE_UID, "plain", a, policy, {"plain": _rec("plain")}, now=NOW).reason
        == "vm_already_running"
    )
    assert (
        decide_start(
            ALICE_UID, "plain", a, policy, {"plain": _rec("plain", BOB_UID)}, now=NOW
        ).reason
        == "vm_in_use"
    )


def test_volumes_whose_keys_the_service_does_not_hold(policy: LocalPolicy) -> None:
    a = _allowlist(policy)
    d = decide_start(ALICE_UID, "secret", a, policy, {}, now=NOW)
    assert not d.allowed and d.reason == "volume_key_unavailable" and "secret-data" in d.message
    d = decide_start(ALICE_UID, "secret", a, policy, {}, now=NOW, keys_held={"secret-data"})
    assert d.allowed and d.volumes == ("secret-data",)


def test_stop_and_status_are_the_owners_or_roots() -> None:
    running = {"plain": _rec("plain")}
    assert decide_control(ALICE_UID, "plain", running).allowed
    assert decide_control(0, "plain", running).allowed
    assert decide_control(BOB_UID, "plain", running).reason == "not_owner"
    assert decide_control(ALICE_UID, "bank-a", running).reason == "vm_not_running"


def test_refusals_through_the_service_are_audited_with_card_and_vm(
    tmp_path: Path, policy: LocalPolicy
) -> None:
    launcher = make_launcher(tmp_path, policy)
    AllowlistStore(launcher.config.session.allowlist_dir).write_bytes(
        ALICE_UID, allowlist_bytes(policy)
    )
    live_session(launcher.config.session.state_dir, ALICE_UID, "alice")
    reply = launcher.handle(ALICE_UID, request("start", "secret"))
    assert not reply.ok and reply.reason == "volume_key_unavailable"
    assert launcher.handle(ALICE_UID, request("stop", "plain")).reason == "vm_not_running"
    listed = launcher.handle(ALICE_UID, request("list"))
    assert listed.ok and [v["vm"] for v in listed.data["allowed"]] == [
        "bank-a",
        "bank-b",
        "plain",
        "secret",
    ]
    recs = audit_records(tmp_path)
    assert [(r["event"], r["reason"], r["vm"]) for r in recs] == [
        ("vm_deny", "volume_key_unavailable", "secret"),
        ("vm_deny", "vm_not_running", "plain"),
        ("vm_list", "ok", ""),
    ]
    assert recs[0]["card"]["fingerprint"] == CARD.fingerprint and recs[0]["user"] == "alice"
    assert recs[2]["card"]["fingerprint"] == CARD.fingerprint
    assert all(r["service"] == "svmmd" and r["host"] == HOST for r in recs)


def test_policy_reload_is_roots_only(tmp_path: Path, policy: LocalPolicy) -> None:
    launcher = make_launcher(tmp_path, policy)
    refused = launcher.handle(ALICE_UID, request("policy_reload"))
    assert not refused.ok and refused.reason == "not_permitted"
    done = launcher.handle(0, request("policy_reload"))
    assert done.ok and done.data["event"] == "none"  # a policy source that is not a file
