"""`svmm lab provision` (svmm_lab/host.py): the demo organisation as a host gets it, in a
tmp folder: a configuration the product loads, the reader as SoftHSM2's configuration, the
card interposer with its state folder compiled in, pulling a card by serial."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from svmm_lab import host, pinguard
from svmm_lab.lab import Lab, free_ports

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def test_provision_writes_a_host_configuration_and_a_reader(tmp_path: Path) -> None:
    from pam_svmm.config import VolumeMode, load

    crl, ocsp, ldap, ldaps = free_ports(4)
    conf = tmp_path / "softhsm2.conf"
    out = host.provision(
        tmp_path / "demo",
        tmp_path / "etc" / "svmm.toml",
        ports=host.HostPorts(crl, ocsp, ldap, ldaps),
        reader=("alice", "scl"),
        volume_mode="dm-crypt",
        softhsm_conf=conf,
        seal_key=tmp_path / "seal.key",
    )
    config = load(out)
    assert config.volumes.mode is VolumeMode.DMCRYPT and config.volumes.enabled
    assert config.session.allowlist_dir == Path("/run/svmm/allowlist")
    assert config.launcher.socket == Path("/run/svmm/launcher.sock")
    assert config.directory.uris == (f"ldap://127.0.0.1:{ldap}",)
    assert config.policy.enabled and config.auth.host_name == "lab-host"
    assert oct(out.stat().st_mode & 0o777) == "0o644"
    assert (tmp_path / "seal.key").stat().st_mode & 0o077 == 0
    ports = host.host_ports(tmp_path / "demo")
    assert ports == host.HostPorts(crl, ocsp, ldap, ldaps)
    # The interposer knows the state folder without the lab's environment.
    lab = Lab(tmp_path / "demo")
    assert str(lab.pinguard_state).encode() in Path(config.pkcs11.module).read_bytes()
    # The reader: alice's and scl's tokens, and nothing else; then bob's alone.
    tokendir = conf.read_text().split("directories.tokendir = ")[1].split("\n")[0]
    labels = _token_labels(conf)
    assert labels == ["alice ID card", "scl ID card"]
    host.set_reader(lab, ["bob"], softhsm_conf=conf)
    assert _token_labels(conf) == ["bob ID card"]
    assert Path(tokendir).is_dir()
    # Pulling a card: pinguard's state for its serial says removed, and back again.
    serial = str(lab.card("bob")["serial"])
    host.set_removed(lab, "bob", True)
    assert pinguard.read_state(lab.pinguard_state, serial).get("removed") == "1"
    host.set_removed(lab, "bob", False)
    assert "removed" not in pinguard.read_state(lab.pinguard_state, serial)
    # Twice: reuses what is there.
    host.provision(
        tmp_path / "demo",
        out,
        ports=ports,
        softhsm_conf=conf,
        seal_key=tmp_path / "seal.key",
    )
    assert _token_labels(conf) == ["alice ID card"]
    assert json.loads((tmp_path / "demo" / host.HOST_FILE).read_text())["ldap"] == ldap


def _token_labels(conf: Path) -> list[str]:
    """Token labels SoftHSM2 shows with this configuration (a separate process: SoftHSM2
    reads its configuration once); SoftHSM2's free slot (no label) left out."""
    code = (
        "import PyKCS11,sys\n"
        "lib=PyKCS11.PyKCS11Lib(); lib.load('/usr/lib/softhsm/libsofthsm2.so')\n"
        "print('\\n'.join(sorted(lib.getTokenInfo(s).label.strip() "
        "for s in lib.getSlotList(tokenPresent=True))))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=dict(os.environ, SOFTHSM2_CONF=str(conf)),
        timeout=60,
        check=True,
    )
    return [label for label in proc.stdout.split("\n") if label]  # not the free slot
