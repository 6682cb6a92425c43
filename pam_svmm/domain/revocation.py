"""Revocation evaluation: OCSP responses, CRL answers and the rule table. Pure.

Nothing here touches the network, the disk or the clock: the adapters fetch bytes and the
validation time ``at`` is a parameter. Every failure to establish a status is UNKNOWN with a
reason for the audit trail; nothing but a verified, fresh, matching answer is GOOD.
"""

from __future__ import annotations

import datetime as dt
import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa
from cryptography.x509 import ocsp
from cryptography.x509.oid import ExtendedKeyUsageOID

from ..errors import CertificateRevoked, RevocationUnknown
from .certpolicy import PARSE_ERRORS
from .settings import RevocationRule


class RevocationStatus(enum.Enum):
    GOOD = "good"
    REVOKED = "revoked"
    UNKNOWN = "unknown"


@dataclass(frozen=True)
class RevocationResult:
    """What one method (``'crl'`` or ``'ocsp'``) found out about one certificate."""

    status: RevocationStatus
    method: str
    detail: str
    revoked_at: dt.datetime | None = None
    reason: str | None = None  # x509.ReasonFlags value, e.g. "keyCompromise"
    # Until when the source vouches for this answer (an OCSP response's nextUpdate, or
    # thisUpdate + max age): what a resident service may reuse it for.
    valid_until: dt.datetime | None = None

    @classmethod
    def unknown(cls, method: str, detail: str) -> RevocationResult:
        return cls(RevocationStatus.UNKNOWN, method, detail)


class Outcome(enum.Enum):
    GOOD = "good"  # a method said good
    SOFT_FAILED = "soft-failed"  # nobody could say; accepted under soft-fail (audit it)
    NOT_CHECKED = "not-checked"  # rule is off


@dataclass(frozen=True)
class Decision:
    """An accepted certificate's revocation outcome (refusals are raised, never returned)."""

    outcome: Outcome
    rule: RevocationRule
    subject: str
    results: tuple[RevocationResult, ...] = ()

    @property
    def note(self) -> str:
        """A note the audit record must carry: set only when accepted without an answer."""
        if self.outcome is Outcome.SOFT_FAILED:
            return (
                f"revocation status of {self.subject} unknown, accepted (soft-fail): "
                f"{_details(self.results)}"
            )
        return ""

    @property
    def detail(self) -> str:
        """One line saying what was decided and why."""
        if self.outcome is Outcome.NOT_CHECKED:
            return f"revocation not checked for {self.subject} (rule off)"
        if self.outcome is Outcome.GOOD:
            good = next(r for r in self.results if r.status is RevocationStatus.GOOD)
            return f"not revoked per {good.method}: {good.detail}"
        return self.note


def _details(results: Iterable[RevocationResult]) -> str:
    return "; ".join(f"{r.method}: {r.detail}" for r in results) or "no revocation information"


def rule_for(end_entity: RevocationRule, ca: RevocationRule, position: int) -> RevocationRule:
    """The rule for the certificate at ``position`` in a chain (0 is the end entity)."""
    return end_entity if position == 0 else ca


def decide(rule: RevocationRule, results: Sequence[RevocationResult], *, subject: str) -> Decision:
    """Apply ``rule`` to what the methods found.

    A REVOKED answer always fails, whatever the rule: a known revocation is never ignored.
    Raises CertificateRevoked, or RevocationUnknown when ``rule`` is REQUIRE and no method
    answered GOOD.
    """
    results = tuple(results)
    for r in results:
        if r.status is RevocationStatus.REVOKED:
            when = f" at {r.revoked_at.isoformat()}" if r.revoked_at else ""
            why = f" ({r.reason})" if r.reason else ""
            raise CertificateRevoked(f"{subject} is revoked{when}{why} per {r.method}: {r.detail}")
    if rule is RevocationRule.OFF:
        return Decision(Outcome.NOT_CHECKED, rule, subject, results)
    if any(r.status is RevocationStatus.GOOD for r in results):
        return Decision(Outcome.GOOD, rule, subject, results)
    if rule is RevocationRule.REQUIRE:
        raise RevocationUnknown(f"revocation status of {subject} unknown: {_details(results)}")
    return Decision(Outcome.SOFT_FAILED, rule, subject, results)


