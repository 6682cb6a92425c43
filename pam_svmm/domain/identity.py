"""Who a person is on this host: their directory entry, POSIX account, roles, account state.

Pure values shared by the directory adapter (which builds them), the offline cache (which
stores them), the login pipeline, the NSS bridge and, later, the policy decision point.
"""

from __future__ import annotations

import datetime as dt
import enum
from dataclasses import dataclass, field


@dataclass(frozen=True)
class PosixAccount:
    """A passwd(5) record."""

    name: str
    uid: int
    gid: int
    gecos: str = ""
    home: str = ""
    shell: str = "/bin/sh"


@dataclass(frozen=True)
class PosixGroup:
    """A group(5) record."""

    name: str
    gid: int
    members: tuple[str, ...] = ()


class AccountStatus(enum.Enum):
    ACTIVE = "active"
    DISABLED = "disabled"  # disabled attribute or ppolicy lock
    EXPIRED = "expired"  # shadowExpire passed


@dataclass(frozen=True)
class AccountState:
    status: AccountStatus = AccountStatus.ACTIVE
    reason: str = ""  # e.g. "pwdAccountLockedTime set", "shadowExpire 2026-01-01"

    @property
    def active(self) -> bool:
        return self.status is AccountStatus.ACTIVE


@dataclass(frozen=True)
class Identity:
    """A person as the directory (or the offline cache) describes them."""

    dn: str
    account: PosixAccount
    roles: tuple[str, ...] = ()
    groups: tuple[PosixGroup, ...] = ()  # POSIX groups the user is in (for NSS and id)
    state: AccountState = field(default_factory=AccountState)
    certificates: tuple[bytes, ...] = ()  # DER values of userCertificate;binary
    # Where it came from, for the audit trail: "directory" or "offline-cache".
    source: str = "directory"
    fetched_at: dt.datetime | None = None

    @property
    def name(self) -> str:
        return self.account.name


@dataclass(frozen=True)
class MappingTrace:
    """How a certificate was mapped: for `svmm cert map` and the audit trail."""

    rule: str
    ldap_filter: str
    entries: tuple[str, ...]  # DNs found
