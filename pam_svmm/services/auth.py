"""The card login pipeline: card -> PIN -> signed challenge -> chain -> revocation -> identity.

It takes plain values (a LoginRequest, a Prompter) and returns a LoginResult or raises one
of the errors in ``pam_svmm.errors``. It knows nothing about pamh; the PAM entry and the
CLI both call it, and so will the resident service.

Order matters for the card's PIN counter and for trust:
1. certificates are read from the card without a PIN and every one is *evaluated* in turn
   (it parses, chain and name constraints, mapping, PAM_USER, revocation: none of it needs
   the PIN); the first that passes is *selected*, so a revoked or unparseable certificate
   beside a good one does not lock its holder out, and no PIN try is spent on a card that
   cannot log in. When none passes, the one that got furthest says why;
2. the PIN is asked, the card signs a fresh challenge bound to host and service, and the
   signature is verified with the selected certificate's key (proof of possession) before
   anything about the certificate is *trusted*;
3. only then are the chain, revocation answers and identity found in step 1 relied on, and
   the identity from the certificate is bound to PAM_USER.
"""

from __future__ import annotations

import datetime as dt
import enum
import hashlib
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from cryptography import x509

from ..config import Config
from ..domain import certpolicy, challenge, mapping, mutual
from ..domain.audit_record import CardFacts
from ..domain.identity import Identity
from ..errors import (
    AuthFailed,
    CertificateInvalid,
    CertificateRevoked,
    HostNotVouched,
    LoginTimeout,
    NoCard,
    NoUsableCertificate,
    PinLocked,
    PinTries,
    Undecided,
)

if TYPE_CHECKING:  # the adapters are loaded by the wiring, not by importing this module
    from ..adapters.token import CardCertificate, Pkcs11Module, TokenInfo, TokenSession
    from ..domain.revocation import Decision
    from .revocation import RevocationChecker


class Prompter(Protocol):
    """The user's side of the conversation (PAM conversation, terminal, ...)."""

    def ask_secret(self, prompt: str) -> str: ...  # echo off; raises ConversationFailed

    def info(self, text: str) -> None: ...

    def error(self, text: str) -> None: ...


@dataclass(frozen=True)
class LoginRequest:
    service: str
    host: str
    pam_user: str | None = None  # None: the card decides who logs in
    tty: str = ""
    rhost: str = ""


@dataclass(frozen=True)
class LoginResult:
    user: str
    rule: str  # the mapping rule that produced the user
    card: CardFacts
    chain: tuple[x509.Certificate, ...]
    notes: tuple[str, ...] = ()  # e.g. revocation soft-failed, for the audit trail
    identity: Identity | None = None  # the directory entry (None: certificate-only mapping)
    method: str = "card"
    card_key_id: bytes = b""  # CKA_ID of the key that proved possession
    # The card's PKCS#11 session, still logged in, when the session phase needs the card
    # (volume keys); whoever takes it closes it. None otherwise.
    card_session: Any = field(default=None, compare=False, repr=False)


@dataclass
class Candidate:
    """A certificate on a token that passed every check a PIN is not needed for."""

    token: TokenInfo
    card_cert: CardCertificate
    cert: x509.Certificate
    chain: list[x509.Certificate]
    mapped: mapping.MappedIdentity
    # Its revocation decisions (chain position by position), for the audit record.
    decisions: list[tuple[x509.Certificate, Decision]] = field(default_factory=list)

    def facts(self) -> CardFacts:
        return card_facts(self.cert, self.token)


class Stage(enum.IntEnum):
    """How far a certificate got; when none passes, the furthest tells the most."""

    PARSE = 0  # the DER does not parse
    CHAIN = 1  # leaf checks, path to an anchor, name constraints
    MAPPING = 2  # who it is (certificate rules or the directory)
    USER = 3  # it is someone other than PAM_USER
    REVOCATION = 4
    PASSED = 5