# --- CRL ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class CrlEntry:
    """One revoked serial as the CRL index stores it."""

    serial: int
    revoked_at: dt.datetime
    reason: x509.ReasonFlags | None


def evaluate_crl(
    entry: CrlEntry | None,
    *,
    this_update: dt.datetime,
    next_update: dt.datetime | None,
    at: dt.datetime,
    skew: float,
    grace: float,
    source: str,
) -> RevocationResult:
    """The answer of a signature-checked CRL (looked up by the caller) at time ``at``.

    A listed serial is REVOKED even in a stale CRL (a revocation does not expire) unless it
    is only on hold; an absent serial is GOOD only while the CRL is fresh.
    """
    if this_update > at + dt.timedelta(seconds=skew):
        return RevocationResult.unknown(
            "crl", f"CRL from {source} is not yet valid (thisUpdate {this_update.isoformat()})"
        )
    stale = ""
    if next_update is None:
        stale = f"CRL from {source} has no nextUpdate"
    elif at > next_update + dt.timedelta(seconds=grace):
        stale = f"stale CRL from {source} (nextUpdate {next_update.isoformat()} passed)"
    if entry is not None and not (stale and entry.reason is x509.ReasonFlags.certificate_hold):
        return RevocationResult(
            RevocationStatus.REVOKED,
            "crl",
            f"serial {entry.serial:X} listed in CRL from {source}",
            revoked_at=entry.revoked_at,
            reason=entry.reason.value if entry.reason else None,
        )
    if stale:
        return RevocationResult.unknown("crl", stale)
    return RevocationResult(
        RevocationStatus.GOOD,
        "crl",
        f"not listed in CRL from {source} (thisUpdate {this_update.isoformat()})",
    )


# --- what a CRL is evidence for (RFC 5280 5.2, 5.3, 6.3.3) ------------------------------
#
# A CRL is used only as a complete, direct CRL of the certificate's issuer. Anything we do
# not process makes it no evidence at all (the answer stays UNKNOWN, never GOOD): an
# unknown critical extension (5.2: MUST NOT be used), a delta CRL, an indirect or
# partial-reasons CRL, one for attribute certificates, one without a non-critical CRLNumber
# (5.2.3: conforming issuers MUST include it; it orders the CRLs we keep), an entry with an
# unknown critical extension. What depends on the certificate (CA or end entity, the
# distribution point) is its scope, kept with the index and checked per certificate.

# Critical CRL extensions we process: only the issuingDistributionPoint.
_CRITICAL_PROCESSED = {x509.IssuingDistributionPoint.oid}
# Entry extensions we process or may ignore (reason code, invalidity date).
_ENTRY_KNOWN = {x509.CRLReason.oid, x509.InvalidityDate.oid}


@dataclass(frozen=True)
class CrlScope:
    """Which certificates a CRL's issuingDistributionPoint says it covers."""

    only_user: bool = False  # onlyContainsUserCerts
    only_ca: bool = False  # onlyContainsCACerts
    dp_names: tuple[str, ...] = ()  # its distribution point's names (name_key); (): any

    def to_json(self) -> dict[str, object]:
        return {"only_user": self.only_user, "only_ca": self.only_ca, "dp_names": self.dp_names}

    @classmethod
    def from_json(cls, value: object) -> CrlScope:
        """ValueError unless ``value`` is what ``to_json`` wrote."""
        if not isinstance(value, dict):
            raise ValueError("CRL scope is not an object")
        only_user, only_ca, names = (value.get(k) for k in ("only_user", "only_ca", "dp_names"))
        if not isinstance(only_user, bool) or not isinstance(only_ca, bool):
            raise ValueError("CRL scope flags are not booleans")
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ValueError("CRL scope names are not strings")
        return cls(only_user, only_ca, tuple(names))


