"""The demo organisation's PKI: a root, an issuing intermediate, a delegated OCSP signer.

Used by the demo lab and by the tests, never by the login path. Everything is made with
cryptography's builders; the CA state lives in one folder:

    root.pem root.key  intermediate.pem intermediate.key  ocsp.pem ocsp.key
    root.crl  intermediate.crl  (DER)          index.txt  (for `openssl ocsp -index`)
    issued/<serial>.pem                         revoked.json
"""

from __future__ import annotations

import datetime as dt
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat import asn1
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, ObjectIdentifier

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey

UPN_OID = ObjectIdentifier("1.3.6.1.4.1.311.20.2.3")
SMARTCARD_LOGON = ObjectIdentifier("1.3.6.1.4.1.311.20.2.2")
UTC = dt.UTC


def new_key(kind: str = "rsa") -> PrivateKey:
    """kind: 'rsa' (2048), 'rsa1024' (weak, for refusal tests), 'p256' or 'p384'."""
    if kind == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if kind == "rsa1024":
        return rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505 - refusal tests
    if kind == "p256":
        return ec.generate_private_key(ec.SECP256R1())
    if kind == "p384":
        return ec.generate_private_key(ec.SECP384R1())
    raise ValueError(f"unknown key kind {kind!r}")


def key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def load_key(path: Path) -> PrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    assert isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey)
    return key


def upn_other_name(upn: str) -> x509.OtherName:
    # The UPN value is an ASN.1 UTF8String; cryptography's DER encoder writes it.
    return x509.OtherName(UPN_OID, asn1.encode_der(upn))


@dataclass(frozen=True)
class Issued:
    cert: x509.Certificate
    key: PrivateKey

    @property
    def serial(self) -> int:
        return self.cert.serial_number


