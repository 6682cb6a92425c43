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
    LoginNotAllowed,
    PinLocked,
    SvmmError,
    Undecided,
)

# (error class, name of the pamh constant)
TABLE: tuple[tuple[type[BaseException], str], ...] = (
    (PinLocked, "PAM_MAXTRIES"),
    (AccountExpired, "PAM_ACCT_EXPIRED"),
    (AccountDisabled, "PAM_PERM_DENIED"),
    (LoginNotAllowed, "PAM_PERM_DENIED"),
    (AuthFailed, "PAM_AUTH_ERR"),
    (Undecided, "PAM_AUTHINFO_UNAVAIL"),
    (ConfigError, "PAM_SYSTEM_ERR"),
    (SvmmError, "PAM_SYSTEM_ERR"),
)
UNEXPECTED = "PAM_SYSTEM_ERR"  # a bug: never a success

# pam_sm_open_session / pam_sm_close_session may answer only PAM_SUCCESS, PAM_IGNORE or
# PAM_SESSION_ERR (pam_sm_open_session(3)): whatever the error, the session call says this.
SESSION_ERROR = "PAM_SESSION_ERR"


def pam_code_name(error: BaseException, *, session: bool = False) -> str:
    if session:
        return SESSION_ERROR
    for cls, name in TABLE:
        if isinstance(error, cls):
            return name
    return UNEXPECTED
