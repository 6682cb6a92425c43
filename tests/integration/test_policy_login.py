"""The account phase consults the signed policy: who may log in on this host, and through
which PAM service (real PAM stack, real slapd for the roles, a bundle signed in the lab)."""

from __future__ import annotations

from pathlib import Path

import pytest

from svmm_lab.directory import Slapd
from svmm_lab.lab import Lab
from tests.integration import ldap_fixtures
from tests.integration.logins import login

pytestmark = pytest.mark.integration
slapd = ldap_fixtures.slapd

POLICY = b"""
version = 3
[hosts.lab-host]
login_roles = ["vm-admins"]
services = ["svmm-policy-admins", "svmm-policy-missing"]

[vms.vm-web]
label = "web"
class = "shop"
type = "public"

[[grants]]
role = "vm-admins"
vm = "vm-web"
permissions = ["boot", "console"]
"""


def _service(lab: Lab, slapd: Slapd, name: str, bundle: Path, state: Path) -> str:
    return lab.variant(
        name, lab.directory_overrides(slapd) + lab.policy_overrides(bundle, state=state)
    )


def test_only_roles_the_policy_names_may_log_in_on_this_host(
    lab: Lab, slapd: Slapd, tmp_path: Path
) -> None:
    bundle = lab.write_policy(POLICY, tmp_path / "policy.bundle")
    svc = _service(lab, slapd, "policy-admins", bundle, tmp_path / "state")
    carol = login(lab, "carol", user="carol", service=svc)  # vm-admins
    assert carol.report.ok, carol.report
    loads = [r for r in carol.audit if r["event"] == "policy_load"]
    assert loads and loads[0]["outcome"] == "success" and "version=3" in loads[0]["detail"]
    bob = login(lab, "bob", user="bob", service=svc)  # vm-users only
    assert bob.report.name == "PAM_PERM_DENIED" and bob.report.step == "acct_mgmt"
    account = [r for r in bob.audit if r["event"] == "account"][-1]
    assert account["reason"] == "login_not_allowed" and "role_not_allowed" in account["detail"]


def test_without_a_policy_nobody_gets_through_the_account_phase(
    lab: Lab, slapd: Slapd, tmp_path: Path
) -> None:
    svc = _service(lab, slapd, "policy-missing", tmp_path / "absent.bundle", tmp_path / "s")
    a = login(lab, "carol", user="carol", service=svc)
    assert a.report.name == "PAM_AUTHINFO_UNAVAIL" and a.report.step == "acct_mgmt"


def test_a_tampered_bundle_never_replaces_the_accepted_one(
    lab: Lab, slapd: Slapd, tmp_path: Path
) -> None:
    bundle = lab.write_policy(POLICY, tmp_path / "policy.bundle")
    svc = _service(lab, slapd, "policy-admins", bundle, tmp_path / "state")
    assert login(lab, "carol", user="carol", service=svc).report.ok
    # Someone edits the bundle's policy to let vm-users in: the signature no longer holds.
    text = bundle.read_text()
    import base64
    import json

    doc = json.loads(text)
    doc["policy"] = base64.b64encode(
        POLICY.replace(b'login_roles = ["vm-admins"]', b'login_roles = ["vm-users"]')
    ).decode()
    bundle.write_text(json.dumps(doc))
    bob = login(lab, "bob", user="bob", service=svc)
    assert bob.report.name == "PAM_PERM_DENIED"  # the accepted policy still rules
    loads = [r for r in bob.audit if r["event"] == "policy_load"]
    assert loads and loads[0]["outcome"] == "failure"


def test_a_policy_load_is_recorded_when_the_accepted_policy_changes_not_at_every_login(
    lab: Lab, slapd: Slapd, tmp_path: Path
) -> None:
    bundle = lab.write_policy(POLICY, tmp_path / "policy.bundle")
    svc = _service(lab, slapd, "policy-admins", bundle, tmp_path / "state")

    def loads() -> list[dict[str, object]]:
        a = login(lab, "carol", user="carol", service=svc)
        assert a.report.ok, a.report
        return [r for r in a.audit if r["event"] == "policy_load"]

    first = loads()  # version 3 becomes the accepted policy
    assert [(r["reason"], r["outcome"]) for r in first] == [("policy_accepted", "success")]
    assert loads() == [] and loads() == []  # the same bundle: nothing changed, nothing to say
    lab.write_policy(POLICY.replace(b"version = 3", b"version = 4"), bundle)
    changed = loads()
    assert [r["reason"] for r in changed] == ["policy_accepted"]
    assert "version=4" in str(changed[0]["detail"]) and "previous_version=3" in str(
        changed[0]["detail"]
    )
    assert loads() == []
