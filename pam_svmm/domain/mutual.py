"""Mutual authentication: the card's own trust anchor vouches for this host before the PIN.

The card carries the organisation's anchor as a public certificate object, written when the
card was issued. Before the user types a PIN, the host must show a certificate that chains to
*that* anchor (not to whatever the host's configuration trusts) and prove, with a fresh
signature, that it holds the certificate's key. The verified host name is then shown in the
PIN prompt, and a host the card's anchor does not vouch for never gets to ask for the PIN.

What it protects against: a host that runs this software but is not enrolled by the
organisation (a look-alike console, a host with a swapped trust configuration). It cannot
protect against a host whose software is itself hostile; no host-side check can.
Pure: certificates, keys and the time come in as values.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ..errors import AuthFailed, HostNotVouched
from . import certpolicy
from .challenge import new_challenge

SERVER_AUTH = ExtendedKeyUsageOID.SERVER_AUTH.dotted_string
PURPOSE_SERVICE = "svmm host proof"


@dataclass(frozen=True)
class VouchedHost:
    name: str  # from the host certificate (DNS SAN, else subject CN)
    anchor: str  # the card anchor's subject, RFC 4514
    fingerprint: str  # sha256 of the host certificate


def host_name(cert: x509.Certificate) -> str:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns = san.get_values_for_type(x509.DNSName)
        if dns:
            return dns[0]
    except x509.ExtensionNotFound:
        pass
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(cns[0].value) if cns else cert.subject.rfc4514_string()


def verify_host(
    *,
    card_anchors: Sequence[x509.Certificate],
    host_cert: x509.Certificate,
    host_key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey,
    intermediates: Sequence[x509.Certificate],
    at: dt.datetime,
    nonce: bytes,
) -> VouchedHost:
    """Raise HostNotVouched unless ``host_cert`` chains to an anchor from the card and the
    host proves possession of its key over a fresh challenge."""
    if not card_anchors:
        raise HostNotVouched("the card carries no trust anchor to check this host against")
    policy = certpolicy.CertPolicy(extended_key_usages=(SERVER_AUTH,))
    try:
        chain = certpolicy.validate_chain(
            host_cert, intermediates, card_anchors, at=at, policy=policy
        )
    except AuthFailed as e:
        raise HostNotVouched(
            f"this host's certificate is not vouched for by the card's anchor: {e.message}"
        ) from None
    name = host_name(host_cert)
    challenge = new_challenge(name, PURPOSE_SERVICE, at=at, nonce=nonce)
    data = challenge.to_be_signed()
    if isinstance(host_key, rsa.RSAPrivateKey):
        sig = host_key.sign(data, padding.PKCS1v15(), hashes.SHA256())
    else:
        sig = host_key.sign(data, ec.ECDSA(hashes.SHA256()))
    pub = host_cert.public_key()
    try:
        if isinstance(pub, rsa.RSAPublicKey):
            pub.verify(sig, data, padding.PKCS1v15(), hashes.SHA256())
        elif isinstance(pub, ec.EllipticCurvePublicKey):
            pub.verify(sig, data, ec.ECDSA(hashes.SHA256()))
        else:
            raise HostNotVouched("this host's certificate has an unsupported key type")
    except (InvalidSignature, TypeError, ValueError):
        # A key of another type than the certificate's raises TypeError / ValueError.
        raise HostNotVouched("this host does not hold the key of its certificate") from None
    return VouchedHost(
        name=name,
        anchor=chain[-1].subject.rfc4514_string(),
        fingerprint=certpolicy.fingerprint(host_cert),
    )
