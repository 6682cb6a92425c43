"""Whole-process login latency: pam_svmm beside a do-nothing pam_python module and pam_pkcs11.

Run from the repository root:

    .venv/bin/python bench/login_latency.py                 # 30 runs per row, a table
    .venv/bin/python bench/login_latency.py --runs 100 --json > latency.json
    .venv/bin/python bench/login_latency.py --rows anchor,pkcs11-sig --runs 10
    .venv/bin/python bench/login_latency.py --shim /usr/lib/svmm/pam_svmm.py --venv /opt/svmm/venv

Each login is one fresh `pamtimer SERVICE alice OPS...` process under pam_wrapper
(LD_PRELOAD=libpam_wrapper.so PAM_WRAPPER=1 PAM_WRAPPER_SERVICE_DIR=<tmp>), the PIN fed on
its stdin, timed from spawn to exit; OPS is `authenticate`, or for the session rows
`authenticate acct_mgmt open_session close_session` (one PAM handle, one process).
pamtimer (bench/pamtimer.c, built into --cache-dir with gcc) does what pamtester does and
also reports when its conversation function handed the PIN back and when each PAM call
returned (CLOCK_MONOTONIC): the post-PIN latency, PIN answered -> pam_authenticate's
result, what a person waits for after typing the PIN (issue 17). --pamtester uses
Debian's pamtester instead (no post-PIN figures). Every
module logs in against the same SoftHSM2 token, provisioned in a tmp dir (SOFTHSM2_CONF
points at the bench's own softhsm2.conf) with the lab PKI's user certificate (CN alice, UPN
alice@demo.example) and RSA key. Rows:

    anchor            pam_python, auth returns PAM_SUCCESS (the cost of starting Python)
    anchor-session    the same do-nothing module for auth, account and session, the
                      session OPS
    anchor-thin       the shim (daemon=required) on a socket nobody listens on, then the
                      do-nothing module: what the thin path costs the PAM process itself
                      (loading the shim and its client; no svmmd, no refusal checks)
    pkcs11-sig        Debian's pam_pkcs11, cert_policy = ca,signature
    pkcs11-crl        pam_pkcs11, cert_policy = ca,signature,crl_offline, the padded CRL
    svmm-sig          pam_svmm, chain + signature, revocation off
    svmm-crl-cold     pam_svmm, the padded CRL from a local file, revocation cache emptied
                      before every login
    svmm-crl-warm     pam_svmm, the same, cache kept (filled by the warm-up logins)
    svmm-ocsp         pam_svmm, OCSP against `openssl ocsp` on loopback (cache emptied before
                      every login, so each login queries the responder)
    svmm-full         (warm) pam_svmm in the PAM process (daemon=off), the full login with the
                      session OPS: chain, the padded CRL (end entity), roles from a slapd the
                      bench starts (svmm_lab.directory.Slapd, config/ldap/example-org.ldif,
                      StartTLS, certmap by UPN), config/policy.example.toml signed by a policy
                      signer of the bench lab's CA (the bench's services added to lab-host's
                      login services), open_session writing the allowlist
    svmm-full-cold    the same with its caches emptied before every login (the CRL index,
                      so the 100k CRL is parsed and indexed again; the directory entries; the
                      policy state): the first login after a CRL changes
    svmm-fast-crl     the same full login through svmmd (daemon=required), CRL
    svmm-fast-ocsp    the same through svmmd with OCSP instead of the CRL, ocsp_reuse = 0:
                      svmmd asks the responder at every login
    svmm-fast-ocsp-reuse  the same with the default ocsp_reuse: svmmd reuses an answer
    svmm-fast-sig     through svmmd, auth only: chain + signature, revocation off, no
                      directory (the fixed cost of the thin path; compare with svmm-sig)

A row's revocation has one method: the first method that answers decides, so a row with
["ocsp", "crl"] would show only OCSP. svmmd (the svmm-fast-* rows) is started by the bench
for each row as its own process, `python -m pam_svmm.daemon.server --config TOML` with this
interpreter, the same TOML the row's PAM line names (its [launcher] socket in the tmp dir)
and SOFTHSM2_CONF of the bench token (svmmd's environment decides which card it sees);
its log is <tmp>/<row>-svmmd.log; all are stopped at the end. Issue 6's targets, printed
under the table: a full login through svmmd at most 1.2 times anchor-session, and below
pkcs11-crl.

Before a row is timed it must log in once with the right PIN and be refused with a wrong
PIN and for another user (pkcs11-crl is also refused with an empty crl_dir, which shows
the CRL is read). The full rows' first login must also leave, in the row's audit log, a
successful auth with the directory's roles, a session_open that wrote the allowlist and a
successful session_close. The svmm-fast-* rows must be refused with svmmd stopped
(daemon=required: which shows their logins go through svmmd); svmmd is started again
before timing. A row whose module is missing, misconfigured or fails any of that is
printed as an error row with the reason; the other rows still run. Rows are timed
interleaved (round-robin), so drift on the machine spreads over all of them.

The lab (CA, user certificate, CRL padded with --crl-entries random serials) is cached in
--cache-dir under a key made of bench/_fixtures.py LAB_VERSION and the padding size; the first run
reports how long cryptography took to build the CRL (about 24 s for 100,000 entries).

The pam_svmm rows name `pam_python.so SHIM venv=VENV config=TOML` (--shim, --venv); the
TOML is written per row and checked with pam_svmm.config before use; the embedded
interpreter gets PYTHONPATH=<repo root>. When pam_svmm refuses the right PIN, the error row
adds its last audit record, or whether the shim can import pam_svmm under /usr/bin/python3.
The svmm-ocsp and svmm-fast-ocsp rows are errors if the responder saw fewer requests than
their logins (counted per login, warm-up included); the table's footer says how often each
OCSP row asked.

After the timed rounds, --breakdown N (default 3) logins of svmm-full and of svmm-fast-crl
run under strace, and bench/_stages.py prints where their time goes, stage by stage, found
from the syscalls alone (nothing in the product is instrumented; strace is in tools/run's
DEBIAN_PACKAGES). The table's footer gives svmmd's resident size (VmRSS) after each
svmmd row.

Output: median, p90 and min in ms over --runs logins, each median over the anchor's, over
pam_pkcs11 ca,signature's and over anchor-session's, and the post-PIN median (and over
anchor-session's whole login); issue 17's targets with this run's ratios; the issue 6
ratios of the svmmd full-login rows (and svmm-full for comparison): median over
anchor-session's and over pkcs11-crl's, each against its target. --json prints all of
it (with the raw samples and the x_anchor_session / x_pkcs11_crl ratios) instead. Progress
goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script: make `bench` and `pam_svmm` importable
    sys.path.insert(0, str(REPO))

from bench import _fixtures as fx  # noqa: E402
from svmm_lab.svmmd import SvmmdProcess  # noqa: E402

if TYPE_CHECKING:
    from svmm_lab.directory import Slapd

PAM_WRAPPER = "/usr/lib/x86_64-linux-gnu/libpam_wrapper.so"
PAM_PYTHON = "/lib/security/pam_python.so"
PAM_PKCS11 = "/lib/x86_64-linux-gnu/security/pam_pkcs11.so"
PAMTESTER = "pamtester"
SLAPD = "/usr/sbin/slapd"
EMBEDDED_PYTHON = "/usr/bin/python3"  # what Debian's pam_python embeds
PIN = "123456"
WRONG_PIN = "654321"
SO_PIN = "12345678"
OTHER_USER = "bob"
LOGIN_TIMEOUT = 60.0
# Reference medians (ms) measured on this kind of machine (2 vCPU AMD EPYC), for the eye.
REFERENCE_MS = {"anchor": 54.0, "pkcs11-sig": 21.0, "pkcs11-crl": 123.0}
ANCHOR, PKCS11_BASE = "anchor", "pkcs11-sig"
# Issue 6's targets for a full login through svmmd (the svmm-fast-* rows): at most this many
# times the do-nothing module with the same PAM calls, and below pam_pkcs11 with the CRL.
ANCHOR_SESSION, PKCS11_CRL = "anchor-session", "pkcs11-crl"
TARGET_X_ANCHOR_SESSION = 1.2
TARGET_X_PKCS11_CRL = 1.0
AUTH_OPS = ("authenticate",)
SESSION_OPS = ("authenticate", "acct_mgmt", "open_session", "close_session")
# The PAM services the bench's policy lets alice log in through (its host login rules).
POLICY_HOST = "lab-host"
SVMMD_START_TIMEOUT = 60.0

NOOP_MODULE = """\
# A pam_python module that does nothing: the latency floor of any pam_python module.
def pam_sm_authenticate(pamh, flags, argv):
    return pamh.PAM_SUCCESS


