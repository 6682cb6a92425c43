"""Hostile bytes get a clear refusal, never a crash or a hang.

What an attacker (or a fault) sends each parser that takes outside bytes: nesting deep enough
for RecursionError, numbers that are not finite or too big for a C type, certificates
cryptography refuses with an exception that is not a ValueError, records of the wrong shape,
a server that drips one byte at a time, a peer that hangs up. Each must end in the product's
typed error (or a skipped record, logged), within its time budget, and the PAM application
must survive.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding

from pam_svmm import config
from pam_svmm.adapters.allowlist_store import SessionRecords, UserSessions
from pam_svmm.adapters.audit_log import AuditLog
from pam_svmm.adapters.crl_store import parse_crl
from pam_svmm.adapters.fetch import HttpFetcher
from pam_svmm.adapters.processes import start_time
from pam_svmm.adapters.token import CardCertificate
from pam_svmm.adapters.vm_registry import VmRecord
from pam_svmm.cli.main import main
from pam_svmm.config import CertmapRule, Config, SessionConfig
from pam_svmm.domain import audit_chain, certmap, custody
from pam_svmm.domain.allowlist import parse_allowlist
from pam_svmm.domain.audit_record import AuditRecord, Outcome
from pam_svmm.domain.certpolicy import parse_certificate
from pam_svmm.domain.pkcs11_uri import InvalidPkcs11Uri
from pam_svmm.domain.pkcs11_uri import parse as parse_uri
from pam_svmm.domain.policy import load_policy
from pam_svmm.domain.policy_bundle import make_bundle, parse_bundle
from pam_svmm.errors import (
    AllowlistInvalid,
    CertificateInvalid,
    ConfigError,
    FetchError,
    KeyTokenInvalid,
    LauncherRefused,
    PolicyBundleInvalid,
    PolicyError,
    RevocationUnknown,
    SessionFailed,
)
from pam_svmm.services.auth import load_pem_bundle
from pam_svmm.services.dmcrypt import DmcryptVolumes
from pam_svmm.services.launcher import live_sessions, parse_request
from pam_svmm.services.session import SessionManager
from tests.unit.certfactory import make_ca
from tests.unit.launcher_fixtures import make_launcher

REPO = Path(__file__).resolve().parents[2]
DEEP_JSON = [b"[" * 100_000, b'{"a":' * 50_000 + b"1" + b"}" * 50_000]
DEEP_TOML = ["x = " + "[" * 100_000, "x = " + "{a = " * 5_000 + "1" + "}" * 5_000]


# --- 4. certificates cryptography refuses with something other than ValueError --------------


def _bad_version(der: bytes, marker: bytes) -> bytes:
    i = der.index(marker)  # the version INTEGER: v3 (2) becomes 5, which X.509 does not have
    return der[: i + len(marker) - 1] + b"\x05" + der[i + len(marker) :]


def _pem(der: bytes, label: str = "CERTIFICATE") -> bytes:
    body = base64.encodebytes(der).decode()
    return f"-----BEGIN {label}-----\n{body}-----END {label}-----\n".encode()


@pytest.fixture(scope="module")
def bad_cert() -> tuple[Any, bytes]:
    ca = make_ca("Policy signer", key_kind="p256", slot=7)
    der = ca.cert.public_bytes(Encoding.DER)
    return ca, _bad_version(der, bytes.fromhex("a003020102"))


def test_a_policy_bundle_signer_with_an_invalid_version_is_bundle_malformed(
    bad_cert: tuple[Any, bytes],
) -> None:
    ca, bad = bad_cert
    doc = json.loads(make_bundle(b"version = 1\n", ca.key, [ca.cert]))
    doc["certificates"] = [_pem(bad).decode()]
    with pytest.raises(PolicyBundleInvalid) as e:
        parse_bundle(json.dumps(doc).encode())
    assert e.value.reason == "bundle_malformed"


def test_every_parser_of_certificate_bytes_gives_a_typed_error(
    bad_cert: tuple[Any, bytes], tmp_path: Path
) -> None:
    _, bad = bad_cert
    with pytest.raises(CertificateInvalid):
        parse_certificate(bad)
    with pytest.raises(CertificateInvalid):
        CardCertificate("card", b"\x01", bad).load()
    (tmp_path / "anchor.pem").write_bytes(_pem(bad))
    with pytest.raises(ValueError, match=r"anchor\.pem"):  # the callers' ConfigError
        load_pem_bundle([tmp_path / "anchor.pem"])


def test_a_crl_with_an_invalid_version_is_revocation_unknown() -> None:
    ca = make_ca("CRL issuer", key_kind="p256", slot=8)
    t = dt.datetime(2025, 1, 1)
    builder = x509.CertificateRevocationListBuilder().issuer_name(ca.cert.subject)
    builder = builder.last_update(t).next_update(t + dt.timedelta(days=1))
    crl = builder.sign(ca.key, hashes.SHA256())
    bad = _bad_version(crl.public_bytes(Encoding.DER), bytes.fromhex("020101"))
    for data in (bad, _pem(bad, "X509 CRL")):
        with pytest.raises(RevocationUnknown):
            parse_crl(data, "test")
