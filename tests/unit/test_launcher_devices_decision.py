"""The launcher's pure device decision: exactly the allowlist's usb:/network: permissions the
policy grants now; a network the host does not define refuses the start."""

from __future__ import annotations

import pytest

from pam_svmm.domain.allowlist import parse_allowlist
from pam_svmm.errors import LauncherRefused
from pam_svmm.services.launcher import decide_devices
from tests.unit.launcher_fixtures import LocalPolicy, allowlist_bytes

POLICY = """
version = 1
[hosts.lab-host]
login_roles = ["analysts"]
services = ["login"]
[networks.lab]
types = ["work"]
[networks.ghost]
types = ["work"]
[vms.box]
type = "work"
usb = ["046d:c52b", "1050:0407"]
networks = ["lab", "ghost"]
[[grants]]
role = "analysts"
vm = "box"
permissions = ["boot", "usb:046d:c52b", "network:lab"]
"""


def test_only_the_granted_devices() -> None:
    policy = LocalPolicy(POLICY)
    allowlist = parse_allowlist(allowlist_bytes(policy))
    d = decide_devices("box", allowlist, policy, [], ["lab"])
    assert (d.usb, d.networks, d.denied) == (("046d:c52b",), ("lab",), ())
    assert d.detail() == "usb=046d:c52b; networks=lab"


def test_a_device_the_policy_no_longer_grants_is_left_out() -> None:
    allowlist = parse_allowlist(allowlist_bytes(LocalPolicy(POLICY)))
    now = LocalPolicy(POLICY.replace('"usb:046d:c52b", ', ""))  # the grant was withdrawn
    d = decide_devices("box", allowlist, now, [], ["lab"])
    assert d.usb == () and d.networks == ("lab",) and d.denied == ("usb:046d:c52b (no_grant)",)


def test_a_granted_network_the_host_does_not_define_is_refused() -> None:
    policy = LocalPolicy(POLICY.replace('"network:lab"]', '"network:lab", "network:ghost"]'))
    allowlist = parse_allowlist(allowlist_bytes(policy))
    with pytest.raises(LauncherRefused) as e:
        decide_devices("box", allowlist, policy, [], ["lab"])
    assert e.value.reason == "network_undefined"
    assert "[launcher.networks.ghost]" in e.value.message
