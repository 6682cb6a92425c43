"""Volumes on image files with SoftHSM2 cards: create (wrapped and card-object custody),
release, enroll, rekey, recover with the escrow key, rollback, LUKS1 for QEMU."""

from __future__ import annotations

import datetime as dt
import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from pam_svmm.adapters.luks import Cryptsetup, Pbkdf
from pam_svmm.adapters.token import Pkcs11Module, TokenInfo, TokenSession
from pam_svmm.domain.custody import Custody
from pam_svmm.errors import KeyReleaseFailed, SvmmError, VolumeError
from pam_svmm.services.volumes import Card, Owner, Unlock, Volumes, luks_passphrase
from tests.integration.cryptsetup_spy import cryptsetup_spy
from tests.integration.softhsm import (  # noqa: F401
    USER_PIN,
    SoftHsm,
    pinguard_so,
    self_signed,
    softhsm,
)
from tests.unit import cli_schemas

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("cryptsetup") is None, reason="cryptsetup not installed"),
]

SIZE = 32 << 20  # LUKS2 (the default) needs room beyond its 16 MiB header
ALICE = Owner("user", "alice")


def _key(kind: str) -> rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey:
    if kind == "rsa":
        return rsa.generate_private_key(65537, 2048)
    return ec.generate_private_key(ec.SECP256R1() if kind == "p256" else ec.SECP384R1())


def _ed25519_cert() -> x509.Certificate:
    """An escrow certificate whose key custody cannot wrap to: fails after the format."""
    key = ed25519.Ed25519PrivateKey.generate()
    name = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, "escrow")])
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(1)
        .not_valid_before(now).not_valid_after(now + dt.timedelta(days=1))
        .sign(key, None)
    )  # fmt: skip


class Cards:
    def __init__(self, hsm: SoftHsm) -> None:
        self.hsm = hsm
        self.module: Pkcs11Module = hsm.open()
        self.tokens: dict[str, TokenInfo] = {}

    def make(self, name: str, kind: str) -> Card:
        key = _key(kind)
        der = self_signed(key, name)
        token = self.hsm.provision(self.module, name, key, der)
        self.tokens[name] = token
        return Card(x509.load_der_x509_certificate(der), b"\x01", name, token.serial)

    @contextmanager
    def session(self, card: Card) -> Iterator[TokenSession]:
        with self.module.session(self.tokens[card.token_label], rw=True) as s:
            s.login(USER_PIN)
            yield s


@pytest.fixture
def cards(softhsm: SoftHsm) -> Cards:  # noqa: F811
    return Cards(softhsm)


@pytest.fixture(scope="module")
def escrow() -> tuple[rsa.RSAPrivateKey, x509.Certificate]:
    key = rsa.generate_private_key(65537, 3072)
    return key, x509.load_der_x509_certificate(self_signed(key, "escrow"))


@pytest.fixture
def vols() -> Volumes:
    lines: list[str] = []
    return Volumes(Cryptsetup(timeout=30), Pbkdf.fast(), progress=lines.append)


def _opens(vols: Volumes, path: Path, unlock: Unlock) -> bool:
    try:
        pw = vols.release(path, unlock)
    except (VolumeError, KeyReleaseFailed):
        return False
    ok = vols.cryptsetup.test_passphrase(path, pw)
    pw[:] = bytes(len(pw))
    return ok


@pytest.mark.parametrize("kind", ["rsa", "p256", "p384"])
def test_create_wrapped_and_release(
    kind: str, cards: Cards, escrow: tuple, vols: Volumes, tmp_path: Path
) -> None:
    esc_key, esc_cert = escrow
    alice, other = cards.make("alice", kind), cards.make("other", "p256")
    path = tmp_path / "a.img"
    lines: list[str] = []
    vols.progress = lines.append
    with cards.session(alice) as s:
        st = vols.create(
            path, owner=ALICE, custody=Custody.WRAPPED, card=alice,
            escrow_certificate=esc_cert, size=SIZE, card_session=s,
        )  # fmt: skip
        assert _opens(vols, path, Unlock.with_card(alice, s))
    assert st.owner == ALICE and st.custody is Custody.WRAPPED and st.luks_version == 2
    assert [s.kind for s in st.slots] == ["card", "escrow"]
    assert st.slots[0].card and st.slots[0].card["subject"] == "CN=alice"
    assert st.slots[0].recipient == alice.recipient
    assert any("formatting LUKS2" in ln and "key derivation" in ln for ln in lines)
    assert _opens(vols, path, Unlock.with_escrow(esc_key))
    # another card, logged in, releases nothing
    with cards.session(other) as s, pytest.raises(VolumeError, match="not enrolled"):
        vols.release(path, Unlock.with_card(other, s))


