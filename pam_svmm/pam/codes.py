"""The ONE table from errors to PAM return codes.

pam_python passes the integer through; constants are read from pamh so this module has no
import of its own on PAM. Order matters: the first matching class wins, most specific first.
"""

from __future__ import annotations

from ..errors import (
    AccountDisabled,
    AccountExpired,
    AuthFailed,
    ConfigError,
    PinLocked,
    SvmmError,
    Undecided,
)

# (error class, name of the pamh constant)
TABLE: tuple[tuple[type[BaseException], str], ...] = (
    (PinLocked, "PAM_MAXTRIES"),
    (AccountExpired, "PAM_ACCT_EXPIRED"),
    (AccountDisabled, "PAM_PERM_DENIED"),
    (AuthFailed, "PAM_AUTH_ERR"),
    (Undecided, "PAM_AUTHINFO_UNAVAIL"),
    (ConfigError, "PAM_SYSTEM_ERR"),
    (SvmmError, "PAM_SYSTEM_ERR"),
)
UNEXPECTED = "PAM_SYSTEM_ERR"  # a bug: never a success


def pam_code_name(error: BaseException) -> str:
    for cls, name in TABLE:
        if isinstance(error, cls):
            return name
    return UNEXPECTED
