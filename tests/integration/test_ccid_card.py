"""The e2e guest's real reader stack starts here: alice's card for QEMU's emulated USB CCID
reader (svmm_lab/ccid.py). Its three certificates are the lab CA's for alice, in an NSS
database whose password is the card's PIN; QEMU takes the card, and QMP pulls it out of the
reader and puts it back. (pcscd and OpenSC read it inside the guest: vagrant/e2e.py.)"""

from __future__ import annotations

import datetime as dt
import json
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import pkcs12

from svmm_lab import ccid
from svmm_lab.pki import LabCA

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("certutil") is None, reason="libnss3-tools not installed"),
]
QEMU = shutil.which("qemu-system-x86_64")


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    LabCA.create(tmp_path / "lab" / "ca", crl_base="http://127.0.0.1:9/", ocsp_url="http://x/")
    ccid.issue(tmp_path / "lab", "alice", tmp_path / "card")
    return tmp_path / "card"


def test_three_certificates_for_the_holder_each_with_its_key(bundle: Path) -> None:
    manifest = json.loads((bundle / ccid.MANIFEST).read_text())
    assert [c["nickname"] for c in manifest["certs"]] == ["alice-auth", "alice-sign", "alice-enc"]
    subjects = set()
    for c in manifest["certs"]:
        assert (bundle / c["file"]).stat().st_mode & 0o077 == 0
        key, cert, chain = pkcs12.load_key_and_certificates(
            (bundle / c["file"]).read_bytes(), b"123456"
        )
        assert key is not None and cert is not None and len(chain) == 1
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert "alice@demo.example" in san.get_values_for_type(x509.RFC822Name)
        assert cert.not_valid_after_utc > dt.datetime.now(dt.UTC)
        subjects.add(cert.subject.rfc4514_string())
    assert len(subjects) == 3  # NSS would give one subject one nickname
    with pytest.raises(ValueError):
        pkcs12.load_key_and_certificates((bundle / "alice-auth.p12").read_bytes(), b"000000")


def test_the_nss_database_holds_the_keys_behind_the_pin(bundle: Path, tmp_path: Path) -> None:
    db = tmp_path / "db"
    assert ccid.nss_database(bundle, db) == ["alice-auth", "alice-sign", "alice-enc"]
    listed = subprocess.run(["certutil", "-L", "-d", f"sql:{db}"], capture_output=True,
                            text=True, check=True).stdout  # fmt: skip
    for nick in ("alice-auth", "alice-sign", "alice-enc"):
        assert f"\n{nick} " in listed
    wrong = tmp_path / "wrong"
    wrong.write_text("000000\n")
    keys = subprocess.run(["certutil", "-K", "-d", f"sql:{db}", "-f", str(wrong)],
                          capture_output=True, text=True, check=False)  # fmt: skip
    assert keys.returncode != 0  # the private keys need the PIN
    assert sorted(p.name for p in db.iterdir()) == ["cert9.db", "key4.db", "pkcs11.txt"]


@pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 not installed")
def test_qemu_takes_the_card_and_qmp_pulls_it_and_puts_it_back(
    bundle: Path, tmp_path: Path
) -> None:
    db = tmp_path / "db"
    nicknames = ccid.nss_database(bundle, db)
    qmp_path = tmp_path / "qmp.sock"
    argv = [str(QEMU), "-accel", "tcg", "-nodefaults", "-display", "none", "-m", "64", "-S",
            "-qmp", f"unix:{qmp_path},server=on,wait=off",
            *ccid.qemu_devices(db, nicknames)]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while not qmp_path.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert proc.poll() is None, proc.communicate()[0].decode()
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(qmp_path))
            f = s.makefile("rw")
            f.readline()

            def qmp(cmd: str, **arguments: object) -> dict[str, object]:
                f.write(json.dumps({"execute": cmd, "arguments": arguments}) + "\n")
                f.flush()
                while True:
                    answer: dict[str, object] = json.loads(f.readline())
                    if "return" in answer or "error" in answer:
                        return answer

            assert "return" in qmp("qmp_capabilities")
            assert "return" in qmp("device_del", id="ccid-card")
            device = ccid.card_device(db, nicknames).split(",")
            assert device[0] == "ccid-card-emulated"
            back = dict(kv.split("=", 1) for kv in device[1:])
            assert "return" in qmp("device_add", driver="ccid-card-emulated", **back)
            assert "error" in qmp("device_add", driver="ccid-card-emulated", **back)  # one slot
    finally:
        proc.kill()
        proc.wait()