def name_key(name: x509.GeneralName) -> str:
    """A stable text form of a distribution point name, for comparing and storing."""
    if isinstance(name, x509.DirectoryName):
        return "dn:" + name.value.public_bytes().hex()
    if isinstance(name, x509.UniformResourceIdentifier):
        return "uri:" + name.value
    return repr(name)


def _dp_names(
    full_name: Sequence[x509.GeneralName] | None,
    relative_name: x509.RelativeDistinguishedName | None,
    issuer: x509.Name,
) -> list[str]:
    if full_name is not None:
        return [name_key(n) for n in full_name]
    if relative_name is not None:  # relative to the issuer's name (RFC 5280 4.2.1.13)
        return [name_key(x509.DirectoryName(x509.Name([*issuer.rdns, relative_name])))]
    return []


def crl_problem(crl: x509.CertificateRevocationList) -> str | None:
    """Why a (signature-checked) CRL is no evidence for any certificate; None if it may be."""
    try:
        exts = crl.extensions
    except PARSE_ERRORS as e:
        return f"has extensions that do not parse ({e})"
    try:
        number = exts.get_extension_for_class(x509.CRLNumber)
    except x509.ExtensionNotFound:
        return "has no CRLNumber (RFC 5280 5.2.3 requires one)"
    if number.critical:
        return "marks its CRLNumber critical (RFC 5280 5.2.3: never critical)"
    for ext in exts:
        if isinstance(ext.value, x509.DeltaCRLIndicator):
            return "is a delta CRL (deltaCRLIndicator; delta CRLs are not processed)"
        if ext.critical and ext.oid not in _CRITICAL_PROCESSED:
            return f"has an unknown critical extension {ext.oid.dotted_string}"
    try:
        idp = exts.get_extension_for_class(x509.IssuingDistributionPoint).value
    except x509.ExtensionNotFound:
        return None
    if idp.indirect_crl:
        return "is an indirect CRL (indirectCRL; not processed)"
    if idp.only_some_reasons:
        reasons = ", ".join(sorted(r.value for r in idp.only_some_reasons))
        return f"covers only some revocation reasons ({reasons}; onlySomeReasons)"
    if idp.only_contains_attribute_certs:
        return "covers only attribute certificates (onlyContainsAttributeCerts)"
    return None


def entry_problem(entry: x509.RevokedCertificate) -> str | None:
    """Why one entry makes its CRL unusable (an indirect entry, an unknown critical one)."""
    try:
        exts = entry.extensions
    except PARSE_ERRORS as e:
        return f"has an entry whose extensions do not parse ({e})"
    for ext in exts:
        if isinstance(ext.value, x509.CertificateIssuer):
            return "is indirect: an entry names a certificateIssuer (not processed)"
        if ext.critical and ext.oid not in _ENTRY_KNOWN:
            return (
                f"has an entry (serial {entry.serial_number:X}) with an unknown critical "
                f"extension {ext.oid.dotted_string}"
            )
    return None


def crl_scope(crl: x509.CertificateRevocationList) -> CrlScope:
    """The scope of a CRL that ``crl_problem`` accepted."""
    try:
        idp = crl.extensions.get_extension_for_class(x509.IssuingDistributionPoint).value
    except x509.ExtensionNotFound:
        return CrlScope()
    return CrlScope(
        only_user=idp.only_contains_user_certs,
        only_ca=idp.only_contains_ca_certs,
        dp_names=tuple(_dp_names(idp.full_name, idp.relative_name, crl.issuer)),
    )


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def scope_problem(scope: CrlScope, cert: x509.Certificate) -> str | None:
    """Why a CRL of ``cert``'s issuer with this scope does not cover ``cert`` (None: it does)."""
    is_ca = _is_ca(cert)
    if scope.only_user and is_ca:
        return "it covers only end-entity certificates (onlyContainsUserCerts), not a CA"
    if scope.only_ca and not is_ca:
        return "it covers only CA certificates (onlyContainsCACerts), not an end entity"
    if not scope.dp_names:
        return None
    # RFC 5280 6.3.3 (b)(2)(i): one of the CRL's distribution point names must be one of
    # the names of a distribution point in the certificate. Points with a cRLIssuer are
    # for indirect CRLs, which are never used.
    try:
        dps = cert.extensions.get_extension_for_class(x509.CRLDistributionPoints).value
    except x509.ExtensionNotFound:
        dps = x509.CRLDistributionPoints([])
    ours: set[str] = set()
    for dp in dps:
        if dp.crl_issuer is None:
            ours.update(_dp_names(dp.full_name, dp.relative_name, cert.issuer))
    if ours.intersection(scope.dp_names):
        return None
    return "it is for a distribution point the certificate does not name"


