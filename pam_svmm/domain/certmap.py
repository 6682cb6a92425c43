"""Certificate mapping rules in the spirit of SSSD's certmap (sss-certmap(5)): pure.

A rule has a *match* part (which certificates it is for) and a *map* part (an LDAP filter
template). Rules run in priority order (lower first); the first rule that matches decides.

Match part (all given conditions must hold, like SSSD's ``&&``):
  * ``match_issuer`` / ``match_subject``: regular expressions searched (not anchored, as
    SSSD's regexec) in the RFC 4514 string of the issuer / subject (most specific RDN
    first, e.g. ``CN=alice,O=Demo Org,C=EU``); anchor with ``^...$`` where it matters.
  * ``match_ekus``: every listed EKU OID is in the certificate's extendedKeyUsage.
  * ``match_san``: the subjectAltName has at least one value of every listed kind.
A rule whose template needs a value the certificate lacks (say ``{upn}`` without a UPN)
does not match either, so a later rule gets its turn, as in SSSD.

Map part: the template's literal text comes from the (root-owned) configuration; every
``{field}`` is replaced by a certificate value escaped for an LDAP filter (RFC 4515 via
ldap3.utils.conv), so nothing in a certificate can change a filter's structure
(invariant 6). Fields:

  ``{cert}``        the whole DER, every byte escaped (``\\30\\82...``), for
                    ``userCertificate;binary`` (SSSD's ``{cert!bin}``)
  ``{cert_exact}``  the certificate as a certificateExactMatch assertion (RFC 4523 GSER:
                    ``{ serialNumber N, issuer rdnSequence:"<issuer>" }``): OpenLDAP matches
                    userCertificate only this way, not by the whole DER. A rule using
                    ``{cert}`` or ``{cert_exact}`` also makes the mapper check that the DER
                    itself is among the entry's certificates.
  ``{subject}``     subject, RFC 4514          ``{issuer}``   issuer, RFC 4514
  ``{serial}``      serial number: uppercase hex of the DER INTEGER content (SSSD's
                    ``{serial_number!HEX_U}``), e.g. ``00A1B2``
  ``{upn}``         SAN otherName UPN          ``{upn_local}``   its part before the last @
  ``{email}``       SAN rfc822Name (else the subject emailAddress)   ``{email_local}``
  ``{cn}``          subject commonName         ``{subject_attr:OID}``  any subject attribute

A field with several values (two UPNs, two CNs) yields one filter per combination, joined
with ``(|...)``: the directory then finds every candidate and more than one entry is
refused as ambiguous rather than one of them being picked.
"""

from __future__ import annotations

import functools
import itertools
import re
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID
from ldap3.utils.conv import escape_bytes, escape_filter_chars

from ..errors import ConfigError, UnknownUser
from .mapping import _emails, _subject_values, _upns
from .settings import CertmapRule, SanKind

_FIELD = re.compile(r"\{([^}]*)\}")
# A template may name several multi-valued fields; bound the filter's size.
MAX_COMBINATIONS = 16


@dataclass(frozen=True)
class RuleEvaluation:
    """What one rule says about one certificate (for the mapper and `svmm cert map`)."""

    rule: CertmapRule
    matched: bool
    detail: str  # why it does not match, or "" when it does
    ldap_filter: str = ""  # the rendered filter when it matches


# --- certificate values -------------------------------------------------------------------


