"""The demo lab's CA as the issuing service's CertificateAuthority (``--demo-ca DIR``).

Lives in the lab, not in the product: a host installed from the Debian package has no demo
CA, and the product never imports the lab (tests/unit/test_layers.py).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from pam_svmm.errors import IssueFailed
from pam_svmm.services.issuing import IssueRequest

from .pki import LabCA

UTC = dt.UTC


@dataclass(frozen=True)
class DemoCA:
    """The lab's CA (svmm_lab.pki.LabCA) for `svmm card issue --demo-ca`, the demo, tests."""

    ca: LabCA

    @classmethod
    def open(cls, folder: Path) -> DemoCA:
        if not (folder / "config.json").is_file():
            raise IssueFailed(f"{folder} is not a demo CA folder", reason="demo_ca_missing")
        return cls(LabCA.open(folder))

    def certify(
        self, csr: x509.CertificateSigningRequest, request: IssueRequest
    ) -> list[x509.Certificate]:
        try:
            cert = self.ca.sign_csr(
                csr, upn=request.upn, email=request.email, common_name=request.common_name
            )
        except ValueError as e:
            raise IssueFailed(f"the demo CA refused the request: {e}", reason="ca_refused") from e
        # Like a real CA, the demo CA's OCSP index knows what it issued (as good).
        self.ca.publish()
        return [cert, self.ca.intermediate.cert]


def revoke_with_demo_ca(
    ca_dir: Path,
    *,
    serial: int,
    reason: x509.ReasonFlags = x509.ReasonFlags.key_compromise,
    now: dt.datetime | None = None,
) -> x509.Certificate:
    """Mark ``serial`` revoked in the demo CA and publish its CRLs and OCSP index.

    The lab's OCSP responder (openssl ocsp) answers the first request after the index changed
    from the old index: the lab calls ``OcspResponder.reload()``.
    """
    ca = DemoCA.open(ca_dir).ca
    cert = ca.issued(serial)
    if cert is None:
        raise IssueFailed(f"the demo CA has issued no serial {serial:x}", reason="unknown_serial")
    now = now or dt.datetime.now(UTC)
    ca.revoke(cert, reason=reason, at=now - dt.timedelta(seconds=1))
    ca.publish(now=now)
    return cert
