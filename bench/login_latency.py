"""Whole-process login latency: pam_svmm beside a do-nothing pam_python module and pam_pkcs11.

Run from the repository root:

    /tmp/v/bin/python bench/login_latency.py                 # 30 runs per row, a table
    /tmp/v/bin/python bench/login_latency.py --runs 100 --json > latency.json
    /tmp/v/bin/python bench/login_latency.py --rows anchor,pkcs11-sig --runs 10
    /tmp/v/bin/python bench/login_latency.py --shim /usr/lib/svmm/pam_svmm.py --venv /opt/svmm/venv

Each login is one fresh `pamtester SERVICE alice authenticate` process under pam_wrapper
(LD_PRELOAD=libpam_wrapper.so PAM_WRAPPER=1 PAM_WRAPPER_SERVICE_DIR=<tmp>), the PIN fed on
its stdin, timed from spawn to exit. Every module logs in against the same SoftHSM2 token,
provisioned in a tmp dir (SOFTHSM2_CONF points at the bench's own softhsm2.conf) with the
lab PKI's user certificate and RSA key. Rows:

    anchor            pam_python, auth returns PAM_SUCCESS (the cost of starting Python)
    pkcs11-sig        Debian's pam_pkcs11, cert_policy = ca,signature
    pkcs11-crl        pam_pkcs11, cert_policy = ca,signature,crl_offline, the padded CRL
    svmm-sig          pam_svmm, chain + signature, revocation off
    svmm-crl-cold     pam_svmm, the padded CRL from a local file, revocation cache emptied
                      before every login
    svmm-crl-warm     pam_svmm, the same, cache kept (filled by the warm-up logins)
    svmm-ocsp         pam_svmm, OCSP against `openssl ocsp` on loopback (cache emptied before
                      every login, so each login queries the responder)

Before a row is timed it must log in once with the right PIN and be refused with a wrong
PIN and for another user (pkcs11-crl is also refused with an empty crl_dir, which shows
the CRL is read). A row whose module is missing, misconfigured or fails any of that is
printed as an error row with the reason; the other rows still run. Rows are timed
interleaved (round-robin), so drift on the machine spreads over all of them.

The lab (CA, user certificate, CRL padded with --crl-entries random serials) is cached in
--cache-dir under a key made of bench/_fixtures.py LAB_VERSION and the padding size; the first run
reports how long cryptography took to build the CRL (about 24 s for 100,000 entries).

The pam_svmm rows name `pam_python.so SHIM venv=VENV config=TOML` (--shim, --venv); the
TOML is written per row and checked with pam_svmm.config before use; the embedded
interpreter gets PYTHONPATH=<repo root>. When pam_svmm refuses the right PIN, the error row
adds its last audit record, or whether the shim can import pam_svmm under /usr/bin/python3.
The svmm-ocsp row is an error if the responder saw fewer requests than logins.

Output: median, p90 and min in ms over --runs logins, and each median over the anchor's
and over pam_pkcs11 ca,signature's; --json prints all of it (with the raw samples) instead.
Progress goes to stderr.
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

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script: make `bench` and `pam_svmm` importable
    sys.path.insert(0, str(REPO))

from bench import _fixtures as fx  # noqa: E402

PAM_WRAPPER = "/usr/lib/x86_64-linux-gnu/libpam_wrapper.so"
PAM_PYTHON = "/lib/security/pam_python.so"
PAM_PKCS11 = "/lib/x86_64-linux-gnu/security/pam_pkcs11.so"
PAMTESTER = "pamtester"
EMBEDDED_PYTHON = "/usr/bin/python3"  # what Debian's pam_python embeds
PIN = "123456"
WRONG_PIN = "654321"
SO_PIN = "12345678"
OTHER_USER = "bob"
LOGIN_TIMEOUT = 60.0
# Reference medians (ms) measured on this kind of machine (2 vCPU AMD EPYC), for the eye.
REFERENCE_MS = {"anchor": 54.0, "pkcs11-sig": 21.0, "pkcs11-crl": 123.0}
ANCHOR, PKCS11_BASE = "anchor", "pkcs11-sig"

NOOP_MODULE = """\
# A pam_python module that does nothing: the latency floor of any pam_python module.
def pam_sm_authenticate(pamh, flags, argv):
    return pamh.PAM_SUCCESS


