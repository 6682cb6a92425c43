"""Logging in through the lab's real PAM stack, for the integration tests that need it:
one attempt and its audit records, a refusal's shape, `svmm card list` on a reader."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from svmm_lab.lab import Lab
from svmm_lab.pamclient import PamReport

PIN = "123456"


@dataclass
class Attempt:
    report: PamReport
    audit: list[dict[str, Any]]

    @property
    def record(self) -> dict[str, Any]:
        """The attempt's one authentication record."""
        auth = [r for r in self.audit if r["event"] == "auth"]
        assert len(auth) == 1, f"expected one auth record, got {self.audit}"
        return auth[0]

    @property
    def events(self) -> list[str]:
        return [r["event"] for r in self.audit]


def login(
    lab: Lab, *cards: str, pin: str = PIN, user: str = "", service: str = "svmm-login"
) -> Attempt:
    before = len(lab.audit_records())
    report = lab.login(lab.insert(*cards), pin=pin, user=user, service=service)
    return Attempt(report, lab.audit_records()[before:])


def refused(a: Attempt, code: str, reason: str) -> None:
    assert a.report.name == code, a.report
    assert a.record["reason"] == reason, a.record
    assert a.record["outcome"] in ("failure", "undecided", "error")
    assert a.events == ["auth"]  # no account phase after a refusal


def card_list(lab: Lab, card: str | tuple[str, ...], *args: str, config: Path | None = None) -> Any:
    cards = (card,) if isinstance(card, str) else card
    env = dict(os.environ, SVMM_CONFIG=str(config or lab.config_path), **lab.insert(*cards).env)
    return subprocess.run(
        [sys.executable, "-m", "pam_svmm.cli.main", "card", "list", *args],
        capture_output=True, text=True, env=env, timeout=60, check=False,
    )  # fmt: skip
