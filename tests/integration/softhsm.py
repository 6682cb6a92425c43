"""SoftHSM2 in a temporary directory, behind pinguard, for integration tests.

Use the fixtures from a test module::

    from tests.integration.softhsm import pinguard_so, softhsm  # noqa: F401

    def test_x(softhsm):
        with softhsm.open() as module:
            token = softhsm.provision(module, "alice", key, cert_der)

``softhsm`` points SOFTHSM2_CONF and pinguard's variables at the test's tmp dir, so nothing
depends on the machine's own tokens. The module path is the pinguard interposer (over
libsofthsm2.so); without state files it forwards everything unchanged.
"""

from __future__ import annotations

import datetime as dt
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from pam_svmm.adapters.token import Pkcs11Module, TokenInfo, provision_card
from svmm_lab import pinguard

SOFTHSM_MODULE = Path(pinguard.DEFAULT_REAL_MODULE)
USER_PIN = "123456"
SO_PIN = "12345678"


@dataclass
class SoftHsm:
    root: Path
    conf: Path
    tokendir: Path
    state_dir: Path
    module_path: Path
    _open: list[Pkcs11Module] = field(default_factory=list)

    def env(self) -> dict[str, str]:
        """Variables a subprocess needs to see these tokens through pinguard."""
        return {
            "SOFTHSM2_CONF": str(self.conf),
            pinguard.ENV_STATE: str(self.state_dir),
            pinguard.ENV_MODULE: str(SOFTHSM_MODULE),
        }

    def open(self) -> Pkcs11Module:
        """Load the module; closed at teardown if the test does not close it."""
        module = Pkcs11Module(self.module_path)
        self._open.append(module)
        return module

    def provision(
        self,
        module: Pkcs11Module,
        label: str,
        key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey,
        certificate: bytes,
        *,
        user_pin: str = USER_PIN,
        so_pin: str = SO_PIN,
        key_id: bytes = b"\x01",
        key_label: str = "auth",
        anchors: tuple[bytes, ...] = (),
    ) -> TokenInfo:
        return provision_card(
            module,
            label=label,
            so_pin=so_pin,
            user_pin=user_pin,
            key=key,
            certificate=certificate,
            key_id=key_id,
            key_label=key_label,
            anchors=anchors,
        )

    # pinguard state, by token
    def set_pin_tries(self, token: TokenInfo, max_tries: int, left: int | None = None) -> None:
        pinguard.set_pin_tries(self.state_dir, token.serial, max_tries, left)

    def set_pinpad(self, token: TokenInfo, pin: str | None) -> Path:
        """Give the token a PIN pad that "types" ``pin`` (None: the user cancels)."""
        pin_file = self.root / f"pinpad-{token.serial}"
        pin_file.unlink(missing_ok=True)
        if pin is not None:
            pinguard.write_pinpad_pin(pin_file, pin)
        pinguard.set_pinpad(self.state_dir, token.serial, pin_file)
        return pin_file

    def set_removed(self, token: TokenInfo, removed: bool = True) -> None:
        pinguard.set_removed(self.state_dir, token.serial, removed)

    def close(self) -> None:
        while self._open:
            self._open.pop().close()


def make_softhsm(root: Path, pinguard_module: Path) -> SoftHsm:
    """A SoftHSM2 configuration with an empty token directory under ``root``."""
    tokendir = root / "tokens"
    state = root / "pinguard"
    tokendir.mkdir(parents=True)
    state.mkdir()
    conf = root / "softhsm2.conf"
    conf.write_text(
        f"directories.tokendir = {tokendir}\n"
        "objectstore.backend = file\n"
        "log.level = ERROR\n"
        "slots.removable = false\n"
    )
    return SoftHsm(root, conf, tokendir, state, pinguard_module)


def self_signed(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, cn: str) -> bytes:
    """A minimal self-signed certificate (DER) for ``key``: enough to store on a card."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.DER)


@pytest.fixture(scope="session")
def pinguard_so(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not SOFTHSM_MODULE.exists():
        pytest.skip(f"SoftHSM2 not installed ({SOFTHSM_MODULE})")
    if shutil.which("gcc") is None:
        pytest.skip("gcc not installed (needed to build pinguard)")
    return pinguard.build_pinguard(tmp_path_factory.mktemp("pinguard"))


@pytest.fixture
def softhsm(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pinguard_so: Path
) -> Iterator[SoftHsm]:
    hsm = make_softhsm(tmp_path / "softhsm", pinguard_so)
    for name, value in hsm.env().items():
        monkeypatch.setenv(name, value)
    try:
        yield hsm
    finally:
        # C_Finalize before the next test points SOFTHSM2_CONF elsewhere.
        hsm.close()
