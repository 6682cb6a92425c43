"""`svmm card issue` / `svmm card revoke` on blank SoftHSM2 tokens, with the lab's CA.

The key pair is generated on the token, the request is signed there through OpenSSL's
pkcs11 engine, and the issued card then logs in through the real PAM stack.
"""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509 import ocsp

from pam_svmm import config as config_mod
from pam_svmm.adapters.token import KeySpec, Pkcs11Module, TokenInfo
from pam_svmm.domain.certpolicy import CertPolicy, fingerprint, key_description, validate_chain
from pam_svmm.domain.signing import SignatureScheme
from pam_svmm.errors import (
    CertificateInvalid,
    CertificateUntrusted,
    DirectoryUnavailable,
    IssueFailed,
)
from pam_svmm.services.issuing import (
    CardIssuer,
    CertificateAuthority,
    CommandCA,
    IssueRequest,
    OpensslCsrSigner,
)
from pam_svmm.services.login import LoginService
from svmm_lab.demo_ca import DemoCA
from svmm_lab.directory import Slapd
from svmm_lab.lab import Lab, Reader
from svmm_lab.responders import OcspResponder
from tests.integration import ldap_fixtures
from tests.integration import softhsm as fixtures
from tests.integration.softhsm import SO_PIN, USER_PIN, SoftHsm

pytestmark = pytest.mark.integration
pinguard_so = fixtures.pinguard_so  # the fixtures this module uses
softhsm = fixtures.softhsm
slapd_factory, fresh_slapd = ldap_fixtures.slapd_factory, ldap_fixtures.fresh_slapd
REPO = Path(__file__).resolve().parents[2]
ANCHOR_LABEL = "svmm-trust-anchor"


def issuer_for(
    lab: Lab,
    module: Pkcs11Module,
    *,
    ca: CertificateAuthority | None = None,
    run: Any = subprocess.run,
    publisher: Any = None,
) -> CardIssuer:
    cfg = config_mod.load(lab.config_path)
    svc = LoginService(cfg)
    return CardIssuer(
        module,
        ca=ca or DemoCA(lab.ca),
        anchors=svc.anchors,
        intermediates=svc.intermediates,
        policy=CertPolicy.from_config(cfg.trust),
        anchor_label=cfg.mutual.card_anchor_label,
        csr_signer=OpensslCsrSigner(str(module.path), run=run),
        publisher=publisher,
    )


def blank_card(module: Pkcs11Module, label: str) -> TokenInfo:
    return module.init_token(label, SO_PIN, USER_PIN)


def objects(module: Pkcs11Module, token: TokenInfo) -> list[tuple[int, bytes, str]]:
    """(class, CKA_ID, label) of every object on the token, private ones included."""
    import PyKCS11

    s = module.lib.openSession(token.slot_id)
    try:
        s.login(USER_PIN)
        out = []
        for h in s.findObjects([]):
            cls, cka_id, label = s.getAttributeValue(
                h, [PyKCS11.CKA_CLASS, PyKCS11.CKA_ID, PyKCS11.CKA_LABEL], allAsBinary=True
            )
            out.append((int.from_bytes(bytes(cls), "little"), bytes(cka_id), bytes(label).decode()))
        s.logout()
        return out
    finally:
        s.closeSession()


def reader_of(hsm: SoftHsm) -> Reader:
    return Reader(hsm.root, hsm.env())


def ocsp_status(lab: Lab, cert: x509.Certificate) -> ocsp.OCSPCertStatus:
    req = (
        ocsp.OCSPRequestBuilder()
        .add_certificate(cert, lab.ca.intermediate.cert, hashes.SHA1())  # noqa: S303
        .build()
        .public_bytes(serialization.Encoding.DER)
    )
    http = urllib.request.Request(  # noqa: S310 - the lab's loopback responder
        lab.ca.ocsp_url, data=req, headers={"Content-Type": "application/ocsp-request"}
    )
    with urllib.request.urlopen(http, timeout=5) as resp:  # noqa: S310
        answer = ocsp.load_der_ocsp_response(resp.read())
    assert answer.response_status is ocsp.OCSPResponseStatus.SUCCESSFUL
    return answer.certificate_status