def _serial_hex(cert: x509.Certificate) -> str:
    n = cert.serial_number
    # Minimal two's complement = the DER INTEGER content octets (a leading 00 stays).
    return n.to_bytes((n.bit_length() + 8) // 8, "big", signed=True).hex().upper()


def _local(values: Sequence[str]) -> list[str]:
    out = []
    for v in values:
        local, at, domain = v.rpartition("@")
        if at and local and domain:
            out.append(local)
    return out


def _email_values(cert: x509.Certificate) -> list[str]:
    from_san, from_subject = _emails(cert)
    return list(from_san) or list(from_subject)


def field_values(rule: CertmapRule, fld: str, cert: x509.Certificate) -> list[str] | list[bytes]:
    """The raw (unescaped) values of template field ``fld``; [] if the certificate has none.

    ``{cert}`` is binary: its one value is the DER, escaped byte by byte when rendered.
    """
    base, _, arg = fld.partition(":")
    if base == "cert":
        return [cert.public_bytes(Encoding.DER)]
    if base == "cert_exact":
        issuer = cert.issuer.rfc4514_string().replace('"', '""')  # GSER string quoting
        return [f'{{ serialNumber {cert.serial_number}, issuer rdnSequence:"{issuer}" }}']
    if base == "subject":
        return [cert.subject.rfc4514_string()]
    if base == "issuer":
        return [cert.issuer.rfc4514_string()]
    if base == "serial":
        return [_serial_hex(cert)]
    if base == "upn":
        return _upns(cert)
    if base == "upn_local":
        return _local(_upns(cert))
    if base == "email":
        return _email_values(cert)
    if base == "email_local":
        return _local(_email_values(cert))
    if base == "cn":
        return _subject_values(cert, NameOID.COMMON_NAME)
    if base == "subject_attr":
        try:
            oid = x509.ObjectIdentifier(arg)
        except ValueError:
            raise ConfigError(
                f"certmap.rules[{rule.name}].map", f"{{{fld}}}: {arg!r} is not a dotted OID"
            ) from None
        return _subject_values(cert, oid)
    raise ConfigError(f"certmap.rules[{rule.name}].map", f"unknown field {{{fld}}}")


def escape_value(value: str | bytes) -> str:
    """RFC 4515 escaping: text keeps its characters but \\ * ( ) NUL; bytes are all escaped."""
    if isinstance(value, bytes):
        return escape_bytes(value)
    return escape_filter_chars(value)


# --- the match part -----------------------------------------------------------------------


def _san(cert: x509.Certificate) -> x509.SubjectAlternativeName | None:
    try:
        return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None


def _has_san(cert: x509.Certificate, kind: SanKind) -> bool:
    san = _san(cert)
    if san is None:
        return False
    if kind is SanKind.UPN:
        return bool(_upns(cert))
    if kind is SanKind.EMAIL:
        return bool(san.get_values_for_type(x509.RFC822Name))
    if kind is SanKind.DNS:
        return bool(san.get_values_for_type(x509.DNSName))
    raise AssertionError(f"unhandled SAN kind {kind}")


def _ekus(cert: x509.Certificate) -> set[str]:
    try:
        ext = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return set()
    return {oid.dotted_string for oid in ext}


def _pattern(rule: CertmapRule, which: str, text: str) -> re.Pattern[str]:
    # config.py checks these; a rule made elsewhere still fails as a ConfigError, not as
    # re's OverflowError (a{99999999999}) or RecursionError.
    try:
        return re.compile(text)
    except (re.error, OverflowError, RecursionError) as e:
        raise ConfigError(f"certmap.rules[{rule.name}].match.{which}", str(e)) from None


def _match_problem(rule: CertmapRule, cert: x509.Certificate) -> str:
    """ "" when the match part accepts the certificate, else why not."""
    if rule.match_issuer and not _pattern(rule, "issuer", rule.match_issuer).search(
        cert.issuer.rfc4514_string()
    ):
        return f"issuer does not match {rule.match_issuer!r}"
    if rule.match_subject and not _pattern(rule, "subject", rule.match_subject).search(
        cert.subject.rfc4514_string()
    ):
        return f"subject does not match {rule.match_subject!r}"
    if rule.match_ekus:
        missing = [oid for oid in rule.match_ekus if oid not in _ekus(cert)]
        if missing:
            return f"extended key usage lacks {', '.join(missing)}"
    for kind in rule.match_san:
        if not _has_san(cert, kind):
            return f"no {kind.value} in subjectAltName"
    return ""


# --- the map part -------------------------------------------------------------------------


def template_fields(rule: CertmapRule) -> list[str]:
    return _FIELD.findall(rule.map)


def maps_whole_certificate(rule: CertmapRule) -> bool:
    """The rule looks the certificate itself up: the entry must then hold exactly it."""
    return any(f in ("cert", "cert_exact") for f in template_fields(rule))


def _render(rule: CertmapRule, cert: x509.Certificate) -> tuple[str, str]:
    """(filter, "") or ("", why no filter)."""
    fields = list(dict.fromkeys(template_fields(rule)))
    escaped: list[list[str]] = []
    for fld in fields:
        values = field_values(rule, fld, cert)
        if not values:
            return "", f"the certificate has no value for {{{fld}}}"
        escaped.append(list(dict.fromkeys(escape_value(v) for v in values)))
    combos = list(itertools.islice(itertools.product(*escaped), MAX_COMBINATIONS + 1))
    if len(combos) > MAX_COMBINATIONS:
        return "", f"more than {MAX_COMBINATIONS} value combinations for the template"
    filters = []
    for combo in combos:
        chosen = dict(zip(fields, combo, strict=True))
        # Substitute in one pass over the template: a value is never scanned again, so
        # text inside a value (already escaped, braces included) is never taken as a field.
        filters.append(_FIELD.sub(functools.partial(_pick, chosen), rule.map))
    unique = list(dict.fromkeys(filters))
    if len(unique) == 1:
        return unique[0], ""
    return "(|" + "".join(unique) + ")", ""


def _pick(chosen: dict[str, str], m: re.Match[str]) -> str:
    return chosen[m.group(1)]


def evaluate(rule: CertmapRule, cert: x509.Certificate) -> RuleEvaluation:
    """Whether ``rule`` matches ``cert`` and, if it does, the filter to search with."""
    problem = _match_problem(rule, cert)
    if problem:
        return RuleEvaluation(rule, matched=False, detail=problem)
    ldap_filter, problem = _render(rule, cert)
    if problem:
        return RuleEvaluation(rule, matched=False, detail=problem)
    return RuleEvaluation(rule, matched=True, detail="", ldap_filter=ldap_filter)


def rule_matches(rule: CertmapRule, cert: x509.Certificate) -> bool:
    return evaluate(rule, cert).matched


def render_filter(rule: CertmapRule, cert: x509.Certificate) -> str:
    """The rule's filter for ``cert``, values escaped; UnknownUser if a value is missing."""
    ldap_filter, problem = _render(rule, cert)
    if problem:
        raise UnknownUser(f"certmap rule {rule.name!r}: {problem}", reason="certmap_no_value")
    return ldap_filter


def ordered(rules: Sequence[CertmapRule]) -> list[CertmapRule]:
    """Priority order, lower first; equal priorities keep their configuration order."""
    return sorted(rules, key=lambda r: r.priority)


def first_match(rules: Sequence[CertmapRule], cert: x509.Certificate) -> RuleEvaluation | None:
    for rule in ordered(rules):
        ev = evaluate(rule, cert)
        if ev.matched:
            return ev
    return None
