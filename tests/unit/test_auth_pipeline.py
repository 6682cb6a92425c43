"""The login pipeline's order and freshness rules, with an in-memory card that signs with a real
key (the same pipeline runs against SoftHSM2 in tests/integration/test_login.py)."""

from __future__ import annotations

import datetime as dt
import itertools
from dataclasses import dataclass, field
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from pam_svmm import config, errors
from pam_svmm.domain.mapping import CertificateMapper
from pam_svmm.domain.signing import SignatureScheme
from pam_svmm.lab.pki import LabCA, new_key
from pam_svmm.services.auth import Attempt, CardAuthenticator, LoginRequest

NOW = dt.datetime(2026, 11, 27, 12, 0, tzinfo=dt.UTC)


@dataclass(frozen=True)
class Token:
    label: str = "alice ID card"
    serial: str = "0001"
    pin_tries: errors.PinTries = errors.PinTries.UNKNOWN
    protected_auth_path: bool = False
    login_required: bool = True


@dataclass(frozen=True)
class CardCert:
    label: str
    id: bytes
    der: bytes


@dataclass
class Card:
    """A card: a key, a certificate, and a log of what it was asked to sign."""

    key: Any
    der: bytes
    pin: str = "123456"
    signed: list[bytes] = field(default_factory=list)
    replay: bytes | None = None  # answer every challenge with this signature

    def session(self, token: Any) -> Card:
        return self

    def __enter__(self) -> Card:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def close(self) -> None:
        self.closed = getattr(self, "closed", 0) + 1

    def tokens(self, uri: Any) -> list[Token]:
        return [Token()]

    def certificates(self, token: Any, uri: Any) -> list[CardCert]:
        return [CardCert("auth", b"\x01", self.der)]

    def login(self, pin: str | None) -> None:
        if pin != self.pin:
            raise errors.PinIncorrect(errors.PinTries.UNKNOWN)

    def sign(self, key_id: bytes, data: bytes) -> tuple[SignatureScheme, bytes]:
        self.signed.append(data)
        if self.replay is not None:
            return SignatureScheme.ECDSA_SHA256, self.replay
        return SignatureScheme.ECDSA_SHA256, self.key.sign(data, ec.ECDSA(hashes.SHA256()))


class NoRevocation:
    def check(self, chain: Any, **kw: Any) -> list[Any]:
        return []


class Prompter:
    def __init__(self, pin: str = "123456") -> None:
        self.pin = pin
        self.asked = 0

    def ask_secret(self, prompt: str) -> str:
        self.asked += 1
        return self.pin

    def info(self, text: str) -> None:
        pass

    def error(self, text: str) -> None:
        pass


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> LabCA:
    return LabCA.create(
        tmp_path_factory.mktemp("ca"),
        crl_base="http://127.0.0.1:1",
        ocsp_url="http://127.0.0.1:2/",
        now=NOW,  # the tests' fixed clock, not the wall clock
    )


def make(ca: LabCA, card: Card, **auth: Any) -> CardAuthenticator:
    cfg = config.parse({"auth": {"host_name": "h", **auth}})
    counter = itertools.count()
    return CardAuthenticator(
        cfg,
        module=card,
        revocation=NoRevocation(),
        mapper=CertificateMapper(cfg.mapping.rules),
        anchors=[ca.root.cert],
        intermediates=[ca.intermediate.cert],
        now=lambda: NOW + dt.timedelta(seconds=next(counter)),
    )


def alice_card(ca: LabCA) -> Card:
    key = new_key("p256")
    cert = ca.issue_user(
        "alice",
        key.public_key(),
        not_before=NOW - dt.timedelta(days=1),
        not_after=NOW + dt.timedelta(days=30),
    )
    return Card(key, cert.public_bytes(serialization.Encoding.DER))


def test_each_login_signs_a_fresh_challenge_bound_to_host_and_service(ca: LabCA) -> None:
    card = alice_card(ca)
    auth = make(ca, card)
    for service in ("login", "login", "sudo"):
        auth.authenticate(LoginRequest(service, "h", "alice"), Prompter(), Attempt())
    a, b, c = card.signed
    assert a != b  # fresh nonce and time each time
    assert b"login" in a and b"sudo" in c and b"h" in a


def test_a_replayed_signature_does_not_log_in(ca: LabCA) -> None:
    card = alice_card(ca)
    auth = make(ca, card)
    auth.authenticate(LoginRequest("login", "h", "alice"), Prompter(), Attempt())
    old = card.key.sign(card.signed[0], ec.ECDSA(hashes.SHA256()))
    card.replay = old
    with pytest.raises(errors.ProofOfPossessionFailed):
        auth.authenticate(LoginRequest("login", "h", "alice"), Prompter(), Attempt())


def test_a_certificate_alone_never_authenticates(ca: LabCA) -> None:
    card = alice_card(ca)
    card.key = new_key("p256")  # the card holds another key than its certificate's
    with pytest.raises(errors.ProofOfPossessionFailed):
        make(ca, card).authenticate(LoginRequest("login", "h", "alice"), Prompter(), Attempt())


def test_wrong_user_is_refused_before_the_pin(ca: LabCA) -> None:
    card = alice_card(ca)
    prompter = Prompter()
    with pytest.raises(errors.UserMismatch):
        make(ca, card).authenticate(LoginRequest("login", "h", "bob"), prompter, Attempt())
    assert prompter.asked == 0 and card.signed == []


def test_the_login_time_budget_is_enforced(ca: LabCA) -> None:
    card = alice_card(ca)
    auth = make(ca, card, login_timeout=1)

    class SlowPrompter(Prompter):
        def ask_secret(self, prompt: str) -> str:
            import time

            time.sleep(1.2)
            return super().ask_secret(prompt)

    with pytest.raises(errors.LoginTimeout):
        auth.authenticate(LoginRequest("login", "h", "alice"), SlowPrompter(), Attempt())
    assert card.signed == []  # nothing signed after the budget ran out


def test_tokens_that_need_no_login_are_not_cards(ca: LabCA) -> None:
    # p11-kit's trust store shows up as a token without CKF_LOGIN_REQUIRED.
    card = alice_card(ca)
    card.tokens = lambda uri: [Token(label="System Trust", login_required=False)]  # type: ignore[method-assign]
    with pytest.raises(errors.NoCard):
        make(ca, card).authenticate(LoginRequest("login", "h", "alice"), Prompter(), Attempt())


def test_the_card_session_is_closed_unless_the_session_phase_needs_it(ca: LabCA) -> None:
    card = alice_card(ca)
    auth = make(ca, card)
    result = auth.authenticate(LoginRequest("login", "h", "alice"), Prompter(), Attempt())
    assert result.card_session is None and card.closed == 1
    kept = auth.authenticate(
        LoginRequest("login", "h", "alice"), Prompter(), Attempt(), keep_card_session=True
    )
    assert kept.card_session is card and card.closed == 1 and kept.card_key_id == b"\x01"
    with pytest.raises(errors.PinIncorrect):
        auth.authenticate(
            LoginRequest("login", "h", "alice"), Prompter("0000"), Attempt(), keep_card_session=True
        )
    assert card.closed == 2  # a failed login never leaves the card logged in
