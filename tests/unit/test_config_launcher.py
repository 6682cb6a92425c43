"""The [launcher] section: defaults, the card-removal keys, and refusals naming the key."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from pam_svmm import config
from pam_svmm.errors import ConfigError


def test_launcher_defaults() -> None:
    lc = config.parse({}).launcher
    assert lc.socket == Path("/run/svmm/launcher.sock")
    assert (lc.vm_uid_min, lc.vm_uid_max) == (70000, 70255)  # a uid per VM, never shared
    low, high = config.DYNAMIC_UID_RANGE  # never a uid systemd may give a service meanwhile
    assert lc.vm_uid_max < low or lc.vm_uid_min > high
    assert lc.run_dir == Path("/run/svmm/vms") and lc.registry_dir == Path("/run/svmm/registry")
    assert lc.card_removal is config.CardRemovalAction.PAUSE
    assert lc.card_poll_interval == 1.0
    assert (lc.quit_timeout, lc.term_timeout, lc.kill_timeout) == (5.0, 3.0, 3.0)


def test_launcher_values_are_read() -> None:
    text = """[launcher]
socket = "/run/x/l.sock"
vm_uid_min = 70000
vm_uid_max = 70009
run_dir = "/run/x/vms"
registry_dir = "/run/x/reg"
start_timeout = 20
quit_timeout = 1
term_timeout = 0.5
kill_timeout = 0.5
card_removal = "stop"
card_poll_interval = 0.25
"""
    lc = config.parse(tomllib.loads(text)).launcher
    assert lc.socket == Path("/run/x/l.sock") and (lc.vm_uid_min, lc.vm_uid_max) == (70000, 70009)
    assert lc.registry_dir == Path("/run/x/reg") and lc.start_timeout == 20.0
    assert lc.card_removal is config.CardRemovalAction.STOP and lc.card_poll_interval == 0.25


@pytest.mark.parametrize(
    ("text", "key", "words"),
    [
        ('[launcher]\nsocket = "svmm.sock"', "launcher.socket", "absolute"),
        (f'[launcher]\nsocket = "/{"x" * 120}"', "launcher.socket", "too long"),
        ('[launcher]\nvm_user = "nobody"', "launcher.vm_user", "a uid of its own"),
        ("[launcher]\nvm_uid_min = 0", "launcher.vm_uid_min", "between"),
        ("[launcher]\nvm_uid_min = 70001\nvm_uid_max = 70000", "launcher.vm_uid_min", "above"),
        ("[launcher]\nvm_uid_min = 65530\nvm_uid_max = 66000", "launcher.vm_uid_max", "nobody"),
        ("[launcher]\nvm_uid_min = 64600\nvm_uid_max = 64855", "launcher.vm_uid_min", "Dynamic"),
        ("[launcher]\nvm_uid_min = 60000\nvm_uid_max = 61184", "launcher.vm_uid_min", "Dynamic"),
        ('[launcher]\ncard_removal = "shred"', "launcher.card_removal", "'pause'"),
        ("[launcher]\ncard_poll_interval = 0", "launcher.card_poll_interval", "at least"),
        ("[launcher]\nquit_timeout = -1", "launcher.quit_timeout", "at least"),
        ('[launcher]\nrun_dir = "vms"', "launcher.run_dir", "absolute"),
        ("[launcher]\nsockets = 1", "launcher.sockets", "unknown key"),
    ],
)
def test_bad_launcher_values_name_the_key(text: str, key: str, words: str) -> None:
    with pytest.raises(ConfigError) as err:
        config.parse(tomllib.loads(text))
    assert err.value.key == key
    assert words in str(err.value)


def test_last_logout_and_networks() -> None:
    lc = config.parse({}).launcher
    assert lc.on_last_logout is config.LastLogoutAction.KEEP and lc.networks == ()
    lc = config.parse(
        {"launcher": {"on_last_logout": "pause", "networks": {
            "lab": {"kind": "user", "restrict": False},
            "dmz": {"kind": "bridge", "bridge": "br-dmz"}}}}
    ).launcher  # fmt: skip
    assert lc.on_last_logout is config.LastLogoutAction.PAUSE
    assert lc.network("lab") == config.NetworkBackend("lab", config.NetworkKind.USER, False)
    assert lc.network("dmz") == config.NetworkBackend(
        "dmz", config.NetworkKind.BRIDGE, bridge="br-dmz"
    )
    assert lc.network("ghost") is None


@pytest.mark.parametrize(
    ("launcher", "key"),
    [
        ({"on_last_logout": "sleep"}, "launcher.on_last_logout"),
        ({"networks": {"Lab": {"kind": "user"}}}, "launcher.networks.Lab"),
        ({"networks": {"lab": {}}}, "launcher.networks.lab.kind"),
        ({"networks": {"lab": {"kind": "vde"}}}, "launcher.networks.lab.kind"),
        ({"networks": {"lab": {"kind": "bridge"}}}, "launcher.networks.lab.bridge"),
        ({"networks": {"lab": {"kind": "bridge", "bridge": "a b"}}},
         "launcher.networks.lab.bridge"),
        ({"networks": {"lab": {"kind": "user", "bridge": "br0"}}}, "launcher.networks.lab.bridge"),
        ({"networks": {"lab": {"kind": "bridge", "bridge": "br0", "restrict": True}}},
         "launcher.networks.lab.restrict"),
        ({"networks": {"lab": {"kind": "user", "mtu": 9000}}}, "launcher.networks.lab.mtu"),
        ({"networks": {"lab": "user"}}, "launcher.networks.lab"),
    ],
)  # fmt: skip
def test_bad_launcher_network_keys_are_named(launcher: dict, key: str) -> None:
    with pytest.raises(ConfigError) as e:
        config.parse({"launcher": launcher})
    assert f"configuration: {key}:" in str(e.value)


def test_the_example_file_documents_the_new_keys() -> None:
    root = Path(__file__).resolve().parents[2]
    doc = tomllib.loads((root / "config" / "svmm.toml").read_text())
    assert doc["launcher"]["on_last_logout"] == "keep"
    assert config.parse(doc).launcher.on_last_logout is config.LastLogoutAction.KEEP