@dataclass
class Verdict:
    """What the evaluation before the PIN says about one certificate on a card."""

    token: TokenInfo
    card_cert: CardCertificate
    cert: x509.Certificate | None  # None: it does not parse
    stage: Stage
    candidate: Candidate | None = None  # set when it passed
    error: AuthFailed | Undecided | None = None  # why not, when it did not
    is_ca: bool = False  # a CA certificate (an intermediate), not a login candidate
    mapped: mapping.MappedIdentity | None = None  # who it is, once known

    @property
    def card(self) -> CardFacts:
        if self.cert is not None:
            return card_facts(self.cert, self.token)
        return CardFacts(  # what is known of a certificate that does not parse
            fingerprint=hashlib.sha256(self.card_cert.der).hexdigest(),
            token=getattr(self.token, "label", ""),
            token_serial=getattr(self.token, "serial", ""),
        )

    @property
    def rank(self) -> tuple[int, bool]:
        # A known revocation tells more than an unanswered revocation question.
        return self.stage, isinstance(self.error, CertificateRevoked)

    @property
    def note(self) -> str:
        """One line for the audit record about a refused certificate."""
        what = f"certificate {self.card_cert.label!r} (sha256 {self.card.fingerprint[:16]})"
        if self.error is None:
            return f"{what}: usable"
        return f"{what} refused: {self.error.reason}: {self.error.message}"


def card_facts(cert: x509.Certificate, token: TokenInfo | None = None) -> CardFacts:
    return CardFacts(
        fingerprint=certpolicy.fingerprint(cert),
        serial=f"{cert.serial_number:x}",
        issuer=cert.issuer.rfc4514_string(),
        subject=cert.subject.rfc4514_string(),
        token=getattr(token, "label", ""),
        token_serial=getattr(token, "serial", ""),
    )


@dataclass
class Attempt:
    """What the pipeline learned so far; the audit record is written from it either way."""

    card: CardFacts = field(default_factory=CardFacts)
    user: str = ""
    notes: list[str] = field(default_factory=list)
    identity: Identity | None = None
    method: str = "card"


