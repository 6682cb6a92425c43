"""The audit record: one decision, as one JSON line. Pure (the time is a parameter).

Records name the person, the card and (later) the VM; they never carry a PIN or key. The
field set is fixed so that `svmm audit show` and auditors can rely on it.
"""

from __future__ import annotations

import datetime as dt
import enum
import json
from dataclasses import asdict, dataclass, field
from typing import Any


class Outcome(enum.Enum):
    SUCCESS = "success"
    FAILURE = "failure"  # the answer was no
    UNDECIDED = "undecided"  # could not find out
    ERROR = "error"  # a bug or a broken configuration


@dataclass(frozen=True)
class CardFacts:
    """What the audit trail says about the card used."""

    fingerprint: str = ""  # sha256 of the certificate, hex
    serial: str = ""  # certificate serial, hex
    issuer: str = ""  # RFC 4514
    subject: str = ""
    token: str = ""  # token label
    token_serial: str = ""


@dataclass(frozen=True)
class AuditRecord:
    event: str  # auth, account, session_open, ...
    outcome: Outcome
    reason: str
    time: dt.datetime
    host: str
    service: str = ""
    user: str = ""  # the identity decided on (or asked for, on failure)
    requested_user: str = ""  # PAM_USER as the application gave it
    method: str = ""  # card, password
    roles: tuple[str, ...] = ()  # the roles the decision was made with
    offline: bool = False  # identity from the offline cache (directory unreachable)
    card: CardFacts = field(default_factory=CardFacts)
    vm: str = ""
    tty: str = ""
    rhost: str = ""
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["outcome"] = self.outcome.value
        d["roles"] = list(self.roles)
        d["time"] = self.time.astimezone(dt.UTC).isoformat(timespec="microseconds")
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"), ensure_ascii=True)

    def syslog_line(self) -> str:
        fp = self.card.fingerprint[:16]
        parts = [
            f"event={self.event}",
            f"outcome={self.outcome.value}",
            f"reason={self.reason}",
            f"user={self.user or '-'}",
            f"service={self.service or '-'}",
            f"card={fp or '-'}",
        ]
        if self.vm:
            parts.append(f"vm={self.vm}")
        if self.method:
            parts.append(f"method={self.method}")
        if self.offline:
            parts.append("offline=yes")
        return " ".join(parts)
