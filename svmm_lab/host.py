"""The demo organisation installed on a host (`svmm lab provision`, used by
vagrant/provision.sh and the end-to-end guest), with the host's own paths.

The lab (lab.py) builds the organisation in a folder for the demo and the tests, where every
PAM client is given the reader's environment. On a host, login, su and sudo run the module
with no such environment, so here:

- the reader is SoftHSM2's default configuration (/etc/softhsm/softhsm2.conf) pointing to
  ``<dir>/reader/tokens``; `svmm lab reader` puts demo cards in it, pulls them, puts them back;
- the card interposer (pinguard) is built with the state folder compiled in;
- the responders and the directory listen on fixed loopback ports (`svmm lab serve --dir D
  --directory`, the svmm-demo-org.service unit), recorded in ``<dir>/host.json`` (the demo
  lab records the ports it picked there too: ``lab_ports``);
- /etc/svmm/svmm.toml names the host's places: /run/svmm, /var/log/svmm, /var/cache/svmm.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from . import pinguard
from .lab import DEMO_CARDS, CardSpec, Lab

SOFTHSM_CONF = Path("/etc/softhsm/softhsm2.conf")
HOST_FILE = "host.json"
POLICY_EXAMPLE = Path(__file__).resolve().parents[1] / "config" / "policy.example.toml"
# Cards of the host demo beyond the lab's: scl has a good card but is not in the
# engineering role (sudo is refused).
HOST_CARDS: tuple[CardSpec, ...] = (
    *DEMO_CARDS,
    CardSpec("scl", "scl", "p256", story="a good card; scl is not in the engineering role"),
)
VOLUMES = (("web-disk", "alice"), ("bank-a-data", "alice"))


@dataclass(frozen=True)
class HostPorts:
    crl: int = 8081
    ocsp: int = 8082
    ldap: int = 3389
    ldaps: int = 6636


def provision(
    folder: Path,
    config_out: Path,
    *,
    ports: HostPorts = HostPorts(),
    reader: Sequence[str] = ("alice",),
    volume_mode: str = "vmm",
    softhsm_conf: Path = SOFTHSM_CONF,
    policy: Path = POLICY_EXAMPLE,
    seal_key: Path = Path("/etc/svmm/audit-seal.key"),
) -> Path:
    """Build (or reuse) the demo organisation in ``folder``; write the host configuration to
    ``config_out``; put ``reader``'s cards in the host's reader. Safe to run twice."""
    from .directory import Slapd
    from .volumes import make_volume

    lab = Lab(folder)
    lab.build(crl_port=ports.crl, ocsp_port=ports.ocsp, cards=HOST_CARDS, venv=Path(sys.prefix))
    record_ports(lab, ports)
    slapd = Slapd(lab.folder / "directory", ca=lab.ca, port=ports.ldap, ldaps_port=ports.ldaps)
    slapd.build()
    # The example policy as it is: a granted VM whose disk is not enrolled for a user's card
    # is skipped at session open (audited), and Debian's `su -` (su-l) is a login service.
    bundle = lab.write_policy(policy.read_bytes())
    for volume, card in VOLUMES:
        make_volume(lab, volume, card)
    module = pinguard.build_pinguard(lab.folder / "pinguard-host", default_state=lab.pinguard_state)
    config_out.parent.mkdir(parents=True, exist_ok=True)
    # The lab's directory timeouts are for tests on a fast machine; a host (or a TCG guest
    # starting Python cold) gets the configuration's defaults' order of magnitude.
    directory = lab.directory_overrides(slapd)
    directory = re.sub(r"(?m)^connect_timeout = .*$", "connect_timeout = 10", directory)
    directory = re.sub(r"(?m)^search_timeout = .*$", "search_timeout = 10", directory)
    lab.write_config(
        _host_overrides(lab, module, volume_mode, seal_key)
        + directory
        + lab.policy_overrides(bundle, state=Path("/var/lib/svmm/policy")),
        path=config_out,
    )
    config_out.chmod(0o644)
    from pam_svmm.adapters.audit_log import load_seal_key

    # Made now, while /etc is writable: svmmd runs with a read-only /etc.
    load_seal_key(seal_key, create=True)
    set_reader(lab, reader, softhsm_conf=softhsm_conf)
    return config_out


def _host_overrides(lab: Lab, module: Path, volume_mode: str, seal_key: Path) -> str:
    return f"""
