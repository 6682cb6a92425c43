"""The demo organisation on one machine: CA, responders, soft cards, PAM service, config.

The demo and the integration tests use the same lab, so what the demo shows is what the
tests check. Layout of the lab folder:

    ca/                   the LabCA (root, intermediate, OCSP signer, CRLs, index.txt)
    cards/NAME/           key.pem (0600), cert.pem, card.json, tokens/ (a SoftHSM2 token)
    readers/ID/           a "reader": softhsm2.conf and the tokens inserted in it
    pinguard/             the PIN-counter interposer module (see pinguard.c)
    pam/                  PAM service files naming the module
    svmm.toml             the product's configuration for this lab
    audit.jsonl  cache/   what the module writes
    run/allowlist/        the per-user VM allowlists of open sessions (run/sessions: refcount)
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, overload

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from . import pinguard
from .pamclient import PamReport, PamSession, build_client, pam_env, run_client, start_session
from .pki import SMARTCARD_LOGON, LabCA, PrivateKey, key_pem, load_key, new_key

if TYPE_CHECKING:
    from .responders import CrlServer, OcspResponder

SOFTHSM_MODULE = Path("/usr/lib/softhsm/libsofthsm2.so")
# What makes a lab reader (Lab.insert): the variables that point SoftHSM and pinguard at it.
READER_ENV = ("SOFTHSM2_CONF", pinguard.ENV_STATE, pinguard.ENV_MODULE)
PAM_PYTHON = Path("/lib/security/pam_python.so")
SHIM = Path(__file__).resolve().parents[1] / "pam_svmm" / "pam" / "shim.py"
LOGIN_SERVICE = "svmm-login"
SO_PIN = "12345678"
UTC = dt.UTC


@dataclass(frozen=True)
class CardSpec:
    """A demo card: who it is for and what is wrong with it, if anything."""

    name: str
    holder: str  # the user name its certificate maps to
    key: str = "rsa"  # rsa, p256, p384, rsa1024
    pin: str = "123456"
    # good, revoked, expired, not_yet_valid, no_eku, smartcard_only, forged, untrusted,
    # malformed, renewed (an expired certificate beside the current one)
    state: str = "good"
    tries_left: int | None = None  # PIN tries left (pinguard), None: not tracked
    max_tries: int = 3
    pinpad: bool = False
    upn: bool = True  # carry a UPN in the SAN (without: only the e-mail address)
    story: str = ""

    @property
    def label(self) -> str:
        return f"{self.holder} ID card"


DEMO_CARDS: tuple[CardSpec, ...] = (
    CardSpec("alice", "alice", "rsa", story="a good card (RSA 2048)"),
    CardSpec("bob", "bob", "p256", story="a good card (EC P-256)"),
    CardSpec("carol", "carol", "p384", story="a good card (EC P-384)"),
    CardSpec("mallory", "mallory", "p256", state="revoked", story="revoked by the CA"),
    CardSpec("eve", "eve", "p256", state="expired", story="its certificate has expired"),
    CardSpec("dave", "dave", "p256", tries_left=1, story="one PIN try left"),
    CardSpec(
        "forged",
        "alice",
        "p256",
        state="forged",
        story="alice's certificate on a card with another key",
    ),
)


@dataclass
class Reader:
    """A reader with some cards inserted: the environment a PAM client runs with."""

    folder: Path
    env: dict[str, str] = field(default_factory=dict)


class Lab:
    def __init__(self, folder: Path) -> None:
        self.folder = folder.resolve()
        self.ca_dir = self.folder / "ca"
        self.cards_dir = self.folder / "cards"
        self.readers_dir = self.folder / "readers"
        self.pam_dir = self.folder / "pam"
        self.config_path = self.folder / "svmm.toml"
        self.audit_path = self.folder / "audit.jsonl"
        self.cache_dir = self.folder / "cache"
        # What the session hook writes (the lab's stand-in for /run/svmm).
        self.allowlist_dir = self.folder / "run" / "allowlist"
        # PIN counters live with the card, not the reader: pulling a card and inserting it
        # elsewhere does not reset them.
        self.pinguard_state = self.folder / "pinguard-state"
        self._ca: LabCA | None = None
        self._rogue: LabCA | None = None
        self._readers = 0

    # --- building -------------------------------------------------------------------------

    @property
    def ca(self) -> LabCA:
        if self._ca is None:
            self._ca = LabCA.open(self.ca_dir)
        return self._ca

    def build(
        self,
        *,
        crl_port: int,
        ocsp_port: int,
        cards: Iterable[CardSpec] = DEMO_CARDS,
        venv: Path | None = None,
        config_overrides: str = "",
    ) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.folder.chmod(0o700)
        for d in (
            self.cards_dir,
            self.readers_dir,
            self.pam_dir,
            self.cache_dir,
            self.pinguard_state,
        ):
            d.mkdir(exist_ok=True)
        self.cache_dir.chmod(0o700)
        if not (self.ca_dir / "config.json").exists():
            self._ca = LabCA.create(
                self.ca_dir,
                crl_base=f"http://127.0.0.1:{crl_port}",
                ocsp_url=f"http://127.0.0.1:{ocsp_port}/",
            )
        for spec in cards:
            self.make_card(spec)
        self.reset_cards()
        self.ca.publish()
        self.write_config(config_overrides)
        self.write_pam_service(venv=venv)

    def write_config(self, overrides: str = "", path: Path | None = None) -> Path:
        """The lab's svmm.toml. ``overrides``: TOML tables replacing the lab's (tests)."""
        text = f"""# Written by the pam_svmm lab.
