"""ID/password login without a card, where policy allows it.

The password is checked by binding to the directory as the user's own entry, over TLS only;
the host never sees a password hash. The identity and roles come from the same directory
entry a card login would map to, so the rest of the session cannot tell the methods apart
except by the method the audit trail records.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from ..config import Config, TlsMode
from ..domain.nss import LocalDb
from ..errors import MethodNotAllowed, PasswordIncorrect, UnknownUser
from .auth import Attempt, LoginRequest, LoginResult, Prompter
from .identity import local_accounts, refuse_local

if TYPE_CHECKING:
    from ..domain.identity import Identity


class UserDirectory(Protocol):
    def user_by_name(self, name: str) -> Identity | None: ...

    def bind_as(self, dn: str, password: str) -> None: ...


def password_allowed(config: Config, service: str) -> bool:
    """Whether this PAM service may fall back to a password at all (per-role rules later)."""
    p = config.password
    return p.enabled and config.directory.enabled and service in p.services


class PasswordAuthenticator:
    def __init__(
        self,
        config: Config,
        directory: UserDirectory,
        local: Callable[[], LocalDb] = local_accounts,
    ) -> None:
        self.config = config
        self.directory = directory
        self.local = local

    def authenticate(
        self, request: LoginRequest, prompter: Prompter, attempt: Attempt
    ) -> LoginResult:
        attempt.method = "password"
        if not password_allowed(self.config, request.service):
            raise MethodNotAllowed(f"password logins are not allowed for {request.service!r}")
        if self.config.directory.tls is TlsMode.NONE and any(
            u.startswith("ldap://") for u in self.config.directory.uris
        ):
            # A password must never cross the network in the clear.
            raise MethodNotAllowed("password logins need TLS to the directory")
        name = request.pam_user or ""
        identity = self.directory.user_by_name(name) if name else None
        if identity is not None:
            attempt.identity = identity
            attempt.user = identity.name
            refuse_local(identity, self.config, self.local())
            demanding = sorted(set(identity.roles) & set(self.config.password.card_required_roles))
            if demanding:
                raise MethodNotAllowed(
                    f"{identity.name} must log in with a card (role {', '.join(demanding)})"
                )
        # Ask even for an unknown user, so the prompt does not tell who exists.
        password = prompter.ask_secret("Password: ")
        try:
            if identity is None:
                raise UnknownUser(f"no directory account {name!r}")
            if not password:
                raise PasswordIncorrect("empty password")
            self.directory.bind_as(identity.dn, password)
        finally:
            del password
        return LoginResult(
            user=identity.name,
            rule="password",
            card=attempt.card,
            chain=(),
            identity=identity,
            method="password",
        )