def test_card_object_custody(cards: Cards, escrow: tuple, vols: Volumes, tmp_path: Path) -> None:
    _, esc_cert = escrow
    bob = cards.make("bob", "p256")
    path = tmp_path / "b.img"
    with cards.session(bob) as s:
        st = vols.create(
            path, owner=Owner("role", "ops"), custody=Custody.CARD_OBJECT, card=bob,
            escrow_certificate=esc_cert, size=SIZE, card_session=s,
        )  # fmt: skip
        assert _opens(vols, path, Unlock.with_card(bob, s))
    assert st.custody is Custody.CARD_OBJECT and st.owner == Owner("role", "ops")
    assert st.slots[0].custody == "card-object"
    # without login the secret object is invisible: nothing is released
    with cards.module.session(cards.tokens["bob"]) as s, pytest.raises(SvmmError):
        vols.release(path, Unlock.with_card(bob, s))
    # card-object custody cannot be set up without the card logged in
    with pytest.raises(VolumeError, match="needs the card logged in"):
        vols.create(
            tmp_path / "c.img", owner=ALICE, custody=Custody.CARD_OBJECT, card=bob,
            escrow_certificate=esc_cert, size=SIZE,
        )  # fmt: skip
    assert not (tmp_path / "c.img").exists()


def test_enroll_rekey_recover(cards: Cards, escrow: tuple, vols: Volumes, tmp_path: Path) -> None:
    esc_key, esc_cert = escrow
    a, b, c, d = (cards.make(n, k) for n, k in
                  (("a", "p256"), ("b", "rsa"), ("c", "p384"), ("d", "p256")))  # fmt: skip
    path = tmp_path / "v.img"
    vols.create(path, owner=ALICE, custody=Custody.WRAPPED, card=a,
                escrow_certificate=esc_cert, size=SIZE)  # fmt: skip
    with cards.session(a) as sa, cards.session(b) as sb:
        slot_b = vols.enroll(path, Unlock.with_card(a, sa), b, card_session=sb)
        assert _opens(vols, path, Unlock.with_card(b, sb))
        assert _opens(vols, path, Unlock.with_card(a, sa))
        with pytest.raises(VolumeError, match="already enrolled"):
            vols.enroll(path, Unlock.with_card(a, sa), b)
    st = vols.status(path)
    assert sorted(s.slot for s in st.card_slots()) == sorted([0, slot_b])
    # rekey: a is replaced by c
    with cards.session(b) as sb, cards.session(c) as sc:
        vols.rekey(path, Unlock.with_card(b, sb), c, old=a.recipient[:12], card_session=sc)
    with cards.session(a) as sa:
        assert not _opens(vols, path, Unlock.with_card(a, sa))
    with cards.session(c) as sc:
        assert _opens(vols, path, Unlock.with_card(c, sc))
    subjects = {s.card["subject"] for s in vols.status(path).card_slots() if s.card}
    assert subjects == {"CN=b", "CN=c"}
    # recover: both cards lost; the escrow key enrols d and the old slots go
    with cards.session(d) as sd:
        vols.recover(path, esc_key, d, card_session=sd)
        assert _opens(vols, path, Unlock.with_card(d, sd))
    st = vols.status(path)
    assert [s.card["subject"] for s in st.card_slots() if s.card] == ["CN=d"]
    assert [s.kind for s in st.slots].count("escrow") == 1
    for lost in (b, c):
        with cards.session(lost) as s:
            assert not _opens(vols, path, Unlock.with_card(lost, s))


