"""`svmm doctor`: is this host ready for card logins? One line per check, `STATUS name: detail`:

* ``ok``   the check passed;
* ``WARN`` advice: something is not set up yet or will need attention, logins still work
  (svmmd not listening: logins run in the PAM process; the profile not enabled yet);
* ``FAIL`` a problem that refuses logins or weakens what they rely on.

Checks: the configuration, the card module, anchors, intermediates, the audit log and its
seal key, the directory (its bind secret root's alone, the server answering), the policy
(the accepted bundle's signature now, the signer's remaining validity, what the source
holds), svmmd's socket (present, root's, answering svmm-launcher/1), the PAM module (the shim
the PAM stack names, root's, this version's), the pam-auth-update profile (common-auth uses
pam_svmm), nsswitch (extrausers, for the directory's accounts), the CRL files, and the CRL
and OCSP services the certificates name.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import os
import re
import socket
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import config as config_mod
from ..errors import ConfigError, PolicyUnavailable, SvmmError
from .common import add_json, print_json, service_module

EXIT_OK = 0  # no check failed (WARN lines are advice)
EXIT_PROBLEM = 1  # at least one check failed
EXIT_CANNOT_RUN = 2  # doctor could not run: the configuration cannot be read
DESCRIPTION = (
    "Is this host ready for card logins? One line per check: 'ok|WARN|FAIL name: detail'. "
    "WARN is advice (not set up yet, or soon due); FAIL refuses logins or weakens them."
)
EPILOG = """\
exit status:
  0  no check failed (WARN lines are advice: not set up yet, or soon due)
  1  at least one check FAILed
  2  doctor could not run (the configuration cannot be read or is invalid)
"""

PAM_SHIM = Path("usr/lib/svmm/pam_svmm.py")  # under --root; where README installs the shim
PAM_PROFILE = Path("usr/share/pam-configs/svmm")
COMMON_AUTH = Path("etc/pam.d/common-auth")
NSSWITCH = Path("etc/nsswitch.conf")
PACKAGED_SHIM = Path(__file__).resolve().parents[1] / "pam" / "shim.py"
SIGNER_WARN_DAYS = 30


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "doctor",
        help="check configuration, card module, anchors, directory, policy, svmmd, PAM, NSS",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--timeout", type=float, default=2.0, help="seconds per service probe")
    p.add_argument(
        "--cert", type=Path, help="also probe this certificate's CRL and OCSP URLs (e.g. a card's)"
    )
    # The system files (PAM, nsswitch, the shim) are read below this folder (tests).
    p.add_argument("--root", type=Path, default=Path("/"), help=argparse.SUPPRESS)
    add_json(p)
    p.set_defaults(func=doctor)


class Warn(str):
    """A check's detail that is advice, not a pass."""


class Report:
    def __init__(self, *, quiet: bool) -> None:
        self.quiet = quiet
        self.checks: list[dict[str, str]] = []

    @property
    def failed(self) -> int:
        return sum(c["status"] == "FAIL" for c in self.checks)

    def line(self, status: str, name: str, detail: str) -> None:
        self.checks.append({"status": status, "name": name, "detail": detail})
        if not self.quiet:
            print(f"{status:4} {name}: {detail}", flush=True)

    def check(self, name: str, fn: Callable[[], str]) -> None:
        try:
            detail = fn()
        except SvmmError as e:
            self.line("FAIL", name, e.message)
        except OSError as e:
            where = f"{e.filename}: " if e.filename else ""
            self.line("FAIL", name, f"{where}{e.strerror or e}")
        else:
            self.line("WARN" if isinstance(detail, Warn) else "ok", name, str(detail))


def doctor_json(config: str, report: Report, code: int) -> dict[str, Any]:
    """`svmm doctor --json`: every check in order, the counts and the exit status."""
    return {
        "configuration": config,
        "checks": report.checks,
        "failed": report.failed,
        "warnings": sum(c["status"] == "WARN" for c in report.checks),
        "exit": code,
    }


