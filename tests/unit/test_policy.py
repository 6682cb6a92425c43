"""The VM policy decision point: validation (errors name the key), decisions (every rule kind,
allow and deny), the mandatory constraints (Chinese Wall, type enforcement), host login."""

from __future__ import annotations

from pathlib import Path

import pytest

from pam_svmm.domain import policy as pdp
from pam_svmm.domain.policy import Subject, decide, grants_for, host_login, load_policy
from pam_svmm.errors import PolicyError

EXAMPLE = Path(__file__).resolve().parents[2] / "config" / "policy.example.toml"

BASE = """
version = 3

[hosts.lab-host]
login_roles = ["vm-users", "vm-admins"]
services = ["login", "sudo"]

[networks.dmz]
types = ["public"]

[networks.internal]
types = ["internal", "restricted"]

[networks.backup]
types = ["internal"]

[vms.vm-web]
label = "web"
class = "shop"
type = "public"
volumes = ["web-disk"]
usb = ["046d:c52b"]
networks = ["dmz"]

[vms.vm-db]
class = "shop"
type = "internal"
volumes = ["db-disk"]
networks = ["internal"]

[vms.bank-a]
class = "bank-a"
type = "restricted"
networks = ["internal"]

[vms.bank-b]
class = "bank-b"
type = "restricted"
networks = ["internal"]

[conflicts]
classes = [["bank-a", "bank-b"]]

[[grants]]            # 0
role = "vm-users"
vm = "vm-web"
permissions = ["boot", "console", "network:dmz"]

[[grants]]            # 1
role = "vm-admins"
vm = "vm-web"
permissions = ["boot", "usb:046d:c52b"]

[[grants]]            # 2
role = "leads"
vm = "bank-a"
permissions = ["boot", "console"]

[[grants]]            # 3
role = "leads"
vm = "bank-b"
permissions = ["boot", "console"]

[[grants]]            # 4
user = "alice"
vm = "bank-b"
permissions = ["boot"]

[[grants]]            # 5: type enforcement refuses it whatever the grant says
role = "tester"
vm = "vm-web"
permissions = ["network:internal"]

[[grants]]            # 6: vm-db is not configured for backup
role = "tester"
vm = "vm-db"
permissions = ["network:backup", "network:internal"]

[[grants]]            # 7: the same permission again, lower priority in explanations
role = "vm-admins"
vm = "vm-web"
permissions = ["boot"]
"""


@pytest.fixture(scope="module")
def compiled() -> pdp.CompiledPolicy:
    return load_policy(BASE)


# --- decisions: every rule kind, allow and deny ----------------------------------------------