def test_wrong_escrow_key_is_refused(cards: Cards, escrow: tuple, vols: Volumes, tmp_path: Path):
    _, esc_cert = escrow
    a, b = cards.make("a", "p256"), cards.make("b", "p256")
    path = tmp_path / "v.img"
    vols.create(path, owner=ALICE, custody=Custody.WRAPPED, card=a,
                escrow_certificate=esc_cert, size=SIZE)  # fmt: skip
    with pytest.raises(KeyReleaseFailed):
        vols.recover(path, rsa.generate_private_key(65537, 2048), b)
    assert len(vols.status(path).card_slots()) == 1


def test_rollback_on_failed_create(cards: Cards, vols: Volumes, tmp_path: Path) -> None:
    a = cards.make("a", "p256")
    bad_cert = _ed25519_cert()
    work = tmp_path / "vols"
    work.mkdir()
    for luks_type in ("luks2", "luks1"):
        path = work / f"{luks_type}.img"
        with pytest.raises(SvmmError, match="cannot wrap"):
            vols.create(path, owner=ALICE, custody=Custody.WRAPPED, card=a,
                        escrow_certificate=bad_cert, size=SIZE, luks_type=luks_type)  # fmt: skip
    assert list(work.iterdir()) == []  # no image, no sidecar


def test_rollback_restores_existing_device(
    cards: Cards, vols: Volumes, escrow: tuple, tmp_path: Path
) -> None:
    a = cards.make("a", "p256")
    dev = tmp_path / "dev"
    dev.write_bytes(os.urandom(SIZE))
    before = dev.read_bytes()
    bad_cert = _ed25519_cert()
    with pytest.raises(SvmmError):
        vols.create(dev, owner=ALICE, custody=Custody.WRAPPED, card=a, escrow_certificate=bad_cert)
    assert dev.read_bytes() == before
    # and formatting over it works when all goes well
    st = vols.create(dev, owner=ALICE, custody=Custody.WRAPPED, card=a,
                     escrow_certificate=escrow[1])  # fmt: skip
    assert [s.kind for s in st.slots] == ["card", "escrow"]


def test_luks1_sidecar_opens_in_qemu(
    cards: Cards, vols: Volumes, escrow: tuple, tmp_path: Path
) -> None:
    """LUKS1 (what QEMU 7.2 opens): tokens beside the image; the released passphrase opens
    the volume in QEMU's LUKS driver, handed over through a pipe."""
    a = cards.make("a", "rsa")
    path = tmp_path / "q.img"
    with cards.session(a) as s:
        st = vols.create(path, owner=ALICE, custody=Custody.WRAPPED, card=a,
                         escrow_certificate=escrow[1], size=SIZE, luks_type="luks1",
                         card_session=s)  # fmt: skip
        assert st.luks_version == 1 and [x.kind for x in st.slots] == ["card", "escrow"]
        assert (tmp_path / "q.img.svmm.json").exists()
        pw = vols.release(path, Unlock.with_card(a, s))
    qemu_io = shutil.which("qemu-io")
    if qemu_io is None:
        pytest.skip("qemu-io not installed")
    for key, ok in ((pw, True), (bytearray(b"wrong"), False)):
        r, w = os.pipe()
        os.write(w, key)
        os.close(w)
        try:
            proc = subprocess.run(
                [qemu_io, "--object", f"secret,id=s0,file=/proc/self/fd/{r}", "--image-opts",
                 "-c", "read 0 512", f"driver=luks,key-secret=s0,file.filename={path}"],
                pass_fds=[r], capture_output=True, timeout=30, check=False,
            )  # fmt: skip
        finally:
            os.close(r)
        assert (proc.returncode == 0 and b"read 512/512" in proc.stdout) is ok, proc.stderr


def test_no_key_in_cryptsetup_argv_or_environ(cards: Cards, escrow: tuple, tmp_path: Path) -> None:
    script, log = cryptsetup_spy(tmp_path)
    vols = Volumes(Cryptsetup(binary=str(script), timeout=30), Pbkdf.fast())
    a, b = cards.make("a", "p256"), cards.make("b", "rsa")
    path = tmp_path / "v.img"
    vols.create(path, owner=ALICE, custody=Custody.WRAPPED, card=a,
                escrow_certificate=escrow[1], size=SIZE)  # fmt: skip
    with cards.session(a) as sa, cards.session(b) as sb:
        vols.enroll(path, Unlock.with_card(a, sa), b, card_session=sb)
        keys = [vols.release(path, Unlock.with_card(c, s)) for c, s in ((a, sa), (b, sb))]
    keys.append(vols.release(path, Unlock.with_escrow(escrow[0])))
    records = list(log.iterdir())
    assert len(records) > 20
    for rec in records:
        data = rec.read_bytes()
        for k in keys:
            assert bytes(k) not in data, rec.name