def reload_ocsp(lab: Lab) -> None:
    """openssl ocsp answers the first request after an index change from the old index."""
    port = urlsplit(lab.ca.ocsp_url).port
    assert port
    OcspResponder(lab.ca_dir, port).reload()


def verify(public_key: Any, scheme: SignatureScheme, signature: bytes, data: bytes) -> None:
    if isinstance(public_key, rsa.RSAPublicKey):
        public_key.verify(signature, data, padding.PKCS1v15(), hashes.SHA256())
    else:
        h = hashes.SHA384() if scheme is SignatureScheme.ECDSA_SHA384 else hashes.SHA256()
        public_key.verify(signature, data, ec.ECDSA(h))


# --- issuing on a blank card, then logging in ---------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "holder", "key_text"),
    [
        (KeySpec.RSA_2048, "alice", "RSA-2048"),
        (KeySpec.EC_P256, "bob", "P-256"),
        (KeySpec.EC_P384, "carol", "P-384"),
    ],
)
def test_issue_on_a_blank_card_then_log_in(
    lab: Lab, softhsm: SoftHsm, spec: KeySpec, holder: str, key_text: str
) -> None:
    import PyKCS11

    module = softhsm.open()
    token = blank_card(module, f"{holder} new card")
    request = IssueRequest(holder, upn=f"{holder}@demo.example", key_spec=spec)
    result = issuer_for(lab, module).issue(token, request, pin=USER_PIN)

    cert = result.certificate
    assert result.key_id == b"\x01" and result.anchor_written
    assert result.chain[-1] == lab.ca.root.cert
    assert cert.issuer == lab.ca.intermediate.cert.subject
    # What the card holds: key pair, certificate (same id), the organisation's anchor.
    with module.session(token) as s:
        on_card = {c.label: c for c in s.certificates()}
        assert on_card["auth"].id == b"\x01"
        assert on_card["auth"].der == cert.public_bytes(serialization.Encoding.DER)
        assert on_card[ANCHOR_LABEL].der == lab.ca.root.cert.public_bytes(
            serialization.Encoding.DER
        )
        # The card's key signs, and the certificate's key verifies it.
        s.login(USER_PIN)
        scheme, sig = s.sign(b"\x01", b"host challenge")
        verify(cert.public_key(), scheme, sig, b"host challenge")
        # The private key is sensitive and never left the card.
        h = s._s.findObjects([(PyKCS11.CKA_CLASS, PyKCS11.CKO_PRIVATE_KEY)])
        assert len(h) == 1
        flags = s._s.getAttributeValue(
            h[0],
            [
                PyKCS11.CKA_SENSITIVE,
                PyKCS11.CKA_EXTRACTABLE,
                PyKCS11.CKA_NEVER_EXTRACTABLE,
                PyKCS11.CKA_ALWAYS_SENSITIVE,
            ],
        )
        assert flags == [True, False, True, True]
        secret = PyKCS11.CKA_PRIVATE_EXPONENT if spec is KeySpec.RSA_2048 else PyKCS11.CKA_VALUE
        # PyKCS11 answers CKR_ATTRIBUTE_SENSITIVE with None.
        assert s._s.getAttributeValue(h[0], [secret], allAsBinary=True) == [None]
    policy = CertPolicy.from_config(config_mod.load(lab.config_path).trust)
    chain = validate_chain(
        cert,
        [lab.ca.intermediate.cert],
        [lab.ca.root.cert],
        at=dt.datetime.now(dt.UTC),
        policy=policy,
    )
    assert chain[-1] == lab.ca.root.cert
    softhsm.close()

    # The product's whole login: PAM, PIN, challenge, chain, OCSP, mapping.
    reload_ocsp(lab)
    before = len(lab.audit_records())
    report = lab.login(reader_of(softhsm), pin=USER_PIN, user=holder)
    assert report.ok, report
    assert report.user == holder
    auth = [r for r in lab.audit_records()[before:] if r["event"] == "auth"]
    assert auth[-1]["card"]["fingerprint"] == fingerprint(cert)
    assert key_text in key_description(cert)