def doctor(args: argparse.Namespace) -> int:
    report = Report(quiet=args.json)
    path = config_mod.resolve_path(args.config)
    try:
        cfg = config_mod.load(path)
    except SvmmError as e:
        report.line("FAIL", "configuration", e.message)
        return _done(args, str(path), report, EXIT_CANNOT_RUN)
    report.line("ok", "configuration", str(path))
    _run_checks(args, cfg, report)
    return _done(args, str(path), report, EXIT_OK if report.failed == 0 else EXIT_PROBLEM)


def _done(args: argparse.Namespace, path: str, report: Report, code: int) -> int:
    if args.json:
        print_json(doctor_json(path, report, code))
    return code


def _run_checks(args: argparse.Namespace, cfg: config_mod.Config, report: Report) -> None:
    from ..services.login import LoginService

    svc = LoginService(cfg)
    now = dt.datetime.now(dt.UTC)

    def module() -> str:
        tokens = service_module(svc).tokens()
        names = ", ".join(t.label for t in tokens) or "no card inserted"
        return f"{cfg.pkcs11.module} loads; tokens: {names}"

    def card_helper() -> str:
        """The card helper as logins start it: its module loads there too."""
        p = cfg.pkcs11
        helper = LoginService(cfg, card_helper=True).login_module()
        try:
            tokens = helper.tokens()
        finally:
            helper.close()
        user = p.helper_user or "root without capabilities"
        text = f"starts as {user} (seccomp, no_new_privs); sees {len(tokens)} token(s)"
        if p.pass_environment:
            passed = ", ".join(p.pass_environment)
            return Warn(f"{text}; copies {passed} from the caller: a user chooses those")
        return text

    def anchors() -> str:
        out = []
        for a in svc.anchors:
            days = (a.not_valid_after_utc - now).days
            if days < 0:
                return Warn(f"{a.subject.rfc4514_string()} expired {-days} days ago")
            out.append(f"{a.subject.rfc4514_string()} ({days} days left)")
        return "; ".join(out)

    def intermediates() -> str:
        return f"{len(svc.intermediates)} from {cfg.trust.intermediates_dir or '(none configured)'}"

    def audit() -> str:
        parent = cfg.audit.path.parent
        if not parent.exists():
            return Warn(f"{parent} does not exist yet (created on first login)")
        if not os.access(parent, os.W_OK):
            return Warn(f"{parent} is not writable by this user")
        return f"{cfg.audit.path} (syslog mirror {'on' if cfg.audit.syslog else 'off'})"

    report.check("card module", module)
    report.check("card helper", card_helper)
    report.check("trust anchors", anchors)
    report.check("intermediates", intermediates)
    report.check("audit log", audit)
    report.check("audit seal key", functools.partial(_seal_key, cfg))
    report.check("directory bind secret", functools.partial(_bind_secret, cfg))
    report.check("directory", functools.partial(_directory, cfg))
    policy = _PolicyChecks(cfg, now)
    report.check("policy", policy.accepted)
    report.check("policy source", policy.source)
    report.check("svmmd socket", functools.partial(_svmmd, cfg, args.timeout))
    pam = _Pam(args.root)
    report.check("PAM module", pam.module)
    report.check("PAM profile", pam.profile)
    report.check("nsswitch", functools.partial(_nsswitch, cfg, args.root))
    for f in cfg.revocation.crl_files:
        report.check(f"CRL {f}", functools.partial(_crl_freshness, f, now))
    probe = _Prober(svc, cfg, args.timeout, now)
    subject = None
    if args.cert:
        from .cert import load_cert_file

        subject = load_cert_file(args.cert)
    for url, kind, cert, issuer in probe.targets(subject):
        report.check(f"{kind} {url}", functools.partial(probe.run, url, kind, cert, issuer))


# --- the checks ----------------------------------------------------------------------------