DECISIONS = [
    # (user, roles, vm, action, running, allowed, reason, rule contains)
    ("bob", ["vm-users"], "vm-web", "boot", [], True, "granted", "grants[0]: role vm-users"),
    ("bob", ["vm-users"], "vm-web", "console", [], True, "granted", "grants[0]"),
    ("bob", ["vm-users"], "vm-db", "boot", [], False, "no_grant", "default deny"),
    ("bob", [], "vm-web", "boot", [], False, "no_grant", "roles: none"),
    ("alice", [], "bank-b", "boot", [], True, "granted", "grants[4]: user alice"),
    ("alice", [], "bank-b", "console", [], False, "no_grant", "default deny"),
    ("mallory", [], "bank-b", "boot", [], False, "no_grant", "default deny"),
    ("bob", ["vm-users"], "vm-x", "boot", [], False, "unknown_vm", "no VM 'vm-x'"),
    ("bob", ["vm-users"], "vm-web", "reboot", [], False, "unknown_action", "not an action"),
    ("bob", ["vm-users"], "vm-web", "usb:xyz", [], False, "unknown_action", "not an action"),
    # usb
    ("carol", ["vm-admins"], "vm-web", "usb:046d:c52b", [], True, "granted", "grants[1]"),
    ("carol", ["vm-admins"], "vm-web", "usb:046D:C52B", [], True, "granted", "grants[1]"),
    ("bob", ["vm-users"], "vm-web", "usb:046d:c52b", [], False, "no_grant", "default deny"),
    ("carol", ["vm-admins"], "vm-web", "usb:dead:beef", [], False, "device_not_assigned", "usb"),
    # networks: grant needed, and type enforcement (a grant does not override it)
    ("bob", ["vm-users"], "vm-web", "network:dmz", [], True, "granted", "grants[0]"),
    ("carol", ["vm-admins"], "vm-web", "network:dmz", [], False, "no_grant", "default deny"),
    ("t", ["tester"], "vm-web", "network:internal", [], False, "network_type_denied", "type"),
    ("t", ["tester"], "vm-db", "network:internal", [], True, "granted", "grants[6]"),
    ("t", ["tester"], "vm-db", "network:backup", [], False, "network_not_attached", "backup"),
    ("t", ["tester"], "vm-db", "network:nowhere", [], False, "unknown_network", "nowhere"),
    # the lowest grant index explains a permission given twice
    ("carol", ["vm-admins", "vm-users"], "vm-web", "boot", [], True, "granted", "grants[0]"),
    ("carol", ["vm-admins"], "vm-web", "boot", [], True, "granted", "grants[1]"),
    # Chinese Wall: boot of one bank while the other runs; allowed once it stopped
    ("dave", ["leads"], "bank-b", "boot", ["bank-a"], False, "conflict_of_interest", "Chinese"),
    ("dave", ["leads"], "bank-b", "boot", [], True, "granted", "grants[3]"),
    ("dave", ["leads"], "bank-a", "boot", ["bank-b"], False, "conflict_of_interest", "bank-b"),
    ("dave", ["leads"], "bank-b", "boot", ["vm-web", "vm-db"], True, "granted", "grants[3]"),
    ("dave", ["leads"], "bank-b", "boot", ["bank-b"], True, "granted", "grants[3]"),
    ("dave", ["leads"], "bank-b", "console", ["bank-a"], True, "granted", "grants[3]"),
    ("dave", ["leads"], "bank-b", "boot", ["gone-vm"], True, "granted", "grants[3]"),
    # a user grant does not get past the wall either
    ("alice", ["leads"], "bank-b", "boot", ["bank-a"], False, "conflict_of_interest", "alice"),
    # same class (shop) never conflicts with itself
    ("carol", ["vm-admins"], "vm-web", "boot", ["vm-db"], True, "granted", "grants[1]"),
]


@pytest.mark.parametrize(
    ("user", "roles", "vm", "action", "running", "allowed", "reason", "rule"), DECISIONS
)
def test_decide(
    compiled: pdp.CompiledPolicy,
    user: str,
    roles: list[str],
    vm: str,
    action: str,
    running: list[str],
    allowed: bool,
    reason: str,
    rule: str,
) -> None:
    d = decide(compiled, Subject(user, roles), vm, action, running)
    assert (d.allowed, d.reason) == (allowed, reason), d.rule
    assert rule in d.rule


def test_decision_is_not_a_boolean(compiled: pdp.CompiledPolicy) -> None:
    # `if decide(...)` would be always true for a dataclass: it must fail loudly instead.
    d = decide(compiled, Subject("bob", []), "vm-web", "boot", [])
    with pytest.raises(TypeError):
        bool(d)


def test_roles_as_a_string_are_refused(compiled: pdp.CompiledPolicy) -> None:
    with pytest.raises(TypeError):
        decide(compiled, ("bob", "vm-users"), "vm-web", "boot", [])
    with pytest.raises(TypeError):
        grants_for(compiled, ("bob", "vm-users"))
    with pytest.raises(TypeError):
        host_login(compiled, "lab-host", "login", "vm-users")


def test_decisions_are_pure_and_order_independent(compiled: pdp.CompiledPolicy) -> None:
    a = decide(compiled, ("carol", ["vm-users", "vm-admins"]), "vm-web", "boot", ["vm-db"])
    b = decide(compiled, ("carol", ("vm-admins", "vm-users")), "vm-web", "boot", {"vm-db"})
    assert a == b


