"""ID/password without a card: only where policy allows it, never for a role that demands a
card, never without TLS, and without telling who exists."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from pam_svmm import config, errors
from pam_svmm.domain.identity import Identity, PosixAccount
from pam_svmm.domain.nss import LocalDb
from pam_svmm.services.auth import Attempt, LoginRequest
from pam_svmm.services.password import PasswordAuthenticator, password_allowed


@dataclass
class Directory:
    users: dict[str, tuple[Identity, str]] = field(default_factory=dict)
    binds: list[str] = field(default_factory=list)

    def user_by_name(self, name: str) -> Identity | None:
        return self.users[name][0] if name in self.users else None

    def bind_as(self, dn: str, password: str) -> None:
        self.binds.append(dn)
        for ident, pw in self.users.values():
            if ident.dn == dn and pw == password:
                return
        raise errors.PasswordIncorrect("invalid credentials")


class Prompter:
    def __init__(self, answer: str) -> None:
        self.answer = answer
        self.prompts: list[str] = []

    def ask_secret(self, prompt: str) -> str:
        self.prompts.append(prompt)
        return self.answer

    def info(self, text: str) -> None:
        pass

    def error(self, text: str) -> None:
        pass


def person(name: str, *roles: str) -> Identity:
    return Identity(
        dn=f"uid={name},ou=people,dc=demo,dc=example",
        account=PosixAccount(name, 10001, 10001, home=f"/home/{name}"),
        roles=roles,
    )


def cfg(**over: Any) -> config.Config:
    data: dict[str, Any] = {
        "directory": {"enabled": True, "uris": ["ldap://127.0.0.1:1"], "base_dn": "dc=x"},
        "certmap": {"rules": [{"name": "upn", "map": "(svmmPrincipalName={upn})"}]},
        "password": {"enabled": True, "services": ["login"], "card_required_roles": ["admins"]},
    }
    for k, v in over.items():
        data[k] = {**data.get(k, {}), **v}
    return config.parse(data)


def run(c: config.Config, d: Directory, user: str, pw: str, service: str = "login") -> Any:
    prompter = Prompter(pw)
    attempt = Attempt()
    result = PasswordAuthenticator(c, d, local=lambda: LOCAL).authenticate(
        LoginRequest(service, "h", user), prompter, attempt
    )
    return result, prompter, attempt


LOCAL = LocalDb(frozenset({"root", "daemon"}), frozenset({0, 1}))


def directory() -> Directory:
    return Directory(
        {
            "paul": (person("paul", "vm-users"), "s3cret"),
            "root2": (person("root2", "admins"), "s3cret"),
        }
    )


def test_right_password_logs_in_with_the_directory_identity() -> None:
    result, prompter, attempt = run(cfg(), directory(), "paul", "s3cret")
    assert result.user == "paul" and result.method == "password"
    assert result.identity is not None and result.identity.roles == ("vm-users",)
    assert prompter.prompts == ["Password: "] and attempt.method == "password"


def test_wrong_password() -> None:
    with pytest.raises(errors.PasswordIncorrect):
        run(cfg(), directory(), "paul", "nope")


def test_empty_password_never_reaches_the_directory() -> None:
    d = directory()
    with pytest.raises(errors.PasswordIncorrect):
        run(cfg(), d, "paul", "")
    assert d.binds == []  # an empty password would be an unauthenticated bind


def test_unknown_user_is_asked_for_a_password_all_the_same() -> None:
    d = directory()
    with pytest.raises(errors.UnknownUser):
        run(cfg(), d, "nobody", "s3cret")
    assert d.binds == []


@pytest.mark.parametrize(
    "account",
    [PosixAccount("root", 10009, 10001), PosixAccount("toor", 0, 10001),
     PosixAccount("daemon2", 1, 10001)],
)  # fmt: skip
def test_a_directory_entry_shadowing_a_local_account_gets_no_password_login(
    account: PosixAccount,
) -> None:
    shadow = Identity(dn=f"uid={account.name},dc=x", account=account)
    d = Directory({account.name: (shadow, "s3cret")})
    with pytest.raises(errors.LocalAccountShadowed):
        run(cfg(), d, account.name, "s3cret")
    assert d.binds == []


def test_a_role_that_demands_a_card_is_refused_before_the_password() -> None:
    c = cfg()
    prompter = Prompter("s3cret")
    with pytest.raises(errors.MethodNotAllowed, match="must log in with a card"):
        PasswordAuthenticator(c, directory(), local=lambda: LOCAL).authenticate(
            LoginRequest("login", "h", "root2"), prompter, Attempt()
        )
    assert prompter.prompts == []


@pytest.mark.parametrize(
    ("over", "service", "allowed"),
    [
        ({}, "login", True),
        ({}, "sudo", False),
        ({"password": {"enabled": False}}, "login", False),
        ({"directory": {"enabled": False}, "certmap": {"rules": []}}, "login", False),
    ],
)
def test_password_allowed_table(over: dict[str, Any], service: str, allowed: bool) -> None:
    assert password_allowed(cfg(**over), service) is allowed
    if not allowed:
        with pytest.raises(errors.MethodNotAllowed):
            run(cfg(**over), directory(), "paul", "s3cret", service)


def test_no_password_over_plain_ldap() -> None:
    with pytest.raises(errors.MethodNotAllowed, match="TLS"):
        run(cfg(directory={"tls": "none"}), directory(), "paul", "s3cret")
