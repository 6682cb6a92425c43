"""The login pipeline's order and freshness rules, with an in-memory card that signs with a real
key (the same pipeline runs against SoftHSM2 in tests/integration/test_login.py)."""

from __future__ import annotations

import datetime as dt
import hashlib
import itertools
import time
from dataclasses import dataclass, field
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from pam_svmm import config, errors
from pam_svmm.domain.mapping import CertificateMapper, MappedIdentity
from pam_svmm.domain.signing import SignatureScheme
from pam_svmm.services.auth import Attempt, CardAuthenticator, LoginRequest
from svmm_lab.pki import Issued, LabCA, new_key

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
    # Further objects on the card, after the first: (id, key or None for a CA, DER).
    more: list[tuple[bytes, Any, bytes]] = field(default_factory=list)
    token: Token = field(default_factory=Token)

    def session(self, token: Any) -> Card:
        return self

    def __enter__(self) -> Card:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def close(self) -> None:
        self.closed = getattr(self, "closed", 0) + 1

    def tokens(self, uri: Any) -> list[Token]:
        return [self.token]

    def certificates(self, token: Any, uri: Any) -> list[CardCert]:
        more = [CardCert(f"cert {i.hex()}", i, der) for i, _k, der in self.more]
        return [CardCert("auth", b"\x01", self.der), *more]

    def login(self, pin: str | None) -> None:
        if pin != self.pin:
            raise errors.PinIncorrect(errors.PinTries.UNKNOWN)

    def sign(self, key_id: bytes, data: bytes) -> tuple[SignatureScheme, bytes]:
        self.signed.append(data)
        if self.replay is not None:
            return SignatureScheme.ECDSA_SHA256, self.replay
        key = self.key if key_id == b"\x01" else next(k for i, k, _ in self.more if i == key_id)
        return SignatureScheme.ECDSA_SHA256, key.sign(data, ec.ECDSA(hashes.SHA256()))


class Reader:
    """Several cards in the reader: each token answers for its own card."""

    def __init__(self, *cards: Card) -> None:
        self.cards = {c.token.label: c for c in cards}

    def tokens(self, uri: Any) -> list[Token]:
        return [c.token for c in self.cards.values()]

    def certificates(self, token: Any, uri: Any) -> list[CardCert]:
        return self.cards[token.label].certificates(token, uri)

    def session(self, token: Any) -> Card:
        return self.cards[token.label]


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


def make(
    ca: LabCA,
    card: Card | Reader,
    *,
    revocation: Any = None,
    mapper: Any = None,
    monotonic: Any = time.monotonic,
    **auth: Any,
) -> CardAuthenticator:
    cfg = config.parse({"auth": {"host_name": "h", **auth}})
    counter = itertools.count()
    return CardAuthenticator(
        cfg,
        module=card,  # type: ignore[arg-type]
        revocation=revocation or NoRevocation(),
        mapper=mapper or CertificateMapper(cfg.mapping.rules),
        anchors=[ca.root.cert],
        intermediates=[ca.intermediate.cert],
        now=lambda: NOW + dt.timedelta(seconds=next(counter)),
        monotonic=monotonic,
    )


def user_cert(ca: LabCA, name: str = "alice", **kw: Any) -> tuple[Any, bytes]:
    """A key and a valid certificate of ``name`` (``kw`` for issue_user)."""
    key = new_key("p256")
    kw = {"not_before": NOW - dt.timedelta(days=1), "not_after": NOW + dt.timedelta(days=30)} | kw
    cert = ca.issue_user(name, key.public_key(), **kw)
    return key, cert.public_bytes(serialization.Encoding.DER)


def alice_card(ca: LabCA) -> Card:
    return Card(*user_cert(ca))


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


class Clock:
    """A monotonic clock the test advances instead of sleeping."""

    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_the_login_time_budget_is_enforced(ca: LabCA) -> None:
    card = alice_card(ca)
    clock = Clock()
    auth = make(ca, card, login_timeout=1, monotonic=clock)

    class SlowPrompter(Prompter):
        def ask_secret(self, prompt: str) -> str:
            clock.t += 1.2  # the person took 1.2 s to type the PIN
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


# --- every certificate on the card is judged before the PIN; the first that passes is used --


class Revoked:
    """Revocation that says "revoked" for some serials; records whom it was asked about."""

    def __init__(self, *serials: int) -> None:
        self.serials = set(serials)
        self.asked: list[int] = []

    def check(self, chain: Any, **kw: Any) -> list[Any]:
        serial = chain[0].serial_number
        self.asked.append(serial)
        if serial in self.serials:
            raise errors.CertificateRevoked(f"serial {serial:X} is revoked per crl: test")
        return []