def test_luks_passphrase_is_text() -> None:
    pw = luks_passphrase(bytes(range(32)))
    assert len(pw) == 43 and bytes(pw).isascii() and b"=" not in pw
    with pytest.raises(VolumeError):
        luks_passphrase(b"short")


# --- the CLI ------------------------------------------------------------------------------


def test_cli_create_status_enroll_recover(
    cards: Cards, escrow: tuple, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from cryptography.hazmat.primitives import serialization

    from pam_svmm.cli.main import main

    esc_key, esc_cert = escrow
    pem = tmp_path / "escrow.pem"
    pem.write_bytes(esc_cert.public_bytes(serialization.Encoding.PEM))
    key_pem = tmp_path / "escrow.key"
    key_pem.write_bytes(
        esc_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    pin = tmp_path / "pin"
    pin.write_text(USER_PIN + "\n")
    pin.chmod(0o600)
    for name, kind in (("a", "p256"), ("b", "rsa"), ("c", "p384")):
        cards.make(name, kind)
    cards.module.close()  # the CLI loads the module itself
    img = tmp_path / "v.img"
    mod = ["--module", str(cards.hsm.module_path), "--pin-file", str(pin)]
    fast = ["--pbkdf", "pbkdf2", "--pbkdf-iterations", "1000"]
    # LUKS2's header takes 16 MiB: an image with no room for data is refused before any work.
    rc = main(["volume", "create", str(img), "--size", "16M", "--owner", "alice",
               "--custody", "key-object", "--escrow-cert", str(pem), "--card", "a",
               *mod, *fast])  # fmt: skip
    out = capsys.readouterr()
    assert rc == 6 and "too small for LUKS2" in out.err and "at least 20 MiB" in out.err
    assert not img.exists()
    rc = main(["volume", "create", str(img), "--size", "32M", "--owner", "alice",
               "--custody", "key-object", "--escrow-cert", str(pem), "--card", "a",
               *mod, *fast])  # fmt: skip
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "formatting LUKS2" in out.err and "key derivation: pbkdf2" in out.err
    assert "owner user alice, custody card-object" in out.out
    rc = main(["volume", "enroll", str(img), "--card", "pkcs11:token=b", *mod,
               "--with-card", "a", "--with-pin-file", str(pin), *fast])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    assert main(["volume", "status", str(img)]) == 0
    out = capsys.readouterr().out
    assert "card CN=a (card-object)" in out and "card CN=b (card-object)" in out
    assert "recovery, escrowed" in out
    assert main(["volume", "status", str(img), "--json"]) == 0
    doc = cli_schemas.parse(capsys.readouterr().out, cli_schemas.VOLUME_STATUS)
    assert doc["path"] == str(img) and doc["luks_version"] == 2
    assert doc["owner"] == {"kind": "user", "name": "alice"} and doc["custody"] == "card-object"
    kinds = sorted(slot["kind"] for slot in doc["slots"])
    assert kinds == ["card", "card", "escrow"]
    assert {str((slot["card"] or {}).get("subject")) for slot in doc["slots"]} >= {"CN=a", "CN=b"}
    rc = main(["volume", "recover", str(img), "--escrow-key", str(key_pem), "--card", "c",
               *mod, *fast])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    assert main(["volume", "status", str(img)]) == 0
    out = capsys.readouterr().out
    assert "CN=c" in out and "CN=a" not in out and "CN=b" not in out
    # a card that is not enrolled unlocks nothing: exit code of a VolumeError, clear message
    rc = main(["volume", "enroll", str(img), "--card", "a", *mod,
               "--with-card", "b", "--with-pin-file", str(pin), *fast])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 6 and "is not enrolled" in err
    assert USER_PIN not in err