def pam_sm_setcred(pamh, flags, argv):
    return pamh.PAM_SUCCESS
"""


class Unavailable(Exception):
    """A row cannot run; the message is the reason shown in its error row."""


@dataclass
class Plan:
    """How to log in for one row, once its fixtures exist."""

    service: str
    refusals: list[tuple[str, str, str]] = field(default_factory=list)  # (what, service, user/pin)
    before_each: Callable[[], None] | None = None
    # Says more about a refused right-PIN login than pamtester's one line.
    diagnose: Callable[[], str] | None = None


@dataclass
class Row:
    key: str
    label: str
    plan: Plan | None = None
    samples_ms: list[float] = field(default_factory=list)
    error: str | None = None

    def stats(self) -> dict[str, float] | None:
        if not self.samples_ms:
            return None
        s = sorted(self.samples_ms)
        p90 = statistics.quantiles(s, n=10, method="inclusive")[8] if len(s) > 1 else s[0]
        return {"median": statistics.median(s), "p90": p90, "min": s[0]}


# --- running pamtester ----------------------------------------------------------------------


@dataclass(frozen=True)
class Login:
    ok: bool
    ms: float
    output: str


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
        self.env: dict[str, str] = {}

    def service(self, name: str, line: str) -> str:
        (self.services / name).write_text(line + "\n")
        return name

    def login(self, service: str, user: str = fx.USER, pin: str = PIN) -> Login:
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(
                [PAMTESTER, service, user, "authenticate"],
                input=pin + "\n",
                capture_output=True,
                text=True,
                env=self.env,
                timeout=LOGIN_TIMEOUT,
                check=False,
            )
        except subprocess.TimeoutExpired:
            return Login(False, LOGIN_TIMEOUT * 1000, f"timed out after {LOGIN_TIMEOUT:.0f} s")
        ms = (time.perf_counter() - t0) * 1000
        return Login(proc.returncode == 0, ms, _tidy(proc.stderr + proc.stdout))

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

    def close(self) -> None:
        if self.ocsp is not None:
            self.ocsp.stop()


def _tidy(text: str) -> str:
    """pamtester's output without prompts and noise, for an error row's reason."""
    keep = []
    for line in text.replace("Smart card PIN:", "\n").replace("PIN for", "\nPIN for").splitlines():
        line = line.strip()
        if line and not line.startswith(("PIN for", "Smart card found", "Welcome ")):
            keep.append(line.split("SYSLOG(3): ", 1)[-1])
    return " | ".join(keep)[-400:]


def _standard_refusals(service: str) -> list[tuple[str, str, str]]:
    return [("a wrong PIN", service, "pin"), (f"user {OTHER_USER}", service, "user")]


# --- the rows ----------------------------------------------------------------------------


def plan_anchor(b: Bench) -> Plan:
    module = b.workdir / "noop.py"
    module.write_text(NOOP_MODULE)
    _require_file(b.args.pam_python, "pam_python")
    return Plan(b.service("anchor", f"auth required {b.args.pam_python} {module}"))


def _plan_pkcs11(b: Bench, key: str, policy: str) -> Plan:
    _require_file(PAM_PKCS11, "pam_pkcs11 (package libpam-pkcs11)")
    lab, token = b.need_lab(), b.need_token()
    conf = fx.pam_pkcs11_conf(b.workdir, key, lab, token, policy)
    plan = Plan(b.service(key, f"auth required {PAM_PKCS11} config_file={conf}"))
    plan.refusals = _standard_refusals(plan.service)
    if "crl_offline" in policy:
        empty = fx.pam_pkcs11_conf(b.workdir, key + "-nocrl", lab, token, policy, with_crl=False)
        svc = b.service(key + "-nocrl", f"auth required {PAM_PKCS11} config_file={empty}")
        plan.refusals.append(("an empty crl_dir", svc, ""))
    return plan


def plan_pkcs11_sig(b: Bench) -> Plan:
    return _plan_pkcs11(b, "pkcs11-sig", "ca,signature")


def plan_pkcs11_crl(b: Bench) -> Plan:
    return _plan_pkcs11(b, "pkcs11-crl", "ca,signature,crl_offline")


def _svmm_toml(b: Bench, key: str, revocation: dict[str, object]) -> Path:
    lab, token = b.need_lab(), b.need_token()
    inter = b.workdir / f"{key}-intermediates"
    inter.mkdir(exist_ok=True)
    shutil.copy(lab.intermediate_pem, inter / "intermediate.pem")
    doc: dict[str, dict[str, object]] = {
        "pkcs11": {"module": token.module, "uri": f"pkcs11:token={token.label}"},
        "trust": {"anchors": [str(lab.root_pem)], "intermediates_dir": str(inter)},
        "revocation": {"cache_dir": str(b.workdir / f"{key}-cache"), **revocation},
        "auth": {"host_name": "bench", "login_timeout": 30},
        "audit": {"path": str(b.workdir / f"{key}-audit.jsonl"), "syslog": False},
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


def _toml(doc: dict[str, dict[str, object]]) -> str:
    out = []
    for section, values in doc.items():
        out.append(f"[{section}]")
        out += [f"{k} = {json.dumps(v)}" for k, v in values.items()]  # JSON scalars/lists are TOML
        out.append("")
    return "\n".join(out)


def _plan_svmm(b: Bench, key: str, revocation: dict[str, object], *, cold: bool = False) -> Plan:
    shim = Path(b.args.shim)
    _require_file(b.args.pam_python, "pam_python")
    _require_file(str(shim), "the pam_svmm shim")
    toml = _svmm_toml(b, key, revocation)
    line = f"auth required {b.args.pam_python} {shim} venv={b.args.venv} config={toml}"
    plan = Plan(b.service(key, line), refusals=_standard_refusals(key))
    plan.diagnose = lambda: _diagnose_svmm(b, shim, toml, b.workdir / f"{key}-audit.jsonl")
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


def plan_svmm_ocsp(b: Bench) -> Plan:
    revocation = {
        "end_entity": "require",
        "ca": "off",
        "methods": ["ocsp"],
        "ocsp_responder": b.need_ocsp().url,
        "crl_fetch": False,
    }
    return _plan_svmm(b, "svmm-ocsp", revocation, cold=True)


ROWS: dict[str, tuple[str, Callable[[Bench], Plan]]] = {
    "anchor": ("anchor: pam_python, does nothing", plan_anchor),
    "pkcs11-sig": ("pam_pkcs11 ca,signature", plan_pkcs11_sig),
    "pkcs11-crl": ("pam_pkcs11 ca,signature,crl_offline (CRL)", plan_pkcs11_crl),
    "svmm-sig": ("pam_svmm chain+signature, revocation off", plan_svmm_sig),
    "svmm-crl-cold": ("pam_svmm CRL file, cold cache", plan_svmm_crl_cold),
    "svmm-crl-warm": ("pam_svmm CRL file, warm cache", plan_svmm_crl_warm),
    "svmm-ocsp": ("pam_svmm OCSP (loopback responder)", plan_svmm_ocsp),
}


def _require_file(path: str, what: str) -> None:
    if not Path(path).is_file():
        raise Unavailable(f"{what} not found at {path}")


# --- the run -----------------------------------------------------------------------------


def prepare(b: Bench, row: Row) -> None:
    """Make the row's fixtures and check that it logs in honestly; sets row.error if not."""
    try:
        plan = ROWS[row.key][1](b)
    except (Unavailable, fx.FixtureError, OSError) as e:
        row.error = str(e) or type(e).__name__
        return
    if plan.before_each:
        plan.before_each()
    ok = b.login(plan.service)
    if not ok.ok:
        why = f"; {plan.diagnose()}" if plan.diagnose else ""
        row.error = f"refuses the right PIN: {ok.output or 'no output'}{why}"
        return
    for what, service, kind in plan.refusals:
        if plan.before_each:
            plan.before_each()
        bad = (
            b.login(service, pin=WRONG_PIN)
            if kind == "pin"
            else (b.login(service, user=OTHER_USER) if kind == "user" else b.login(service))
        )
        if bad.ok:
            row.error = f"accepts {what}: not an honest login, not timed"
            return
    row.plan = plan