def serial_of(der: bytes) -> int:
    return x509.load_der_x509_certificate(der).serial_number


def duplicate_extension(ca: LabCA, der: bytes) -> bytes:
    """``der`` re-issued with its basicConstraints twice: cryptography parses the
    certificate but raises DuplicateExtension when its extensions are read."""
    base = x509.load_der_x509_certificate(der)
    b = (
        x509.CertificateBuilder()
        .subject_name(base.subject)
        .issuer_name(base.issuer)
        .public_key(base.public_key())  # type: ignore[arg-type]
        .serial_number(base.serial_number)
        .not_valid_before(base.not_valid_before_utc)
        .not_valid_after(base.not_valid_after_utc)
    )
    for ext in base.extensions:
        b = b.add_extension(ext.value, critical=ext.critical)
    placeholder = x509.ObjectIdentifier("2.5.29.99")  # same DER length as 2.5.29.19
    bc = x509.BasicConstraints(ca=False, path_length=None).public_bytes()
    b = b.add_extension(x509.UnrecognizedExtension(placeholder, bc), critical=True)
    out = b.sign(ca.intermediate.key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)
    assert out.count(b"\x06\x03\x55\x1d\x63") == 1
    return out.replace(b"\x06\x03\x55\x1d\x63", b"\x06\x03\x55\x1d\x13")


def test_a_certificate_that_does_not_parse_is_refused_and_the_next_one_is_used(
    ca: LabCA,
) -> None:
    key, der = user_cert(ca)
    broken = duplicate_extension(ca, user_cert(ca)[1])
    card = Card(new_key("p256"), broken, more=[(b"\x02", key, der)])
    attempt = Attempt()
    result = make(ca, card).authenticate(LoginRequest("login", "h", "alice"), Prompter(), attempt)
    assert result.user == "alice" and result.card_key_id == b"\x02"
    # The refused certificate is in the audit record's notes, with its reason.
    assert any("certificate_malformed" in n and "Duplicate" in n for n in attempt.notes)


def test_a_card_holding_only_a_certificate_that_does_not_parse_is_refused_as_malformed(
    ca: LabCA,
) -> None:
    broken = duplicate_extension(ca, user_cert(ca)[1])
    card, prompter, attempt = Card(new_key("p256"), broken), Prompter(), Attempt()
    with pytest.raises(errors.CertificateInvalid) as e:
        make(ca, card).authenticate(LoginRequest("login", "h", "alice"), prompter, attempt)
    assert e.value.reason == "certificate_malformed"
    assert attempt.card.fingerprint == hashlib.sha256(broken).hexdigest()
    assert prompter.asked == 0


def test_a_revoked_first_certificate_does_not_hide_a_valid_second_one(ca: LabCA) -> None:
    old_key, old = user_cert(ca)
    key, der = user_cert(ca)
    card, prompter, attempt = Card(old_key, old, more=[(b"\x02", key, der)]), Prompter(), Attempt()
    revocation = Revoked(serial_of(old))
    result = make(ca, card, revocation=revocation).authenticate(
        LoginRequest("login", "h", "alice"), prompter, attempt
    )
    assert result.card_key_id == b"\x02" and prompter.asked == 1
    assert revocation.asked == [serial_of(old), serial_of(der)]  # each once, before the PIN
    assert any("certificate_revoked" in n for n in attempt.notes)


def test_a_card_whose_certificate_is_revoked_is_refused_before_the_pin(ca: LabCA) -> None:
    key, der = user_cert(ca)
    card, prompter, attempt = Card(key, der), Prompter(), Attempt()
    with pytest.raises(errors.CertificateRevoked):
        make(ca, card, revocation=Revoked(serial_of(der))).authenticate(
            LoginRequest("login", "h", "alice"), prompter, attempt
        )
    assert prompter.asked == 0 and card.signed == []
    assert attempt.card.serial == f"{serial_of(der):x}"