class LabCA:
    """A two-level CA in ``folder`` whose certificates point at loopback CRL/OCSP URLs."""

    def __init__(self, folder: Path, *, crl_base: str, ocsp_url: str, org: str = "Demo Org"):
        self.folder = folder
        self.crl_base = crl_base.rstrip("/")
        self.ocsp_url = ocsp_url
        self.org = org
        self.root: Issued
        self.intermediate: Issued
        self.ocsp: Issued

    # --- creation -------------------------------------------------------------------------

    @classmethod
    def create(
        cls,
        folder: Path,
        *,
        crl_base: str,
        ocsp_url: str,
        org: str = "Demo Org",
        now: dt.datetime | None = None,
    ) -> LabCA:
        now = now or dt.datetime.now(UTC)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "issued").mkdir(exist_ok=True)
        ca = cls(folder, crl_base=crl_base, ocsp_url=ocsp_url, org=org)
        root_key = new_key("p384")
        root_name = ca._name(f"{org} Root CA")
        root = (
            ca._builder(root_name, root_name, root_key.public_key(), now, days=3650)
            .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
            .add_extension(ca._ca_usage(), critical=True)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(root_key.public_key()), critical=False
            )
            .sign(root_key, hashes.SHA384())
        )
        ca.root = Issued(root, root_key)
        int_key = new_key("p256")
        inter = (
            ca._builder(ca._name(f"{org} Issuing CA 1"), root_name, int_key.public_key(), now, 1825)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(ca._ca_usage(), critical=True)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(int_key.public_key()), critical=False
            )
            .add_extension(ca._aki(ca.root), critical=False)
            .add_extension(ca._crl_dp("root.crl"), critical=False)
            .sign(root_key, hashes.SHA384())
        )
        ca.intermediate = Issued(inter, int_key)
        ocsp_key = new_key("p256")
        ocsp_cert = (
            ca._builder(
                ca._name(f"{org} OCSP Responder"), inter.subject, ocsp_key.public_key(), now, 365
            )
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(ca._ee_usage(), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.OCSP_SIGNING]), critical=True)
            .add_extension(x509.OCSPNoCheck(), critical=False)
            .add_extension(ca._aki(ca.intermediate), critical=False)
            .sign(int_key, hashes.SHA256())
        )
        ca.ocsp = Issued(ocsp_cert, ocsp_key)
        for name, issued in (
            ("root", ca.root),
            ("intermediate", ca.intermediate),
            ("ocsp", ca.ocsp),
        ):
            ca._write_pair(name, issued)
        (folder / "revoked.json").write_text("{}")
        (folder / "config.json").write_text(
            json.dumps({"crl_base": ca.crl_base, "ocsp_url": ocsp_url, "org": org})
        )
        ca.publish(now=now)
        return ca

    @classmethod
    def open(cls, folder: Path) -> LabCA:
        meta = json.loads((folder / "config.json").read_text())
        ca = cls(folder, crl_base=meta["crl_base"], ocsp_url=meta["ocsp_url"], org=meta["org"])
        for name in ("root", "intermediate", "ocsp"):
            cert = x509.load_pem_x509_certificate((folder / f"{name}.pem").read_bytes())
            setattr(ca, name, Issued(cert, load_key(folder / f"{name}.key")))
        return ca

    # --- issuing --------------------------------------------------------------------------

    def issue_user(
        self,
        common_name: str,
        public_key: object,
        *,
        upn: str | None = None,
        email: str | None = None,
        ekus: Sequence[ObjectIdentifier] = (ExtendedKeyUsageOID.CLIENT_AUTH, SMARTCARD_LOGON),
        key_usage: bool = True,
        not_before: dt.datetime | None = None,
        not_after: dt.datetime | None = None,
        issuer: Issued | None = None,
        extra_subject: Iterable[x509.NameAttribute] = (),
        sans: Sequence[x509.GeneralName] = (),
    ) -> x509.Certificate:
        """An end-entity certificate for a card holder, signed by the intermediate.
        ``sans``: further subjectAltName entries (DNS names, IP addresses, ...)."""
        issuer = issuer or self.intermediate
        now = dt.datetime.now(UTC)
        nb = not_before or now - dt.timedelta(minutes=5)
        na = not_after or now + dt.timedelta(days=365)
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.COUNTRY_NAME, "EU"),
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, self.org),
                x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                *extra_subject,
            ]
        )
        b = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer.cert.subject)
            .public_key(public_key)  # type: ignore[arg-type]
            .serial_number(x509.random_serial_number())
            .not_valid_before(nb)
            .not_valid_after(na)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(self._aki(issuer), critical=False)
            .add_extension(self._crl_dp("intermediate.crl"), critical=False)
            .add_extension(self._aia(), critical=False)
        )
        if key_usage:
            b = b.add_extension(self._ee_usage(), critical=True)
        if ekus:
            b = b.add_extension(x509.ExtendedKeyUsage(list(ekus)), critical=False)
        names: list[x509.GeneralName] = []
        if upn:
            names.append(upn_other_name(upn))
        if email:
            names.append(x509.RFC822Name(email))
        names.extend(sans)
        if names:
            b = b.add_extension(x509.SubjectAlternativeName(names), critical=False)
        cert = b.sign(issuer.key, hashes.SHA256())
        (self.folder / "issued" / f"{cert.serial_number:X}.pem").write_bytes(
            cert.public_bytes(serialization.Encoding.PEM)
        )
        return cert

    def issue_host(
        self, hostname: str, public_key: object, *, sans: Sequence[x509.GeneralName] = ()
    ) -> x509.Certificate:
        """A host certificate (serverAuth) for mutual authentication; ``sans``: its
        subjectAltName (DNS names, IP addresses) for TLS servers that clients check."""
        return self.issue_user(
            hostname, public_key, ekus=(ExtendedKeyUsageOID.SERVER_AUTH,), sans=sans
        )

    def issue_policy_signer(
        self,
        name: str,
        public_key: object,
        *,
        not_before: dt.datetime | None = None,
        not_after: dt.datetime | None = None,
        issuer: Issued | None = None,
    ) -> x509.Certificate:
        """A certificate for the organisation's policy-signing key (the product's
        policy-signing EKU only), for `svmm policy sign`."""
        from pam_svmm.config import POLICY_SIGNING_EKU

        return self.issue_user(
            name,
            public_key,
            ekus=(ObjectIdentifier(POLICY_SIGNING_EKU),),
            not_before=not_before,
            not_after=not_after,
            issuer=issuer,
        )

    def sign_csr(
        self,
        csr: x509.CertificateSigningRequest,
        *,
        upn: str | None = None,
        email: str | None = None,
        common_name: str | None = None,
    ) -> x509.Certificate:
        """Certify the key of a request whose self-signature verifies (`svmm card issue`).

        The CA decides the subject: the request's CN (or ``common_name``), the UPN and
        e-mail given here or, when not given, those the request asks for in its SAN.
        """
        if not csr.is_signature_valid:
            raise ValueError("the certificate request's signature does not verify")
        if common_name is None:
            cns = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
            if len(cns) != 1:
                raise ValueError("the certificate request has no single common name")
            common_name = str(cns[0].value)
        try:
            asked: list[x509.GeneralName] = list(
                csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            )
        except x509.ExtensionNotFound:  # (cryptography 51 refuses an empty SAN object)
            asked = []
        if upn is None:
            upns = [
                n.value for n in asked if isinstance(n, x509.OtherName) and n.type_id == UPN_OID
            ]
            upn = asn1.decode_der(str, upns[0]) if upns else None
        if email is None:
            emails = [n.value for n in asked if isinstance(n, x509.RFC822Name)]
            email = emails[0] if emails else None
        return self.issue_user(common_name, csr.public_key(), upn=upn, email=email)

    def issued(self, serial: int) -> x509.Certificate | None:
        """The certificate this CA issued with ``serial``, if any."""
        path = self.folder / "issued" / f"{serial:X}.pem"
        return x509.load_pem_x509_certificate(path.read_bytes()) if path.is_file() else None

    # --- revocation -----------------------------------------------------------------------

    def revoke(
        self,
        cert: x509.Certificate,
        *,
        reason: x509.ReasonFlags = x509.ReasonFlags.key_compromise,
        at: dt.datetime | None = None,
    ) -> None:
        at = at or dt.datetime.now(UTC) - dt.timedelta(seconds=1)
        state = self._revoked()
        state[f"{cert.serial_number:X}"] = {"at": at.isoformat(), "reason": reason.value}
        self._atomic(self.folder / "revoked.json", json.dumps(state, indent=1).encode())

    def publish(
        self,
        *,
        now: dt.datetime | None = None,
        next_update: dt.timedelta = dt.timedelta(days=1),
        extra_revoked: int = 0,
    ) -> None:
        """Write both CRLs and the responder's index from the current revocation state.

        ``extra_revoked`` pads the intermediate CRL with that many random serials, for the
        benchmarks' large-CRL cases.
        """
        now = now or dt.datetime.now(UTC)
        state = self._revoked()
        entries = []
        for serial_hex, info in state.items():
            entries.append(
                x509.RevokedCertificateBuilder()
                .serial_number(int(serial_hex, 16))
                .revocation_date(dt.datetime.fromisoformat(str(info["at"])))
                .add_extension(x509.CRLReason(x509.ReasonFlags(info["reason"])), critical=False)
                .build()
            )
        padding_date = now - dt.timedelta(days=1)
        for _ in range(extra_revoked):
            entries.append(
                x509.RevokedCertificateBuilder()
                .serial_number(x509.random_serial_number())
                .revocation_date(padding_date)
                .build()
            )
        self._write_crl("intermediate.crl", self.intermediate, entries, now, next_update)
        self._write_crl("root.crl", self.root, [], now, next_update)
        self._write_index(state)

    def _write_crl(
        self,
        name: str,
        issuer: Issued,
        entries: list[x509.RevokedCertificate],
        now: dt.datetime,
        next_update: dt.timedelta,
    ) -> None:
        number_file = self.folder / f"{name}.number"
        number = int(number_file.read_text()) + 1 if number_file.exists() else 1
        b = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(issuer.cert.subject)
            .last_update(now - dt.timedelta(minutes=1))
            .next_update(now + next_update)
            .add_extension(x509.CRLNumber(number), critical=False)
            .add_extension(self._aki(issuer), critical=False)
        )
        for e in entries:
            b = b.add_revoked_certificate(e)
        crl = b.sign(issuer.key, hashes.SHA256())
        self._atomic(self.folder / name, crl.public_bytes(serialization.Encoding.DER))
        number_file.write_text(str(number))

    def _write_index(self, state: dict[str, dict[str, object]]) -> None:
        """The CA database `openssl ocsp -index` reads (one line per issued certificate)."""
        lines = []
        for pem in sorted((self.folder / "issued").glob("*.pem")):
            cert = x509.load_pem_x509_certificate(pem.read_bytes())
            serial_hex = f"{cert.serial_number:X}"
            expiry = cert.not_valid_after_utc.strftime("%y%m%d%H%M%SZ")
            # One line per certificate, tab-separated: a subject with control characters
            # (tests put NUL, tabs and newlines in names) must not break the file, or
            # `openssl ocsp` refuses to reload it and keeps answering from the old one.
            subject = "/" + "/".join(
                f"{a.rfc4514_attribute_name}={a.value!s}" for a in cert.subject
            )
            subject = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in subject)
            if serial_hex in state:
                info = state[serial_hex]
                revoked = dt.datetime.fromisoformat(str(info["at"])).strftime("%y%m%d%H%M%SZ")
                reason = x509.ReasonFlags(info["reason"]).name.replace("_", "")
                reason = {"keycompromise": "keyCompromise", "cacompromise": "CACompromise"}.get(
                    reason, "unspecified"
                )
                lines.append(f"R\t{expiry}\t{revoked},{reason}\t{serial_hex}\tunknown\t{subject}")
            else:
                lines.append(f"V\t{expiry}\t\t{serial_hex}\tunknown\t{subject}")
        index = self.folder / "index.txt"
        old = int(index.stat().st_mtime) if index.exists() else 0
        self._atomic(index, ("\n".join(lines) + "\n").encode())
        # `openssl ocsp` reloads the index when its mtime changes, in whole seconds: two
        # publications within one second would leave it on the older one.
        if int(index.stat().st_mtime) <= old:
            os.utime(index, (old + 1, old + 1))
        (self.folder / "index.txt.attr").write_text("unique_subject = no\n")

    # --- helpers --------------------------------------------------------------------------

    def _revoked(self) -> dict[str, dict[str, object]]:
        return json.loads((self.folder / "revoked.json").read_text())

    @staticmethod
    def _atomic(path: Path, data: bytes) -> None:
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)

    def _name(self, cn: str) -> x509.Name:
        return x509.Name(
            [
                x509.NameAttribute(NameOID.COUNTRY_NAME, "EU"),
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, self.org),
                x509.NameAttribute(NameOID.COMMON_NAME, cn),
            ]
        )

    @staticmethod
    def _builder(
        subject: x509.Name, issuer: x509.Name, public_key: object, now: dt.datetime, days: int
    ) -> x509.CertificateBuilder:
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer)
            .public_key(public_key)  # type: ignore[arg-type]
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=days))
        )

    @staticmethod
    def _ca_usage() -> x509.KeyUsage:
        return x509.KeyUsage(
            digital_signature=True,
            content_commitment=False,
            key_encipherment=False,
            data_encipherment=False,
            key_agreement=False,
            key_cert_sign=True,
            crl_sign=True,
            encipher_only=False,
            decipher_only=False,
        )

    @staticmethod
    def _ee_usage() -> x509.KeyUsage:
        return x509.KeyUsage(
            digital_signature=True,
            content_commitment=False,
            key_encipherment=False,
            data_encipherment=False,
            key_agreement=False,
            key_cert_sign=False,
            crl_sign=False,
            encipher_only=False,
            decipher_only=False,
        )

    @staticmethod
    def _aki(issuer: Issued) -> x509.AuthorityKeyIdentifier:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(
            issuer.cert.public_key()  # type: ignore[arg-type]
        )

    def _crl_dp(self, name: str) -> x509.CRLDistributionPoints:
        return x509.CRLDistributionPoints(
            [
                x509.DistributionPoint(
                    full_name=[x509.UniformResourceIdentifier(f"{self.crl_base}/{name}")],
                    relative_name=None,
                    reasons=None,
                    crl_issuer=None,
                )
            ]
        )

    def _aia(self) -> x509.AuthorityInformationAccess:
        return x509.AuthorityInformationAccess(
            [
                x509.AccessDescription(
                    x509.AuthorityInformationAccessOID.OCSP,
                    x509.UniformResourceIdentifier(self.ocsp_url),
                )
            ]
        )

    def _write_pair(self, name: str, issued: Issued) -> None:
        (self.folder / f"{name}.pem").write_bytes(
            issued.cert.public_bytes(serialization.Encoding.PEM)
        )
        key_path = self.folder / f"{name}.key"
        key_path.write_bytes(key_pem(issued.key))
        key_path.chmod(0o600)


def _sign_csr_command(argv: Sequence[str]) -> int:
    """``python -m svmm_lab.pki sign-csr CA_DIR``: the demo CA as an [issue] ca_command.

    Reads a CSR (PEM) on stdin, writes the certificate and the intermediate (PEM) on stdout.
    """
    import sys

    if len(argv) != 2 or argv[0] != "sign-csr":
        print("usage: python -m svmm_lab.pki sign-csr CA_DIR", file=sys.stderr)
        return 2
    ca = LabCA.open(Path(argv[1]))
    try:
        csr = x509.load_pem_x509_csr(sys.stdin.buffer.read())
        cert = ca.sign_csr(csr)
    except ValueError as e:
        print(f"sign-csr: {e}", file=sys.stderr)
        return 1
    sys.stdout.buffer.write(cert.public_bytes(serialization.Encoding.PEM))
    sys.stdout.buffer.write(ca.intermediate.cert.public_bytes(serialization.Encoding.PEM))
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(_sign_csr_command(sys.argv[1:]))
