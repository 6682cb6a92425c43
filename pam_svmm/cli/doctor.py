"""`svmm doctor`: is this host ready for card logins? Config, module, anchors, CRLs, responders.

Each check prints `ok`, `warn` or `FAIL` with what it found; the exit status is 0 when nothing
failed, 3 otherwise.
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import os
from collections.abc import Callable
from pathlib import Path

from .. import config as config_mod
from ..errors import SvmmError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("doctor", help="check configuration, card module, anchors, CRLs, responders")
    p.add_argument("--timeout", type=float, default=2.0, help="seconds per responder probe")
    p.add_argument(
        "--cert", type=Path, help="also probe this certificate's CRL and OCSP URLs (e.g. a card's)"
    )
    p.set_defaults(func=doctor)


class Report:
    def __init__(self) -> None:
        self.failed = 0

    def line(self, status: str, what: str, detail: str) -> None:
        if status == "FAIL":
            self.failed += 1
        print(f"{status:4} {what}: {detail}")

    def check(self, what: str, fn: Callable[[], str]) -> None:
        try:
            detail = fn()
        except SvmmError as e:
            self.line("FAIL", what, e.message)
        except OSError as e:
            self.line("FAIL", what, f"{e.strerror or e}")
        else:
            status, _, text = (
                detail.partition(":") if detail.startswith("warn:") else ("ok", "", detail)
            )
            self.line(status, what, text.strip() if status == "warn" else detail)


def doctor(args: argparse.Namespace) -> int:
    from ..services.login import LoginService

    report = Report()
    path = config_mod.resolve_path(args.config)
    try:
        cfg = config_mod.load(path)
    except SvmmError as e:
        report.line("FAIL", "configuration", e.message)
        return 3
    report.line("ok", "configuration", str(path))
    svc = LoginService(cfg)
    now = dt.datetime.now(dt.UTC)

    def module() -> str:
        tokens = svc.module.tokens()
        names = ", ".join(t.label for t in tokens) or "no card inserted"
        return f"{cfg.pkcs11.module} loads; tokens: {names}"

    def anchors() -> str:
        out = []
        for a in svc.anchors:
            days = (a.not_valid_after_utc - now).days
            if days < 0:
                return f"warn: {a.subject.rfc4514_string()} expired {-days} days ago"
            out.append(f"{a.subject.rfc4514_string()} ({days} days left)")
        return "; ".join(out)

    def intermediates() -> str:
        return f"{len(svc.intermediates)} from {cfg.trust.intermediates_dir or '(none configured)'}"

    def audit() -> str:
        parent = cfg.audit.path.parent
        if not parent.exists():
            return f"warn: {parent} does not exist yet (created on first login)"
        if not os.access(parent, os.W_OK):
            return f"warn: {parent} is not writable by this user"
        return f"{cfg.audit.path} (syslog mirror {'on' if cfg.audit.syslog else 'off'})"

    report.check("card module", module)
    report.check("trust anchors", anchors)
    report.check("intermediates", intermediates)
    report.check("audit log", audit)
    for f in cfg.revocation.crl_files:
        report.check(f"CRL {f}", functools.partial(_crl_freshness, f, now))
    probe = _Prober(svc, cfg, args.timeout, now)
    subject = None
    if args.cert:
        from .cert import load_cert_file

        subject = load_cert_file(args.cert)
    for url, kind, cert, issuer in probe.targets(subject):
        report.check(f"{kind} {url}", functools.partial(probe.run, url, kind, cert, issuer))
    return 0 if report.failed == 0 else 3


def _crl_freshness(path: Path, now: dt.datetime) -> str:
    from ..adapters.crl_store import parse_crl

    crl = parse_crl(path.read_bytes(), str(path))
    nu = crl.next_update_utc
    if nu is None:
        return f"warn: {crl.issuer.rfc4514_string()}: no nextUpdate"
    if nu < now:
        return f"warn: stale since {nu:%Y-%m-%d %H:%M} UTC"
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

        anchors = list(getattr(self.svc, "anchors", []))
        cas = list(getattr(self.svc, "intermediates", []))
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
                return f"warn: answers, but the CRL is stale since {nu:%Y-%m-%d %H:%M} UTC"
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
            return f"warn: answers with status {status}"
        return f"answers: {resp.certificate_status.name.lower()} for {_cn(cert)}"


def _issuer_of(cert: object, pool: list) -> object | None:
    for c in pool:
        if c.subject == cert.issuer:  # type: ignore[attr-defined]
            return c
    return None


def _cn(cert: object) -> str:
    return cert.subject.rfc4514_string()  # type: ignore[attr-defined]
