"""One error hierarchy for the whole product.

Two branches decide how an entry point answers:

* ``AuthFailed``: we found out and the answer is no (wrong PIN, revoked, untrusted,
  unknown user). PAM_AUTH_ERR.
* ``Undecided``: we could not find out (no card, responder down, directory down).
  PAM_AUTHINFO_UNAVAIL, so a stack may fall through to another method.

``PinLocked`` is its own branch (PAM_MAXTRIES). Anything that is not an ``SvmmError`` is a
bug and maps to PAM_SYSTEM_ERR. The tables from these classes to PAM codes and exit codes
live in ``pam_svmm.pam.codes`` and ``pam_svmm.cli.main`` and nowhere else.

Every error carries ``reason``: a short stable token for the audit trail and tests, and a
message for people. Messages never contain secrets.
"""

from __future__ import annotations

import enum


class SvmmError(Exception):
    """Base of every error the product raises on purpose."""

    reason: str = "error"

    def __init__(self, message: str = "", *, reason: str | None = None) -> None:
        super().__init__(message or self.__class__.__doc__ or self.reason)
        if reason is not None:
            self.reason = reason

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else self.reason


class ConfigError(SvmmError):
    """The configuration is invalid; the message names the key."""

    reason = "config_invalid"

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"configuration: {key}: {problem}")
        self.key = key
        self.problem = problem


class InputMalformed(SvmmError, ValueError):
    """Bytes from outside were refused by a bounded parser (domain/bounded.py): larger than
    its limit, nested deeper than its limit, not UTF-8, not well-formed, or a number that is
    not finite or too long. A ValueError too, so a parser's existing ``except ValueError``
    turns it into that parser's own typed error; the message says which bound."""

    reason = "input_malformed"


# --- the answer is "no" -------------------------------------------------------------------


class AuthFailed(SvmmError):
    """Authentication failed."""

    reason = "auth_failed"


class PinIncorrect(AuthFailed):
    """The PIN was wrong; ``tries`` tells what the token reports about the remaining tries."""

    reason = "pin_incorrect"

    def __init__(self, tries: PinTries, message: str = "") -> None:
        super().__init__(message or f"wrong PIN ({tries.describe()})")
        self.tries = tries


class PinInvalid(AuthFailed):
    """The PIN was rejected as malformed (length or characters) by the token."""

    reason = "pin_invalid"


class ProofOfPossessionFailed(AuthFailed):
    """The card's signature over the challenge does not verify with the certificate's key."""

    reason = "proof_of_possession_failed"


class CertificateInvalid(AuthFailed):
    """The certificate is malformed, expired, not yet valid, or lacks a required usage."""

    reason = "certificate_invalid"


class CertificateUntrusted(AuthFailed):
    """No chain from the certificate to a configured trust anchor."""

    reason = "certificate_untrusted"


class NameConstraintsViolated(CertificateUntrusted):
    """A name the mapper could use (subject, subject e-mail, a SAN, a UPN) lies outside the
    nameConstraints of a CA in the chain; the message names the name and the constraint."""

    reason = "name_constraints"


class CertificateRevoked(AuthFailed):
    """A certificate in the chain is revoked."""

    reason = "certificate_revoked"


class UnknownUser(AuthFailed):
    """No identity could be mapped from the certificate."""

    reason = "unknown_user"


class LocalAccountShadowed(AuthFailed):
    """The directory entry the card maps to names a local or system account (root, a uid
    outside the directory's range): whoever can add one entry must not get a local account."""

    reason = "local_account_shadowed"


class UserMismatch(AuthFailed):
    """The card belongs to someone other than the user asking to log in."""

    reason = "user_mismatch"


class HostNotVouched(AuthFailed):
    """Mutual authentication: the card's anchor does not vouch for this host."""

    reason = "host_not_vouched"


class NoUsableCertificate(AuthFailed):
    """A card is present but none of its certificates passes policy for this user."""

    reason = "no_usable_certificate"


class AmbiguousUser(UnknownUser):
    """The certificate maps to more than one directory entry; none is picked."""

    reason = "mapping_ambiguous"


class AccountDisabled(AuthFailed):
    """The directory marks the account disabled or locked."""

    reason = "account_disabled"


class AccountExpired(AuthFailed):
    """The account's expiry date (shadowExpire) has passed."""

    reason = "account_expired"


class LoginNotAllowed(AuthFailed):
    """The policy does not let this user log in on this host through this service."""

    reason = "login_not_allowed"


class MethodNotAllowed(AuthFailed):
    """Policy does not allow this login method here (e.g. a password where a card is required)."""

    reason = "method_not_allowed"


class PasswordIncorrect(AuthFailed):
    """The directory refused the password."""

    reason = "password_incorrect"


# --- we could not find out ----------------------------------------------------------------


class Undecided(SvmmError):
    """The decision could not be made (information unavailable)."""

    reason = "undecided"


class NoCard(Undecided):
    """No card (token) is present."""

    reason = "no_card"


class TokenError(Undecided):
    """The card or its module failed in a way that is not an answer about the user."""

    reason = "token_error"