def test_the_configured_ca_command_path_with_the_demo_ca(lab: Lab, softhsm: SoftHsm) -> None:
    """`python -m svmm_lab.pki sign-csr DIR` as [issue] ca_command: the CSR travels."""
    module = softhsm.open()
    token = blank_card(module, "dave new card")
    env_path = f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
    ca = CommandCA(
        (
            "/usr/bin/env",
            f"PYTHONPATH={env_path}",
            sys.executable,
            "-m",
            "svmm_lab.pki",
            "sign-csr",
            str(lab.ca_dir),
        ),
        timeout=30,
    )
    request = IssueRequest("dave", upn="dave@demo.example", email="dave@demo.example")
    result = issuer_for(lab, module, ca=ca).issue(token, request, pin=USER_PIN)
    san = result.certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.value.get_values_for_type(x509.RFC822Name) == ["dave@demo.example"]
    assert result.chain[-1] == lab.ca.root.cert


def test_a_second_issue_keeps_the_first_key_and_uses_a_new_id(lab: Lab, softhsm: SoftHsm) -> None:
    module = softhsm.open()
    token = blank_card(module, "eve renewal")
    issuer = issuer_for(lab, module)
    first = issuer.issue(token, IssueRequest("eve", key_id=None), pin=USER_PIN)
    second = issuer.issue(token, IssueRequest("eve", key_label="renewed"), pin=USER_PIN)
    assert (first.key_id, second.key_id) == (b"\x01", b"\x02")
    assert not second.anchor_written  # already there
    with pytest.raises(IssueFailed) as e:
        issuer.issue(token, IssueRequest("eve", key_id=b"\x01"), pin=USER_PIN)
    assert e.value.reason == "key_id_in_use"


# --- all or nothing -------------------------------------------------------------------------------

CA_SCRIPT = """
import sys
sys.path.insert(0, sys.argv[1])
from pathlib import Path
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import ExtendedKeyUsageOID
from svmm_lab.pki import LabCA, new_key
ca = LabCA.open(Path(sys.argv[2]))
csr = x509.load_pem_x509_csr(sys.stdin.buffer.read())
mode = sys.argv[3]
if mode == "fail":
    print("CA database locked", file=sys.stderr)
    sys.exit(3)
if mode == "other-key":
    cert = ca.issue_user("alice", new_key("p256").public_key())
elif mode == "no-login-eku":
    cert = ca.issue_user("alice", csr.public_key(), ekus=(ExtendedKeyUsageOID.EMAIL_PROTECTION,))
elif mode == "garbage":
    sys.stdout.write("not a certificate")
    sys.exit(0)
else:
    cert = ca.sign_csr(csr)
sys.stdout.buffer.write(cert.public_bytes(serialization.Encoding.PEM))
"""


@pytest.mark.parametrize(
    ("mode", "error", "reason"),
    [
        ("fail", IssueFailed, "ca_command_failed"),
        ("garbage", IssueFailed, "ca_output_invalid"),
        ("other-key", IssueFailed, "certificate_key_mismatch"),
        ("no-login-eku", CertificateInvalid, None),
        ("rogue", CertificateUntrusted, "certificate_untrusted"),
    ],
)
def test_a_failing_ca_leaves_nothing_on_the_card(
    lab: Lab, softhsm: SoftHsm, tmp_path: Path, mode: str, error: type, reason: str | None
) -> None:
    script = tmp_path / "ca.py"
    script.write_text(CA_SCRIPT)
    ca_dir = lab.rogue_ca.folder if mode == "rogue" else lab.ca_dir
    ca = CommandCA((sys.executable, str(script), str(REPO), str(ca_dir), mode), timeout=30)
    module = softhsm.open()
    token = blank_card(module, "frank new card")
    with pytest.raises(error) as e:
        issuer_for(lab, module, ca=ca).issue(token, IssueRequest("frank"), pin=USER_PIN)
    if reason:
        assert e.value.reason == reason
    if mode == "fail":
        assert "CA database locked" in e.value.message
    assert objects(module, token) == []