def test_wall_between_three_classes() -> None:
    text = (
        BASE.replace(
            '[conflicts]\nclasses = [["bank-a", "bank-b"]]',
            '[vms.bank-c]\nclass = "bank-c"\n\n'
            '[conflicts]\nclasses = [["bank-a", "bank-b", "bank-c"]]',
        )
        + '\n[[grants]]\nrole = "leads"\nvm = "bank-c"\npermissions = ["boot"]\n'
    )
    c = load_policy(text)
    s = Subject("dave", ["leads"])
    assert decide(c, s, "bank-c", "boot", ["bank-b"]).reason == "conflict_of_interest"
    assert decide(c, s, "bank-c", "boot", []).allowed


# --- grants_for ---------------------------------------------------------------------------


def test_grants_for_unions_user_and_role_grants(compiled: pdp.CompiledPolicy) -> None:
    g = grants_for(compiled, Subject("alice", ["vm-users", "leads"]))
    assert g == {
        "vm-web": frozenset({"boot", "console", "network:dmz"}),
        "bank-a": frozenset({"boot", "console"}),
        "bank-b": frozenset({"boot", "console"}),
    }


def test_grants_for_leaves_out_what_static_constraints_refuse(
    compiled: pdp.CompiledPolicy,
) -> None:
    g = grants_for(compiled, Subject("t", ["tester"]))
    assert g == {"vm-db": frozenset({"network:internal"})}
    assert grants_for(compiled, Subject("nobody", ["unknown-role"])) == {}


# --- host login ---------------------------------------------------------------------------

LOGINS = [
    ("lab-host", "login", ["vm-users"], True, "login_allowed"),
    ("lab-host", "sudo", ["auditor", "vm-admins"], True, "login_allowed"),
    ("lab-host", "sshd", ["vm-users"], False, "service_not_allowed"),
    ("lab-host", "login", ["auditor"], False, "role_not_allowed"),
    ("lab-host", "login", [], False, "role_not_allowed"),
    ("other-host", "login", ["vm-users"], False, "unknown_host"),
]


@pytest.mark.parametrize(("host", "service", "roles", "allowed", "reason"), LOGINS)
def test_host_login(
    compiled: pdp.CompiledPolicy,
    host: str,
    service: str,
    roles: list[str],
    allowed: bool,
    reason: str,
) -> None:
    d = host_login(compiled, host, service, roles)
    assert (d.allowed, d.reason) == (allowed, reason), d.rule
    assert f"{host}" in d.rule


# --- validation: every error names its key ---------------------------------------------------


def _replace(old: str, new: str) -> str:
    assert old in BASE
    return BASE.replace(old, new, 1)


