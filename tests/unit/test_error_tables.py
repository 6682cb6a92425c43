"""The one table from errors to PAM codes, and the one to exit codes: every class, by name."""

from __future__ import annotations

import inspect

import pytest

from pam_svmm import errors
from pam_svmm.cli.main import EXIT_INTERNAL, exit_code
from pam_svmm.pam.codes import pam_code_name

ALL_ERRORS = [
    c for _, c in inspect.getmembers(errors, inspect.isclass) if issubclass(c, errors.SvmmError)
]


def _instance(cls: type) -> BaseException:
    if cls is errors.ConfigError:
        return cls("k", "bad")
    if cls is errors.PinIncorrect:
        return cls(errors.PinTries.FINAL_TRY)
    return cls("x")


@pytest.mark.parametrize("cls", ALL_ERRORS, ids=lambda c: c.__name__)
def test_every_error_has_a_pam_code_that_is_never_success(cls: type) -> None:
    name = pam_code_name(_instance(cls))
    assert name != "PAM_SUCCESS"
    if issubclass(cls, errors.PinLocked):
        assert name == "PAM_MAXTRIES"
    elif issubclass(cls, errors.AccountExpired):
        assert name == "PAM_ACCT_EXPIRED"
    elif issubclass(cls, errors.AccountDisabled | errors.LoginNotAllowed):
        assert name == "PAM_PERM_DENIED"
    elif issubclass(cls, errors.AuthFailed):
        assert name == "PAM_AUTH_ERR"
    elif issubclass(cls, errors.Undecided):
        assert name == "PAM_AUTHINFO_UNAVAIL"
    else:
        assert name == "PAM_SYSTEM_ERR"


def test_unexpected_exceptions_are_system_errors() -> None:
    assert pam_code_name(RuntimeError("boom")) == "PAM_SYSTEM_ERR"
    assert pam_code_name(KeyError("x")) == "PAM_SYSTEM_ERR"
    assert exit_code(RuntimeError("boom")) == EXIT_INTERNAL


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (errors.CertificateRevoked("x"), 1),
        (errors.NoCard("x"), 3),
        (errors.PinLocked("x"), 4),
        (errors.ConfigError("k", "v"), 5),
    ],
)
def test_exit_codes(error: BaseException, code: int) -> None:
    assert exit_code(error) == code


def test_pin_incorrect_message_tells_tries_without_secrets() -> None:
    e = errors.PinIncorrect(errors.PinTries.FINAL_TRY)
    assert "one try left" in e.message
    assert e.reason == "pin_incorrect"
