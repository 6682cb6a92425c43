"""The login, the card and the allowlist at session open: stand-ins shared by the key release
and dm-crypt tests (tests/unit/test_key_release.py, tests/unit/test_dmcrypt_session.py and
tests/integration/test_dmcrypt.py)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pam_svmm.domain.allowlist import Allowlist, VmAllowance
from pam_svmm.domain.audit_record import CardFacts
from pam_svmm.errors import VolumeError

NOW = dt.datetime(2026, 11, 27, 12, 0, tzinfo=dt.UTC)
VMS = {
    "vm-web": VmAllowance(("boot", "console"), ("web-disk",)),
    "vm-db": VmAllowance(("boot",), ("db-disk", "db-logs")),
    "vm-view": VmAllowance(("console",), ("secret-disk",)),  # no boot: never opened
}


def allowlist(vms: Mapping[str, VmAllowance] = VMS, *, user: str = "alice") -> Allowlist:
    return Allowlist(
        user=user,
        uid=10001 if user == "alice" else 10002,
        roles=("vm-users",),
        card=None,
        method="card",
        sessions=("s1",),
        policy_version=1,
        host="h",
        issued_at=NOW,
        expires_at=NOW + dt.timedelta(hours=1),
        vms=dict(vms),
    )


@dataclass
class Login:
    method: str = "card"
    card_session: Any = "logged-in session"
    chain: tuple[Any, ...] = ("certificate",)
    card_key_id: bytes = b"\x01"
    card: CardFacts = field(
        default_factory=lambda: CardFacts(
            fingerprint="ab" * 32, token="alice ID card", token_serial="tok-alice"
        )
    )


@dataclass
class Volumes:
    """The card's part: releases ``pass-<volume>``; records the buffers to check wiping."""

    fail_on: str = ""
    not_enrolled: tuple[str, ...] = ()
    given: list[bytearray] = field(default_factory=list)

    def release(self, path: Path, unlock: Any) -> bytearray:
        if path.stem == self.fail_on:
            raise VolumeError(f"{path.stem}: Invalid password", reason="volume_key_refused")
        if path.stem in self.not_enrolled:
            raise VolumeError(f"{path}: card ab is not enrolled", reason="card_not_enrolled")
        secret = bytearray(f"pass-{path.stem}".encode())
        self.given.append(secret)
        return secret
