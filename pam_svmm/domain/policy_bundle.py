"""Signed policy bundles: the policy's exact bytes, a signature, and the signer's chain.

    {"format": "svmm-policy-bundle/1", "policy": base64(TOML bytes), "signature": base64,
     "certificates": [PEM leaf, PEM intermediate, ...]}

The signature is over the exact policy bytes with the leaf's key: ECDSA with SHA-256 (P-256)
or SHA-384 (P-384), or RSA PKCS#1 v1.5 with SHA-256. The leaf must carry the policy-signing
EKU and chain to the trust anchors at the verification time (certpolicy.validate_chain).
Pure: the time is a parameter; cryptography does the signing and verifying.
Revocation of the signer is not checked here.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Sequence
from datetime import datetime
from typing import NamedTuple

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from ..errors import CertificateInvalid, CertificateUntrusted, InputMalformed, PolicyBundleInvalid
from .bounded import loads_json
from .certpolicy import CertPolicy, parse_pem_certificates, validate_chain

FORMAT = "svmm-policy-bundle/1"
_KEYS = frozenset({"format", "policy", "signature", "certificates"})
MAX_BUNDLE_BYTES = 16 * 1024 * 1024
MAX_CERTIFICATES = 8


class VerifiedBundle(NamedTuple):
    policy: bytes  # the exact signed bytes
    signer: x509.Certificate


def _hash_for(key: object) -> hashes.HashAlgorithm:
    if isinstance(key, ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey):
        return hashes.SHA384() if key.curve.key_size >= 384 else hashes.SHA256()
    return hashes.SHA256()


def sign(policy: bytes, key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key.sign(policy, ec.ECDSA(_hash_for(key)))
    if isinstance(key, rsa.RSAPrivateKey):
        return key.sign(policy, padding.PKCS1v15(), hashes.SHA256())
    raise TypeError("policy signing keys are RSA or EC")


def make_bundle(
    policy: bytes,
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey,
    chain: Sequence[x509.Certificate],
) -> bytes:
    """A bundle over ``policy`` signed by ``key``; ``chain`` is leaf first (then intermediates).

    The leaf's public key must be ``key``'s: a bundle no host could verify is refused here."""
    if not chain:
        raise ValueError("the chain needs at least the signer's certificate")
    signature = sign(policy, key)
    _check_signature(chain[0], policy, signature)
    doc = {
        "format": FORMAT,
        "policy": base64.b64encode(policy).decode("ascii"),
        "signature": base64.b64encode(signature).decode("ascii"),
        "certificates": [c.public_bytes(serialization.Encoding.PEM).decode("ascii") for c in chain],
    }
    return (json.dumps(doc, indent=1) + "\n").encode("ascii")


def _malformed(what: str) -> PolicyBundleInvalid:
    return PolicyBundleInvalid(f"policy bundle: {what}", reason="bundle_malformed")


def _b64(doc: dict[str, object], name: str) -> bytes:
    value = doc[name]
    if not isinstance(value, str) or not value:
        raise _malformed(f"{name!r} must be a non-empty base64 string")
    try:
        return base64.b64decode(value.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise _malformed(f"{name!r} is not valid base64") from None


class ParsedBundle(NamedTuple):
    policy: bytes
    signature: bytes
    certificates: tuple[x509.Certificate, ...]  # leaf first


def parse_bundle(data: bytes) -> ParsedBundle:
    """The bundle's parts, strictly checked; no signature or chain check yet."""
    if len(data) > MAX_BUNDLE_BYTES:
        raise _malformed(f"larger than {MAX_BUNDLE_BYTES} bytes")
    try:
        doc = loads_json(data, max_bytes=MAX_BUNDLE_BYTES, max_depth=2, what="document")
    except InputMalformed as e:
        raise _malformed(e.message) from None
    if not isinstance(doc, dict):
        raise _malformed("not a JSON object")
    if set(doc) != _KEYS:
        missing, extra = sorted(_KEYS - set(doc)), sorted(set(doc) - _KEYS)
        raise _malformed(f"keys missing: {missing or '-'}, unknown: {extra or '-'}")
    if doc["format"] != FORMAT:
        raise _malformed(f"format is {doc['format']!r}, expected {FORMAT!r}")
    policy = _b64(doc, "policy")
    signature = _b64(doc, "signature")
    pems = doc["certificates"]
    if not isinstance(pems, list) or not pems or len(pems) > MAX_CERTIFICATES:
        raise _malformed(f"'certificates' must be a list of 1 to {MAX_CERTIFICATES} PEM strings")
    certs = []
    for i, pem in enumerate(pems):
        if not isinstance(pem, str):
            raise _malformed(f"certificates[{i}] is not a string")
        try:
            loaded = parse_pem_certificates(pem.encode("ascii"))
        except UnicodeEncodeError:
            raise _malformed(f"certificates[{i}] is not a PEM certificate") from None
        except CertificateInvalid as e:  # InvalidVersion and kin, all of them
            raise _malformed(f"certificates[{i}] is not a PEM certificate: {e.message}") from None
        if len(loaded) != 1:
            raise _malformed(f"certificates[{i}] must hold exactly one certificate")
        certs.append(loaded[0])
    return ParsedBundle(policy, signature, tuple(certs))


def _check_signature(signer: x509.Certificate, policy: bytes, signature: bytes) -> None:
    try:
        pub = signer.public_key()
    except (ValueError, UnsupportedAlgorithm):
        raise PolicyBundleInvalid(
            "policy bundle: the signer's public key is not supported",
            reason="bundle_signature_invalid",
        ) from None
    try:
        if isinstance(pub, ec.EllipticCurvePublicKey):
            pub.verify(signature, policy, ec.ECDSA(_hash_for(pub)))
        elif isinstance(pub, rsa.RSAPublicKey):
            pub.verify(signature, policy, padding.PKCS1v15(), hashes.SHA256())
        else:
            raise PolicyBundleInvalid(
                f"policy bundle: signer key type {type(pub).__name__} is not RSA or EC",
                reason="bundle_signature_invalid",
            )
    except InvalidSignature:
        raise PolicyBundleInvalid(
            "policy bundle: the signature does not verify over the policy with the key of "
            f"{signer.subject.rfc4514_string()}",
            reason="bundle_signature_invalid",
        ) from None


def verify_bundle(
    data: bytes,
    anchors: Sequence[x509.Certificate],
    intermediates: Sequence[x509.Certificate] = (),
    *,
    at: datetime,
    eku: str,
) -> VerifiedBundle:
    """The policy bytes and signer of a bundle whose signature verifies and whose signer
    chains to ``anchors`` with ``eku`` at ``at``; PolicyBundleInvalid (a specific reason)
    otherwise."""
    parsed = parse_bundle(data)
    leaf = parsed.certificates[0]
    _check_signature(leaf, parsed.policy, parsed.signature)
    policy = CertPolicy(extended_key_usages=(eku,), key_usages=("digital_signature",))
    try:
        validate_chain(
            leaf, [*parsed.certificates[1:], *intermediates], anchors, at=at, policy=policy
        )
    except CertificateInvalid as e:
        raise PolicyBundleInvalid(
            f"policy signer {leaf.subject.rfc4514_string()}: {e.message} ({e.reason})",
            reason="bundle_signer_invalid",
        ) from None
    except CertificateUntrusted as e:
        raise PolicyBundleInvalid(
            f"policy signer {leaf.subject.rfc4514_string()}: {e.message}",
            reason="bundle_signer_untrusted",
        ) from None
    return VerifiedBundle(parsed.policy, leaf)
