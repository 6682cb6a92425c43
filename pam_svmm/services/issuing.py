"""Rolling cards out: `svmm card issue`, and `svmm card revoke` for the demo CA.

The private key never exists outside the card:

1. the key pair is generated ON the card (sensitive, never extractable; checked);
2. the certificate request is signed BY THE CARD: ``openssl req`` with OpenSSL's pkcs11
   engine (libp11, Debian's libengine-pkcs11-openssl) in a child process that loads the
   same PKCS#11 module and reads the PIN from a pipe (``-passin fd:N``), never argv or
   environment; the request's signature and its public key are then checked here;
3. the CA certifies it: a configured command (CSR PEM on stdin, certificate PEM on stdout,
   bounded time) or the demo CA; the certificate must carry the card's key, chain to the
   configured anchors and pass the login policy (EKU, key usage, validity, key strength);
4. the certificate (same CKA_ID as the key) and the organisation's anchor are written to the
   card, and the certificate is published to the user's directory entry.

All or nothing: if any step after key generation fails, the objects this run created on the
card are destroyed, so no half-issued card is left behind.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ..adapters.token import KeySpec
from ..domain import certpolicy
from ..domain.certpolicy import PARSE_ERRORS
from ..errors import IssueFailed, SvmmError, TokenError

if TYPE_CHECKING:
    from ..adapters.token import Pkcs11Module, TokenInfo, TokenSession
    from ..config import Config

UTC = dt.UTC
CSR_TIMEOUT = 60.0  # seconds for the card to sign the request (a PIN pad waits for a human)
CA_TIMEOUT = 120.0
MAX_CA_OUTPUT = 1 << 20

# Only characters that mean nothing to `openssl req -subj` / `-addext` parsing (no / \ + = , :)
# reach the child's argv: the names are data, never syntax.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9 ._'@-]{0,63}")
_MAIL = re.compile(r"[A-Za-z0-9._%+-]{1,64}@[A-Za-z0-9-]{1,63}(\.[A-Za-z0-9-]{1,63})+")
_DIGEST = {KeySpec.RSA_2048: "sha256", KeySpec.EC_P256: "sha256", KeySpec.EC_P384: "sha384"}
UPN_OID = x509.ObjectIdentifier("1.3.6.1.4.1.311.20.2.3")


@dataclass(frozen=True)
class IssueRequest:
    """What to put on the card. ``key_id`` None: the lowest one-byte CKA_ID free on the card."""

    common_name: str
    upn: str | None = None
    email: str | None = None
    organisation: str | None = None
    key_spec: KeySpec = KeySpec.EC_P256
    key_id: bytes | None = None
    key_label: str = "auth"

    def __post_init__(self) -> None:
        for what, value in (("common name", self.common_name), ("organisation", self.organisation)):
            if value is not None and not _NAME.fullmatch(value):
                raise IssueFailed(
                    f"{what} {value!r}: use letters, digits, space and . _ ' @ - (64 at most)",
                    reason="request_invalid",
                )
        for what, value in (("UPN", self.upn), ("e-mail", self.email)):
            if value is not None and not _MAIL.fullmatch(value):
                raise IssueFailed(f"{what} {value!r} is not name@domain", reason="request_invalid")
        if self.key_id is not None and not 1 <= len(self.key_id) <= 64:
            raise IssueFailed("the key id must be 1 to 64 bytes", reason="request_invalid")
        if not self.key_label or len(self.key_label.encode()) > 64:
            raise IssueFailed("the key label must be 1 to 64 bytes", reason="request_invalid")

    def subject_arg(self) -> str:
        """`openssl req -subj`: CN and, if given, O."""
        org = f"/O={self.organisation}" if self.organisation else ""
        return f"/CN={self.common_name}{org}"

    def san_arg(self) -> str | None:
        """`openssl req -addext`: the UPN (otherName) and e-mail the request asks for."""
        names = []
        if self.upn:
            names.append(f"otherName:{UPN_OID.dotted_string};UTF8:{self.upn}")
        if self.email:
            names.append(f"email:{self.email}")
        return f"subjectAltName={','.join(names)}" if names else None


@dataclass(frozen=True)
class IssuedCard:
    token: TokenInfo
    key_id: bytes
    certificate: x509.Certificate
    chain: tuple[x509.Certificate, ...]  # leaf first, anchor last
    anchor_written: bool
    published_to: str | None


# --- the CA -----------------------------------------------------------------------------------


class CertificateAuthority(Protocol):
    """Certifies a request; returns the certificate first, then any chain certificates."""

    def certify(
        self, csr: x509.CertificateSigningRequest, request: IssueRequest
    ) -> list[x509.Certificate]: ...


@dataclass(frozen=True)
class CommandCA:
    """``[issue] ca_command``: CSR (PEM) on stdin, certificate(s) (PEM) on stdout."""

    argv: tuple[str, ...]
    timeout: float = CA_TIMEOUT

    def certify(
        self, csr: x509.CertificateSigningRequest, request: IssueRequest
    ) -> list[x509.Certificate]:
        if not self.argv:
            raise IssueFailed("no CA command is configured", reason="ca_command_missing")
        name = Path(self.argv[0]).name
        try:
            proc = subprocess.run(
                list(self.argv),
                input=csr.public_bytes(serialization.Encoding.PEM),
                capture_output=True,
                timeout=self.timeout,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise IssueFailed(
                f"the CA command {name} gave no answer within {self.timeout:g} s",
                reason="ca_command_timeout",
            ) from None
        except OSError as e:
            raise IssueFailed(
                f"cannot run the CA command {self.argv[0]}: {e.strerror}",
                reason="ca_command_failed",
            ) from None
        if proc.returncode != 0:
            raise IssueFailed(
                f"the CA command {name} failed (exit {proc.returncode}): {_tail(proc.stderr)}",
                reason="ca_command_failed",
            )
        if len(proc.stdout) > MAX_CA_OUTPUT:
            raise IssueFailed(f"the CA command {name} wrote too much", reason="ca_output_invalid")
        try:
            certs = x509.load_pem_x509_certificates(proc.stdout)
        except PARSE_ERRORS:
            certs = []
        if not certs:
            raise IssueFailed(
                f"the CA command {name} wrote no PEM certificate", reason="ca_output_invalid"
            )
        return certs


# --- the request, signed on the card ----------------------------------------------------------


@dataclass(frozen=True)
class OpensslCsrSigner:
    """`openssl req` with the pkcs11 engine: the card signs the request.

    ``run`` is subprocess.run; tests may wrap it to look at the child's argv and environment.
    """

    module_path: str
    openssl: str | None = None  # default: `openssl` on PATH
    timeout: float = CSR_TIMEOUT
    run: Callable[..., subprocess.CompletedProcess[bytes]] = field(default=subprocess.run)

    def argv(self, key_uri: str, request: IssueRequest, *, passin_fd: int | None) -> list[str]:
        openssl = self.openssl or shutil.which("openssl")
        if openssl is None:
            raise IssueFailed("openssl is not installed", reason="openssl_missing")
        argv = [openssl, "req", "-new", "-utf8", "-engine", "pkcs11", "-keyform", "engine"]
        argv += ["-key", key_uri, "-subj", request.subject_arg()]
        argv += [f"-{_DIGEST[request.key_spec]}"]
        san = request.san_arg()
        if san is not None:
            argv += ["-addext", san]
        if passin_fd is not None:
            argv += ["-passin", f"fd:{passin_fd}"]  # the PIN comes through this pipe
        return argv

    def sign_request(
        self, token: TokenInfo, key_id: bytes, request: IssueRequest, *, pin: str | None
    ) -> x509.CertificateSigningRequest:
        uri = key_uri(token, key_id)
        with tempfile.TemporaryDirectory(prefix="svmm-csr-") as tmp:
            conf = Path(tmp) / "openssl.cnf"
            conf.write_text(_engine_conf(self.module_path))
            env = dict(os.environ, OPENSSL_CONF=str(conf))
            read_fd, write_fd = os.pipe()
            try:
                if pin is not None:
                    os.write(write_fd, pin.encode() + b"\n")  # far below a pipe's buffer
                os.close(write_fd)
                write_fd = -1
                argv = self.argv(uri, request, passin_fd=read_fd if pin is not None else None)
                proc = self.run(
                    argv,
                    stdin=subprocess.DEVNULL,
                    capture_output=True,
                    env=env,
                    pass_fds=(read_fd,) if pin is not None else (),
                    timeout=self.timeout,
                    check=False,
                )
            except subprocess.TimeoutExpired:
                raise TokenError(
                    f"the card did not sign the certificate request within {self.timeout:g} s",
                    reason="csr_timeout",
                ) from None
            finally:
                os.close(read_fd)
                if write_fd >= 0:
                    os.close(write_fd)
        if proc.returncode != 0:
            # libp11 crashes (SIGSEGV) on some login failures: the exit code says little.
            raise TokenError(
                f"the card could not sign the certificate request (openssl exit"
                f" {proc.returncode}): {_tail(proc.stderr)}",
                reason="csr_failed",
            )
        try:
            return x509.load_pem_x509_csr(proc.stdout)
        except PARSE_ERRORS:
            raise TokenError("openssl wrote no certificate request", reason="csr_failed") from None


def key_uri(token: TokenInfo, key_id: bytes) -> str:
    """RFC 7512 URI of the private key ``key_id`` on ``token`` (every value percent-encoded)."""
    parts = []
    if token.label:
        parts.append(f"token={_pct(token.label.encode())}")
    if token.serial:
        parts.append(f"serial={_pct(token.serial.encode())}")
    parts += [f"id={_pct(key_id)}", "type=private"]
    return "pkcs11:" + ";".join(parts)


def _pct(data: bytes) -> str:
    keep = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~"
    return "".join(chr(b) if b in keep else f"%{b:02X}" for b in data)


@cache
def engine_path() -> Path:
    """OpenSSL's pkcs11 engine (libengine-pkcs11-openssl), found through `openssl version -e`."""
    openssl = shutil.which("openssl")
    found: Path | None = None
    if openssl is not None:
        out = subprocess.run(
            [openssl, "version", "-e"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
        m = re.search(r'ENGINESDIR: "([^"]+)"', out)
        if m:
            found = Path(m.group(1)) / "pkcs11.so"
    if found is None or not found.is_file():
        raise IssueFailed(
            "OpenSSL's pkcs11 engine is not installed (Debian: libengine-pkcs11-openssl)",
            reason="pkcs11_engine_missing",
        )
    return found


def _engine_conf(module_path: str) -> str:
    engine = str(engine_path())
    for value in (module_path, engine):
        # The file is OpenSSL configuration syntax: no comments, variables or line breaks.
        if not value.startswith("/") or re.search(r"[\s#$\"'\\;]", value):
            raise IssueFailed(
                f"PKCS#11 module path {value!r} cannot be handed to OpenSSL's engine",
                reason="module_path_invalid",
            )
    return (
        "openssl_conf = svmm_init\n"
        "[svmm_init]\nengines = svmm_engines\n"
        "[svmm_engines]\npkcs11 = svmm_pkcs11\n"
        f"[svmm_pkcs11]\nengine_id = pkcs11\ndynamic_path = {engine}\n"
        f"MODULE_PATH = {module_path}\ninit = 0\n"
        "[req]\ndistinguished_name = svmm_dn\n[svmm_dn]\n"
    )


def _tail(stderr: bytes, limit: int = 400) -> str:
    lines = [ln for ln in stderr.decode("utf-8", "replace").splitlines() if ln.strip()]
    text = " | ".join(ln for ln in lines if 'Engine "pkcs11" set' not in ln)
    return (text[-limit:] or "no message").strip()


# --- publishing -------------------------------------------------------------------------------


class CertificatePublisher(Protocol):
    def publish(self, der: bytes) -> str: ...  # returns where it went (the entry's DN)


@dataclass
class DirectoryPublisher:
    """Adds the certificate to the user's entry (userCertificate;binary) as the publisher."""

    client: Any  # adapters.directory.DirectoryClient
    dn: str
    bind_dn: str
    password: str = field(repr=False)

    def publish(self, der: bytes) -> str:
        self.client.publish_certificate(self.dn, der, bind_dn=self.bind_dn, password=self.password)
        return self.dn


def directory_publisher(config: Config, user: str, dn: str | None = None) -> DirectoryPublisher:
    """The publisher from ``[directory]`` and ``[issue]``; ``dn`` None: look the user up.

    Built before anything touches the card, so a directory problem costs no key generation.
    """
    from ..errors import ConfigError

    if not config.directory.enabled:
        raise ConfigError("directory.enabled", "publishing needs the directory (or --no-publish)")
    if not config.issue.publish_bind_dn or config.issue.publish_password_file is None:
        raise ConfigError(
            "issue.publish_bind_dn",
            "publish_bind_dn and publish_password_file are needed to publish (or --no-publish)",
        )
    from ..adapters.directory import DirectoryClient, read_secret_file

    password = read_secret_file(
        config.issue.publish_password_file, key="issue.publish_password_file"
    )
    client = DirectoryClient.from_config(config.directory)
    if dn is None:
        identity = client.user_by_name(user)
        if identity is None:
            from ..errors import UnknownUser

            raise UnknownUser(f"no directory entry for {user!r} to publish the certificate to")
        dn = identity.dn
    return DirectoryPublisher(client, dn, config.issue.publish_bind_dn, password)


# --- issuing ----------------------------------------------------------------------------------


class CsrSigner(Protocol):
    def sign_request(
        self, token: TokenInfo, key_id: bytes, request: IssueRequest, *, pin: str | None
    ) -> x509.CertificateSigningRequest: ...


class CardIssuer:
    def __init__(
        self,
        module: Pkcs11Module,
        *,
        ca: CertificateAuthority,
        anchors: Sequence[x509.Certificate],
        intermediates: Sequence[x509.Certificate] = (),
        policy: certpolicy.CertPolicy,
        anchor_label: str,
        csr_signer: CsrSigner | None = None,
        publisher: CertificatePublisher | None = None,
        clock: Callable[[], dt.datetime] = lambda: dt.datetime.now(UTC),
    ) -> None:
        self.module = module
        self.ca = ca
        self.anchors = list(anchors)
        self.intermediates = list(intermediates)
        self.policy = policy
        self.anchor_label = anchor_label
        self.csr_signer = csr_signer or OpensslCsrSigner(module.path)
        self.publisher = publisher
        self.clock = clock

    @classmethod
    def from_config(
        cls,
        config: Config,
        module: Pkcs11Module,
        *,
        ca: CertificateAuthority,
        anchors: Sequence[x509.Certificate],
        intermediates: Sequence[x509.Certificate] = (),
        publisher: CertificatePublisher | None = None,
    ) -> CardIssuer:
        return cls(
            module,
            ca=ca,
            anchors=anchors,
            intermediates=intermediates,
            policy=certpolicy.CertPolicy.from_config(config.trust),
            anchor_label=config.mutual.card_anchor_label,
            csr_signer=OpensslCsrSigner(config.pkcs11.module),
            publisher=publisher,
        )

    def issue(self, token: TokenInfo, request: IssueRequest, *, pin: str | None) -> IssuedCard:
        """Issue a certificate for a key made on ``token``; all or nothing (see the module)."""
        if not token.login_required:
            raise TokenError(f"token {token.describe()} needs no PIN: not a card to issue on")
        if not self.anchors:
            raise IssueFailed("no trust anchor is configured", reason="anchors_missing")
        with self.module.session(token, rw=True) as s:
            s.login(pin)
            used = s.object_ids()
            key_id = request.key_id or _free_key_id(used)
            if key_id in used:
                raise IssueFailed(
                    f"key id {key_id.hex()} is already used on {token.describe()}",
                    reason="key_id_in_use",
                )
            undo = _Undo(s, key_id)
            issued_serial: int | None = None
            try:
                undo.key = True
                public_key = s.generate_key_pair(
                    request.key_spec, key_id=key_id, label=request.key_label
                )
                _check_key_stays_on_card(s, key_id)
                csr = self.csr_signer.sign_request(token, key_id, request, pin=pin)
                _check_request(csr, public_key)
                leaf, chain = self._certify(csr, request, public_key)
                issued_serial = leaf.serial_number
                der = leaf.public_bytes(serialization.Encoding.DER)
                undo.certificate = True
                s.write_certificate(der, key_id=key_id, label=request.key_label)
                anchor = chain[-1]
                anchor_der = anchor.public_bytes(serialization.Encoding.DER)
                have = [c.der for c in s.certificates() if c.label == self.anchor_label]
                if anchor_der not in have:
                    undo.anchor = anchor_der
                    s.write_trust_anchor(anchor_der, label=self.anchor_label)
                published = self.publisher.publish(der) if self.publisher else None
            except BaseException as e:
                problem = undo.run(self.anchor_label)
                if problem or (issued_serial is not None and isinstance(e, SvmmError)):
                    raise _after_undo(e, problem, issued_serial) from e
                raise
        return IssuedCard(
            token=self.module.token_info(token.slot_id),
            key_id=key_id,
            certificate=leaf,
            chain=tuple(chain),
            anchor_written=undo.anchor is not None,
            published_to=published,
        )

    def _certify(
        self, csr: x509.CertificateSigningRequest, request: IssueRequest, public_key: Any
    ) -> tuple[x509.Certificate, list[x509.Certificate]]:
        certs = self.ca.certify(csr, request)
        leaf, extra = certs[0], certs[1:]
        if _spki(leaf.public_key()) != _spki(public_key):
            raise IssueFailed(
                f"the CA returned a certificate ({leaf.subject.rfc4514_string()}, serial"
                f" {leaf.serial_number:x}) for another key than the card's",
                reason="certificate_key_mismatch",
            )
        # The login's own rules: if a login would refuse it, it must not go on a card.
        chain = certpolicy.validate_chain(
            leaf, [*self.intermediates, *extra], self.anchors, at=self.clock(), policy=self.policy
        )
        return leaf, chain


def _check_request(csr: x509.CertificateSigningRequest, public_key: Any) -> None:
    if not csr.is_signature_valid:
        raise IssueFailed("the card's certificate request does not verify", reason="csr_invalid")
    if _spki(csr.public_key()) != _spki(public_key):
        raise IssueFailed(
            "the certificate request carries another key than the one generated",
            reason="csr_invalid",
        )


def _spki(public_key: Any) -> bytes:
    return bytes(
        public_key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


def _free_key_id(used: set[bytes]) -> bytes:
    for i in range(1, 256):
        if bytes([i]) not in used:
            return bytes([i])
    raise IssueFailed("no free one-byte key id on the card; give one", reason="key_id_in_use")


def _after_undo(error: BaseException, problem: str, serial: int | None) -> IssueFailed:
    msg = error.message if isinstance(error, SvmmError) else f"{type(error).__name__}: {error}"
    reason = error.reason if isinstance(error, SvmmError) else "issue_failed"
    if serial is not None:
        msg += f"; the CA issued serial {serial:x}, which is on no card: revoke it"
    if problem:
        msg += f"; cleaning the card failed ({problem}): it may hold a partial issue"
        reason = "rollback_failed"
    return IssueFailed(msg, reason=reason)


def _check_key_stays_on_card(s: TokenSession, key_id: bytes) -> None:
    sensitive, extractable = s.key_protection(key_id)
    if not sensitive or extractable:
        raise IssueFailed(
            "the card generated a key it would let out (not sensitive or extractable)",
            reason="key_extractable",
        )


@dataclass
class _Undo:
    """What this run created on the card, to destroy if a later step fails."""

    session: TokenSession
    key_id: bytes
    key: bool = False
    certificate: bool = False
    anchor: bytes | None = None

    def run(self, anchor_label: str) -> str:
        kinds: tuple[str, ...] = ()
        if self.key:
            kinds += ("private", "public")
        if self.certificate:
            kinds += ("cert",)
        problems = []
        try:
            if kinds:
                self.session.destroy(key_id=self.key_id, kinds=kinds)
        except SvmmError as e:
            problems.append(e.message)
        if self.anchor is not None:
            try:
                self.session.destroy(kinds=("cert",), label=anchor_label, value=self.anchor)
            except SvmmError as e:
                problems.append(e.message)
        return "; ".join(problems)


# --- revocation (the demo CA) -----------------------------------------------------------------

REVOCATION_REASONS: dict[str, x509.ReasonFlags] = {
    r.value: r
    for r in (
        x509.ReasonFlags.key_compromise,
        x509.ReasonFlags.affiliation_changed,
        x509.ReasonFlags.superseded,
        x509.ReasonFlags.cessation_of_operation,
        x509.ReasonFlags.privilege_withdrawn,
    )
}


def real_ca_revocation_steps(serial: int, reason: x509.ReasonFlags) -> str:
    """What an administrator does when the certificate comes from the organisation's CA."""
    return (
        f"The certificate (serial {serial:x}) was not issued by the demo CA; svmm cannot"
        " revoke it. At the organisation's CA:\n"
        f"  1. revoke serial {serial:x} with reason {reason.value};\n"
        "  2. publish a new CRL at the certificate's CRL distribution point and let the OCSP"
        " responder pick up the change;\n"
        "  3. remove the certificate from the user's directory entry (userCertificate;binary);\n"
        "  4. hosts refuse the card at their next CRL/OCSP check (`svmm cert verify FILE`"
        " shows it)."
    )


def load_certificate_file(path: Path) -> x509.Certificate:
    data = path.read_bytes()
    with suppress(*PARSE_ERRORS):
        return x509.load_pem_x509_certificate(data)
    try:
        return x509.load_der_x509_certificate(data)
    except PARSE_ERRORS:
        raise IssueFailed(f"{path} holds no certificate", reason="certificate_unreadable") from None