def test_a_ca_command_that_hangs_is_cut_short(lab: Lab, softhsm: SoftHsm) -> None:
    module = softhsm.open()
    token = blank_card(module, "gina new card")
    ca = CommandCA(("/bin/sleep", "30"), timeout=1)
    with pytest.raises(IssueFailed) as e:
        issuer_for(lab, module, ca=ca).issue(token, IssueRequest("gina"), pin=USER_PIN)
    assert e.value.reason == "ca_command_timeout"
    assert objects(module, token) == []


class BrokenDirectory:
    def publish(self, der: bytes) -> str:
        raise DirectoryUnavailable("no directory server answered (ldap://127.0.0.1:9)")


def test_a_failed_publish_removes_key_certificate_and_anchor(lab: Lab, softhsm: SoftHsm) -> None:
    module = softhsm.open()
    token = blank_card(module, "hank new card")
    issuer = issuer_for(lab, module, publisher=BrokenDirectory())
    with pytest.raises(IssueFailed) as e:
        issuer.issue(token, IssueRequest("hank"), pin=USER_PIN)
    assert e.value.reason == "directory_unavailable"
    assert "revoke it" in e.value.message  # the CA issued a certificate that is on no card
    assert objects(module, token) == []


def test_an_anchor_already_on_the_card_survives_a_rollback(lab: Lab, softhsm: SoftHsm) -> None:
    module = softhsm.open()
    token = blank_card(module, "ivy new card")
    root_der = lab.ca.root.cert.public_bytes(serialization.Encoding.DER)
    with module.session(token, rw=True) as s:
        s.login(USER_PIN)
        s.write_trust_anchor(root_der, label=ANCHOR_LABEL)
    with pytest.raises(IssueFailed):
        issuer_for(lab, module, publisher=BrokenDirectory()).issue(
            token, IssueRequest("ivy"), pin=USER_PIN
        )
    assert [label for _, _, label in objects(module, token)] == [ANCHOR_LABEL]


# --- the PIN ----------------------------------------------------------------------------------


def exec_cmdline(pid: int, program: str, timeout: float = 10.0) -> bytes:
    """/proc/PID/cmdline once PID has exec'd ``program`` (Popen may return before the exec)."""
    deadline = time.monotonic() + timeout
    while True:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        if cmdline.startswith(program.encode() + b"\0") or time.monotonic() > deadline:
            return cmdline
        time.sleep(0.005)


def test_the_pin_never_reaches_a_child_process_argv_or_environment(
    lab: Lab, softhsm: SoftHsm
) -> None:
    pin = "730591"
    module = softhsm.open()
    token = module.init_token("jan new card", SO_PIN, pin)
    seen: list[tuple[list[str], bytes, bytes, bytes]] = []

    def run(argv: list[str], **kw: Any) -> subprocess.CompletedProcess[bytes]:
        """subprocess.run, reading the live child's /proc cmdline and environ.

        The PIN pipe is swapped for an empty one first, so openssl waits for its PIN (alive,
        exec'd) until /proc has been read; then it gets the PIN the service wrote."""
        fd = int(argv[argv.index("-passin") + 1].removeprefix("fd:"))
        pin_bytes = os.read(fd, 4096)
        r, w = os.pipe()
        os.dup2(r, fd)
        os.close(r)
        timeout = kw.pop("timeout")
        kw.pop("check")
        kw.pop("capture_output")
        with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw) as p:
            try:
                cmdline = exec_cmdline(p.pid, argv[0])
                environ = Path(f"/proc/{p.pid}/environ").read_bytes()
            finally:
                os.write(w, pin_bytes)
                os.close(w)
            out, err = p.communicate(timeout=timeout)
        seen.append((argv, cmdline, environ, pin_bytes))
        return subprocess.CompletedProcess(argv, p.returncode, out, err)

    issuer_for(lab, module, run=run).issue(token, IssueRequest("jan"), pin=pin)
    assert len(seen) == 1
    argv, cmdline, environ, piped = seen[0]
    assert piped == pin.encode() + b"\n"  # the PIN went through the pipe
    assert b"openssl" in cmdline and b"pkcs11" in cmdline  # the live process was read
    assert "-passin" in argv and argv[argv.index("-passin") + 1].startswith("fd:")
    assert not any(pin in a for a in argv)
    assert pin.encode() not in cmdline and pin.encode() not in environ


