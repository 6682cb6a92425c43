"""A card for a real reader stack: QEMU's emulated CCID card, read through pcscd and OpenSC.

QEMU's ``ccid-card-emulated`` (libcacard, ``backend=certificates``) presents a CAC card whose
three certificates and private keys live in an NSS database on the host running QEMU; the
card's PIN is that database's password (libcacard answers the card's VERIFY with
PK11_Authenticate). In the guest, a USB CCID reader (``usb-ccid``) appears, pcscd with the
CCID driver serves it, and OpenSC's PKCS#11 module reads the card (its CAC driver).

``issue`` (in the lab, where the demo CA is) writes the three certificates and keys as
PKCS#12 files; ``nss_database`` (on the host that runs QEMU) imports them into an NSS
database protected by the PIN, with certutil and pk12util (libnss3-tools).
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

# libcacard's certificates backend wants exactly three (cert1, cert2, cert3): a CAC card's
# identity, signature and encryption certificates. All three are the holder's, for login.
SLOTS = ("auth", "sign", "enc")
MANIFEST = "ccid-card.json"


def issue(lab_folder: Path, holder: str, out: Path, pin: str = "123456") -> dict[str, Any]:
    """``holder``'s three certificates from the lab's CA, each with its RSA key, as PKCS#12
    files in ``out`` (the PIN their password) and a manifest naming them."""
    # Here, not at the top: the host that runs QEMU (vagrant/guest.py, Debian's python3)
    # needs only the NSS half of this module.
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.hazmat.primitives.serialization import pkcs12
    from cryptography.x509.oid import NameOID

    from .lab import Lab

    lab = Lab(lab_folder)
    out.mkdir(parents=True, exist_ok=True)
    os.chmod(out, 0o700)
    names = []
    for slot in SLOTS:
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        cert = lab.ca.issue_user(
            holder,
            key.public_key(),
            upn=f"{holder}@demo.example",
            email=f"{holder}@demo.example",
            # NSS names certificates by subject: three alike would be one nickname.
            extra_subject=[x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, slot)],
        )
        name = f"{holder}-{slot}"
        blob = pkcs12.serialize_key_and_certificates(
            name.encode(),
            key,
            cert,
            [lab.ca.intermediate.cert],
            serialization.BestAvailableEncryption(pin.encode()),
        )
        path = out / f"{name}.p12"
        path.write_bytes(blob)
        os.chmod(path, 0o600)
        names.append({"nickname": name, "file": path.name, "serial": f"{cert.serial_number:x}"})
    manifest: dict[str, Any] = {"holder": holder, "certs": names}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def nss_database(bundle: Path, db: Path, pin: str = "123456") -> list[str]:
    """An NSS database in ``db`` holding the bundle's keys and certificates, its password
    the PIN; returns the three nicknames (cert1..cert3 for ccid-card-emulated)."""
    manifest = json.loads((bundle / MANIFEST).read_text())
    db.mkdir(parents=True, exist_ok=True)
    os.chmod(db, 0o700)
    with tempfile.NamedTemporaryFile("w", dir=db, delete=False) as f:
        f.write(pin + "\n")
        pwfile = f.name
    try:
        nss = f"sql:{db}"
        _run(["certutil", "-N", "-d", nss, "-f", pwfile])
        for c in manifest["certs"]:
            _run(["pk12util", "-i", str(bundle / c["file"]), "-d", nss, "-k", pwfile,
                  "-w", pwfile])  # fmt: skip
    finally:
        os.unlink(pwfile)
    return [str(c["nickname"]) for c in manifest["certs"]]


def qemu_devices(db: Path, nicknames: list[str], *, card_id: str = "ccid-card") -> list[str]:
    """QEMU arguments: a USB controller, a CCID reader on it, and the card in the reader."""
    return [
        "-device", "piix3-usb-uhci,id=svmm-usb",  # USB 1.1: usb-ccid is a full-speed device
        "-device", "usb-ccid,id=svmm-ccid,bus=svmm-usb.0",
        "-device", card_device(db, nicknames, card_id=card_id),
    ]  # fmt: skip


def card_device(db: Path, nicknames: list[str], *, card_id: str = "ccid-card") -> str:
    """The card itself, as ``-device`` (and QMP device_add) spells it."""
    cert_args = ",".join(f"cert{i}={n}" for i, n in enumerate(nicknames, 1))
    return f"ccid-card-emulated,id={card_id},backend=certificates,db=sql:{db},{cert_args}"


def _run(argv: list[str]) -> None:
    p = subprocess.run(argv, capture_output=True, text=True, check=False)
    if p.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed ({p.returncode}): {(p.stderr or p.stdout)[-300:]}")
