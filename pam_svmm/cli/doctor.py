"""`svmm doctor`: is this host ready for card logins? Config, module, anchors, CRLs, responders.

Each check prints `ok`, `warn` or `FAIL` with what it found; the exit status is 0 when nothing
failed, 3 otherwise.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import socket
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

from .. import config as config_mod
from ..errors import SvmmError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("doctor", help="check configuration, card module, anchors, CRLs, responders")
    p.add_argument("--timeout", type=float, default=2.0, help="seconds per reachability probe")
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
        tokens = svc.module.tokens()  # type: ignore[attr-defined]
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
        report.check(f"CRL {f}", lambda f=f: _crl_freshness(f, now))
    for url in _revocation_urls(svc, cfg):
        report.check(f"responder {url}", lambda url=url: _reachable(url, args.timeout))
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


def _revocation_urls(svc: object, cfg: config_mod.Config) -> list[str]:
    from ..services.revocation import crl_urls, ocsp_urls

    urls: list[str] = []
    if cfg.revocation.ocsp_responder:
        urls.append(cfg.revocation.ocsp_responder)
    for cert in getattr(svc, "intermediates", []):
        urls.extend(crl_urls(cert) + ocsp_urls(cert))
    return list(dict.fromkeys(urls))


def _reachable(url: str, timeout: float) -> str:
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    with socket.create_connection((parts.hostname or "", port), timeout=timeout):
        return "reachable"