def pam_sm_setcred(pamh, flags, argv):
    return pamh.PAM_SUCCESS


def pam_sm_acct_mgmt(pamh, flags, argv):
    return pamh.PAM_SUCCESS


def pam_sm_open_session(pamh, flags, argv):
    return pamh.PAM_SUCCESS


def pam_sm_close_session(pamh, flags, argv):
    return pamh.PAM_SUCCESS
"""


class Unavailable(Exception):
    """A row cannot run; the message is the reason shown in its error row."""


@dataclass
class Plan:
    """How to log in for one row, once its fixtures exist."""

    service: str
    ops: tuple[str, ...] = AUTH_OPS  # pamtester's operations, in one process
    # (what, a login that must be refused): checked before the row is timed.
    refusals: list[tuple[str, Callable[[], Login]]] = field(default_factory=list)
    before_each: Callable[[], None] | None = None
    # Says more about a refused right-PIN login than pamtester's one line.
    diagnose: Callable[[], str] | None = None
    # After the first right-PIN login: why it was not the login the row claims (None: it was).
    verify: Callable[[], str | None] | None = None
    # The row's logins must each query the OCSP responder (else an error row).
    every_login_asks_ocsp: bool = False


@dataclass
class Row:
    key: str
    label: str
    plan: Plan | None = None
    samples_ms: list[float] = field(default_factory=list)
    post_pin_ms: list[float] = field(default_factory=list)  # PIN answered -> auth result
    error: str | None = None
    logins: int = 0  # right-PIN logins in measure() (warm-up included)
    ocsp_requests: int = 0  # requests the bench's OCSP responder got during them

    def stats(self, samples: list[float] | None = None) -> dict[str, float] | None:
        samples = self.samples_ms if samples is None else samples
        if not samples:
            return None
        s = sorted(samples)
        p90 = statistics.quantiles(s, n=10, method="inclusive")[8] if len(s) > 1 else s[0]
        return {"median": statistics.median(s), "p90": p90, "min": s[0]}


# --- running pamtester ----------------------------------------------------------------------


@dataclass(frozen=True)
class Login:
    ok: bool
    ms: float
    output: str
    # PIN answered (the client's conversation function returned it) -> pam_authenticate's
    # result, from bench/pamtimer.c's timestamps; None when no PIN was asked (or pamtester).
    post_pin_ms: float | None = None
    # The client's timeline: ("spawn" 0.0, then its events), ms since the bench spawned it.
    timeline: tuple[tuple[str, float], ...] = ()


class Bench:
    def __init__(self, args: argparse.Namespace, workdir: Path, log: Callable[[str], None]):
        self.args = args
        self.workdir = workdir
        self.log = log
        self.services = workdir / "pam.d"
        self.services.mkdir()
        # Unknown services fall back to "other"; make it refuse (and keep pam_wrapper quiet).
        (self.services / "other").write_text("auth required pam_deny.so\n")
        self.lab: fx.Lab | None = None
        self.token: fx.Token | None = None
        self.token_error = ""
        self.ocsp: fx.OcspResponder | None = None
        self.slapd: Slapd | None = None
        self.policy: Path | None = None
        self.daemons: list[SvmmdProcess] = []
        self.env: dict[str, str] = {}
        self.client = PAMTESTER  # main() builds bench/pamtimer.c and puts it here

    def service(self, name: str, line: str) -> str:
        (self.services / name).write_text(line + "\n")
        return name

    def login(
        self,
        service: str,
        user: str = fx.USER,
        pin: str = PIN,
        ops: tuple[str, ...] = AUTH_OPS,
        *,
        wrap: tuple[str, ...] = (),
    ) -> Login:
        """One login in a fresh client process (``wrap``: a command it runs under, strace)."""
        client = [self.client, service, user, *ops]
        t0 = time.monotonic_ns()
        try:
            proc = subprocess.run(
                [*wrap, *client],
                input=pin + "\n",
                capture_output=True,
                text=True,
                env=self.env,
                timeout=LOGIN_TIMEOUT,
                check=False,
            )
        except subprocess.TimeoutExpired:
            return Login(False, LOGIN_TIMEOUT * 1000, f"timed out after {LOGIN_TIMEOUT:.0f} s")
        ms = (time.monotonic_ns() - t0) / 1e6
        out = proc.stdout
        post_pin, timeline = None, ()
        if self.client != PAMTESTER:
            out, post_pin, timeline = _client_times(proc.stdout, t0)
        return Login(proc.returncode == 0, ms, _tidy(proc.stderr + out), post_pin, timeline)

    # --- fixtures shared by rows (made on first use, so a broken one fails only its rows)

    def need_lab(self) -> fx.Lab:
        if self.lab is None:
            cache = Path(self.args.cache_dir)
            self.lab = fx.lab(cache, self.args.crl_entries, self.log)
        return self.lab

    def need_token(self) -> fx.Token:
        if self.token_error:  # failed once: every row that needs it gets the same reason
            raise fx.FixtureError(self.token_error)
        if self.token is None:
            try:
                self.token = fx.provision_token(
                    self.workdir / "softhsm", self.need_lab(), PIN, SO_PIN
                )
            except fx.FixtureError as e:
                self.token_error = str(e)
                raise
            self.env["SOFTHSM2_CONF"] = str(self.token.conf)
        return self.token

    def need_ocsp(self) -> fx.OcspResponder:
        if self.ocsp is None:
            self.ocsp = fx.OcspResponder(self.need_lab(), self.workdir).start()
        return self.ocsp

    def need_slapd(self) -> Slapd:
        """slapd on loopback with the example organisation (alice: uid 10001, vm-users)."""
        if self.slapd is None:
            from svmm_lab.directory import Slapd as LabSlapd
            from svmm_lab.pki import LabCA

            if not Path(SLAPD).is_file():
                raise Unavailable(f"slapd not found at {SLAPD} (packages slapd, ldap-utils)")
            # The bench lab's CA issues slapd's TLS certificate: one trust anchor for all.
            server = LabSlapd(self.workdir / "slapd", ca=LabCA.open(self.need_lab().folder))
            self.log("  starting slapd (example organisation)...")
            server.start()
            self.slapd = server
        return self.slapd

    def need_policy(self, services: list[str]) -> Path:
        """config/policy.example.toml with the bench's services allowed on POLICY_HOST,
        signed by a policy signer the bench lab's CA issues (as Lab.write_policy does)."""
        if self.policy is None:
            from cryptography.hazmat.primitives import serialization

            from pam_svmm.domain.policy_bundle import make_bundle
            from svmm_lab.pki import LabCA, new_key

            text = (REPO / "config" / "policy.example.toml").read_bytes()
            allowed = b'"svmm-login"]'
            if allowed not in text:
                raise Unavailable(f"config/policy.example.toml no longer has {allowed.decode()}")
            extra = ", ".join(json.dumps(s) for s in services).encode()
            text = text.replace(allowed, b'"svmm-login", ' + extra + b"]")
            ca = LabCA.open(self.need_lab().folder)
            key = new_key("p256")
            cert = ca.issue_policy_signer("bench policy signer", key.public_key())
            bundle = self.workdir / "policy.bundle"
            bundle.write_bytes(make_bundle(text, key, [cert, ca.intermediate.cert]))
            (self.workdir / "policy-signer.pem").write_bytes(
                cert.public_bytes(serialization.Encoding.PEM)
            )
            self.policy = bundle
        return self.policy

    def close(self) -> None:
        for daemon in self.daemons:
            daemon.stop()
        if self.ocsp is not None:
            self.ocsp.stop()
        if self.slapd is not None:
            self.slapd.stop()