[pkcs11]
module = "{module}"
pin_prompt = "PIN for {{token}}: "

[revocation]
end_entity = "require"
ca = "require"
methods = ["ocsp", "crl"]
cache_dir = "/var/cache/svmm/revocation"
fetch_timeout = 10

[auth]
host_name = "lab-host"
login_timeout = 120

[audit]
path = "/var/log/svmm/audit.jsonl"
syslog = true
seal_key = "{seal_key}"

[session]
allowlist_dir = "/run/svmm/allowlist"
state_dir = "/run/svmm/sessions"

[launcher]
socket = "/run/svmm/launcher.sock"
run_dir = "/run/svmm/vms"
registry_dir = "/run/svmm/registry"
card_poll_interval = 0.5

# The example policy's networks, on QEMU's isolated user stack.
[launcher.networks.dmz]
kind = "user"

[launcher.networks.internal]
kind = "user"

[volumes]
enabled = true
dir = "{lab.folder / "volumes"}"
mode = "{volume_mode}"
"""


def reader_dir(lab: Lab) -> Path:
    return lab.folder / "reader" / "tokens"


def set_reader(lab: Lab, cards: Sequence[str], *, softhsm_conf: Path = SOFTHSM_CONF) -> None:
    """The host's reader holds exactly these demo cards (copies of their tokens)."""
    tokens = reader_dir(lab)
    if tokens.exists():
        shutil.rmtree(tokens)
    tokens.mkdir(parents=True, mode=0o700)
    for name in cards:
        for token in (lab.cards_dir / name / "tokens").iterdir():
            shutil.copytree(token, tokens / token.name)
    softhsm_conf.parent.mkdir(parents=True, exist_ok=True)
    softhsm_conf.write_text(
        "# The pam_svmm demo's card reader (svmm lab reader).\n"
        f"directories.tokendir = {tokens}\nobjectstore.backend = file\n"
        "log.level = ERROR\nslots.removable = true\n"
    )


def set_removed(lab: Lab, card: str, removed: bool) -> None:
    """Pull a card out of the reader (True) or put it back (False), as pinguard sees it."""
    pinguard.set_removed(lab.pinguard_state, str(lab.card(card)["serial"]), removed)


def lab_ports(lab: Lab) -> HostPorts:
    """The ports of the lab in ``lab.folder``: those it recorded (``host.json``, see
    ``record_ports``), else those its certificates already name for the CRLs and OCSP and free
    ones for the rest. So the demo, run again, and `svmm lab serve` use the same ports, and
    the configuration the demo wrote stays right."""
    from urllib.parse import urlsplit

    from .lab import free_ports

    recorded = host_ports(lab.folder)
    if recorded is not None:
        return recorded
    crl, ocsp, ldap, ldaps = free_ports(4)
    meta = lab.ca_dir / "config.json"
    if meta.exists():
        m = json.loads(meta.read_text())
        crl = urlsplit(m["crl_base"]).port or crl
        ocsp = urlsplit(m["ocsp_url"]).port or ocsp
    return HostPorts(crl, ocsp, ldap, ldaps)


def record_ports(lab: Lab, ports: HostPorts) -> None:
    (lab.folder / HOST_FILE).write_text(json.dumps(asdict(ports), indent=1) + "\n")


def port_names(ports: HostPorts) -> dict[str, int]:
    """What listens on each port (for messages)."""
    return {
        "the lab's CRL server": ports.crl,
        "the lab's OCSP responder": ports.ocsp,
        "the lab's directory (LDAP)": ports.ldap,
        "the lab's directory (LDAPS)": ports.ldaps,
    }


def host_ports(folder: Path) -> HostPorts | None:
    path = folder / HOST_FILE
    return HostPorts(**json.loads(path.read_text())) if path.exists() else None