class Deadline:
    """The login's total time budget (invariant 7)."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._end = clock() + seconds

    def remaining(self) -> float:
        return self._end - self._clock()

    def check(self, step: str) -> float:
        left = self.remaining()
        if left <= 0:
            raise LoginTimeout(f"login took too long (at step: {step})")
        return left


def load_pem_bundle(paths: Sequence[Path]) -> list[x509.Certificate]:
    """Certificates from PEM files and folders of PEM files (the trust configuration).
    OSError, or ValueError naming the file that does not parse (whatever cryptography
    raised: a bad version is not a ValueError there)."""
    from ..domain.certpolicy import parse_pem_certificates

    out: list[x509.Certificate] = []
    for p in paths:
        files = sorted(q for q in p.iterdir() if q.is_file()) if p.is_dir() else [p]
        for f in files:
            try:
                out.extend(parse_pem_certificates(f.read_bytes()))
            except CertificateInvalid as e:
                raise ValueError(f"{f}: {e.message}") from None
    return out


class CardAuthenticator:
    """Runs the pipeline. Collaborators are passed in so the resident service can share them."""

    def __init__(
        self,
        config: Config,
        *,
        module: Pkcs11Module,
        revocation: RevocationChecker,
        mapper: mapping.IdentityMapper,
        anchors: Sequence[x509.Certificate],
        intermediates: Sequence[x509.Certificate] = (),
        now: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
        random: Callable[[int], bytes] = os.urandom,
        host_credentials: tuple[x509.Certificate, Any] | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        """``monotonic``: the clock the login's time budget runs on (tests advance it)."""
        from ..domain import pkcs11_uri

        self.config = config
        self.module = module
        self.revocation = revocation
        self.mapper = mapper
        self.anchors = list(anchors)
        self.intermediates = list(intermediates)
        self.policy = certpolicy.CertPolicy.from_config(config.trust)
        self.uri = pkcs11_uri.parse(config.pkcs11.uri)
        self.now = now
        self.random = random
        self.host_credentials = host_credentials
        self.monotonic = monotonic

    # --- public ---------------------------------------------------------------------------

    def authenticate(
        self,
        request: LoginRequest,
        prompter: Prompter,
        attempt: Attempt,
        *,
        keep_card_session: bool = False,
    ) -> LoginResult:
        """Run the pipeline. ``keep_card_session``: leave the card logged in and hand the
        session over in the result (the session phase releases volume keys with it)."""
        deadline = Deadline(self.config.auth.login_timeout, self.monotonic)
        at = self.now()
        token, candidates = self.select(request, at, deadline, attempt)
        chosen = candidates[0]
        attempt.card = chosen.facts()
        attempt.user = chosen.mapped.username
        attempt.identity = chosen.mapped.identity
        # How each certificate of the chain was found not revoked, or accepted without an
        # answer (soft-fail): asked during selection, recorded whatever happens next.
        attempt.notes.extend(d.note or d.detail for _cert, d in chosen.decisions)
        vouched = self._vouch_for_host(token, at) if self.config.mutual.enabled else None
        if vouched is not None:
            attempt.notes.append(f"host {vouched.name} vouched for by card anchor {vouched.anchor}")

        session = self.module.session(token)
        try:
            self._login(session, token, prompter, deadline, vouched)
            deadline.check("challenge")
            ch = challenge.new_challenge(
                request.host,
                request.service,
                at=at,
                nonce=self.random(self.config.auth.challenge_bytes),
            )
            data = ch.to_be_signed()
            scheme, signature = session.sign(chosen.card_cert.id, data)
            challenge.verify_possession(chosen.cert, scheme, data, signature)
            result = self._trust(request, attempt, chosen, at, deadline)
        except BaseException:
            session.close()
            raise
        if not keep_card_session:
            session.close()
            return result
        return replace(result, card_session=session)

    def _trust(
        self,
        request: LoginRequest,
        attempt: Attempt,
        chosen: Candidate,
        at: dt.datetime,
        deadline: Deadline,
    ) -> LoginResult:
        # Trust decisions, now that the card has proved it holds the key. The chain and the
        # revocation answers were found during selection at the same instant `at`; they are
        # only relied on now.
        chain = chosen.chain
        user = mapping.check_user(request.pam_user, chosen.mapped)
        attempt.user = user
        return LoginResult(
            user=user,
            rule=chosen.mapped.rule,
            card=attempt.card,
            chain=tuple(chain),
            notes=tuple(attempt.notes),
            identity=chosen.mapped.identity,
            card_key_id=chosen.card_cert.id,
        )

    # --- steps ----------------------------------------------------------------------------

    def _tokens(self, deadline: Deadline) -> list[TokenInfo]:
        tokens = self._login_tokens()
        if not tokens and self.config.pkcs11.wait_for_card > 0:
            wait = min(self.config.pkcs11.wait_for_card, deadline.remaining())
            self.module.wait_for_token(self.uri, wait)
            tokens = self._login_tokens()
        if not tokens:
            raise NoCard("no smart card found")
        return tokens

    def _login_tokens(self) -> list[TokenInfo]:
        # A login card protects its key with a PIN. Tokens that need no login (p11-kit's
        # "System Trust" store of CA certificates, behind the default proxy) hold no key to
        # prove possession with, and are not cards to log in with.
        return [t for t in self.module.tokens(self.uri) if t.login_required]

    def select(
        self,
        request: LoginRequest,
        at: dt.datetime,
        deadline: Deadline | None = None,
        attempt: Attempt | None = None,
    ) -> tuple[TokenInfo, list[Candidate]]:
        """The token and the first certificate that passes everything but the PIN.

        The certificates refused on the way go to ``attempt.notes`` (the audit record).
        When none passes, raise the error of the one that got furthest (the first of
        those): a revoked card of the user before someone else's card, someone else's
        card before one nobody maps, that before an untrusted or malformed certificate.
        """
        refused: list[Verdict] = []
        for verdict in self.evaluate(request, at, deadline):
            if verdict.is_ca:
                continue
            if verdict.candidate is not None:
                if attempt is not None:
                    attempt.notes.extend(v.note for v in refused)
                return verdict.token, [verdict.candidate]
            refused.append(verdict)
        if not refused:
            raise NoUsableCertificate("the card holds no certificate usable for login")
        best = refused[0]
        for verdict in refused[1:]:
            if verdict.rank > best.rank:
                best = verdict
        if attempt is not None:
            attempt.card = best.card
            attempt.notes.extend(v.note for v in refused if v is not best)
        assert best.error is not None  # a refused verdict always carries its error
        raise best.error

    def evaluate(
        self,
        request: LoginRequest,
        at: dt.datetime,
        deadline: Deadline | None = None,
        *,
        tokens: Sequence[TokenInfo] | None = None,
    ) -> Iterator[Verdict]:
        """A verdict on every certificate of every login token (or of ``tokens``), in card
        order, lazily: the login stops at the first that passes, `svmm card list` shows all."""
        deadline = deadline or Deadline(self.config.auth.login_timeout, self.monotonic)
        for token in self._tokens(deadline) if tokens is None else tokens:
            deadline.check("reading certificates")
            card_certs = self.module.certificates(token, self.uri)
            parsed: list[tuple[CardCertificate, x509.Certificate]] = []
            for cc in card_certs:
                try:
                    parsed.append((cc, certpolicy.parse_certificate(cc.der)))
                except CertificateInvalid as e:
                    # Refused on its own; the card's other certificates still count.
                    yield Verdict(token, cc, None, Stage.PARSE, error=e)
            # CA certificates on the card may serve as intermediates (never as anchors).
            ca_certs = [c for _, c in parsed if _is_ca(c)]
            for cc, cert in parsed:
                if _is_ca(cert):
                    yield Verdict(token, cc, cert, Stage.PARSE, is_ca=True)
                    continue
                yield self._judge(request, token, cc, cert, ca_certs, at, deadline)

    def _judge(
        self,
        request: LoginRequest,
        token: TokenInfo,
        cc: CardCertificate,
        cert: x509.Certificate,
        ca_certs: Sequence[x509.Certificate],
        at: dt.datetime,
        deadline: Deadline,
    ) -> Verdict:
        stage = Stage.CHAIN
        ident: mapping.MappedIdentity | None = None
        try:
            deadline.check("certificate checks")
            chain = certpolicy.validate_chain(
                cert, [*self.intermediates, *ca_certs], self.anchors, at=at, policy=self.policy
            )
            stage = Stage.MAPPING
            ident = self.mapper.map(cert)
            stage = Stage.USER
            if request.pam_user is not None:
                mapping.check_user(request.pam_user, ident)
            stage = Stage.REVOCATION
            deadline.check("revocation")
            decisions = self.revocation.check(chain, at=at, budget=deadline.remaining())
        except LoginTimeout:
            raise  # the login's budget is spent: nothing more is evaluated
        except (AuthFailed, Undecided) as e:
            # "Could not decide" about this certificate (its directory entry, its revocation)
            # must not hide the next one: a cached user's card beside an uncached one.
            return Verdict(token, cc, cert, stage, error=e, mapped=ident)
        candidate = Candidate(token, cc, cert, chain, ident, list(decisions))
        return Verdict(token, cc, cert, Stage.PASSED, candidate=candidate, mapped=ident)

    def _vouch_for_host(self, token: TokenInfo, at: dt.datetime) -> mutual.VouchedHost:
        """Mutual authentication, before any PIN: the card's anchor must vouch for us."""
        if self.host_credentials is None:
            raise HostNotVouched("mutual authentication is on but this host has no credentials")
        label = self.config.mutual.card_anchor_label
        anchors = []
        for cc in self.module.certificates(token, None):
            if cc.label == label:
                anchors.append(certpolicy.parse_certificate(cc.der))
        host_cert, host_key = self.host_credentials
        return mutual.verify_host(
            card_anchors=anchors,
            host_cert=host_cert,
            host_key=host_key,
            intermediates=self.intermediates,
            at=at,
            nonce=self.random(self.config.auth.challenge_bytes),
        )

    def _login(
        self,
        session: TokenSession,
        token: TokenInfo,
        prompter: Prompter,
        deadline: Deadline,
        vouched: mutual.VouchedHost | None = None,
    ) -> None:
        tries = getattr(token, "pin_tries", PinTries.UNKNOWN)
        if tries is PinTries.LOCKED:
            raise PinLocked(f"the PIN of card '{token.label}' is locked")
        if tries is PinTries.FINAL_TRY:
            prompter.error("Warning: this is the final PIN try before the card locks.")
        elif tries is PinTries.COUNT_LOW:
            prompter.error("Warning: few PIN tries are left on this card.")
        deadline.check("PIN")
        if getattr(token, "protected_auth_path", False) and self.config.pkcs11.allow_pinpad:
            prompter.info(f"Enter the PIN for '{token.label}' on the reader's keypad.")
            session.login(None)
            return
        template = self.config.pkcs11.pin_prompt
        host = vouched.name if vouched else ""
        if vouched and "{host}" not in template:
            template = "[host {host}, vouched for by your card] " + template
        prompt = template.format(token=token.label, host=host)
        pin = prompter.ask_secret(prompt)
        deadline.check("PIN")
        try:
            session.login(pin)
        finally:
            del pin


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False