ERRORS = [
    (
        BASE + '\n[[grants]]\nrole = "r"\nvm = "vm-x"\npermissions = ["boot"]\n',
        "grants[8].vm",
        "unknown VM 'vm-x'",
    ),
    (_replace('usb = ["046d:c52b"]', 'usb = ["46d:c52b"]'), "vms.vm-web.usb[0]", "usb id"),
    (
        _replace('usb = ["046d:c52b"]', 'usb = ["046d:c52b", "046D:C52B"]'),
        "vms.vm-web.usb[1]",
        "twice",
    ),
    (
        _replace('"boot", "console", "network:dmz"', '"boot", "reboot"'),
        "grants[0].permissions[1]",
        "unknown permission 'reboot'",
    ),
    (
        _replace('"boot", "usb:046d:c52b"', '"boot", "usb:1234:5678"'),
        "grants[1].permissions[1]",
        "not assigned to vm-web",
    ),
    (
        _replace('"boot", "usb:046d:c52b"', '"boot", "usb:12345:678"'),
        "grants[1].permissions[1]",
        "unknown permission",
    ),
    (
        _replace('permissions = ["network:internal"]', 'permissions = ["network:nowhere"]'),
        "grants[5].permissions[0]",
        "unknown network 'nowhere'",
    ),
    (
        _replace('classes = [["bank-a", "bank-b"]]', 'classes = [["bank-a", "bank-z"]]'),
        "conflicts.classes[0][1]",
        "unknown class 'bank-z'",
    ),
    (
        _replace('classes = [["bank-a", "bank-b"]]', 'classes = [["bank-a"]]'),
        "conflicts.classes[0]",
        "at least two",
    ),
    (
        _replace('type = "public"', 'type = "internal"'),
        "vms.vm-web.networks[0]",
        "network 'dmz' admits types public",
    ),
    (
        _replace('networks = ["dmz"]', 'networks = ["lan"]'),
        "vms.vm-web.networks[0]",
        "unknown network 'lan'",
    ),
    (_replace("version = 3", ""), "version", "required"),
    (_replace("version = 3", "version = 0"), "version", "positive"),
    (_replace("version = 3", "version = true"), "version", "positive"),
    (_replace("version = 3", 'version = "3"'), "version", "positive"),
    ("owner = 1\n" + BASE, "owner", "unknown key"),
    (_replace('label = "web"', 'lable = "web"'), "vms.vm-web.lable", "unknown key"),
    (
        _replace(
            'role = "vm-users"\nvm = "vm-web"', 'role = "vm-users"\nuser = "bob"\nvm = "vm-web"'
        ),
        "grants[0].role",
        "exactly one",
    ),
    (
        _replace('role = "vm-users"\nvm = "vm-web"', 'vm = "vm-web"'),
        "grants[0].role",
        "exactly one",
    ),
    (_replace('user = "alice"', 'user = "al ice"'), "grants[4].user", "not a valid user"),
    (
        _replace('services = ["login", "sudo"]', 'services = "login"'),
        "hosts.lab-host.services",
        "array",
    ),
    (_replace('types = ["public"]', "types = []"), "networks.dmz.types", "at least one"),
    (_replace("[vms.bank-b]", '[vms."bank b"]'), "vms.bank b", "not a valid name"),
    (
        _replace('vm = "vm-web"\npermissions = ["boot"]\n', 'vm = "vm-web"\npermissions = []\n'),
        "grants[7].permissions",
        "at least one",
    ),
    (
        _replace('"boot", "console", "network:dmz"', '"boot", "boot"'),
        "grants[0].permissions[1]",
        "twice",
    ),
    ("version = [", "", "not valid TOML"),
]


@pytest.mark.parametrize(("text", "key", "problem"), ERRORS)
def test_errors_name_the_key(text: str, key: str, problem: str) -> None:
    with pytest.raises(PolicyError) as e:
        load_policy(text)
    assert e.value.key == key
    assert problem in e.value.problem
    assert e.value.reason == "policy_invalid"


def test_bytes_that_are_not_utf8_are_refused() -> None:
    with pytest.raises(PolicyError, match="UTF-8"):
        load_policy(b"version = 1\n# \xff\n")


def test_the_example_policy_is_valid_and_decides_the_demo_cases() -> None:
    c = load_policy(EXAMPLE.read_bytes())
    assert set(c.policy.vms) == {"vm-web", "vm-db", "bank-a", "bank-b"}
    leads = Subject("dave", ["vm-users", "vm-admins", "engineering-leads"])
    assert decide(c, leads, "bank-b", "boot", ["bank-a"]).reason == "conflict_of_interest"
    assert decide(c, leads, "bank-b", "boot", []).allowed
    assert not decide(c, Subject("bob", ["vm-users"]), "vm-db", "boot", []).allowed
    assert host_login(c, "lab-host", "login", ["vm-users"]).allowed


# --- lint ---------------------------------------------------------------------------------


def test_lint_reports_what_is_valid_but_probably_wrong() -> None:
    text = BASE + '\n[vms.spare]\ntype = "internal"\n'
    warnings = pdp.lint(pdp.parse_policy(text))
    joined = "\n".join(warnings)
    assert "vms.spare: no grant refers to this VM" in joined
    assert "grants[5].permissions[0]: network:internal can never take effect: type" in joined
    assert "grants[6].permissions[0]: network:backup can never take effect" in joined
    assert "networks.backup: no VM is configured" in joined
    assert (
        "grants[7].permissions[0]: boot on vm-web for role vm-admins is already in grants[1]"
        in joined
    )
    assert "conflicts.classes[0]: role leads may boot VMs of bank-a, bank-b" in joined
    assert "user alice" not in joined  # one side only


def test_example_lints_only_the_deliberate_wall() -> None:
    warnings = pdp.lint(pdp.parse_policy(EXAMPLE.read_bytes()))
    assert len(warnings) == 1 and "engineering-leads may boot VMs of bank-a, bank-b" in warnings[0]