# --- OCSP --------------------------------------------------------------------------------


def build_ocsp_request(
    cert: x509.Certificate, issuer: x509.Certificate, nonce: bytes | None
) -> bytes:
    """A DER OCSP request for ``cert`` (SHA-1 CertID, the interoperable default)."""
    b = ocsp.OCSPRequestBuilder().add_certificate(cert, issuer, hashes.SHA1())  # noqa: S303
    if nonce is not None:
        b = b.add_extension(x509.OCSPNonce(nonce), critical=False)
    return b.build().public_bytes(serialization.Encoding.DER)


def _cert_id(
    cert: x509.Certificate, issuer: x509.Certificate, algorithm: hashes.HashAlgorithm
) -> tuple[bytes, bytes, int]:
    # The library computes the CertID hashes (name hash, key hash) for us.
    req = ocsp.OCSPRequestBuilder().add_certificate(cert, issuer, algorithm).build()
    return req.issuer_name_hash, req.issuer_key_hash, req.serial_number


def _verify(
    public_key: object, signature: bytes, data: bytes, algorithm: hashes.HashAlgorithm | None
) -> bool:
    try:
        if isinstance(public_key, rsa.RSAPublicKey) and algorithm is not None:
            public_key.verify(signature, data, padding.PKCS1v15(), algorithm)
        elif isinstance(public_key, ec.EllipticCurvePublicKey) and algorithm is not None:
            public_key.verify(signature, data, ec.ECDSA(algorithm))
        elif isinstance(public_key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
            public_key.verify(signature, data)
        else:
            return False
    except (InvalidSignature, UnsupportedAlgorithm, ValueError, TypeError):
        return False
    return True


def _key_hash(cert: x509.Certificate) -> bytes:
    # ResponderID byKey is the SHA-1 of the subjectPublicKey bits, the same as SKI method 1.
    return x509.SubjectKeyIdentifier.from_public_key(cert.public_key()).digest


def _names_responder(resp: ocsp.OCSPResponse, cert: x509.Certificate) -> bool:
    if resp.responder_name is not None:
        return resp.responder_name == cert.subject
    return resp.responder_key_hash == _key_hash(cert)


def _delegate_problem(
    delegate: x509.Certificate, issuer: x509.Certificate, at: dt.datetime
) -> str | None:
    """Why a certificate in the response cannot sign for ``issuer`` (None: it can)."""
    try:
        delegate.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return "delegated OCSP responder certificate is not issued by the certificate's issuer"
    try:
        eku = delegate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        eku = None
    if eku is None or ExtendedKeyUsageOID.OCSP_SIGNING not in eku:
        return "delegated OCSP responder certificate lacks the OCSPSigning extended key usage"
    if not delegate.not_valid_before_utc <= at <= delegate.not_valid_after_utc:
        return "delegated OCSP responder certificate is not valid at the validation time"
    return None


def _signer_problem(
    resp: ocsp.OCSPResponse,
    issuer: x509.Certificate,
    at: dt.datetime,
    trusted_responders: Sequence[x509.Certificate],
) -> str | None:
    """None when the response is signed by someone entitled to answer for ``issuer``."""
    data, sig, alg = resp.tbs_response_bytes, resp.signature, None
    try:
        alg = resp.signature_hash_algorithm
    except UnsupportedAlgorithm:
        return "unsupported OCSP signature algorithm"
    if _names_responder(resp, issuer) and _verify(issuer.public_key(), sig, data, alg):
        return None
    problems = []
    for delegate in resp.certificates:
        if not _names_responder(resp, delegate):
            continue
        if not _verify(delegate.public_key(), sig, data, alg):
            problems.append("signature does not verify with the included responder certificate")
            continue
        problem = _delegate_problem(delegate, issuer, at)
        if problem is None:
            return None
        problems.append(problem)
    for trusted in trusted_responders:
        if _names_responder(resp, trusted) and _verify(trusted.public_key(), sig, data, alg):
            return None
    if problems:
        return problems[0]
    return "OCSP response not signed by the issuer, a delegated responder or a trusted responder"


def evaluate_ocsp(
    response_der: bytes,
    cert: x509.Certificate,
    issuer: x509.Certificate,
    *,
    nonce: bytes | None,
    at: dt.datetime,
    skew: float,
    max_age: float,
    trusted_responders: Sequence[x509.Certificate] = (),
) -> RevocationResult:
    """Judge an OCSP response for ``cert`` issued by ``issuer`` at time ``at``."""

    def unknown(detail: str) -> RevocationResult:
        return RevocationResult.unknown("ocsp", detail)

    try:
        resp = ocsp.load_der_ocsp_response(response_der)
    except PARSE_ERRORS as e:
        return unknown(f"malformed OCSP response: {e}")
    if resp.response_status is not ocsp.OCSPResponseStatus.SUCCESSFUL:
        return unknown(f"OCSP responder answered {resp.response_status.name.lower()}")
    try:
        problem = _signer_problem(resp, issuer, at, trusted_responders)
        if problem:
            return unknown(problem)
        if nonce is not None:
            try:
                got = resp.extensions.get_extension_for_class(x509.OCSPNonce).value.nonce
            except x509.ExtensionNotFound:
                return unknown("OCSP responder omitted the nonce we sent (replay protection)")
            if got != nonce:
                return unknown("OCSP response nonce does not match the request's")
        matching = []
        for single in resp.responses:
            want = _cert_id(cert, issuer, single.hash_algorithm)
            if (single.issuer_name_hash, single.issuer_key_hash, single.serial_number) == want:
                matching.append(single)
    except PARSE_ERRORS as e:  # the responder's certificates included: x509.InvalidVersion
        return unknown(f"malformed OCSP response: {e}")
    if len(matching) != 1:
        return unknown(
            f"OCSP response has {len(matching)} answers for serial "
            f"{cert.serial_number:X} (need exactly one)"
        )
    single = matching[0]
    this_update, next_update = single.this_update_utc, single.next_update_utc
    if this_update > at + dt.timedelta(seconds=skew):
        return unknown(f"OCSP thisUpdate {this_update.isoformat()} is in the future")
    if next_update is not None:
        if at - dt.timedelta(seconds=skew) > next_update:
            return unknown(f"OCSP response expired (nextUpdate {next_update.isoformat()})")
    elif at - this_update > dt.timedelta(seconds=max_age):
        return unknown(
            f"OCSP response too old (thisUpdate {this_update.isoformat()}, no nextUpdate)"
        )
    status = single.certificate_status
    when = f"thisUpdate {this_update.isoformat()}"
    until = next_update or this_update + dt.timedelta(seconds=max_age)
    if status is ocsp.OCSPCertStatus.GOOD:
        return RevocationResult(
            RevocationStatus.GOOD, "ocsp", f"OCSP good ({when})", valid_until=until
        )
    if status is ocsp.OCSPCertStatus.REVOKED:
        reason = single.revocation_reason
        return RevocationResult(
            RevocationStatus.REVOKED,
            "ocsp",
            f"OCSP revoked ({when})",
            revoked_at=single.revocation_time_utc,
            reason=reason.value if reason else None,
            valid_until=until,
        )
    return unknown("OCSP responder does not know this certificate")
