"""From a validated certificate to a POSIX user name, and the PAM_USER check.

Rules are tried in order; the first rule that finds a value decides, and a value that is not
a strict POSIX name refuses the login (it does not fall through to a later rule). Names are
never case-folded or normalised: anything outside ``[a-z_][a-z0-9_.-]{0,31}`` is refused,
which also rules out Unicode look-alikes, control characters and path tricks.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from cryptography import x509
from cryptography.hazmat import asn1
from cryptography.x509.oid import NameOID

from ..errors import ConfigError, UnknownUser, UserMismatch
from .identity import Identity
from .settings import MappingKind, MappingRule

UPN_OID = x509.ObjectIdentifier("1.3.6.1.4.1.311.20.2.3")
_POSIX_NAME = re.compile(r"[a-z_][a-z0-9_.-]{0,31}")


def is_valid_username(name: object) -> bool:
    return isinstance(name, str) and _POSIX_NAME.fullmatch(name) is not None


@dataclass(frozen=True)
class MappedIdentity:
    """A user name taken from a certificate; ``username`` is always a valid POSIX name."""

    username: str
    rule: str  # which rule produced it, e.g. "upn" or "subject_attr:0.9.2342.19200300.100.1.1"
    source_value: str  # the certificate value the name came from
    # The directory entry behind the name, when a directory mapped it (None: certificate only).
    identity: Identity | None = None

    def __post_init__(self) -> None:
        if not is_valid_username(self.username):
            raise UnknownUser(
                f"{self.rule} yields {self.username!r}, which is not a valid user name",
                reason="invalid_username",
            )


class IdentityMapper(Protocol):
    def map(self, cert: x509.Certificate) -> MappedIdentity: ...


# --- value extraction ---------------------------------------------------------------------


def _subject_values(cert: x509.Certificate, oid: x509.ObjectIdentifier) -> list[str]:
    out = []
    for attr in cert.subject.get_attributes_for_oid(oid):
        if not isinstance(attr.value, str):
            raise UnknownUser(
                f"subject attribute {oid.dotted_string} is not a string", reason="mapping_malformed"
            )
        out.append(attr.value)
    return out


def _san(cert: x509.Certificate) -> x509.SubjectAlternativeName | None:
    try:
        return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None


def _upns(cert: x509.Certificate) -> list[str]:
    san = _san(cert)
    if san is None:
        return []
    out = []
    for other in san.get_values_for_type(x509.OtherName):
        if other.type_id != UPN_OID:
            continue
        # OtherName.value is the DER of the [0] EXPLICIT content: a UTF8String for a UPN.
        try:
            out.append(asn1.decode_der(str, other.value))
        except ValueError:
            raise UnknownUser(
                "certificate UPN is not a DER UTF8String", reason="mapping_malformed"
            ) from None
    return out


def _emails(cert: x509.Certificate) -> tuple[list[str], list[str]]:
    san = _san(cert)
    from_san = san.get_values_for_type(x509.RFC822Name) if san is not None else []
    return from_san, _subject_values(cert, NameOID.EMAIL_ADDRESS)


# --- rules --------------------------------------------------------------------------------


def rule_label(rule: MappingRule) -> str:
    if rule.kind is MappingKind.SUBJECT_ATTR:
        return f"{rule.kind.value}:{rule.oid}"
    return rule.kind.value


def _addressed(values: Iterable[str], rule: MappingRule) -> list[tuple[str, str]]:
    """(username, source) for user@domain values whose domain the rule accepts."""
    accepted = {d.lower() for d in rule.domains}
    out = []
    for value in values:
        local, at, domain = value.rpartition("@")
        if not at or not local or not domain or "@" in local:
            continue  # not of the form local@domain: no value from this entry
        if accepted and domain.lower() not in accepted:
            continue
        out.append((local if rule.strip_domain else value, value))
    return out


def _candidates(cert: x509.Certificate, rule: MappingRule) -> list[tuple[str, str]]:
    if rule.kind is MappingKind.SUBJECT_CN:
        return [(v, v) for v in _subject_values(cert, NameOID.COMMON_NAME)]
    if rule.kind is MappingKind.SUBJECT_ATTR:
        oid = x509.ObjectIdentifier(rule.oid)
        return [(v, v) for v in _subject_values(cert, oid)]
    if rule.kind is MappingKind.UPN:
        return _addressed(_upns(cert), rule)
    if rule.kind is MappingKind.EMAIL:
        from_san, from_subject = _emails(cert)
        # The SAN is the standard place; the subject emailAddress is the legacy fallback.
        return _addressed(from_san, rule) or _addressed(from_subject, rule)
    raise AssertionError(f"unhandled mapping kind {rule.kind}")


class CertificateMapper:
    """Maps a certificate with the configured rules, in order."""

    def __init__(self, rules: Sequence[MappingRule]) -> None:
        if not rules:
            raise ConfigError("mapping.rules", "must not be empty")
        for i, rule in enumerate(rules):
            if rule.kind is MappingKind.SUBJECT_ATTR:
                try:
                    x509.ObjectIdentifier(rule.oid)
                except ValueError:
                    raise ConfigError(
                        f"mapping.rules[{i}].oid", f"{rule.oid!r} is not a dotted OID"
                    ) from None
        self.rules = tuple(rules)

    def map(self, cert: x509.Certificate) -> MappedIdentity:
        for rule in self.rules:
            found = _candidates(cert, rule)
            if not found:
                continue
            label = rule_label(rule)
            names = {name for name, _ in found}
            if len(names) > 1:
                # Two identities in one certificate: refuse rather than guess.
                raise UnknownUser(
                    f"{label} yields several user names: {sorted(names)!r}",
                    reason="mapping_ambiguous",
                )
            name, source = found[0]
            return MappedIdentity(username=name, rule=label, source_value=source)
        tried = ", ".join(rule_label(r) for r in self.rules)
        raise UnknownUser(f"no mapping rule yields a user name (tried {tried})")


def check_user(pam_user: str | None, mapped: MappedIdentity) -> str:
    """The user to log in: the mapped one, which must equal PAM_USER when that is set.

    Exact comparison, no case folding or normalisation: a requested name that is not a
    strict POSIX name can never match (so "Alice", "alice " or a look-alike is refused).
    """
    if not is_valid_username(mapped.username):  # MappedIdentity checks this; be sure
        raise UnknownUser(
            f"{mapped.username!r} is not a valid user name", reason="invalid_username"
        )
    if pam_user is None or pam_user == "":
        return mapped.username
    if not is_valid_username(pam_user):
        raise UserMismatch(
            f"requested user {pam_user!r} is not a valid user name; the card maps to "
            f"{mapped.username!r}"
        )
    if pam_user != mapped.username:
        raise UserMismatch(f"the card maps to {mapped.username!r}, not to {pam_user!r}")
    return mapped.username