class RevocationUnknown(Undecided):
    """Revocation status could not be established under a rule that requires it."""

    reason = "revocation_unknown"


class FetchError(Undecided):
    """A network fetch (CRL, OCSP) failed or timed out."""

    reason = "fetch_failed"


class DirectoryUnavailable(Undecided):
    """No directory server answered (and no usable offline entry)."""

    reason = "directory_unavailable"


class LoginTimeout(Undecided):
    """The login exceeded its total time budget."""

    reason = "login_timeout"


class ConversationFailed(Undecided):
    """The PAM conversation failed or the user cancelled the prompt."""

    reason = "conversation_failed"


# --- locked ------------------------------------------------------------------------------


class PinLocked(SvmmError):
    """The PIN is locked; only an administrator (PUK / SO) can unblock it."""

    reason = "pin_locked"


# --- administration ----------------------------------------------------------------------


class IssueFailed(SvmmError):
    """Issuing a card failed (CA command, request or returned certificate); nothing was kept."""

    reason = "issue_failed"


# --- sessions ----------------------------------------------------------------------------


class SessionFailed(SvmmError):
    """The session's allowlist or its session record could not be written, read or removed
    safely (I/O error, or a file or folder that someone else could have redirected)."""

    reason = "session_failed"


# --- VM policy ---------------------------------------------------------------------------


class PolicyError(SvmmError):
    """The VM policy document is invalid; the message names the key."""

    reason = "policy_invalid"

    def __init__(self, key: str, problem: str = "invalid", *, reason: str | None = None) -> None:
        text = f"policy: {key}: {problem}" if key else f"policy: {problem}"
        super().__init__(text, reason=reason)
        self.key = key
        self.problem = problem


class PolicyBundleInvalid(SvmmError):
    """A signed policy bundle was refused (malformed, bad signature, untrusted signer)."""

    reason = "policy_bundle_invalid"


class PolicyRollback(PolicyBundleInvalid):
    """A policy bundle older than (or as old as, with other content) the accepted one."""

    reason = "policy_rollback"


class PolicyUnavailable(Undecided):
    """No policy could be obtained and none was accepted before: nothing can be allowed."""

    reason = "policy_unavailable"


class AllowlistInvalid(SvmmError):
    """An allowlist document is malformed; the message names the field."""

    reason = "allowlist_invalid"


# --- volumes -----------------------------------------------------------------------------


class VolumeError(SvmmError):
    """A LUKS volume could not be made, read, changed or opened; the message names the volume
    and quotes the tool (e.g. cryptsetup), never a key. ``reason`` tells the cases apart:
    ``volume_key_refused`` (no keyslot takes the key), ``dm_unavailable`` (no device-mapper on
    this host), ``volume_failed`` (anything else)."""

    reason = "volume_failed"


# --- VMs ---------------------------------------------------------------------------------


class VmError(SvmmError):
    """A VM could not be built, started, controlled or stopped as asked; the message names the
    VM and quotes QEMU, never a key. ``reason``: ``vm_spec_invalid`` (a name or value fails
    validation), ``vm_start_failed`` (QEMU exited or never answered on QMP), ``qmp_failed``
    (a QMP command failed, timed out or the connection was lost), ``vm_failed`` (else). A
    volume key QEMU's LUKS driver refuses is a ``VolumeError`` (``volume_key_refused``)."""

    reason = "vm_failed"


# --- audit -------------------------------------------------------------------------------


class AuditTampered(SvmmError):
    """The audit trail does not verify: a record was edited, deleted, reordered, inserted or
    truncated, or a seal or the head file is bad."""

    reason = "audit_tampered"


# --- volume keys -------------------------------------------------------------------------


class KeyReleaseFailed(AuthFailed):
    """The card (or the escrow key) did not release a volume key: it is not the key the volume
    key was wrapped to, the wrapped key does not authenticate (altered token or wrong key), or
    the card holds no such secret object."""

    reason = "key_release_failed"


class KeyTokenInvalid(SvmmError):
    """A wrapped-key token (the JSON kept beside a volume) is malformed; the message names the
    field."""

    reason = "key_token_invalid"


# --- helpers -----------------------------------------------------------------------------


class PinTries(enum.Enum):
    """What a token says about the remaining PIN tries (CKF_USER_PIN_* flags)."""

    UNKNOWN = "unknown"
    COUNT_LOW = "count_low"
    FINAL_TRY = "final_try"
    LOCKED = "locked"

    def describe(self) -> str:
        return {
            PinTries.UNKNOWN: "tries left not reported",
            PinTries.COUNT_LOW: "few tries left",
            PinTries.FINAL_TRY: "one try left before the PIN locks",
            PinTries.LOCKED: "PIN locked",
        }[self]


# --- the launcher service ----------------------------------------------------------------


class LauncherRefused(AuthFailed):
    """The launcher service refused the request; ``reason`` carries its token (e.g.
    ``not_in_allowlist``, ``conflict_of_interest``, ``volume_key_unavailable``)."""

    reason = "launcher_refused"


class LauncherUnavailable(Undecided):
    """The launcher service could not be reached, or its answer was not the protocol."""

    reason = "launcher_unavailable"