Timeline = tuple[tuple[str, float], ...]


def _client_times(stdout: str, t0: int) -> tuple[str, float | None, Timeline]:
    """bench/pamtimer.c's JSON line: (the rest of stdout, post-PIN ms, the timeline)."""
    lines = stdout.splitlines()
    try:
        doc = json.loads(lines[-1])
        events = [(str(e["what"]) + (f":{e['op']}" if "op" in e else ""), int(e["t"]))
                  for e in doc["events"]]  # fmt: skip
        main_ns, end_ns = int(doc["main"]), int(doc["end"])
    except (IndexError, ValueError, KeyError, TypeError):
        return stdout, None, ()
    answered = [t for what, t in events if what == "answered"]
    auth = [t for what, t in events if what == "op:authenticate"]
    post_pin = (auth[0] - answered[-1]) / 1e6 if answered and auth else None
    timeline = (
        ("spawn", 0.0),
        ("main", (main_ns - t0) / 1e6),
        *((what, (t - t0) / 1e6) for what, t in events),
        ("end", (end_ns - t0) / 1e6),
    )
    return "\n".join(lines[:-1]), post_pin, timeline


def _tidy(text: str) -> str:
    """pamtester's output without prompts and noise, for an error row's reason."""
    keep = []
    for line in text.replace("Smart card PIN:", "\n").replace("PIN for", "\nPIN for").splitlines():
        line = line.strip()
        if line and not line.startswith(("PIN for", "Smart card found", "Welcome ")):
            keep.append(line.split("SYSLOG(3): ", 1)[-1])
    return " | ".join(keep)[-400:]


def _standard_refusals(
    b: Bench, service: str, ops: tuple[str, ...] = AUTH_OPS
) -> list[tuple[str, Callable[[], Login]]]:
    return [
        ("a wrong PIN", lambda: b.login(service, pin=WRONG_PIN, ops=ops)),
        (f"user {OTHER_USER}", lambda: b.login(service, user=OTHER_USER, ops=ops)),
    ]


# --- the rows ----------------------------------------------------------------------------


def _noop_module(b: Bench) -> Path:
    _require_file(b.args.pam_python, "pam_python")
    module = b.workdir / "noop.py"
    module.write_text(NOOP_MODULE)
    return module


def plan_anchor(b: Bench) -> Plan:
    module = _noop_module(b)
    return Plan(b.service("anchor", f"auth required {b.args.pam_python} {module}"))


def plan_anchor_session(b: Bench) -> Plan:
    line = f"{b.args.pam_python} {_noop_module(b)}"
    return Plan(b.service(ANCHOR_SESSION, _stack(line)), ops=SESSION_OPS)


def plan_anchor_thin(b: Bench) -> Plan:
    """The thin path's cost in the PAM process alone: the real shim, daemon=required, on a
    socket nobody listens on (pam_python loads the shim, whose client
    fails to connect), then the do-nothing module says yes."""
    shim = Path(b.args.shim)
    _require_file(str(shim), "the pam_svmm shim")
    module = _noop_module(b)
    nobody = b.workdir / "nobody-listens.sock"
    line = f"{b.args.pam_python} {shim} venv={b.args.venv} daemon=required socket={nobody}"
    alone = b.service("anchor-thin-alone", f"auth required {line}")

    def verify() -> str | None:
        # The shim alone must answer PAM_AUTHINFO_UNAVAIL (no svmmd), not PAM_SYSTEM_ERR (it
        # failed to load): else the row would time a shim that never reached its client.
        out = b.login(alone).output
        unavailable = "cannot retrieve authentication info" in out  # PAM_AUTHINFO_UNAVAIL
        return None if unavailable else f"the shim alone says: {out}"

    plan = Plan(
        b.service(
            "anchor-thin",
            f"auth [success=done default=ignore] {line}\n"
            f"auth required {b.args.pam_python} {module}",
        )
    )
    plan.verify = verify
    return plan


