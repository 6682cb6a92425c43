"""Encrypted VM volumes for the lab: a LUKS1 image per policy volume, enrolled for a lab card
(wrapped to the card's key) with a recovery slot for the lab's escrow certificate.

The card takes part (the OAEP hash it supports is probed), and SoftHSM2 reads its
configuration once per process, so enrolment runs in a short child process pointed at the
card's token; the PIN reaches it on stdin.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from .pki import key_pem, load_key, new_key


def escrow_credentials(lab: Any) -> tuple[Path, Path]:
    """The lab organisation's escrow certificate and key (made once)."""
    folder = lab.folder / "escrow"
    cert_path, key_path = folder / "escrow.pem", folder / "escrow.key"
    if not cert_path.exists():
        folder.mkdir(mode=0o700, exist_ok=True)
        key = new_key("rsa")
        cert = lab.ca.issue_user("Demo Org key escrow", key.public_key(), ekus=())
        key_path.write_bytes(key_pem(key))
        key_path.chmod(0o600)
        cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


def make_volume(
    lab: Any, name: str, card: str, *, size: int | None = None, luks_type: str = "luks1"
) -> Path:
    """<lab>/volumes/<name>.img enrolled for ``card`` (a lab card name); made once.
    ``luks_type``: luks1 (QEMU 7.2's LUKS driver; dm-crypt opens it too) or luks2 (dm-crypt
    only; tokens in the header)."""
    folder = lab.folder / "volumes"
    folder.mkdir(mode=0o700, exist_ok=True)
    path = folder / f"{name}.img"
    if path.exists():
        return path
    escrow, _ = escrow_credentials(lab)
    spec = lab.card(card)
    reader = lab.insert(card)
    request = {
        "path": str(path),
        # LUKS2's header alone takes 16 MiB (services/volumes.py MIN_SIZE).
        "size": size or ((32 if luks_type == "luks2" else 16) << 20),
        "owner": str(spec["holder"]),
        "cert": str(lab.cards_dir / card / "cert.pem"),
        "escrow": str(escrow),
        "module": "/usr/lib/softhsm/libsofthsm2.so",
        "pin": str(spec["pin"]),
        "luks_type": luks_type,
    }
    proc = subprocess.run(
        [sys.executable, "-m", "svmm_lab.volumes"],
        input=json.dumps(request),
        capture_output=True,
        text=True,
        env=dict(os.environ, **reader.env),
        timeout=300,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"making volume {name!r} failed: {proc.stderr[-2000:]}")
    return path


def _child() -> int:
    from pam_svmm.adapters.luks import Cryptsetup, Pbkdf
    from pam_svmm.adapters.token import Pkcs11Module
    from pam_svmm.domain.custody import Custody
    from pam_svmm.services.volumes import Card, Owner, Volumes

    req = json.loads(sys.stdin.read())
    cert = x509.load_pem_x509_certificate(Path(req["cert"]).read_bytes())
    escrow = x509.load_pem_x509_certificate(Path(req["escrow"]).read_bytes())
    with Pkcs11Module(req["module"]) as module:
        (token,) = module.tokens()
        with module.session(token) as session:
            session.login(req["pin"])
            card = Card(cert, b"\x01", token.label, token.serial)
            Volumes(Cryptsetup(), Pbkdf.fast()).create(
                Path(req["path"]),
                owner=Owner("user", req["owner"]),
                custody=Custody.WRAPPED,
                card=card,
                escrow_certificate=escrow,
                size=int(req["size"]),
                luks_type=req.get("luks_type", "luks1"),
                card_session=session,
            )
    return 0


__all__ = ["escrow_credentials", "load_key", "make_volume"]

if __name__ == "__main__":
    sys.exit(_child())
