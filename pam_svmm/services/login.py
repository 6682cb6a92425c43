"""Wires the login pipeline from configuration and audits every attempt.

`LoginService` is what entry points hold: the PAM module builds one per process (per config
file), the CLI one per command, and the resident service keeps one alive so the PKCS#11
module, anchors and CRL indexes stay loaded.
"""

from __future__ import annotations

import datetime as dt
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography import x509

from ..adapters.audit_log import AuditLog
from ..config import Config
from ..domain import mapping
from ..domain.audit_record import AuditRecord, CardFacts, Outcome
from ..errors import AuthFailed, NoCard, PinLocked, SvmmError, Undecided
from .auth import Attempt, CardAuthenticator, LoginRequest, LoginResult, Prompter, load_pem_bundle

if TYPE_CHECKING:
    from ..adapters.directory import DirectoryClient
    from ..adapters.identity_cache import IdentityCache
    from ..adapters.token import Pkcs11Module
    from ..domain.identity import Identity
    from .dmcrypt import DmcryptVolumes
    from .key_release import KeyRelease
    from .policy import PolicyService
    from .revocation import RevocationChecker


SPARE_MAX_AGE = 60.0  # seconds a pre-started card helper waits; older ones start afresh


class _Watched:
    """A prompter that remembers whether the login used it (asked a PIN, said anything)."""

    def __init__(self, prompter: Prompter) -> None:
        self._prompter = prompter
        self.used = False

    def __getattr__(self, name: str) -> Any:
        self.used = True
        return getattr(self._prompter, name)


def load_intermediates(folder: Path | None) -> list[x509.Certificate]:
    """The certificates of ``trust.intermediates_dir`` (none when unset or absent). A folder
    or file that cannot be read (root's alone, and a user asks) or holds no PEM is a
    configuration error naming it, never an internal one."""
    from ..errors import ConfigError

    if folder is None or not folder.exists():
        return []
    try:
        return load_pem_bundle([folder])
    except OSError as e:
        where = e.filename or folder
        raise ConfigError("trust.intermediates_dir", f"cannot read {where}: {e.strerror}") from None
    except ValueError as e:
        raise ConfigError(
            "trust.intermediates_dir", f"{folder}: not PEM certificates ({e})"
        ) from None


@dataclass(frozen=True)
class CertificateVerdict:
    user: str
    rule: str
    chain: tuple[x509.Certificate, ...]
    notes: tuple[str, ...]


def outcome_of(error: BaseException) -> Outcome:
    if isinstance(error, AuthFailed | PinLocked):
        return Outcome.FAILURE
    if isinstance(error, Undecided):
        return Outcome.UNDECIDED
    return Outcome.ERROR


def reason_of(error: BaseException) -> str:
    return error.reason if isinstance(error, SvmmError) else f"internal:{type(error).__name__}"