def _stack(line: str) -> str:
    """One module for PAM's auth, account and session calls."""
    return "\n".join(f"{kind:<8} required {line}" for kind in ("auth", "account", "session"))


def _plan_pkcs11(b: Bench, key: str, policy: str) -> Plan:
    _require_file(PAM_PKCS11, "pam_pkcs11 (package libpam-pkcs11)")
    lab, token = b.need_lab(), b.need_token()
    conf = fx.pam_pkcs11_conf(b.workdir, key, lab, token, policy)
    plan = Plan(b.service(key, f"auth required {PAM_PKCS11} config_file={conf}"))
    plan.refusals = _standard_refusals(b, plan.service)
    if "crl_offline" in policy:
        empty = fx.pam_pkcs11_conf(b.workdir, key + "-nocrl", lab, token, policy, with_crl=False)
        svc = b.service(key + "-nocrl", f"auth required {PAM_PKCS11} config_file={empty}")
        plan.refusals.append(("an empty crl_dir", lambda: b.login(svc)))
    return plan


def plan_pkcs11_sig(b: Bench) -> Plan:
    return _plan_pkcs11(b, "pkcs11-sig", "ca,signature")


def plan_pkcs11_crl(b: Bench) -> Plan:
    return _plan_pkcs11(b, "pkcs11-crl", "ca,signature,crl_offline")


def _svmm_toml(
    b: Bench, key: str, revocation: dict[str, object], extra: TomlDoc | None = None
) -> Path:
    lab, token = b.need_lab(), b.need_token()
    inter = b.workdir / f"{key}-intermediates"
    inter.mkdir(exist_ok=True)
    shutil.copy(lab.intermediate_pem, inter / "intermediate.pem")
    doc: TomlDoc = {
        # The card helper gets only the variables named here (adapters/card_helper.py): the
        # bench's token is SOFTHSM2_CONF's, as the lab's readers are.
        "pkcs11": {
            "module": token.module,
            "uri": f"pkcs11:token={token.label}",
            "pass_environment": ["SOFTHSM2_CONF"],
        },
        "trust": {"anchors": [str(lab.root_pem)], "intermediates_dir": str(inter)},
        "revocation": {"cache_dir": str(b.workdir / f"{key}-cache"), **revocation},
        "auth": {"host_name": "bench", "login_timeout": 30},
        "audit": {
            "path": str(b.workdir / f"{key}-audit.jsonl"),
            "syslog": False,
            "seal_key": str(b.workdir / "audit-seal.key"),
        },
        **(extra or {}),
    }
    path = b.workdir / f"{key}.toml"
    path.write_text(_toml(doc))
    # Check the file against the product's own reader, so a drift in config keys shows as
    # this row's reason rather than as a refused login.
    from pam_svmm import config as config_mod
    from pam_svmm.errors import ConfigError

    try:
        config_mod.load(path)
    except ConfigError as e:
        raise Unavailable(str(e)) from None
    return path


# A section is a table, or a list of tables (TOML's [[array.of.tables]]).
TomlDoc = dict[str, "dict[str, object] | list[dict[str, object]]"]


def _toml(doc: TomlDoc) -> str:
    out = []
    for section, body in doc.items():
        for values in body if isinstance(body, list) else [body]:
            out.append(f"[[{section}]]" if isinstance(body, list) else f"[{section}]")
            out += [f"{k} = {_toml_value(v)}" for k, v in values.items()]
            out.append("")
    return "\n".join(out)


def _toml_value(v: object) -> str:
    if isinstance(v, dict):  # an inline table
        return "{ " + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + " }"
    return json.dumps(v)  # JSON scalars and lists of them are TOML


def _plan_svmm(
    b: Bench,
    key: str,
    revocation: dict[str, object],
    *,
    cold: bool = False,
    full: bool = False,
    daemon: str = "off",
) -> Plan:
    """A pam_svmm row. ``full``: the directory (roles), the signed policy and the session
    (allowlist) too, with the four PAM calls; ``daemon``: the shim's daemon= (for
    ``required`` the bench starts svmmd with the same TOML)."""
    shim = Path(b.args.shim)
    _require_file(b.args.pam_python, "pam_python")
    _require_file(str(shim), "the pam_svmm shim")
    audit = b.workdir / f"{key}-audit.jsonl"
    sock = b.workdir / f"{key}-svmmd" / "launcher.sock"
    extra: TomlDoc = _full_sections(b, key) if full else {}
    if daemon != "off":
        run = b.workdir / f"{key}-svmmd"
        run.mkdir(mode=0o755)
        extra["launcher"] = {
            "socket": str(sock),
            "run_dir": str(run / "vms"),
            "registry_dir": str(run / "registry"),
        }
    toml = _svmm_toml(b, key, revocation, extra)
    args = f"venv={b.args.venv} config={toml} daemon={daemon}"
    if daemon != "off":
        args += f" socket={sock}"
    line = f"{b.args.pam_python} {shim} {args}"
    ops = SESSION_OPS if full else AUTH_OPS
    service = b.service(key, _stack(line) if full else f"auth required {line}")
    plan = Plan(service, ops=ops, refusals=_standard_refusals(b, service, ops))
    plan.diagnose = lambda: _diagnose_svmm(b, shim, toml, audit)
    if full:
        plan.verify = lambda: _verify_full(audit)
    if daemon != "off":
        svmmd = SvmmdProcess(toml, sock, _svmmd_env(b), b.workdir / f"{key}-svmmd.log")
        b.daemons.append(svmmd)
        b.log(f"  starting svmmd for {key}...")
        svmmd.start(SVMMD_START_TIMEOUT)
        tail = svmmd.tail
        plan.diagnose = lambda: f"{_diagnose_svmm(b, shim, toml, audit)}; svmmd log: {tail()}"

        def without_svmmd() -> Login:
            svmmd.stop()
            try:
                return b.login(service, ops=ops)
            finally:
                svmmd.start(SVMMD_START_TIMEOUT)

        plan.refusals.append(("the right PIN with svmmd stopped (daemon=required)", without_svmmd))
    if cold:
        cache = b.workdir / f"{key}-cache"

        def empty_cache() -> None:
            shutil.rmtree(cache, ignore_errors=True)

        plan.before_each = empty_cache
    return plan


