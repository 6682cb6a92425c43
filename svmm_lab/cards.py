"""Soft cards for the lab: one SoftHSM2 token per card, made with the product's own
provisioning (``adapters.token``), the same code `svmm card issue` uses on real cards.

SoftHSM2 reads its configuration once per process, so each card is provisioned in a short
child process pointed at that card's token folder. The private key reaches the child on
stdin, never in argv or the environment.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from .pki import PrivateKey, key_pem

SOFTHSM_MODULE = "/usr/lib/softhsm/libsofthsm2.so"


def softhsm_conf(tokendir: Path) -> Path:
    conf = tokendir.parent / "softhsm2.conf"
    conf.write_text(
        f"directories.tokendir = {tokendir}\nobjectstore.backend = file\nlog.level = ERROR\n"
    )
    return conf


def provision_card(
    tokendir: Path,
    *,
    label: str,
    pin: str,
    so_pin: str,
    key: PrivateKey,
    cert_der: bytes,
    key_id: bytes = b"\x01",
    ca_certs: Sequence[x509.Certificate] = (),
    anchors: Sequence[x509.Certificate] = (),
    malformed: bool = False,
    extra: Sequence[tuple[PrivateKey, bytes, bytes, str]] = (),
) -> str:
    """Make a card in ``tokendir``; returns the token serial SoftHSM2 gave it.

    ``extra``: more (key, certificate DER, key id, label) pairs on the same card, as a card
    holding an old and a renewed certificate does."""
    tokendir.mkdir(parents=True, exist_ok=True)
    conf = softhsm_conf(tokendir)
    request = {
        "label": label,
        "pin": pin,
        "so_pin": so_pin,
        "key_pem": key_pem(key).decode(),
        "cert": cert_der.hex(),
        "key_id": key_id.hex(),
        "ca_certs": [c.public_bytes(serialization.Encoding.DER).hex() for c in ca_certs],
        "anchors": [c.public_bytes(serialization.Encoding.DER).hex() for c in anchors],
        "malformed": malformed,
        "extra": [
            {"key_pem": key_pem(k).decode(), "cert": d.hex(), "key_id": i.hex(), "label": lbl}
            for k, d, i, lbl in extra
        ],
    }
    env = dict(os.environ, SOFTHSM2_CONF=str(conf))
    proc = subprocess.run(
        [sys.executable, "-m", "svmm_lab.cards"],
        input=json.dumps(request),
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"provisioning card {label!r} failed: {proc.stderr[-2000:]}")
    return proc.stdout.strip()


def _child() -> int:
    from pam_svmm.adapters.token import Pkcs11Module
    from pam_svmm.adapters.token import provision_card as provision

    req = json.loads(sys.stdin.read())
    key = serialization.load_pem_private_key(req["key_pem"].encode(), password=None)
    cert = bytes.fromhex(req["cert"])
    with Pkcs11Module(SOFTHSM_MODULE) as module:
        if req.get("malformed"):
            return _malformed(module, req, key, cert)
        info = provision(
            module,
            label=req["label"],
            so_pin=req["so_pin"],
            user_pin=req["pin"],
            key=key,
            certificate=cert,
            key_id=bytes.fromhex(req["key_id"]),
            anchors=tuple(bytes.fromhex(a) for a in req["anchors"]),
        )
        with module.session(info, rw=True) as s:
            s.login(req["pin"])
            for i, der in enumerate(req["ca_certs"]):
                s.write_trust_anchor(bytes.fromhex(der), label=f"ca-{i}")
            for e in req["extra"]:
                k = serialization.load_pem_private_key(e["key_pem"].encode(), password=None)
                kid = bytes.fromhex(e["key_id"])
                s.import_private_key(k, key_id=kid, label=e["label"])
                s.write_certificate(bytes.fromhex(e["cert"]), key_id=kid, label=e["label"])
    print(info.serial)
    return 0


def _malformed(module: object, req: dict, key: object, garbage: bytes) -> int:
    """A card whose certificate object holds bytes that do not parse (a test case the
    product's provisioning rightly refuses to write, so it is written raw here)."""
    import PyKCS11

    info = module.init_token(req["label"], req["so_pin"], req["pin"])  # type: ignore[attr-defined]
    with module.session(info, rw=True) as s:  # type: ignore[attr-defined]
        s.login(req["pin"])
        s.import_private_key(key, key_id=bytes.fromhex(req["key_id"]), label="auth")
        s._s.createObject(
            [
                (PyKCS11.CKA_CLASS, PyKCS11.CKO_CERTIFICATE),
                (PyKCS11.CKA_CERTIFICATE_TYPE, PyKCS11.CKC_X_509),
                (PyKCS11.CKA_TOKEN, True),
                (PyKCS11.CKA_PRIVATE, False),
                (PyKCS11.CKA_LABEL, "auth"),
                (PyKCS11.CKA_SUBJECT, x509.Name([]).public_bytes()),
                (PyKCS11.CKA_ID, bytes.fromhex(req["key_id"])),
                (PyKCS11.CKA_VALUE, garbage),
            ]
        )
    print(module.token_info(info.slot_id).serial)  # type: ignore[attr-defined]
    return 0


if __name__ == "__main__":
    sys.exit(_child())