class LoginService:
    def __init__(
        self,
        config: Config,
        *,
        now: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
        card_helper: bool = False,
    ) -> None:
        """``card_helper``: each card login runs the PKCS#11 module in a helper process of
        its own (adapters/card_helper.py); the login paths (pam/entry.py, in-process and in
        svmmd) set it. The CLI's card commands use ``module`` in their own process."""
        self.config = config
        self.now = now
        self.card_helper = card_helper
        # Inside svmmd: its Launcher. Requests go to it directly, never over its own socket.
        self.local_launcher: Any = None
        # Inside svmmd: keep one card helper started ahead of the next login (its interpreter
        # start and module load, ~70 ms here, are then off that login's path).
        self.prefork = False
        self._spare: tuple[float, Any, int] | None = None
        self._spare_lock = threading.Lock()
        self._spare_starting = False  # one spare at a time: logins together start one each
        self._forker: Any = None  # svmmd's card helper forker, started at the first login
        self._early: Any = None  # a PAM process's helper, started before its imports
        self._card_generation = 0  # card events seen (card_changed); a spare is of one

    def adopt_helper(self, helper: Any) -> None:
        """The next login's card helper, started early by the PAM process (pam/entry.py)."""
        old, self._early = self._early, helper
        if old is not None:
            old.close()

    def close_early(self) -> None:
        """A helper started early that no login took (the call failed before the card)."""
        early, self._early = self._early, None
        if early is not None:
            early.close()

    # Collaborators are built on first use: a login needs all of them, `svmm card list`
    # needs only the module, and nothing is loaded at import time.
    @cached_property
    def module(self) -> Pkcs11Module:
        from ..adapters.token import Pkcs11Module

        return Pkcs11Module(self.config.pkcs11.module)

    @cached_property
    def anchors(self) -> list[x509.Certificate]:
        from ..errors import ConfigError

        if not self.config.trust.anchors:
            raise ConfigError("trust.anchors", "no trust anchor configured")
        try:
            anchors = load_pem_bundle(self.config.trust.anchors)
        except (OSError, ValueError) as e:
            raise ConfigError("trust.anchors", f"cannot load: {e}") from None
        if not anchors:
            raise ConfigError("trust.anchors", "the files hold no certificate")
        return anchors

    @cached_property
    def intermediates(self) -> list[x509.Certificate]:
        return load_intermediates(self.config.trust.intermediates_dir)

    @cached_property
    def revocation(self) -> RevocationChecker:
        from ..adapters.crl_store import CrlStore
        from ..adapters.fetch import HttpFetcher
        from .revocation import RevocationChecker

        rc = self.config.revocation
        fetcher = HttpFetcher()
        store = CrlStore(
            rc.cache_dir,
            fetcher=fetcher if rc.crl_fetch else None,
            skew=rc.clock_skew,
            grace=rc.crl_grace,
        )
        return RevocationChecker(rc, fetcher=fetcher, store=store, clock=self.now)

    @cached_property
    def directory(self) -> DirectoryClient:
        from ..adapters.directory import DirectoryClient, read_secret_file

        d = self.config.directory
        password = read_secret_file(d.bind_password_file) if d.bind_password_file else None
        return DirectoryClient(d, bind_password=password)

    @cached_property
    def identity_cache(self) -> IdentityCache:
        from ..adapters.identity_cache import IdentityCache

        d = self.config.directory
        return IdentityCache(d.cache_dir, d.cache_max_age)

    @cached_property
    def mapper(self) -> mapping.IdentityMapper:
        """The directory decides who a certificate is when one is configured; else the
        certificate's own names do (mapping rules)."""
        if not self.config.directory.enabled:
            return mapping.CertificateMapper(self.config.mapping.rules)
        from .identity import DirectoryMapper

        return DirectoryMapper(self.config, self.directory, self.identity_cache, now=self.now)

    @cached_property
    def audit(self) -> AuditLog:
        a = self.config.audit
        return AuditLog(
            a.path,
            syslog_mirror=a.syslog,
            seal_key=a.seal_key,
            seal_every=a.seal_every,
            disk_full_action=a.disk_full_action,
        )

    @cached_property
    def host_credentials(self) -> tuple[x509.Certificate, Any] | None:
        """This host's certificate and key, for mutual authentication (root-only key)."""
        m = self.config.mutual
        if not m.enabled or m.host_cert is None or m.host_key is None:
            return None
        from cryptography.hazmat.primitives import serialization

        from ..domain.certpolicy import PARSE_ERRORS
        from ..errors import ConfigError

        try:
            cert = x509.load_pem_x509_certificate(m.host_cert.read_bytes())
        except OSError as e:
            raise ConfigError("mutual.host_cert", f"cannot load: {e}") from None
        except PARSE_ERRORS as e:
            raise ConfigError("mutual.host_cert", f"cannot load: {e}") from None
        try:
            key = serialization.load_pem_private_key(m.host_key.read_bytes(), password=None)
        except (OSError, ValueError, TypeError) as e:
            raise ConfigError("mutual.host_key", f"cannot load: {type(e).__name__}") from None
        return cert, key

    def login_module(self) -> Any:
        """The card access of one login: a new helper process, or this process's module."""
        if not self.card_helper:
            return self.module
        early, self._early = self._early, None
        if early is not None:
            if early.alive():
                return early
            early.close()
        if not self.prefork:
            return self._new_helper()
        with self._spare_lock:
            spare, self._spare = self._spare, None
        self._start_spare()
        if spare is not None:
            started, helper, generation = spare
            fresh = generation == self._card_generation and helper.alive()
            if fresh and time.monotonic() - started < SPARE_MAX_AGE:
                helper.started_ahead = True  # card_login: what it saw may be stale
                return helper
            helper.close()
        return self._new_helper()

    def _new_helper(self) -> Any:
        from ..adapters.card_helper import CardHelper, HelperForker

        p = self.config.pkcs11
        forker = None
        if self.prefork:  # svmmd: forked from one process that has the card code imported
            with self._spare_lock:
                if self._forker is None:
                    self._forker = HelperForker(
                        pass_environment=p.pass_environment, user=p.helper_user
                    )
                forker = self._forker
        return CardHelper(
            p.module,
            pass_environment=p.pass_environment,
            user=p.helper_user,
            timeout=self.config.auth.login_timeout,
            forker=forker,
        )

    def _start_spare(self) -> None:
        """Start the next login's helper, unless one is ready or being started: logins that
        arrive together each start their own, and one spare behind them is enough."""
        with self._spare_lock:
            if self._spare is not None or self._spare_starting:
                return
            self._spare_starting = True

        def start() -> None:
            helper = None
            generation = self._card_generation  # before the module is loaded
            try:
                helper = self._new_helper()
            except SvmmError:
                pass  # the login that needs it starts its own and says why
            finally:
                with self._spare_lock:  # nobody else sets a spare while this one starts
                    self._spare_starting = False
                    if helper is not None:
                        self._spare = (time.monotonic(), helper, generation)

        threading.Thread(target=start, name="svmm-card-spare", daemon=True).start()

    def drop_spare(self) -> None:
        """Close the helper started ahead (it loaded the module before a card change)."""
        with self._spare_lock:
            spare, self._spare = self._spare, None
        if spare is not None:
            spare[1].close()

    def card_changed(self) -> None:
        """A card left a reader or came back (svmmd's card watch): the helper started ahead
        loaded the module before, and may hold the card that left (OpenSC then answers its
        login CKR_DEVICE_REMOVED after the PIN). The next login closes it and starts its own;
        not here and now: closing it means a C_Finalize while the reader is going away."""
        with self._spare_lock:
            self._card_generation += 1

    def close_spare(self) -> None:
        """Close the helper started ahead and the forker (logins under way keep theirs)."""
        with self._spare_lock:
            spare, self._spare = self._spare, None
            forker, self._forker = self._forker, None
        if spare is not None:
            spare[1].close()
        if forker is not None:
            forker.close()

    def authenticator(self, module: Any = None) -> CardAuthenticator:
        return CardAuthenticator(
            self.config,
            module=self.module if module is None else module,
            revocation=self.revocation,
            mapper=self.mapper,
            anchors=self.anchors,
            intermediates=self.intermediates,
            now=self.now,
            random=os.urandom,
            host_credentials=self.host_credentials,
        )

    def host_name(self) -> str:
        return self.config.auth.host_name or os.uname().nodename

    # --- checks without a card -----------------------------------------------------------

    def verify_certificate(
        self,
        cert: x509.Certificate,
        *,
        extra_intermediates: list[x509.Certificate] | None = None,
        at: dt.datetime | None = None,
        step: Callable[[str, str], None] = lambda name, detail: None,
    ) -> CertificateVerdict:
        """The checks a login applies to a certificate, minus the card (`svmm cert verify`).

        ``step`` is told each check that passed; the first failure raises its error.
        """
        from ..domain import certpolicy

        at = at or self.now()
        policy = certpolicy.CertPolicy.from_config(self.config.trust)
        chain = certpolicy.validate_chain(
            cert,
            [*self.intermediates, *(extra_intermediates or [])],
            self.anchors,
            at=at,
            policy=policy,
        )
        step("chain", " -> ".join(c.subject.rfc4514_string() for c in chain))
        notes: list[str] = []
        for checked, decision in self.revocation.check(chain, at=at):
            note = getattr(decision, "note", "") or getattr(decision, "detail", "")
            step("revocation", f"{checked.subject.rfc4514_string()}: {note or 'good'}")
            if getattr(decision, "note", ""):
                notes.append(decision.note)
        ident = self.mapper.map(cert)
        step("identity", f"{ident.username} (rule {ident.rule})")
        return CertificateVerdict(
            user=ident.username, rule=ident.rule, chain=tuple(chain), notes=tuple(notes)
        )

    # --- the login ------------------------------------------------------------------------

    def card_login(self, request: LoginRequest, prompter: Prompter) -> LoginResult:
        """Authenticate with the card; write one audit record whatever happens."""
        attempt = Attempt(user=request.pam_user or "")
        helper = None
        keep = self.config.volumes.enabled
        try:
            module = self.login_module()
            helper = module if self.card_helper else None
            watched = _Watched(prompter)
            try:
                result = self.authenticator(module).authenticate(
                    request, watched, attempt, keep_card_session=keep
                )
            except NoCard:
                # A helper started ahead (svmmd's spare) loaded the module before the reader
                # last changed: to it a card swapped in since is "removed" (OpenSC answers
                # CKR_DEVICE_REMOVED). Nothing was asked yet: once more, with a helper
                # started now; a card really absent is "no card" again.
                if helper is None or watched.used or not getattr(helper, "started_ahead", False):
                    raise
                helper.close()
                self.drop_spare()
                attempt = Attempt(user=request.pam_user or "")
                module = helper = self.login_module()
                result = self.authenticator(module).authenticate(
                    request, prompter, attempt, keep_card_session=keep
                )
        except BaseException as e:
            if helper is not None:
                helper.close()
            # The notes say what else was refused on the card, and why.
            detail = "; ".join([_detail(e), *attempt.notes])
            self.audit_event("auth", request, attempt, outcome_of(e), reason_of(e), detail)
            raise
        if helper is not None:
            if result.card_session is None:
                helper.close()
            else:
                result.card_session.owns_helper = True  # it ends with the kept session
        self.audit_event("auth", request, attempt, Outcome.SUCCESS, "ok", "; ".join(result.notes))
        return result

    def password_allowed(self, service: str) -> bool:
        from .password import password_allowed

        return password_allowed(self.config, service)

    def password_login(self, request: LoginRequest, prompter: Prompter) -> LoginResult:
        """ID/password against the directory; one audit record whatever happens."""
        from .password import PasswordAuthenticator

        attempt = Attempt(user=request.pam_user or "", method="password")
        try:
            result = PasswordAuthenticator(self.config, self.directory).authenticate(
                request, prompter, attempt
            )
        except BaseException as e:
            self.audit_event("auth", request, attempt, outcome_of(e), reason_of(e), _detail(e))
            raise
        self.audit_event("auth", request, attempt, Outcome.SUCCESS, "ok")
        return result

    def account(self, request: LoginRequest, result: LoginResult | None) -> bool:
        """Account management: is this account usable now?

        ``result`` is this process's own login of the user, if any. Returns False when this
        module has nothing to say (not a directory user and not logged in by us); raises
        AccountDisabled / AccountExpired / DirectoryUnavailable; audits every decision.
        """
        identity = result.identity if result else None
        name = request.pam_user or (result.user if result else "")
        if identity is None and result is None:
            if not self.config.directory.enabled or not name:
                return False
            identity = self._identity_by_name(name)
            if identity is None:
                return False
        attempt = Attempt(
            card=result.card if result else CardFacts(),
            user=name,
            identity=identity,
            method=result.method if result else "",
        )
        try:
            if identity is not None:
                from .identity import require_active

                require_active(identity)
            self._check_host_login(request, identity)
        except BaseException as e:
            self.audit_event("account", request, attempt, outcome_of(e), reason_of(e), _detail(e))
            raise
        reason = "card_login" if result and result.method == "card" else "active"
        self.audit_event("account", request, attempt, Outcome.SUCCESS, reason)
        return True

    def launcher_call(self, request: dict[str, Any]) -> dict[str, Any]:
        if self.local_launcher is not None:
            import json

            from ..adapters.launcher_client import PROTOCOL

            line = json.dumps({"version": PROTOCOL, **request}).encode()
            reply = self.local_launcher.handle(0, line)
            return dict(json.loads(reply.to_json()))
        from ..adapters.launcher_client import call

        return call(self.config.launcher.socket, request)

    @cached_property
    def key_release(self) -> KeyRelease | DmcryptVolumes:
        """The session's volume hook: keys handed to svmmd (vmm) or mappings (dm-crypt)."""
        from ..config import VolumeMode
        from .key_release import KeyRelease

        if self.config.volumes.mode is VolumeMode.DMCRYPT:
            from .dmcrypt import DmcryptVolumes

            return DmcryptVolumes(self.config, now=self.now)
        hold = self.local_launcher.hold_keys if self.local_launcher is not None else None
        return KeyRelease(self.config, send=self.launcher_call, hold=hold)

    @cached_property
    def policy(self) -> PolicyService:
        from .policy import PolicyService

        directory = self.directory if self.config.directory.enabled else None
        return PolicyService(
            self.config,
            anchors=self.anchors,
            intermediates=self.intermediates,
            directory=directory,
            now=self.now,
        )

    def audit_policy_loads(self, service: str = "") -> None:
        """One record per policy load since the last call that is news: a bundle accepted
        (its version and digest differ from the state's), a candidate refused, no policy at
        all. A load that found the accepted bundle again (``unchanged``, what nearly every
        login's load finds) is not recorded: it changed nothing."""
        from ..adapters.policy_store import LoadEvent

        for load in self.policy.take_loads():
            if load.event is LoadEvent.UNCHANGED and load.problem is None:
                continue
            self.audit.write(self.policy.audit_record(load, service=service))

    def _check_host_login(self, request: LoginRequest, identity: Identity | None) -> None:
        """The policy's rule for logging in on this host through this PAM service."""
        if not self.config.policy.enabled:
            return
        from ..errors import LoginNotAllowed

        roles = identity.roles if identity else ()
        try:
            decision = self.policy.host_login(request.service, roles)
        finally:
            self.audit_policy_loads(request.service)
        if not decision.allowed:
            raise LoginNotAllowed(
                f"the policy does not let {request.pam_user or 'this user'} log in here through "
                f"{request.service!r} ({decision.reason}: {decision.rule})"
            )

    def _identity_by_name(self, name: str) -> Identity | None:
        """The directory's entry for a user, or the offline cache's while it is down."""
        from ..errors import DirectoryUnavailable

        try:
            return self.directory.user_by_name(name)
        except DirectoryUnavailable:
            cached = self.identity_cache.by_name(name, now=self.now())
            if cached is None:
                raise
            return cached

    def audit_event(
        self,
        event: str,
        request: LoginRequest,
        attempt: Attempt,
        outcome: Outcome,
        reason: str,
        detail: str = "",
        *,
        vm: str = "",
    ) -> None:
        """One audit record for a decision (login, account, session, key release)."""
        self.audit.write(
            AuditRecord(
                event=event,
                outcome=outcome,
                reason=reason,
                time=self.now(),
                host=request.host,
                service=request.service,
                user=attempt.user,
                requested_user=request.pam_user or "",
                method=attempt.method,
                roles=attempt.identity.roles if attempt.identity else (),
                offline=bool(attempt.identity and attempt.identity.source == "offline-cache"),
                card=attempt.card if attempt.card else CardFacts(),
                tty=request.tty,
                rhost=request.rhost,
                vm=vm,
                detail=detail,
            )
        )


def _detail(error: BaseException) -> str:
    # Our messages never hold secrets (errors.py); anything else is named by type only.
    if isinstance(error, SvmmError):
        return error.message
    return type(error).__name__
