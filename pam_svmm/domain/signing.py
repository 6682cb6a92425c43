"""Signature schemes shared by the card adapter (which signs) and the domain (which verifies).

The card adapter picks a scheme from the key type and the mechanisms the token offers; the
verifier checks the signature with the certificate's public key under the same scheme.
Signatures cross this boundary in the encoding `cryptography` verifies: PKCS#1 bytes for
RSA, DER ``Ecdsa-Sig-Value`` for ECDSA (the adapter converts PKCS#11's raw r||s).
"""

from __future__ import annotations

import enum


class KeyType(enum.Enum):
    RSA = "rsa"
    EC = "ec"


class SignatureScheme(enum.Enum):
    RSA_PKCS1_SHA256 = "rsa-pkcs1-sha256"
    RSA_PSS_SHA256 = "rsa-pss-sha256"
    ECDSA_SHA256 = "ecdsa-sha256"
    ECDSA_SHA384 = "ecdsa-sha384"

    @property
    def key_type(self) -> KeyType:
        return KeyType.EC if self.value.startswith("ecdsa") else KeyType.RSA