def _seal_key(cfg: config_mod.Config) -> str:
    from ..adapters.audit_log import load_seal_key

    key = cfg.audit.seal_key
    if not key.exists() and not key.is_symlink():
        # The writer makes it on first use where it may write (not /etc under systemd).
        return Warn(f"{key} does not exist yet: records are chained, not sealed, until it does")
    load_seal_key(key)  # root's, a regular file, no access for group or others, long enough
    return f"{key} (root only, mode {stat.S_IMODE(key.stat().st_mode):04o})"


def _bind_secret(cfg: config_mod.Config) -> str:
    from ..adapters.directory import read_secret_file

    d = cfg.directory
    if not d.enabled:
        return "no directory configured"
    if not d.bind_dn or d.bind_password_file is None:
        return "anonymous service binds (no bind_dn)"
    read_secret_file(d.bind_password_file)  # refuses group/other access, names the file
    return f"{d.bind_password_file} (root only)"


def _directory(cfg: config_mod.Config) -> str:
    from ..adapters.directory import DirectoryClient

    d = cfg.directory
    if not d.enabled:
        return "not enabled (certificates map by their own names)"
    try:
        client = DirectoryClient.from_config(d)
    except ConfigError as e:
        if e.key != "directory.bind_password_file":
            raise
        raise ConfigError("directory", "not asked: its bind secret is refused (above)") from None
    try:
        client.read_attribute(d.base_dn, "objectClass")  # a bound service search, one entry
    finally:
        client.close()
    tls = "StartTLS" if d.tls.value == "starttls" else d.tls.value
    return f"{', '.join(d.uris)} answers ({tls}, bound as {d.bind_dn or 'anonymous'})"


class _PolicyChecks:
    def __init__(self, cfg: config_mod.Config, now: dt.datetime) -> None:
        self.cfg = cfg
        self.now = now
        self._accepted: Any = None

    @functools.cached_property
    def service(self) -> Any:
        from ..services.policy import PolicyService

        return PolicyService(self.cfg)

    def accepted(self) -> str:
        """The accepted bundle, its signature verified again now (an anchor changed, the
        signer expired or was replaced since it was accepted)."""
        from ..domain.policy_bundle import verify_bundle

        pc = self.cfg.policy
        if not pc.enabled:
            return "not enabled (no host-login rule, no VM grants)"
        accepted, _floor, problem = self.service.store.accepted_state()
        if problem is not None:
            raise problem
        if accepted is None:
            raise PolicyUnavailable(
                f"no accepted policy in {pc.state_dir}: every login is refused in the account "
                "phase (svmm policy load)"
            )
        self._accepted = accepted
        s = self.service
        verify_bundle(accepted.bundle, s.anchors, s.intermediates, at=self.now, eku=pc.signer_eku)
        days = (accepted.signer.not_valid_after_utc - self.now).days
        text = (
            f"version {accepted.version} signed by {accepted.signer_subject}, accepted "
            f"{accepted.accepted_at:%Y-%m-%d %H:%M} UTC; signature verifies now; signer valid "
            f"{days} more days"
        )
        return Warn(text + ": sign a renewal soon") if days < SIGNER_WARN_DAYS else text

    def source(self) -> str:
        """What the source holds now, against the accepted bundle."""
        from ..domain.policy import load_policy
        from ..domain.policy_bundle import verify_bundle

        pc = self.cfg.policy
        if not pc.enabled:
            return "not enabled"
        src = self.service.source
        candidate = src.read()
        accepted = self._accepted
        if candidate is None:
            return Warn(f"{src.description} holds no bundle (the accepted one stays in force)")
        if accepted is not None and candidate == accepted.bundle:
            return f"{src.description} holds the accepted bundle"
        s = self.service
        verified = verify_bundle(candidate, s.anchors, s.intermediates, at=self.now,
                                 eku=pc.signer_eku)  # fmt: skip
        version = load_policy(verified.policy).version
        if accepted is None:
            return Warn(f"{src.description} holds version {version}, not accepted yet")
        if version > accepted.version:
            return Warn(
                f"{src.description} holds version {version}, newer than the accepted "
                f"{accepted.version}: the next login or `svmm policy load` accepts it"
            )
        raise PolicyUnavailable(
            f"{src.description} holds version {version}, not newer than the accepted "
            f"{accepted.version}: it will be refused (a changed policy needs a higher version)"
        )


