"""From a validated certificate to exactly one directory identity (IdentityMapper).

Rules run in priority order and the first that *matches* decides (a later rule is never
asked to second-guess it): no entry -> UnknownUser, several -> AmbiguousUser (none is
picked). With ``require_certificate_in_entry`` the card's certificate must also be one of
the entry's userCertificate;binary values.

When the directory cannot be reached, the offline cache answers by certificate
fingerprint if its entry is fresh (``identity.source == "offline-cache"``); otherwise
DirectoryUnavailable. Every successful directory mapping refreshes the cache.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from ..adapters.identity_cache import IdentityCache
from ..config import CertmapRule, Config
from ..domain import certmap, nss
from ..domain.certpolicy import fingerprint
from ..domain.identity import AccountStatus, Identity, MappingTrace
from ..domain.mapping import MappedIdentity
from ..errors import (
    AccountDisabled,
    AccountExpired,
    AmbiguousUser,
    ConfigError,
    DirectoryUnavailable,
    LocalAccountShadowed,
    UnknownUser,
)

LOCAL_PASSWD = Path("/etc/passwd")


def local_accounts(path: Path = LOCAL_PASSWD) -> nss.LocalDb:
    """The local accounts' names and uids. Unreadable: every uid is taken (fail closed)."""
    try:
        return nss.parse_local(path.read_text(encoding="utf-8", errors="replace"))
    except OSError as e:
        raise ConfigError(str(path), f"cannot read the local accounts: {e.strerror}") from None


def refuse_local(identity: Identity, config: Config, local: nss.LocalDb) -> None:
    """The NSS bridge's rule on the login path too (SSSD filters root the same way): an
    identity that is, or collides with, a local or system account never logs in as it."""
    problem = nss.account_problem(identity.account, config.nss, local)
    if problem is not None:
        raise LocalAccountShadowed(
            f"directory entry {identity.dn} maps to account {identity.account.name!r} "
            f"(uid {identity.account.uid}), which this host will not give a directory user: "
            f"{problem[1]}"
        )


class Directory(Protocol):
    """What the mapper needs from DirectoryClient."""

    def search_users(self, ldap_filter: str) -> list[str]: ...
    def identity(self, dn: str, *, now: dt.datetime | None = None) -> Identity: ...
    def identity_for(
        self, ldap_filter: str, *, now: dt.datetime | None = None
    ) -> tuple[list[str], Identity | None]: ...


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class DirectoryMapper:
    def __init__(
        self,
        config: Config,
        client: Directory,
        cache: IdentityCache,
        now: Callable[[], dt.datetime] = _utcnow,
        local: Callable[[], nss.LocalDb] = local_accounts,
    ) -> None:
        if not config.certmap.rules:
            raise ConfigError("certmap.rules", "at least one rule is required with a directory")
        self.rules = certmap.ordered(config.certmap.rules)
        self.require_cert = config.directory.require_certificate_in_entry
        self.client = client
        self.cache = cache
        self.now = now
        self.config = config
        self.local = local
        # Set when the cache could not be refreshed (the login itself is not refused).
        self.cache_error: str | None = None

    def map(self, cert: x509.Certificate) -> MappedIdentity:
        decider = certmap.first_match(self.rules, cert)
        if decider is None:
            tried = ", ".join(r.name for r in self.rules)
            raise UnknownUser(
                f"no certificate mapping rule matches this certificate (tried {tried})",
                reason="no_matching_rule",
            )
        now = self.now()
        try:
            identity = self._lookup(decider, cert, now)
            refuse_local(identity, self.config, self.local())
        except DirectoryUnavailable as e:
            cached = self.cache.by_fingerprint(fingerprint(cert), now=now)
            if cached is None:
                raise DirectoryUnavailable(
                    f"{e.message}; no fresh offline entry for this certificate", reason=e.reason
                ) from None
            refuse_local(cached, self.config, self.local())
            return MappedIdentity(
                username=cached.name,
                rule="offline-cache",
                source_value=fingerprint(cert),
                identity=cached,
            )
        try:
            self.cache.store(identity, fingerprints=[fingerprint(cert)], now=now)
            self.cache_error = None
        except (ConfigError, ValueError) as e:
            self.cache_error = str(e)
        return MappedIdentity(
            username=identity.name,
            rule=decider.rule.name,
            source_value=decider.ldap_filter,
            identity=identity,
        )

    def _lookup(
        self, decider: certmap.RuleEvaluation, cert: x509.Certificate, now: dt.datetime
    ) -> Identity:
        dns, identity = self.client.identity_for(decider.ldap_filter, now=now)
        name = decider.rule.name
        if not dns:
            raise UnknownUser(f"rule {name!r}: no directory entry for this certificate")
        if len(dns) > 1 or identity is None:
            raise AmbiguousUser(
                f"rule {name!r}: {len(dns)} directory entries match this certificate "
                f"({', '.join(dns)}); refusing to pick one"
            )
        if self._require_cert(decider.rule) and (
            cert.public_bytes(Encoding.DER) not in identity.certificates
        ):
            raise UnknownUser(
                f"rule {name!r}: {identity.dn} does not hold this certificate "
                "(require_certificate_in_entry)",
                reason="certificate_not_in_entry",
            )
        return identity

    def _require_cert(self, rule: CertmapRule) -> bool:
        return self.require_cert or certmap.maps_whole_certificate(rule)

    def explain(self, cert: x509.Certificate) -> tuple[list[MappingTrace], Identity | None]:
        """Every rule in order: its filter and the entries it finds (for `svmm cert map`);
        the identity the deciding rule yields (None if it is unknown or ambiguous)."""
        traces: list[MappingTrace] = []
        chosen: Identity | None = None
        decided = False
        for rule in self.rules:
            ev = certmap.evaluate(rule, cert)
            if not ev.matched:
                traces.append(MappingTrace(rule.name, "", ()))
                continue
            dns = tuple(self.client.search_users(ev.ldap_filter))
            traces.append(MappingTrace(rule.name, ev.ldap_filter, dns))
            if not decided:
                decided = True
                if len(dns) == 1:
                    identity = self.client.identity(dns[0], now=self.now())
                    der = cert.public_bytes(Encoding.DER)
                    if not self._require_cert(rule) or der in identity.certificates:
                        chosen = identity
        return traces, chosen


def require_active(identity: Identity) -> None:
    """Account management: refuse a disabled/locked or expired account, with the reason."""
    state = identity.state
    if state.status is AccountStatus.DISABLED:
        raise AccountDisabled(f"account {identity.name!r} is disabled ({state.reason})")
    if state.status is AccountStatus.EXPIRED:
        raise AccountExpired(f"account {identity.name!r} has expired ({state.reason})")