def test_when_no_certificate_passes_the_one_that_got_furthest_tells_why(ca: LabCA) -> None:
    expired_key, expired = user_cert(
        ca, not_before=NOW - dt.timedelta(days=30), not_after=NOW - dt.timedelta(days=1)
    )
    bob_key, bob = user_cert(ca, "bob")
    key, revoked = user_cert(ca)
    card = Card(expired_key, expired, more=[(b"\x02", bob_key, bob), (b"\x03", key, revoked)])
    prompter, attempt = Prompter(), Attempt()
    with pytest.raises(errors.CertificateRevoked):
        make(ca, card, revocation=Revoked(serial_of(revoked))).authenticate(
            LoginRequest("login", "h", "alice"), prompter, attempt
        )
    assert attempt.card.serial == f"{serial_of(revoked):x}" and prompter.asked == 0
    reasons = " ".join(attempt.notes)
    assert "certificate_expired" in reasons and "user_mismatch" in reasons


def test_a_certificate_outside_its_cas_name_constraints_does_not_log_in(ca: LabCA) -> None:
    # A CA constrained to rfc822Name corp.example issues a leaf without SAN whose subject
    # emailAddress is admin@evil.org; the e-mail rule would map it to "admin".
    ca_key = new_key("p256")
    constrained = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Corp CA")]))
        .issuer_name(ca.root.cert.subject)
        .public_key(ca_key.public_key())  # type: ignore[arg-type]
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - dt.timedelta(days=10))
        .not_valid_after(NOW + dt.timedelta(days=300))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, True, True, False, False), critical=True
        )
        .add_extension(x509.NameConstraints([x509.RFC822Name("corp.example")], None), critical=True)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.root.cert.public_key()),  # type: ignore[arg-type]
            critical=False,
        )
        .sign(ca.root.key, hashes.SHA256())
    )
    key, der = user_cert(
        ca,
        "admin",
        issuer=Issued(constrained, ca_key),
        extra_subject=[x509.NameAttribute(NameOID.EMAIL_ADDRESS, "admin@evil.org")],
    )
    ca_der = constrained.public_bytes(serialization.Encoding.DER)
    card, prompter = Card(key, der, more=[(b"\x09", None, ca_der)]), Prompter()
    rules = [config.MappingRule(config.MappingKind.EMAIL, strip_domain=True)]
    with pytest.raises(errors.CertificateUntrusted) as e:
        make(ca, card, mapper=CertificateMapper(rules)).authenticate(
            LoginRequest("login", "h", None), prompter, Attempt()
        )
    assert e.value.reason == "name_constraints" and "admin@evil.org" in e.value.message
    assert prompter.asked == 0


class OfflineMapper:
    """The directory is down; the offline cache knows only some certificates."""

    def __init__(self, cached: dict[int, str]) -> None:
        self.cached = cached

    def map(self, cert: x509.Certificate) -> MappedIdentity:
        name = self.cached.get(cert.serial_number)
        if name is None:
            raise errors.DirectoryUnavailable("directory down; no fresh offline entry")
        return MappedIdentity(name, "offline-cache", "fp")


@pytest.mark.parametrize("uncached_first", [True, False])
def test_an_uncached_second_card_does_not_block_a_cached_users_offline_login(
    ca: LabCA, uncached_first: bool
) -> None:
    bob = Card(*user_cert(ca, "bob"), token=Token("bob ID card", "0002"))
    carol = Card(*user_cert(ca, "carol"), token=Token("carol ID card", "0003"))
    cards = (carol, bob) if uncached_first else (bob, carol)
    mapper = OfflineMapper({serial_of(bob.der): "bob"})
    for user in ("bob", None):
        result = make(ca, Reader(*cards), mapper=mapper).authenticate(
            LoginRequest("login", "h", user), Prompter(), Attempt()
        )
        assert result.user == "bob" and result.card.token == "bob ID card"
    # The uncached card alone: we could not find out who it is (not a refusal).
    with pytest.raises(errors.DirectoryUnavailable):
        make(ca, Reader(carol), mapper=mapper).authenticate(
            LoginRequest("login", "h", "carol"), Prompter(), Attempt()
        )


def test_the_time_budget_still_ends_the_evaluation(ca: LabCA) -> None:
    clock = Clock()

    class SlowMapper(CertificateMapper):
        def map(self, cert: x509.Certificate) -> MappedIdentity:
            clock.t += 1.1  # a directory that took 1.1 s to answer
            return super().map(cert)

    card = Card(*user_cert(ca), more=[(b"\x02", *user_cert(ca))])
    cfg_rules = config.parse({}).mapping.rules
    with pytest.raises(errors.LoginTimeout):
        make(ca, card, mapper=SlowMapper(cfg_rules), login_timeout=1, monotonic=clock).authenticate(
            LoginRequest("login", "h", "alice"), Prompter(), Attempt()
        )