def _svmmd(cfg: config_mod.Config, timeout: float) -> str:
    from ..adapters.launcher_client import call

    sock = cfg.launcher.socket
    try:
        st = sock.lstat()
    except FileNotFoundError:
        return Warn(
            f"{sock} is absent: logins run in the PAM process, and no VM starts "
            "(systemctl enable --now svmmd.socket)"
        )
    if not stat.S_ISSOCK(st.st_mode):
        raise ConfigError("launcher.socket", f"{sock} is not a socket")
    if st.st_uid != 0:
        # Whoever made it could answer the PAM module's questions as svmmd.
        raise ConfigError("launcher.socket", f"{sock} is owned by uid {st.st_uid}, not root")
    with socket.socket(socket.AF_UNIX) as probe:
        probe.settimeout(timeout)
        try:
            probe.connect(str(sock))
        except ConnectionRefusedError:
            # What the PAM module's daemon=auto takes for "no svmmd" too (a stale socket).
            return Warn(
                f"{sock}: nobody listens (svmmd is not running): logins run in the PAM "
                "process, and no VM starts (systemctl restart svmmd.socket)"
            )
        except OSError:
            pass  # said by the request below
    reply = call(sock, {"op": "list"}, timeout=timeout)
    return f"{sock} (root's) answers {reply.get('version')}"


class _Pam:
    def __init__(self, root: Path) -> None:
        self.root = root

    def _common_auth(self) -> str:
        try:
            return (self.root / COMMON_AUTH).read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def _rules(self) -> list[str]:
        """common-auth's lines that run pam_svmm (through pam_python)."""
        return [
            line.strip()
            for line in self._common_auth().splitlines()
            if "pam_svmm" in line and not line.lstrip().startswith("#")
        ]

    def module(self) -> str:
        """The shim the PAM stack names (or README's path): root's, and this version's."""
        from .. import trusted_path

        named = None
        for rule in self._rules():
            m = re.search(r"pam_python\.so\s+(\S+)", rule)
            if m:
                named = m.group(1)
                break
        shim = self.root / (named.lstrip("/") if named else PAM_SHIM)
        if not shim.exists():
            if named:
                raise ConfigError("PAM", f"common-auth runs {named}, which does not exist")
            return Warn(f"{shim} is not installed (see README: Installing on a host)")
        why = trusted_path.problem(shim)
        if why is not None:
            raise ConfigError("PAM", f"{shim}: {why}: root must not run it")
        if shim.read_bytes() != PACKAGED_SHIM.read_bytes():
            return Warn(f"{shim} differs from this version's shim ({PACKAGED_SHIM}): reinstall it")
        return f"{shim} (root's, this version's)"

    def profile(self) -> str:
        profile = self.root / PAM_PROFILE
        if self._rules():
            return f"{self.root / COMMON_AUTH} uses pam_svmm"
        if profile.exists():
            return Warn(f"{profile} is installed, not enabled (pam-auth-update --enable svmm)")
        return Warn(f"{self.root / COMMON_AUTH} does not use pam_svmm and {profile} is absent")


def _nsswitch(cfg: config_mod.Config, root: Path) -> str:
    path = root / NSSWITCH
    if not cfg.directory.enabled:
        return "no directory: the NSS bridge is not needed"
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return Warn(f"{path} is absent")
    missing = []
    for db in ("passwd", "group"):
        m = re.search(rf"^\s*{db}\s*:(.*)$", text, re.MULTILINE)
        if not m or "extrausers" not in m.group(1).split():
            missing.append(db)
    if missing:
        return Warn(
            f"{path}: {', '.join(missing)} without extrausers: directory accounts that "
            "`svmm nss sync` writes are not seen (README: The identity bridge)"
        )
    return f"{path}: passwd and group use extrausers"