[pkcs11]
module = "{pinguard.build_pinguard(self.folder / "pinguard")}"
pin_prompt = "PIN for {{token}}: "
# The lab's readers are environments (Lab.insert): the card helper gets these from the
# process that starts it. A real host names none (the caller's environment is the user's).
pass_environment = {json.dumps(list(READER_ENV))}

[trust]
anchors = ["{self.ca_dir / "root.pem"}"]
intermediates_dir = "{self.folder / "intermediates"}"

[revocation]
end_entity = "require"
ca = "require"
methods = ["ocsp", "crl"]
cache_dir = "{self.cache_dir}"
fetch_timeout = 2

[[mapping.rules]]
kind = "upn"
strip_domain = true
domains = ["demo.example"]

[[mapping.rules]]
kind = "subject_cn"

[auth]
host_name = "lab-host"
login_timeout = 30

[audit]
path = "{self.audit_path}"
syslog = false
seal_key = "{self.folder / "audit-seal.key"}"

[session]
allowlist_dir = "{self.allowlist_dir}"
state_dir = "{self.folder / "run" / "sessions"}"
"""
        inter = self.folder / "intermediates"
        inter.mkdir(exist_ok=True)
        shutil.copy(self.ca_dir / "intermediate.pem", inter / "intermediate.pem")
        path = path or self.config_path
        path.write_text(_merge_toml(text, overrides))
        return path

    def write_pam_service(
        self,
        *,
        venv: Path | None = None,
        name: str = LOGIN_SERVICE,
        config: Path | None = None,
        args: str = "daemon=off",
    ) -> Path:
        """``args``: the shim's other module arguments; by default every call runs in the
        PAM process (the lab's svmmd serves VMs, not logins, unless a service asks so with
        ``daemon=required socket=PATH``)."""
        venv = venv or Path(sys.prefix)
        line = f"{PAM_PYTHON} {SHIM} venv={venv} config={config or self.config_path} {args}"
        path = self.pam_dir / name
        path.write_text(
            f"# pam_svmm lab service\nauth     required {line}\n"
            f"account  required {line}\nsession  required {line}\n"
        )
        return path

    def variant(self, name: str, overrides: str, *, args: str = "daemon=off") -> str:
        """A PAM service whose configuration is the lab's with ``overrides``; its name."""
        service = f"svmm-{name}"
        cfg = self.write_config(overrides, self.folder / f"{service}.toml")
        self.write_pam_service(name=service, config=cfg, args=args)
        return service

    def directory_overrides(self, slapd: Any, *, password_services: Sequence[str] = ()) -> str:
        """TOML for the lab's directory: the running ``slapd``, the certificate mapping rules
        (UPN first, then e-mail) and the password policy."""
        secret = slapd.write_password_file(self.folder / "ldap-service.secret", "service")
        services = ", ".join(f'"{s}"' for s in password_services)
        return f"""
[directory]
enabled = true
uris = ["{slapd.uri}"]
base_dn = "{slapd.base_dn}"
users_base = "ou=people,{slapd.base_dn}"
groups_base = "ou=groups,{slapd.base_dn}"
bind_dn = "{slapd.service_dn}"
bind_password_file = "{secret}"
tls = "starttls"
ca_file = "{self.ca_dir / "root.pem"}"
connect_timeout = 2
search_timeout = 3
cache_dir = "{self.folder / "identity-cache"}"
cache_max_age = 3600

[[certmap.rules]]
name = "upn"
priority = 10
match = {{ san = ["upn"] }}
map = "(svmmPrincipalName={{upn}})"

[[certmap.rules]]
name = "email"
priority = 20
match = {{ san = ["email"] }}
map = "(mail={{email}})"

[password]
enabled = {"true" if password_services else "false"}
services = [{services}]
card_required_roles = ["vm-admins"]
"""

    # --- cards ----------------------------------------------------------------------------

    def make_card(self, spec: CardSpec) -> Path:
        """Provision the card's token once; later calls reuse it."""
        folder = self.cards_dir / spec.name
        if (folder / "card.json").exists():
            return folder
        folder.mkdir(parents=True, exist_ok=True)
        folder.chmod(0o700)
        key = new_key(spec.key)
        cert = self._certificate_for(spec, key)
        card_key = new_key(spec.key) if spec.state == "forged" else key
        (folder / "key.pem").write_bytes(key_pem(card_key))
        (folder / "key.pem").chmod(0o600)
        (folder / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        cert_der = cert.public_bytes(serialization.Encoding.DER)
        if spec.state == "malformed":
            cert_der = cert_der[:40] + b"\x00garbage" + cert_der[48:]
        from .cards import provision_card

        extra = []
        if spec.state == "renewed":
            # The card still holds last year's (expired) certificate next to the current one.
            old_key = new_key(spec.key)
            old = self._certificate_for(replace(spec, state="expired"), old_key)
            (folder / "old-cert.pem").write_bytes(old.public_bytes(serialization.Encoding.PEM))
            extra.append((old_key, old.public_bytes(serialization.Encoding.DER), b"\x02", "old"))
        serial = provision_card(
            folder / "tokens",
            label=spec.label,
            pin=spec.pin,
            so_pin=SO_PIN,
            key=card_key,
            cert_der=cert_der,
            key_id=bytes.fromhex("01"),
            ca_certs=[self.ca.intermediate.cert],
            anchors=[self.ca.root.cert],
            malformed=spec.state == "malformed",
            extra=extra,
        )
        meta = asdict(spec) | {"serial": serial, "cert_serial": f"{cert.serial_number:x}"}
        (folder / "card.json").write_text(json.dumps(meta, indent=1))
        self._reset_reader_state(spec, serial)
        if spec.state == "revoked":
            self.ca.revoke(cert)
        return folder

    def reset_cards(self) -> None:
        """Put every card's PIN counter and pinpad back as its spec says (a demo rerun)."""
        for folder in sorted(self.cards_dir.iterdir()):
            meta = json.loads((folder / "card.json").read_text())
            serial = meta.pop("serial")
            meta.pop("cert_serial", None)
            self._reset_reader_state(CardSpec(**meta), serial)

    def _reset_reader_state(self, spec: CardSpec, serial: str) -> None:
        self.pinguard_state.mkdir(exist_ok=True)
        if spec.tries_left is not None:
            pinguard.set_pin_tries(self.pinguard_state, serial, spec.max_tries, spec.tries_left)
        if spec.pinpad:
            pin_file = self.pinguard_state / f"{serial}.keypad"
            pinguard.write_pinpad_pin(pin_file, spec.pin)
            pinguard.set_pinpad(self.pinguard_state, serial, pin_file)

    def _certificate_for(self, spec: CardSpec, key: PrivateKey) -> x509.Certificate:
        now = dt.datetime.now(UTC)
        kw: dict[str, object] = {
            "upn": f"{spec.holder}@demo.example" if spec.upn else None,
            "email": f"{spec.holder}@demo.example",
        }
        if spec.state == "expired":
            kw |= {
                "not_before": now - dt.timedelta(days=400),
                "not_after": now - dt.timedelta(days=1),
            }
        elif spec.state == "not_yet_valid":
            kw |= {
                "not_before": now + dt.timedelta(days=1),
                "not_after": now + dt.timedelta(days=400),
            }
        elif spec.state == "no_eku":
            kw |= {"ekus": (ExtendedKeyUsageOID.EMAIL_PROTECTION,)}
        elif spec.state == "smartcard_only":
            kw |= {"ekus": (SMARTCARD_LOGON,)}
        if spec.state == "untrusted":
            return self.rogue_ca.issue_user(spec.holder, key.public_key(), **kw)  # type: ignore[arg-type]
        return self.ca.issue_user(spec.holder, key.public_key(), **kw)  # type: ignore[arg-type]

    @property
    def rogue_ca(self) -> LabCA:
        """Another organisation's CA, with the same names: trusted by nobody here."""
        if self._rogue is None:
            folder = self.folder / "rogue-ca"
            if (folder / "config.json").exists():
                self._rogue = LabCA.open(folder)
            else:
                self._rogue = LabCA.create(
                    folder, crl_base=self.ca.crl_base, ocsp_url=self.ca.ocsp_url, org=self.ca.org
                )
        return self._rogue

    def write_policy(self, policy: bytes, path: Path | None = None) -> Path:
        """Sign ``policy`` (TOML) with the lab's policy-signing key and write the bundle."""
        from pam_svmm.domain.policy_bundle import make_bundle

        folder = self.folder / "policy-signer"
        key_path, cert_path = folder / "signer.key", folder / "signer.pem"
        if not cert_path.exists():
            folder.mkdir(mode=0o700, exist_ok=True)
            key = new_key("p256")
            cert = self.ca.issue_policy_signer("Demo Org policy signer", key.public_key())
            key_path.write_bytes(key_pem(key))
            key_path.chmod(0o600)
            cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key = load_key(key_path)
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        path = path or self.folder / "policy.bundle"
        path.write_bytes(make_bundle(policy, key, [cert, self.ca.intermediate.cert]))
        return path

    def policy_overrides(self, bundle: Path, *, state: Path | None = None) -> str:
        """TOML enabling the policy from ``bundle`` (accepted state kept under the lab)."""
        return (
            f'\n[policy]\nenabled = true\nsource = "file"\nfile = "{bundle}"\n'
            f'state_dir = "{state or self.folder / "policy-state"}"\nhost = "lab-host"\n'
        )

    def launcher_overrides(
        self, socket_dir: Path, *, card_poll_interval: float | None = None
    ) -> str:
        """TOML for the VM launcher (svmmd) and the volumes whose keys sessions release.

        ``socket_dir`` must be reachable by every user (the lab folder is root-only);
        ``card_poll_interval``: seconds between the card watch's slot polls (else the default)."""
        run = self.folder / "run"
        poll = "" if card_poll_interval is None else f"card_poll_interval = {card_poll_interval}\n"
        return (
            f'\n[launcher]\nsocket = "{socket_dir / "launcher.sock"}"\n'
            f'run_dir = "{run / "vms"}"\nregistry_dir = "{run / "registry"}"\n{poll}'
            # The lab's VMs run no guest OS: nobody answers the ACPI power button.
            "powerdown_timeout = 1\n"
            # Under TCG (nested in the e2e guest) QEMU can take over 10 s to answer QMP.
            "start_timeout = 120\n"
            # The example policy's networks, on QEMU's isolated user stack (no bridge here).
            '\n[launcher.networks.dmz]\nkind = "user"\n'
            '\n[launcher.networks.internal]\nkind = "user"\n'
            f'\n[volumes]\nenabled = true\ndir = "{self.folder / "volumes"}"\nmode = "vmm"\n'
        )

    def host_credentials(self, *, rogue: bool = False) -> tuple[Path, Path]:
        """This lab host's certificate and key for mutual authentication (made once).
        ``rogue``: the same host name under another organisation's CA."""
        folder = self.folder / ("rogue-host" if rogue else "host")
        cert_path, key_path = folder / "host.pem", folder / "host.key"
        if not cert_path.exists():
            folder.mkdir(mode=0o700, exist_ok=True)
            key = new_key("p256")
            ca = self.rogue_ca if rogue else self.ca
            cert = ca.issue_host("lab-host", key.public_key())
            key_path.write_bytes(key_pem(key))
            key_path.chmod(0o600)
            cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return cert_path, key_path

    def card(self, name: str) -> dict[str, object]:
        return json.loads((self.cards_dir / name / "card.json").read_text())

    def card_cert(self, name: str) -> x509.Certificate:
        return x509.load_pem_x509_certificate((self.cards_dir / name / "cert.pem").read_bytes())

    def card_key(self, name: str) -> PrivateKey:
        return load_key(self.cards_dir / name / "key.pem")

    # --- readers --------------------------------------------------------------------------

    def insert(self, *names: str) -> Reader:
        """A fresh reader with copies of these cards' tokens (none: an empty reader)."""
        self._readers += 1
        folder = self.readers_dir / f"r{os.getpid()}-{self._readers}"
        if folder.exists():
            shutil.rmtree(folder)
        tokens = folder / "tokens"
        tokens.mkdir(parents=True)
        for name in names:
            for token in (self.cards_dir / name / "tokens").iterdir():
                shutil.copytree(token, tokens / token.name)
        conf = folder / "softhsm2.conf"
        conf.write_text(
            f"directories.tokendir = {tokens}\nobjectstore.backend = file\n"
            "log.level = ERROR\nslots.removable = true\n"
        )
        env = {
            "SOFTHSM2_CONF": str(conf),
            pinguard.ENV_STATE: str(self.pinguard_state),
            pinguard.ENV_MODULE: str(SOFTHSM_MODULE),
        }
        return Reader(folder, env)

    # --- logging in -----------------------------------------------------------------------

    @overload
    def login(
        self,
        reader: Reader,
        *,
        pin: str,
        user: str = ...,
        service: str = ...,
        timeout: float = ...,
        session: Literal[False] = ...,
    ) -> PamReport: ...

    @overload
    def login(
        self,
        reader: Reader,
        *,
        pin: str,
        user: str = ...,
        service: str = ...,
        timeout: float = ...,
        session: Literal[True],
    ) -> PamSession: ...

    def login(
        self,
        reader: Reader,
        *,
        pin: str,
        user: str = "",
        service: str = LOGIN_SERVICE,
        timeout: float = 60,
        session: bool = False,
    ) -> PamReport | PamSession:
        """One login through the real PAM stack, in a fresh process.

        ``session``: the process also opens a PAM session and holds it; the PamSession
        returned closes it with ``close()`` (or at the end of a ``with`` block)."""
        client = build_client(self.folder / "bin")
        if session:
            return start_session(
                client, self.pam_dir, service, user, pin, env=reader.env, timeout=timeout
            )
        return run_client(client, self.pam_dir, service, user, pin, env=reader.env, timeout=timeout)

    def allowlist(self, uid: int) -> dict[str, Any] | None:
        """The allowlist the session hook wrote for ``uid`` (None: there is none)."""
        path = self.allowlist_dir / f"{uid}.json"
        return json.loads(path.read_text()) if path.exists() else None

    def pamtester(
        self, reader: Reader, *, pin: str, user: str, service: str = LOGIN_SERVICE
    ) -> subprocess.CompletedProcess[str]:
        """The same login with pamtester, a whole separate PAM application."""
        return subprocess.run(
            ["pamtester", service, user, "authenticate", "acct_mgmt"],
            input=pin + "\n",
            capture_output=True,
            text=True,
            env=pam_env(self.pam_dir, reader.env),
            timeout=60,
            check=False,
        )

    def audit_records(self) -> list[dict[str, Any]]:
        if not self.audit_path.exists():
            return []
        records = (json.loads(line) for line in self.audit_path.read_text().splitlines() if line)
        return [
            r for r in records if r.get("event") != "seal"
        ]  # seals are the chain's, not decisions

    # --- responders -----------------------------------------------------------------------

    @contextmanager
    def responders(self) -> Iterator[tuple[OcspResponder, CrlServer]]:
        """The OCSP responder and CRL server on the ports the certificates name."""
        from urllib.parse import urlsplit

        from .responders import CrlServer, OcspResponder

        crl_port = urlsplit(self.ca.crl_base).port
        ocsp_port = urlsplit(self.ca.ocsp_url).port
        assert crl_port and ocsp_port
        with ExitStack() as stack:
            ocsp = stack.enter_context(OcspResponder(self.ca_dir, ocsp_port))
            crl = stack.enter_context(CrlServer(self.ca_dir, crl_port))
            yield ocsp, crl


def _merge_toml(base: str, overrides: str) -> str:
    """Append override tables; a section repeated in ``overrides`` replaces the base one."""
    if not overrides.strip():
        return base
    import tomllib

    over = tomllib.loads(overrides)
    kept: list[str] = []
    skip = False
    for line in base.splitlines():
        stripped = line.strip()
        if stripped.startswith("["):
            section = stripped.strip("[]").split(".")[0]
            skip = section in over
        if not skip:
            kept.append(line)
    return "\n".join(kept) + "\n" + overrides


def free_ports(n: int) -> list[int]:
    import socket

    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


__all__: Sequence[str] = ("DEMO_CARDS", "CardSpec", "Lab", "Reader", "free_ports")