# Run by the interpreter pam_python embeds, with the shim's own sys.path set-up.
PROBE = """
import runpy, sys
shim = runpy.run_path(sys.argv[1])
if "_entry" in shim:
    shim["_entry"](["shim", "venv=" + sys.argv[2]])
import pam_svmm.pam.entry
from pam_svmm import config
config.load(sys.argv[3])
"""


def _diagnose_svmm(b: Bench, shim: Path, toml: Path, audit: Path) -> str:
    """Why pam_svmm said no: its last audit record, else whether it imports at all."""
    try:
        last = json.loads(audit.read_text().strip().splitlines()[-1])
        return "audit: " + ", ".join(f"{k}={last.get(k)}" for k in ("outcome", "reason", "detail"))
    except (OSError, IndexError, ValueError, AttributeError):
        pass
    env = {k: v for k, v in b.env.items() if not k.startswith(("LD_PRELOAD", "PAM_WRAPPER"))}
    proc = subprocess.run(
        [EMBEDDED_PYTHON, "-c", PROBE, str(shim), b.args.venv, str(toml)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    if proc.returncode != 0:
        err = proc.stderr.strip().splitlines()
        return f"under {EMBEDDED_PYTHON} the shim cannot import pam_svmm: {err[-1] if err else ''}"
    return "pam_svmm imports and reads its config, no audit record: an internal error (syslog)"


# Like pam_pkcs11's crl_offline, only the end entity's status is checked (ca = "off").
def _crl_revocation(b: Bench) -> dict[str, object]:
    return {
        "end_entity": "require",
        "ca": "off",
        "methods": ["crl"],
        "crl_files": [str(b.need_lab().crl_der)],
        "crl_fetch": False,
    }


def plan_svmm_sig(b: Bench) -> Plan:
    return _plan_svmm(b, "svmm-sig", {"end_entity": "off", "ca": "off", "methods": []})


def plan_svmm_crl_cold(b: Bench) -> Plan:
    return _plan_svmm(b, "svmm-crl-cold", _crl_revocation(b), cold=True)


def plan_svmm_crl_warm(b: Bench) -> Plan:
    return _plan_svmm(b, "svmm-crl-warm", _crl_revocation(b))


def _ocsp_revocation(b: Bench, **more: object) -> dict[str, object]:
    return {
        "end_entity": "require",
        "ca": "off",
        "methods": ["ocsp"],
        "ocsp_responder": b.need_ocsp().url,
        "crl_fetch": False,
        **more,
    }


def plan_svmm_ocsp(b: Bench) -> Plan:
    plan = _plan_svmm(b, "svmm-ocsp", _ocsp_revocation(b), cold=True)
    plan.every_login_asks_ocsp = True
    return plan


# --- issue 6: the full login (directory roles, signed policy, allowlist), in-process and
# through svmmd. Each row's revocation has one method: the first method that answers
# decides, so a second one would never be asked.

FULL_ROWS = (
    "svmm-full",
    "svmm-full-cold",
    "svmm-fast-crl",
    "svmm-fast-ocsp",
    "svmm-fast-ocsp-reuse",
)
IN_PROCESS_FULL = ("svmm-full", "svmm-full-cold")


def _full_sections(b: Bench, key: str) -> TomlDoc:
    """The directory (the bench's slapd, certmap by UPN), the signed policy, the session."""
    slapd = b.need_slapd()
    secret = slapd.write_password_file(b.workdir / f"{key}-ldap.secret", "service")
    bundle = b.need_policy(list(FULL_ROWS))
    return {
        "directory": {
            "enabled": True,
            "uris": [slapd.uri],
            "base_dn": slapd.base_dn,
            "users_base": f"ou=people,{slapd.base_dn}",
            "groups_base": f"ou=groups,{slapd.base_dn}",
            "bind_dn": slapd.service_dn,
            "bind_password_file": str(secret),
            "tls": "starttls",
            "ca_file": str(b.need_lab().root_pem),
            "connect_timeout": 2,
            "search_timeout": 3,
            "cache_dir": str(b.workdir / f"{key}-identity"),
            "cache_max_age": 3600,
        },
        "certmap.rules": [
            {
                "name": "upn",
                "priority": 10,
                "match": {"san": ["upn"]},
                "map": "(svmmPrincipalName={upn})",
            }
        ],
        "policy": {
            "enabled": True,
            "source": "file",
            "file": str(bundle),
            "state_dir": str(b.workdir / f"{key}-policy-state"),
            "host": POLICY_HOST,
        },
        "session": {
            "allowlist_dir": str(b.workdir / f"{key}-run" / "allowlist"),
            "state_dir": str(b.workdir / f"{key}-run" / "sessions"),
        },
    }


def _svmmd_env(b: Bench) -> dict[str, str]:
    """svmmd sees the bench token, and nothing of pam_wrapper."""
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PYTHONPATH": str(REPO),
        "SOFTHSM2_CONF": str(b.need_token().conf),
    }


def _verify_full(audit: Path) -> str | None:
    """The last login's audit records: card login with the directory's roles, the session
    opened with an allowlist and closed again."""
    try:
        records = [json.loads(x) for x in audit.read_text().splitlines() if x.strip()]
    except (OSError, ValueError) as e:
        return f"no readable audit records ({e})"
    last: dict[str, dict[str, object]] = {}
    for r in records:
        last[str(r.get("event"))] = r
    auth, opened, closed = last.get("auth"), last.get("session_open"), last.get("session_close")
    if not auth or auth.get("outcome") != "success" or not auth.get("roles"):
        return f"no successful auth with directory roles in the audit: {auth}"
    if not opened or opened.get("reason") != "allowlist_written":
        return f"open_session wrote no allowlist: {opened}"
    if not closed or closed.get("outcome") != "success":
        return f"close_session did not succeed: {closed}"
    return None


def plan_svmm_full(b: Bench) -> Plan:
    return _plan_svmm(b, "svmm-full", _crl_revocation(b), full=True)


def plan_svmm_full_cold(b: Bench) -> Plan:
    """The in-process full login with every cache of its own emptied before each login: the
    CRL index (so the 100k CRL is parsed and indexed again), the directory entries and the
    policy state. The first login after a CRL changes, a reboot with /var/cache cleared."""
    key = "svmm-full-cold"
    plan = _plan_svmm(b, key, _crl_revocation(b), full=True)
    caches = [b.workdir / f"{key}-cache", b.workdir / f"{key}-identity"]
    caches.append(b.workdir / f"{key}-policy-state")

    def empty_caches() -> None:
        for folder in caches:
            shutil.rmtree(folder, ignore_errors=True)

    plan.before_each = empty_caches
    return plan


def plan_svmm_fast_crl(b: Bench) -> Plan:
    return _plan_svmm(b, "svmm-fast-crl", _crl_revocation(b), full=True, daemon="required")


def plan_svmm_fast_ocsp(b: Bench) -> Plan:
    # ocsp_reuse = 0: svmmd asks the responder at every login, as a login process does.
    revocation = _ocsp_revocation(b, ocsp_reuse=0)
    plan = _plan_svmm(b, "svmm-fast-ocsp", revocation, full=True, daemon="required")
    plan.every_login_asks_ocsp = True
    return plan


def plan_svmm_fast_ocsp_reuse(b: Bench) -> Plan:
    # The product's default: svmmd reuses an answer for ocsp_reuse seconds (within its
    # validity); the table says how often the responder was asked.
    revocation = _ocsp_revocation(b)
    return _plan_svmm(b, "svmm-fast-ocsp-reuse", revocation, full=True, daemon="required")


def plan_svmm_fast_sig(b: Bench) -> Plan:
    # The fixed cost of the thin path: chain + signature through svmmd, nothing else.
    revocation = {"end_entity": "off", "ca": "off", "methods": []}
    return _plan_svmm(b, "svmm-fast-sig", revocation, daemon="required")


ROWS: dict[str, tuple[str, Callable[[Bench], Plan]]] = {
    "anchor": ("anchor: pam_python, does nothing", plan_anchor),
    ANCHOR_SESSION: ("anchor: the same, auth+acct+session", plan_anchor_session),
    "anchor-thin": ("anchor + shim/thin client, no svmmd", plan_anchor_thin),
    "pkcs11-sig": ("pam_pkcs11 ca,signature", plan_pkcs11_sig),
    "pkcs11-crl": ("pam_pkcs11 ca,signature,crl_offline (CRL)", plan_pkcs11_crl),
    "svmm-sig": ("pam_svmm chain+signature, revocation off", plan_svmm_sig),
    "svmm-crl-cold": ("pam_svmm CRL file, cold cache", plan_svmm_crl_cold),
    "svmm-crl-warm": ("pam_svmm CRL file, warm cache", plan_svmm_crl_warm),
    "svmm-ocsp": ("pam_svmm OCSP (loopback responder)", plan_svmm_ocsp),
    "svmm-full": ("in-process: full login, CRL, warm", plan_svmm_full),
    "svmm-full-cold": ("in-process: full login, CRL, cold caches", plan_svmm_full_cold),
    "svmm-fast-sig": ("svmmd: chain+signature, revocation off", plan_svmm_fast_sig),
    "svmm-fast-crl": ("svmmd: full login, CRL", plan_svmm_fast_crl),
    "svmm-fast-ocsp": ("svmmd: full login, OCSP every login", plan_svmm_fast_ocsp),
    "svmm-fast-ocsp-reuse": ("svmmd: full login, OCSP reused (default)", plan_svmm_fast_ocsp_reuse),
}


def _require_file(path: str, what: str) -> None:
    if not Path(path).is_file():
        raise Unavailable(f"{what} not found at {path}")


# --- the run -----------------------------------------------------------------------------


def prepare(b: Bench, row: Row) -> None:
    """Make the row's fixtures and check that it logs in honestly; sets row.error if not."""
    try:
        plan = ROWS[row.key][1](b)
    except (Unavailable, fx.FixtureError, OSError, RuntimeError) as e:  # SlapdError too
        row.error = str(e) or type(e).__name__
        return
    if plan.before_each:
        plan.before_each()
    ok = b.login(plan.service, ops=plan.ops)
    if not ok.ok:
        why = f"; {plan.diagnose()}" if plan.diagnose else ""
        row.error = f"refuses the right PIN: {ok.output or 'no output'}{why}"
        return
    wrong = plan.verify() if plan.verify else None
    if wrong:
        row.error = f"logs in, but not fully: {wrong}"
        return
    for what, refused in plan.refusals:
        if plan.before_each:
            plan.before_each()
        try:
            bad = refused()
        except (Unavailable, OSError, RuntimeError) as e:  # RuntimeError: svmmd did not start
            row.error = f"checking {what}: {e}"
            return
        if bad.ok:
            row.error = f"accepts {what}: not an honest login, not timed"
            return
    row.plan = plan


def measure(b: Bench, rows: list[Row], runs: int, warmup: int) -> None:
    live = [r for r in rows if r.plan is not None]
    for i in range(warmup + runs):
        for row in live:
            if row.error is not None or row.plan is None:
                continue
            if row.plan.before_each:
                row.plan.before_each()
            # Requests the responder logged around this login (it logs on receipt, before
            # it answers, so a finished login's request is counted).
            asked = b.ocsp.requests() if b.ocsp else 0
            res = b.login(row.plan.service, ops=row.plan.ops)
            if b.ocsp:
                row.ocsp_requests += b.ocsp.requests() - asked
            if not res.ok:
                why = f"; {row.plan.diagnose()}" if row.plan.diagnose else ""
                row.error = f"login {i + 1} failed: {res.output or 'no output'}{why}"
                continue
            row.logins += 1
            if i >= warmup:
                row.samples_ms.append(res.ms)
                if res.post_pin_ms is not None:
                    row.post_pin_ms.append(res.post_pin_ms)
        b.log(f"  round {i + 1}/{warmup + runs}" + (" (warm-up)" if i < warmup else ""))
    # An OCSP row is meant to query the responder on every login, not answer from a cache.
    for row in live:
        asks = row.plan is not None and row.plan.every_login_asks_ocsp
        if asks and row.error is None and row.ocsp_requests < row.logins:
            row.error = (
                f"the responder saw {row.ocsp_requests} requests for {row.logins} logins: "
                "answered from a cache, not timed as OCSP"
            )


# --- machine, versions, output -------------------------------------------------------------


def _svmmd_rss(b: Bench) -> dict[str, int]:
    """VmRSS (KiB) of each svmmd the bench started, after its row's logins."""
    out = {}
    for daemon in b.daemons:
        proc = daemon.proc
        if proc is None or proc.poll() is not None:
            continue
        try:
            status = Path(f"/proc/{proc.pid}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                out[daemon.log.name.removesuffix("-svmmd.log")] = int(line.split()[1])
    return out


def machine() -> dict[str, object]:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    distro = ""
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                distro = line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu": cpu,
        "kernel": platform.release(),
        "os": distro,
    }


def versions() -> dict[str, str]:
    out: dict[str, str] = {}
    for pkg in (
        "libpam-pkcs11",
        "libpam-python",
        "libpam-wrapper",
        "pamtester",
        "softhsm2",
        "openssl",
        "python3",
    ):
        proc = subprocess.run(
            ["dpkg-query", "-W", "-f", "${Version}", pkg],
            capture_output=True,
            text=True,
            check=False,
        )
        out[pkg] = proc.stdout.strip() if proc.returncode == 0 else "not installed"
    for dist in ("cryptography", "PyKCS11"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    out["bench python"] = platform.python_version()
    return out


def _ratio(x: float | None, base: float | None) -> float | None:
    return None if x is None or not base else x / base


def report(rows: list[Row]) -> list[dict[str, object]]:
    base = {r.key: (r.stats() or {}).get("median") for r in rows}
    out = []
    floor = base.get(ANCHOR_SESSION)
    for r in rows:
        st = r.stats()
        med = st["median"] if st else None
        pp = r.stats(r.post_pin_ms)
        pp_med = pp["median"] if pp else None
        out.append(
            {
                "key": r.key,
                "label": r.label,
                "runs": len(r.samples_ms),
                "median_ms": med,
                "p90_ms": st["p90"] if st else None,
                "min_ms": st["min"] if st else None,
                "x_anchor": _ratio(med, base.get(ANCHOR)),
                "x_pkcs11": _ratio(med, base.get(PKCS11_BASE)),
                # Issue 6's two ratios (its targets are for the full logins through svmmd).
                "x_anchor_session": _ratio(med, base.get(ANCHOR_SESSION)),
                "x_pkcs11_crl": _ratio(med, base.get(PKCS11_CRL)),
                "target_row": r.key in FULL_ROWS and r.key not in IN_PROCESS_FULL,
                "reference_ms": REFERENCE_MS.get(r.key),
                "error": r.error,
                "logins": r.logins,
                "ocsp_requests": r.ocsp_requests,
                "samples_ms": [round(x, 3) for x in r.samples_ms],
                # Issue 17: what the person feels, PIN answered -> pam_authenticate's result.
                "post_pin_median_ms": pp_med,
                "post_pin_p90_ms": pp["p90"] if pp else None,
                "post_pin_x_anchor_session": _ratio(pp_med, floor),
                "post_pin_samples_ms": [round(x, 3) for x in r.post_pin_ms],
            }
        )
    return out


def table(result: dict[str, object]) -> str:
    m, v, lab = result["machine"], result["versions"], result["lab"]
    assert isinstance(m, dict) and isinstance(v, dict) and isinstance(lab, dict)
    lines = [
        f"login latency: one {result['client']} process per login under pam_wrapper, "
        f"{result['runs']} timed runs per row (after {result['warmup']} warm-up), interleaved",
        f"machine: {m['nproc']} CPU, {m['cpu']}, Linux {m['kernel']}, {m['os']}",
        "versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
    ]
    if lab.get("extra_revoked") is not None:
        lines.append(
            f"lab: CRL with {lab['extra_revoked']} revoked entries "
            f"({lab['crl_bytes']} bytes DER), built by cryptography in "
            f"{lab['build_seconds']:.1f} s{' (cached)' if lab['cached'] else ''}; {lab['folder']}"
        )
    head = (
        f"{'row':<44}{'median':>8}{'p90':>8}{'min':>8}{'x anchor':>10}{'x pkcs11':>10}"
        f"{'x a-sess':>10}{'post-PIN':>10}{'x a-sess':>10}"
    )
    lines += ["", head, "-" * len(head)]

    def num(x: object, fmt: str) -> str:
        return format(x, fmt) if isinstance(x, float) else "-"

    rows = result["rows"]
    assert isinstance(rows, list)
    for r in rows:
        if r["error"]:
            lines.append(f"{r['label']:<44}{'ERROR':>8}  {r['error']}")
            continue
        lines.append(
            f"{r['label']:<44}{num(r['median_ms'], '.1f'):>8}{num(r['p90_ms'], '.1f'):>8}"
            f"{num(r['min_ms'], '.1f'):>8}{num(r['x_anchor'], '.2f'):>10}"
            f"{num(r['x_pkcs11'], '.2f'):>10}{num(r['x_anchor_session'], '.2f'):>10}"
            f"{num(r['post_pin_median_ms'], '.1f'):>10}"
            f"{num(r['post_pin_x_anchor_session'], '.2f'):>10}"
        )
    lines.append(
        "times in ms, whole process (spawn to exit); x anchor / x pkcs11 / x a-sess: median "
        "over the anchor's / pam_pkcs11 ca,signature's / anchor-session's median; post-PIN: "
        "median from the PIN handed to the module to pam_authenticate's result (pamtimer's "
        "conversation timestamps; - : no PIN asked), and over anchor-session's whole login"
    )
    lines += ["", *_targets(rows), "", *_targets_17(rows)]
    breakdown = result.get("breakdown")
    if isinstance(breakdown, dict) and breakdown:
        from bench import _stages

        lines += ["", *_stages.table(breakdown)]
    daemons = result.get("svmmd_rss_kib")
    if isinstance(daemons, dict) and daemons:
        lines.append(
            "svmmd resident size at the end of its row (VmRSS, KiB): "
            + ", ".join(f"{k} {v}" for k, v in daemons.items())
        )
    asked = [r for r in rows if r["ocsp_requests"] and not r["error"]]
    if asked:
        lines.append(
            "OCSP responder requests / logins (warm-up included): "
            + ", ".join(f"{r['key']} {r['ocsp_requests']}/{r['logins']}" for r in asked)
        )
    return "\n".join(lines)


# Issue 17's targets, each a ratio to the do-nothing module making the same PAM calls.
TARGETS_17 = (
    ("svmm-fast-crl", "x_anchor_session", 1.2, "full login through svmmd"),
    ("svmm-fast-crl", "post_pin_x_anchor_session", 0.5, "post-PIN through svmmd"),
    ("svmm-full", "x_anchor_session", 4.0, "full login in the PAM process (warm)"),
    ("svmm-full", "x_pkcs11_crl", 1.0, "the same, below pam_pkcs11 with the CRL"),
    ("svmm-full-cold", "x_anchor_session", 4.0, "the same with cold caches"),
)


def _targets_17(rows: list[dict[str, object]]) -> list[str]:
    by_key = {str(r["key"]): r for r in rows}
    lines = [f"issue 17 targets (ratios to {ANCHOR_SESSION} / {PKCS11_CRL}, this run):"]
    for key, ratio, limit, what in TARGETS_17:
        r = by_key.get(key)
        x = r.get(ratio) if r and not r["error"] else None
        if not isinstance(x, float):
            lines.append(f"  {what:<44} -      (row {key} not run or failed)")
            continue
        ok = x < limit if ratio == "x_pkcs11_crl" else x <= limit
        sign = "<" if ratio == "x_pkcs11_crl" else "<="
        lines.append(
            f"  {what:<44} {x:5.2f}x  {sign} {limit:<4}  {'met' if ok else 'MISSED'}  ({key})"
        )
    return lines


def _targets(rows: list[dict[str, object]]) -> list[str]:
    """Issue 6: a full login through svmmd at most 1.2 x the do-nothing module making the
    same PAM calls (anchor-session), and below pam_pkcs11 crl_offline (pkcs11-crl)."""
    if not any(r["target_row"] or r["key"] in IN_PROCESS_FULL for r in rows):
        return []
    lines = [
        f"issue 6 targets: svmmd row median / {ANCHOR_SESSION} median <= "
        f"{TARGET_X_ANCHOR_SESSION}, / {PKCS11_CRL} median < {TARGET_X_PKCS11_CRL}"
    ]

    def verdict(x: object, limit: float, strict: bool) -> str:
        if not isinstance(x, float):
            return "    -    (no baseline)"
        ok = x < limit if strict else x <= limit
        return f"{x:6.2f}  {'met' if ok else 'MISSED':<6}"

    for r in rows:
        if not r["target_row"] and r["key"] not in IN_PROCESS_FULL:
            continue
        if r["error"]:
            lines.append(f"  {r['label']:<42}  ERROR (see above)")
            continue
        a = verdict(r["x_anchor_session"], TARGET_X_ANCHOR_SESSION, strict=False)
        c = verdict(r["x_pkcs11_crl"], TARGET_X_PKCS11_CRL, strict=True)
        note = "" if r["target_row"] else "  (in-process: for comparison)"
        line = f"  {r['label']:<42}  x {ANCHOR_SESSION} {a}  x {PKCS11_CRL} {c}{note}"
        lines.append(line.rstrip())
    return lines


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "pam_svmm-bench"
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--runs", type=int, default=30, help="timed logins per row (default 30)")
    p.add_argument("--warmup", type=int, default=2, help="untimed logins per row first")
    p.add_argument(
        "--rows", default=",".join(ROWS), help=f"comma-separated subset of: {', '.join(ROWS)}"
    )
    p.add_argument(
        "--crl-entries",
        type=int,
        default=100_000,
        help="extra revoked serials in the CRL (default 100000)",
    )
    p.add_argument("--cache-dir", default=str(cache), help=f"lab cache (default {cache})")
    p.add_argument(
        "--shim",
        default=str(REPO / "pam_svmm" / "pam" / "shim.py"),
        help="the pam_python file the pam_svmm rows name",
    )
    p.add_argument(
        "--venv", default=sys.prefix, help="venv= for the shim (default: this interpreter's prefix)"
    )
    p.add_argument("--pam-python", default=PAM_PYTHON, help="path of pam_python.so")

    p.add_argument(
        "--pamtester",
        action="store_true",
        help="log in with pamtester (no post-PIN figures) instead of bench/pamtimer.c",
    )
    p.add_argument(
        "--breakdown",
        type=int,
        default=3,
        metavar="N",
        help="after timing, N logins per path under strace for the per-stage breakdown "
        "(0: none; default 3)",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.add_argument("--keep", action="store_true", help="keep the tmp dir and say where")
    args = p.parse_args(argv)
    unknown = [k for k in args.rows.split(",") if k not in ROWS]
    if unknown:
        p.error(f"unknown row(s): {', '.join(unknown)}")
    if args.runs < 1 or args.warmup < 0:
        p.error("--runs must be at least 1 and --warmup at least 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    for tool in (PAMTESTER, "openssl"):
        if shutil.which(tool) is None:
            log(f"{tool} not found on PATH")
            return 2
    if not Path(PAM_WRAPPER).is_file():
        log(f"pam_wrapper not found at {PAM_WRAPPER} (package libpam-wrapper)")
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="svmm-bench-"))
    bench = Bench(args, workdir, log)
    bench.env = {
        **{k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "SVMM_CONFIG")},
        "LD_PRELOAD": PAM_WRAPPER,
        "PAM_WRAPPER": "1",
        "PAM_WRAPPER_SERVICE_DIR": str(bench.services),
        # pam_python's embedded interpreter finds pam_svmm in this checkout.
        "PYTHONPATH": str(REPO),
    }
    if not args.pamtester:
        from svmm_lab.cbuild import build_c

        try:
            source, bin_dir = REPO / "bench" / "pamtimer.c", Path(args.cache_dir) / "bin"
            bench.client = str(build_c(source, bin_dir, suffix="", libs=["-lpam"]))
        except (RuntimeError, OSError) as e:
            log(f"cannot build bench/pamtimer.c (gcc, libpam0g-dev): {e}")
            return 2
    rows = [Row(k, ROWS[k][0]) for k in args.rows.split(",")]
    rss: dict[str, int] = {}
    breakdown: dict[str, object] = {}
    try:
        for row in rows:
            log(f"preparing {row.key}...")
            prepare(bench, row)
            if row.error:
                log(f"  {row.key}: ERROR {row.error}")
        log(f"timing {args.runs} runs per row...")
        measure(bench, rows, args.runs, args.warmup)
        rss = _svmmd_rss(bench)
        if args.breakdown:
            from bench import _stages

            breakdown = _stages.run(bench, rows, args.breakdown, log)
    finally:
        bench.close()
        if args.keep:
            log(f"tmp dir kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    lab: dict[str, object] = {}
    if bench.lab is not None:
        lab = {
            "extra_revoked": bench.lab.extra_revoked,
            "cached": bench.lab.cached,
            "build_seconds": bench.lab.build_seconds,
            "folder": str(bench.lab.folder),
            "crl_bytes": bench.lab.crl_der.stat().st_size,
            "version": fx.LAB_VERSION,
            "token_provisioned_by": bench.token.provisioned_by if bench.token else "",
        }
    result: dict[str, object] = {
        "runs": args.runs,
        "warmup": args.warmup,
        "machine": machine(),
        "versions": versions(),
        "lab": lab,
        "rows": report(rows),
        "client": "pamtester" if args.pamtester else "bench/pamtimer.c",
        "svmmd_rss_kib": rss,
        "breakdown": breakdown,
    }
    print(json.dumps(result, indent=1) if args.json else table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