def measure(b: Bench, rows: list[Row], runs: int, warmup: int) -> None:
    live = [r for r in rows if r.plan is not None]
    ocsp_before = b.ocsp.requests() if b.ocsp else 0
    for i in range(warmup + runs):
        for row in live:
            if row.error is not None or row.plan is None:
                continue
            if row.plan.before_each:
                row.plan.before_each()
            res = b.login(row.plan.service)
            if not res.ok:
                row.error = f"login {i + 1} failed: {res.output or 'no output'}"
                continue
            if i >= warmup:
                row.samples_ms.append(res.ms)
        b.log(f"  round {i + 1}/{warmup + runs}" + (" (warm-up)" if i < warmup else ""))
    # The OCSP row is meant to query the responder on every login, not answer from a cache.
    for row in live:
        if row.key == "svmm-ocsp" and row.error is None and b.ocsp is not None:
            seen = b.ocsp.requests() - ocsp_before
            if seen < warmup + runs:
                row.error = (
                    f"the responder saw {seen} requests for {warmup + runs} logins: "
                    "answered from a cache, not timed as OCSP"
                )


# --- machine, versions, output -------------------------------------------------------------


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
    for r in rows:
        st = r.stats()
        med = st["median"] if st else None
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
                "reference_ms": REFERENCE_MS.get(r.key),
                "error": r.error,
                "samples_ms": [round(x, 3) for x in r.samples_ms],
            }
        )
    return out


