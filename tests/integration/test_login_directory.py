"""Card and password logins through the real PAM stack with the directory deciding who the card
holder is: a real slapd (StartTLS, the example organisation), the lab's cards and responders."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from svmm_lab.directory import Slapd
from svmm_lab.lab import PAM_PYTHON, SHIM, Lab
from tests.integration import ldap_fixtures
from tests.integration.logins import card_list, login, refused

pytestmark = pytest.mark.integration
slapd, slapd_factory = ldap_fixtures.slapd, ldap_fixtures.slapd_factory
fresh_slapd = ldap_fixtures.fresh_slapd
PASSWORD = "demo-password"


@pytest.fixture
def service(lab: Lab, slapd: Slapd) -> str:
    return lab.variant(
        "directory", lab.directory_overrides(slapd, password_services=["svmm-directory"])
    )


def test_card_login_takes_identity_and_roles_from_the_directory(lab: Lab, service: str) -> None:
    a = login(lab, "carol", user="carol", service=service)
    assert a.report.ok, a.report
    assert "vm-admins" in a.record["roles"] and "vm-users" in a.record["roles"]
    assert a.record["offline"] is False
    assert a.events == ["auth", "account"]


def test_pam_user_is_set_from_the_directory_entry(lab: Lab, service: str) -> None:
    a = login(lab, "bob", service=service)
    assert a.report.ok and a.report.user == "bob"


def test_ambiguous_mapping_is_refused(lab: Lab, service: str) -> None:
    a = login(lab, "twin", service=service)
    refused(a, "PAM_AUTH_ERR", "mapping_ambiguous")
    assert "twin-a" in a.record["detail"] and "twin-b" in a.record["detail"]
    assert a.report.prompts == ()  # decided before any PIN


def test_unknown_certificate_is_refused(lab: Lab, service: str) -> None:
    refused(login(lab, "ghost", service=service), "PAM_AUTH_ERR", "unknown_user")


def test_disabled_account_is_refused_at_account_management(lab: Lab, service: str) -> None:
    a = login(lab, "dora", user="dora", service=service)
    assert a.report.name == "PAM_PERM_DENIED" and a.report.step == "acct_mgmt"
    assert a.events == ["auth", "account"]
    assert a.audit[1]["reason"] == "account_disabled"
    assert "svmmDisabled" in a.audit[1]["detail"]


def test_account_phase_refuses_a_disabled_directory_user_authenticated_elsewhere(
    lab: Lab, slapd: Slapd
) -> None:
    # auth by another module (pam_permit stands in for, say, an SSH key); our account
    # phase still consults the directory.
    cfg = lab.write_config(lab.directory_overrides(slapd), lab.folder / "acct-only.toml")
    module = f"{PAM_PYTHON} {SHIM} venv={sys.prefix} config={cfg}"
    (lab.pam_dir / "svmm-acct-only").write_text(
        "auth required pam_permit.so\n"
        f"account [success=ok ignore=ignore default=bad] {module}\n"
        "account required pam_permit.so\n"
    )
    dora = login(lab, user="dora", service="svmm-acct-only")
    assert dora.report.name == "PAM_PERM_DENIED"
    assert dora.audit[-1]["event"] == "account" and dora.audit[-1]["reason"] == "account_disabled"
    ok = login(lab, user="bob", service="svmm-acct-only")
    assert ok.report.ok
    local = login(lab, user="root", service="svmm-acct-only")
    assert local.report.ok and local.audit == []  # not a directory user: nothing to say


def test_password_login_where_policy_allows_it(lab: Lab, service: str) -> None:
    a = login(lab, pin=PASSWORD, user="alice", service=service)
    assert a.report.ok, a.report
    assert a.report.prompts == ("Password: ",)
    auth = [r for r in a.audit if r["event"] == "auth"]
    assert [r["reason"] for r in auth] == ["no_card", "ok"]
    assert auth[-1]["method"] == "password" and "vm-users" in auth[-1]["roles"]
    assert PASSWORD not in lab.audit_path.read_text()


def test_wrong_password(lab: Lab, service: str) -> None:
    a = login(lab, pin="not-it", user="alice", service=service)
    assert a.report.name == "PAM_AUTH_ERR"
    assert a.audit[-1]["reason"] == "password_incorrect"


def test_password_refused_for_a_role_that_demands_a_card(lab: Lab, service: str) -> None:
    a = login(lab, pin=PASSWORD, user="paul", service=service)
    assert a.report.name == "PAM_AUTH_ERR"
    assert a.audit[-1]["reason"] == "method_not_allowed"
    assert a.report.prompts == ()  # refused before the password is typed


def test_password_not_offered_on_other_services(lab: Lab, slapd: Slapd) -> None:
    svc = lab.variant("dir-nopw", lab.directory_overrides(slapd))
    a = login(lab, pin=PASSWORD, user="alice", service=svc)
    refused(a, "PAM_AUTHINFO_UNAVAIL", "no_card")  # the stack may try another module


def test_directory_down_offline_login_then_cache_expiry(
    lab: Lab, slapd_factory: ldap_fixtures.SlapdFactory, tmp_path: Path
) -> None:
    server = slapd_factory()
    overrides = lab.directory_overrides(server).replace(
        f'cache_dir = "{lab.folder / "identity-cache"}"', f'cache_dir = "{tmp_path / "cache"}"'
    )
    svc = lab.variant("offline", overrides)
    assert login(lab, "bob", user="bob", service=svc).report.ok  # fills the cache
    server.stop()
    offline = login(lab, "bob", user="bob", service=svc)
    assert offline.report.ok, offline.report
    assert offline.record["offline"] is True and "vm-users" in offline.record["roles"]
    # A card the cache never saw cannot log in while the directory is down.
    refused(
        login(lab, "carol", user="carol", service=svc),
        "PAM_AUTHINFO_UNAVAIL",
        "directory_unavailable",
    )
    # Entries older than the maximum age are not used.
    expired = lab.variant(
        "offline-expired", overrides.replace("cache_max_age = 3600", "cache_max_age = 1")
    )
    time.sleep(1.5)
    refused(
        login(lab, "bob", user="bob", service=expired),
        "PAM_AUTHINFO_UNAVAIL",
        "directory_unavailable",
    )


def test_an_uncached_second_card_does_not_block_a_cached_users_offline_login(
    lab: Lab, slapd_factory: ldap_fixtures.SlapdFactory, tmp_path: Path
) -> None:
    server = slapd_factory()
    overrides = lab.directory_overrides(server).replace(
        f'cache_dir = "{lab.folder / "identity-cache"}"', f'cache_dir = "{tmp_path / "cache"}"'
    )
    svc = lab.variant("offline-two", overrides)
    # SoftHSM2 lists tokens in an order of its own (random per card, the same in every
    # reader): of three users' cards the last one listed is the cached user's, the first
    # one the card the cache never saw, in the slot before it.
    other, *_, cached = _slot_order(lab, "alice", "bob", "carol")
    assert _slot_order(lab, other, cached) == [other, cached]  # else the test proves nothing
    assert login(lab, cached, user=cached, service=svc).report.ok  # fills the cache
    server.stop()
    # The directory being down is no answer about the other card, and it must not stop the
    # cached user's card from being considered (before, it ended the login).
    for user in (cached, ""):
        a = login(lab, other, cached, user=user, service=svc)
        assert a.report.ok and a.report.user == cached, (other, user, a.report)
        assert a.record["offline"] is True
    # That card alone: could not decide (the stack may try another method).
    refused(login(lab, other, service=svc), "PAM_AUTHINFO_UNAVAIL", "directory_unavailable")


def _slot_order(lab: Lab, *cards: str) -> list[str]:
    out = card_list(lab, cards).stdout
    return [ln.split("'")[1].removesuffix(" ID card") for ln in out.splitlines()
            if ln.startswith("token '")]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "uid", "why"),
    [("toor", 0, "uid 0 not in"), ("root", 10050, "a local account has this name"),
     ("sys2", 3, "uid 3 not in")],
)  # fmt: skip
def test_a_directory_entry_naming_a_local_account_never_logs_in_as_it(
    lab: Lab, fresh_slapd: Slapd, name: str, uid: int, why: str
) -> None:
    """Whoever can add one directory entry (uid 0, or the name root, with some card's UPN)
    must not give that card's holder a local account. The NSS bridge already refuses to
    shadow local accounts; the login applies the same rule, audited."""
    fresh_slapd.add_ldif(
        f"dn: uid={name},ou=people,dc=demo,dc=example\n"
        "objectClass: inetOrgPerson\nobjectClass: posixAccount\nobjectClass: svmmUser\n"
        f"uid: {name}\ncn: {name}\nsn: {name}\nuidNumber: {uid}\ngidNumber: 10000\n"
        f"homeDirectory: /home/{name}\nsvmmPrincipalName: ghost@demo.example\n"
    )
    service = lab.variant(f"shadow-{name}", lab.directory_overrides(fresh_slapd))
    a = login(lab, "ghost", service=service)
    refused(a, "PAM_AUTH_ERR", "local_account_shadowed")
    assert why in a.record["detail"] and a.report.prompts == ()  # decided before any PIN