# --- the command line -----------------------------------------------------------------------------


def svmm(lab: Lab, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, SVMM_CONFIG=str(lab.config_path))
    return subprocess.run(
        [sys.executable, "-m", "pam_svmm.cli.main", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
        stdin=subprocess.DEVNULL,
    )


def test_cli_issue_list_revoke_then_the_card_is_refused(
    lab: Lab, softhsm: SoftHsm, tmp_path: Path
) -> None:
    pin_file, so_file = tmp_path / "pin", tmp_path / "so-pin"
    pin_file.write_text(USER_PIN + "\n")
    so_file.write_text(SO_PIN + "\n")
    pin_file.chmod(0o600)
    so_file.chmod(0o600)
    p = svmm(
        lab, "card", "issue", "--user", "kim", "--upn", "kim@demo.example", "--key", "ec-p384",
        "--init", "kim ID card", "--pin-file", str(pin_file), "--so-pin-file", str(so_file),
        "--demo-ca", str(lab.ca_dir), "--no-publish",
    )  # fmt: skip
    assert p.returncode == 0, p.stdout + p.stderr
    assert "issued on 'kim ID card'" in p.stdout and "P-384" in p.stdout
    assert "trust anchor" in p.stdout and "written" in p.stdout

    listing = svmm(lab, "card", "list", "--user", "kim")
    assert listing.returncode == 0, listing.stdout + listing.stderr
    assert "would use 'auth' on 'kim ID card' for kim" in listing.stdout

    with softhsm.open() as module:
        (token,) = module.tokens()
        (cert,) = [c.load() for c in module.certificates(token) if c.label == "auth"]
    softhsm.close()
    cert_file = tmp_path / "kim.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    revoked = svmm(lab, "card", "revoke", "--cert", str(cert_file), "--demo-ca", str(lab.ca_dir))
    assert revoked.returncode == 0, revoked.stdout + revoked.stderr
    crl = x509.load_der_x509_crl((lab.ca_dir / "intermediate.crl").read_bytes())
    entry = crl.get_revoked_certificate_by_serial_number(cert.serial_number)
    assert entry is not None
    assert entry.extensions.get_extension_for_class(x509.CRLReason).value.reason == (
        x509.ReasonFlags.key_compromise
    )
    reload_ocsp(lab)
    assert ocsp_status(lab, cert) is ocsp.OCSPCertStatus.REVOKED

    before = len(lab.audit_records())
    report = lab.login(reader_of(softhsm), pin=USER_PIN, user="kim")
    assert report.name == "PAM_AUTH_ERR", report
    auth = [r for r in lab.audit_records()[before:] if r["event"] == "auth"]
    assert auth[-1]["reason"] == "certificate_revoked"


def test_cli_revoke_for_a_real_ca_says_what_to_do(lab: Lab) -> None:
    p = svmm(lab, "card", "revoke", "--serial", "1a2b3c", "--reason", "superseded")
    assert p.returncode == 1
    assert "serial 1a2b3c" in p.stdout and "superseded" in p.stdout
    assert "publish a new CRL" in p.stdout


def test_cli_revoke_of_an_unknown_serial_with_the_demo_ca(lab: Lab) -> None:
    p = svmm(lab, "card", "revoke", "--serial", "0badc0de", "--demo-ca", str(lab.ca_dir))
    assert p.returncode != 0
    assert "no serial badc0de" in p.stderr


def test_cli_refuses_a_pin_file_others_can_read(lab: Lab, softhsm: SoftHsm, tmp_path: Path) -> None:
    pin_file = tmp_path / "pin"
    pin_file.write_text(USER_PIN)
    pin_file.chmod(0o644)
    p = svmm(
        lab, "card", "issue", "--user", "lee", "--init", "lee card", "--pin-file", str(pin_file),
        "--so-pin-file", str(pin_file), "--demo-ca", str(lab.ca_dir), "--no-publish",
    )  # fmt: skip
    assert p.returncode == 5
    assert "group or others" in p.stderr


# --- publishing to the directory ----------------------------------------------------------------


def test_cli_issue_publishes_to_the_users_directory_entry(
    lab: Lab, softhsm: SoftHsm, fresh_slapd: Slapd, tmp_path: Path
) -> None:
    from pam_svmm.adapters.directory import DirectoryClient

    server = fresh_slapd
    service_pw = server.write_password_file(tmp_path / "service.pw", "service")
    publisher_pw = server.write_password_file(tmp_path / "publisher.pw", "publisher")
    cfg_path = lab.write_config(
        f"""
[directory]
enabled = true
uris = ["{server.uri}"]
base_dn = "{server.base_dn}"
bind_dn = "{server.service_dn}"
bind_password_file = "{service_pw}"
ca_file = "{server.ca_file}"
cache_dir = "{tmp_path / "identity-cache"}"

[[certmap.rules]]
name = "upn"
map = "(svmmPrincipalName={{upn}})"

[issue]
publish_bind_dn = "{server.publisher_dn}"
publish_password_file = "{publisher_pw}"
""",
        tmp_path / "svmm.toml",
    )
    pin_file = tmp_path / "pin"
    pin_file.write_text(USER_PIN)
    pin_file.chmod(0o600)
    env = dict(os.environ, SVMM_CONFIG=str(cfg_path))
    p = subprocess.run(
        [sys.executable, "-m", "pam_svmm.cli.main", "card", "issue", "--user", "carol",
         "--upn", "carol@demo.example", "--init", "carol new card", "--pin-file", str(pin_file),
         "--so-pin-file", str(pin_file), "--demo-ca", str(lab.ca_dir)],
        capture_output=True, text=True, env=env, timeout=120, check=False,
        stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert p.returncode == 0, p.stdout + p.stderr
    dn = server.user_dn("carol")
    assert f"published to {dn}" in p.stdout
    with softhsm.open() as module:
        (token,) = module.tokens()
        (on_card,) = [c.der for c in module.certificates(token) if c.label == "auth"]
    cfg = config_mod.load(cfg_path)
    with DirectoryClient.from_config(cfg.directory) as client:
        assert on_card in client.identity(dn).certificates


def test_an_unknown_user_is_refused_before_the_card_is_touched(
    lab: Lab, softhsm: SoftHsm, fresh_slapd: Slapd, tmp_path: Path
) -> None:
    from pam_svmm.errors import UnknownUser
    from pam_svmm.services.issuing import directory_publisher

    server = fresh_slapd
    cfg = config_mod.parse(
        {
            "directory": {
                "enabled": True,
                "uris": [server.uri],
                "base_dn": server.base_dn,
                "bind_dn": server.service_dn,
                "bind_password_file": str(server.write_password_file(tmp_path / "s.pw")),
                "ca_file": str(server.ca_file),
            },
            "certmap": {"rules": [{"name": "upn", "map": "(svmmPrincipalName={upn})"}]},
            "issue": {
                "publish_bind_dn": server.publisher_dn,
                "publish_password_file": str(
                    server.write_password_file(tmp_path / "p.pw", "publisher")
                ),
            },
        }
    )
    with pytest.raises(UnknownUser):
        directory_publisher(cfg, "nobody-here")
    publisher = directory_publisher(cfg, "bob")
    assert publisher.dn == server.user_dn("bob")