def _crl_freshness(path: Path, now: dt.datetime) -> str:
    from ..adapters.crl_store import parse_crl

    crl = parse_crl(path.read_bytes(), str(path))
    nu = crl.next_update_utc
    if nu is None:
        return Warn(f"{crl.issuer.rfc4514_string()}: no nextUpdate")
    if nu < now:
        return Warn(f"stale since {nu:%Y-%m-%d %H:%M} UTC")
    return f"{len(crl)} entries, next update {nu:%Y-%m-%d %H:%M} UTC"


class _Prober:
    """Real requests to the revocation services (a bare TCP connect would not tell whether
    the service answers, and wedges some responders)."""

    def __init__(self, svc: object, cfg: config_mod.Config, timeout: float, now: dt.datetime):
        from ..adapters.fetch import HttpFetcher

        self.svc = svc
        self.cfg = cfg
        self.timeout = timeout
        self.now = now
        self.fetcher = HttpFetcher()

    def targets(self, leaf: object | None) -> list[tuple[str, str, object, object]]:
        """(url, 'CRL'|'OCSP', certificate, its issuer) for the CAs and the optional leaf."""
        from ..services.revocation import crl_urls, ocsp_urls

        try:
            anchors = list(getattr(self.svc, "anchors", []))
            cas = list(getattr(self.svc, "intermediates", []))
        except SvmmError:  # reported by the anchors and intermediates checks
            return []
        pairs = [(c, _issuer_of(c, anchors + cas)) for c in cas]
        if leaf is not None:
            pairs.insert(0, (leaf, _issuer_of(leaf, cas + anchors)))
        out: list[tuple[str, str, object, object]] = []
        for cert, issuer in pairs:
            for url in crl_urls(cert):
                out.append((url, "CRL", cert, issuer))
            urls = (
                [self.cfg.revocation.ocsp_responder] if self.cfg.revocation.ocsp_responder else []
            )
            for url in urls or ocsp_urls(cert):
                if issuer is not None:
                    out.append((url, "OCSP", cert, issuer))
        unique: dict[tuple[str, str], tuple[str, str, object, object]] = {}
        for t in out:
            unique.setdefault((t[0], t[1]), t)
        return list(unique.values())

    def run(self, url: str, kind: str, cert: object, issuer: object) -> str:
        from ..adapters.crl_store import parse_crl
        from ..domain.revocation import build_ocsp_request

        if kind == "CRL":
            crl = parse_crl(self.fetcher.get(url, timeout=self.timeout), url)
            nu = crl.next_update_utc
            if nu is not None and nu < self.now:
                return Warn(f"answers, but the CRL is stale since {nu:%Y-%m-%d %H:%M} UTC")
            return f"answers: {len(crl)} entries, next update {nu:%Y-%m-%d %H:%M} UTC"
        from cryptography.x509 import ocsp

        der = self.fetcher.post(
            url,
            build_ocsp_request(cert, issuer, None),  # type: ignore[arg-type]
            content_type="application/ocsp-request",
            timeout=self.timeout,
        )
        resp = ocsp.load_der_ocsp_response(der)
        status = resp.response_status.name.lower()
        if resp.response_status is not ocsp.OCSPResponseStatus.SUCCESSFUL:
            return Warn(f"answers with status {status}")
        return f"answers: {resp.certificate_status.name.lower()} for {_cn(cert)}"


def _issuer_of(cert: object, pool: list) -> object | None:
    for c in pool:
        if c.subject == cert.issuer:  # type: ignore[attr-defined]
            return c
    return None


def _cn(cert: object) -> str:
    return cert.subject.rfc4514_string()  # type: ignore[attr-defined]
