"""Shared pieces for the launcher tests: a small policy with a Chinese Wall, allowlists written
through the real AllowlistStore, a Launcher wired to tmp folders and a real AuditLog."""

from __future__ import annotations

import datetime as dt
import json
import os
from collections.abc import Collection
from dataclasses import replace
from pathlib import Path
from typing import Any

from pam_svmm.adapters.allowlist_store import AllowlistStore, SessionRecords
from pam_svmm.adapters.audit_log import AuditLog
from pam_svmm.adapters.processes import start_time
from pam_svmm.config import Config, LauncherConfig, SessionConfig
from pam_svmm.domain import policy as pdp
from pam_svmm.domain.allowlist import build_allowlist
from pam_svmm.domain.audit_record import CardFacts
from pam_svmm.services.launcher import Launcher

HOST = "lab-host"
NOW = dt.datetime(2026, 3, 1, 9, 0, tzinfo=dt.UTC)
ALICE_UID = 10001
BOB_UID = 10002
CARD = CardFacts(fingerprint="ab" * 32, serial="1f2e")

POLICY_TOML = """
version = 3
[hosts.lab-host]
login_roles = ["analysts"]
services = ["login"]

[vms.plain]
label = "no disks"

[vms.bank-a]
class = "bank-a"

[vms.bank-b]
class = "bank-b"

[vms.secret]
volumes = ["secret-data"]

[vms.other]

[conflicts]
classes = [["bank-a", "bank-b"]]

[[grants]]
role = "analysts"
vm = "plain"
permissions = ["boot", "console"]

[[grants]]
role = "analysts"
vm = "bank-a"
permissions = ["boot"]

[[grants]]
role = "analysts"
vm = "bank-b"
permissions = ["boot"]

[[grants]]
role = "analysts"
vm = "secret"
permissions = ["boot"]
"""


class LocalPolicy:
    """PolicyService's decide() over a compiled policy (the real decision point)."""

    host = HOST

    def __init__(self, text: str = POLICY_TOML) -> None:
        self.compiled = pdp.load_policy(text)

    def decide(
        self, user: str, roles: Collection[str], vm_id: str, action: str, running: Collection[str]
    ) -> pdp.Decision:
        return pdp.decide(self.compiled, pdp.Subject(user, roles), vm_id, action, running)


def allowlist_bytes(
    policy: LocalPolicy,
    *,
    user: str = "alice",
    uid: int = ALICE_UID,
    now: dt.datetime = NOW,
    ttl: float = 3600,
    host: str = HOST,
) -> bytes:
    return build_allowlist(
        policy.compiled,
        user=user,
        uid=uid,
        roles=("analysts",),
        card=CARD,
        method="card",
        sessions=("tty1:1",),
        host=host,
        now=now,
        ttl=ttl,
    ).to_json()


def launcher_config(base: Path) -> Config:
    return replace(
        Config(),
        session=SessionConfig(allowlist_dir=base / "allowlist", state_dir=base / "sessions"),
        launcher=LauncherConfig(
            socket=base / "sock" / "launcher.sock",
            run_dir=base / "vms",
            registry_dir=base / "registry",
            start_timeout=10.0,
            powerdown_timeout=0.5,  # no guest OS answers the power button here
            quit_timeout=3.0,
            term_timeout=2.0,
            kill_timeout=2.0,
        ),
    )


def make_launcher(
    base: Path, policy: LocalPolicy | None = None, *, now: dt.datetime = NOW
) -> Launcher:
    cfg = launcher_config(base)
    return Launcher(
        cfg,
        policy=policy or LocalPolicy(),
        audit=AuditLog(base / "audit" / "audit.jsonl", syslog_mirror=False),
        store=AllowlistStore(cfg.session.allowlist_dir),
        now=lambda: now,
    )


def audit_records(base: Path) -> list[dict[str, Any]]:
    path = base / "audit" / "audit.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def request(op: str, vm: str = "", **extra: Any) -> bytes:
    doc: dict[str, Any] = {"version": "svmm-launcher/1", "op": op, **extra}
    if vm:
        doc["vm"] = vm
    return json.dumps(doc).encode()


def live_session(state_dir: Path, uid: int, user: str, session: str = "tty9:1:test") -> None:
    """A session record of ``uid`` opened by this (live) process, as pam_sm_open_session
    writes one: without it an allowlist is no grant (invariant 12)."""
    with SessionRecords(state_dir).locked(uid) as held:
        state = held.load()
        state.user = user
        state.sessions[session] = {"pid": os.getpid(), "pid_start": start_time(os.getpid())}
        held.save(state)