def table(result: dict[str, object]) -> str:
    m, v, lab = result["machine"], result["versions"], result["lab"]
    assert isinstance(m, dict) and isinstance(v, dict) and isinstance(lab, dict)
    lines = [
        f"login latency: one pamtester process per login under pam_wrapper, "
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
    head = f"{'row':<44}{'median':>8}{'p90':>8}{'min':>8}{'x anchor':>10}{'x pkcs11':>10}{'ref':>6}"
    lines += ["", head, "-" * len(head)]

    def num(x: object, fmt: str) -> str:
        return format(x, fmt) if isinstance(x, float) else "-"

    rows = result["rows"]
    assert isinstance(rows, list)
    for r in rows:
        ref = num(r["reference_ms"], ".0f")
        if r["error"]:
            lines.append(f"{r['label']:<44}{'ERROR':>8}  {r['error']}")
            continue
        lines.append(
            f"{r['label']:<44}{num(r['median_ms'], '.1f'):>8}{num(r['p90_ms'], '.1f'):>8}"
            f"{num(r['min_ms'], '.1f'):>8}{num(r['x_anchor'], '.2f'):>10}"
            f"{num(r['x_pkcs11'], '.2f'):>10}{ref:>6}"
        )
    lines.append(
        "times in ms; x anchor / x pkcs11: median over the anchor's / pam_pkcs11 "
        "ca,signature's median; ref: reference median on this kind of machine"
    )
    return "\n".join(lines)


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
    rows = [Row(k, ROWS[k][0]) for k in args.rows.split(",")]
    try:
        for row in rows:
            log(f"preparing {row.key}...")
            prepare(bench, row)
            if row.error:
                log(f"  {row.key}: ERROR {row.error}")
        log(f"timing {args.runs} runs per row...")
        measure(bench, rows, args.runs, args.warmup)
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
    }
    print(json.dumps(result, indent=1) if args.json else table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
