"""Card-held volume keys on SoftHSM2 cards (RSA-2048, P-256, P-384): wrapped keys unwrapped
on the card, key objects read after login, escrow recovery."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import PyKCS11
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from pam_svmm.adapters.token import CardCertificate, KeySpec, Pkcs11Module, TokenInfo
from pam_svmm.domain import custody as dc
from pam_svmm.errors import KeyReleaseFailed, KeyTokenInvalid, SvmmError, TokenError
from pam_svmm.services.custody import (
    card_oaep_hash,
    new_volume_secret,
    read_from_card,
    release,
    store_on_card,
    unwrap_with_card,
    unwrap_with_escrow,
    wrap_for_card,
    wrap_for_escrow,
)
from svmm_lab.pki import LabCA, PrivateKey, new_key
from tests.integration import softhsm as fixtures
from tests.integration.softhsm import SO_PIN, USER_PIN, SoftHsm

pytestmark = pytest.mark.integration
pinguard_so = fixtures.pinguard_so  # the fixtures this module uses
softhsm = fixtures.softhsm

KINDS = ("rsa", "p256", "p384")
DER = serialization.Encoding.DER


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> LabCA:
    return LabCA.create(
        tmp_path_factory.mktemp("ca"),
        crl_base="http://127.0.0.1:9/crl",
        ocsp_url="http://127.0.0.1:9/ocsp",
    )


@pytest.fixture(scope="module")
def card_keys() -> dict[str, PrivateKey]:
    """Two keys of each kind, for an "a" card and a "b" card of the same type."""
    return {f"{kind}-{n}": new_key(kind) for kind in KINDS for n in ("a", "b")}


@dataclass
class Card:
    token: TokenInfo
    cert: x509.Certificate
    on_card: CardCertificate


@pytest.fixture
def module(softhsm: SoftHsm) -> Pkcs11Module:
    return softhsm.open()


def make_card(
    softhsm: SoftHsm, module: Pkcs11Module, ca: LabCA, key: PrivateKey, name: str
) -> Card:
    cert = ca.issue_user(name, key.public_key(), upn=f"{name}@demo.example")
    token = softhsm.provision(module, name, key, cert.public_bytes(DER))
    with module.session(token) as s:
        (on_card,) = s.certificates()
    return Card(token, cert, on_card)


@contextmanager
def logged_in(module: Pkcs11Module, card: Card, *, rw: bool = False) -> Iterator[Any]:
    with module.session(card.token, rw=rw) as s:
        s.login(USER_PIN)
        yield s


def wrap(module: Pkcs11Module, card: Card, secret: bytearray) -> dc.WrappedKey:
    """Enrolment: the card's certificate, and for RSA the OAEP hash the card can do."""
    oaep = "sha256"
    if card.token.label.startswith("rsa"):
        with logged_in(module, card) as s:
            oaep = card_oaep_hash(s, card.on_card)
    return wrap_for_card(card.cert, secret, key_id=card.on_card.id, oaep_hash=oaep)


@contextmanager
def raw_session(module: Pkcs11Module, card: Card, *, login: bool) -> Iterator[Any]:
    """A bare PyKCS11 session, to look at the card without the adapter in between."""
    s = module.lib.openSession(card.token.slot_id, PyKCS11.CKF_RW_SESSION)
    try:
        if login:
            s.login(USER_PIN)
        yield s
    finally:
        s.closeSession()


def secret_objects(module: Pkcs11Module, card: Card) -> list[Any]:
    with raw_session(module, card, login=True) as s:
        return s.findObjects([(PyKCS11.CKA_CLASS, PyKCS11.CKO_SECRET_KEY)])


# --- wrapped keys ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_wrap_to_the_card_certificate_and_unwrap_on_the_card(
    softhsm: SoftHsm, module: Pkcs11Module, ca: LabCA, card_keys, kind: str
) -> None:
    card = make_card(softhsm, module, ca, card_keys[f"{kind}-a"], f"{kind}-a")
    secret = new_volume_secret()
    token = wrap(module, card, secret).with_keyslots(1)
    expected = dc.kem_for(card.cert.public_key())
    assert token.kem is expected or (expected.is_rsa and token.kem is dc.Kem.RSA_OAEP_SHA1)
    text = token.to_json()
    with logged_in(module, card) as s:
        released = unwrap_with_card(s, text)
        assert isinstance(released, bytearray) and released == secret
        assert release(s, text) == secret
        # The private key stayed on the card and is still not extractable.
        assert s.key_protection(card.on_card.id) == (True, False)
    # The ECDH output lived in a session object that is gone again.
    assert secret_objects(module, card) == []


def test_an_rsa_card_without_oaep_sha256_fails_closed_on_a_sha256_token(
    softhsm: SoftHsm, module: Pkcs11Module, ca: LabCA, card_keys
) -> None:
    card = make_card(softhsm, module, ca, card_keys["rsa-a"], "rsa-a")
    with logged_in(module, card) as s:
        if card_oaep_hash(s, card.on_card) == "sha256":
            pytest.skip("this PKCS#11 module does RSA-OAEP with SHA-256")
        token = wrap_for_card(card.cert, new_volume_secret(), key_id=card.on_card.id)
        with pytest.raises(TokenError):
            unwrap_with_card(s, token)


def test_keys_generated_on_the_card_can_unwrap(
    softhsm: SoftHsm, module: Pkcs11Module, ca: LabCA
) -> None:
    """Cards issued by `svmm card issue` (key generated on the card) decrypt and derive."""
    for spec in (KeySpec.RSA_2048, KeySpec.EC_P256):
        token_info = module.init_token(spec.value, SO_PIN, USER_PIN)
        with module.session(token_info, rw=True) as s:
            s.login(USER_PIN)
            public_key = s.generate_key_pair(spec, key_id=b"\x07", label="auth")
            cert = ca.issue_user(spec.value, public_key)
            s.write_certificate(cert.public_bytes(DER), key_id=b"\x07", label="auth")
            (on_card,) = s.certificates()
            card = Card(token_info, cert, on_card)
        secret = new_volume_secret()
        token = wrap(module, card, secret)
        with logged_in(module, card) as s:
            assert unwrap_with_card(s, token) == secret


@pytest.mark.parametrize("kind", KINDS)
def test_unwrapping_needs_a_login(
    softhsm: SoftHsm, module: Pkcs11Module, ca: LabCA, card_keys, kind: str
) -> None:
    card = make_card(softhsm, module, ca, card_keys[f"{kind}-a"], f"{kind}-a")
    token = wrap(module, card, new_volume_secret())
    with module.session(card.token) as s, pytest.raises(TokenError) as e:
        unwrap_with_card(s, token)
    assert e.value.reason == "login_required"


@pytest.mark.parametrize("kind", KINDS)
def test_another_card_cannot_unwrap(
    softhsm: SoftHsm, module: Pkcs11Module, ca: LabCA, card_keys, kind: str
) -> None:
    a = make_card(softhsm, module, ca, card_keys[f"{kind}-a"], f"{kind}-a")
    b = make_card(softhsm, module, ca, card_keys[f"{kind}-b"], f"{kind}-b")
    secret = new_volume_secret()
    token = wrap(module, a, secret)
    with logged_in(module, b) as s:
        with pytest.raises(KeyReleaseFailed) as e:
            unwrap_with_card(s, token)
        assert e.value.reason == "not_recipient"
        assert secret.hex() not in str(e.value)
        # Below the recipient check, the card's key itself does not open the token.
        if kind == "rsa":
            with pytest.raises(SvmmError):
                s.decrypt_rsa_oaep(b.on_card.id, token.enc, hash=token.kem.oaep_hash)
        else:
            peer = ec.EllipticCurvePublicKey.from_encoded_point(token.kem.curve, token.enc)
            wrong = s.ecdh_derive(b.on_card.id, peer)
            with pytest.raises(KeyReleaseFailed):
                dc.open_wrapped(token, wrong)
    with logged_in(module, a) as s:
        assert unwrap_with_card(s, token) == secret


def _flip(value: str, index: int) -> str:
    raw = bytearray(base64.b64decode(value))
    raw[index] ^= 0x01
    return base64.b64encode(bytes(raw)).decode()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("field", ["ciphertext", "nonce", "key-id", "enc", "kem"])
def test_a_tampered_token_is_refused(
    softhsm: SoftHsm, module: Pkcs11Module, ca: LabCA, card_keys, kind: str, field: str
) -> None:
    card = make_card(softhsm, module, ca, card_keys[f"{kind}-a"], f"{kind}-a")
    secret = new_volume_secret()
    token = wrap(module, card, secret)
    d = token.to_dict()
    if field in ("ciphertext", "nonce"):
        d[field] = _flip(d[field], 5)
    elif field == "enc":
        d[field] = _flip(d[field], 20)
    elif field == "key-id":
        d[field] = "99"
    else:
        d[field] = {
            "rsa-oaep-sha1": "rsa-oaep-sha256",
            "rsa-oaep-sha256": "rsa-oaep-sha1",
            "ecdh-p256": "ecdh-p384",
            "ecdh-p384": "ecdh-p256",
        }[d[field]]
    with logged_in(module, card) as s:
        # An RSA ciphertext the card cannot decode is reported by SoftHSM as
        # CKR_GENERAL_ERROR (TokenError); every other case is a definite refusal.
        accepted: tuple[type[SvmmError], ...] = (KeyReleaseFailed, KeyTokenInvalid)
        if kind == "rsa" and field in ("enc", "kem"):
            accepted = (*accepted, TokenError)
        with pytest.raises(accepted) as e:
            unwrap_with_card(s, d)
        if field in ("ciphertext", "nonce", "key-id"):
            assert e.value.reason == "key_unwrap_failed"
        # The untampered token still opens.
        assert unwrap_with_card(s, token) == secret


# --- key objects on the card -------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_key_object_is_readable_only_after_login(
    softhsm: SoftHsm, module: Pkcs11Module, ca: LabCA, card_keys, kind: str
) -> None:
    card = make_card(softhsm, module, ca, card_keys[f"{kind}-a"], f"{kind}-a")
    secret = new_volume_secret()
    with logged_in(module, card, rw=True) as s:
        ref = store_on_card(
            s, secret, card_certificate=card.cert, object_id=b"\x42", label="svmm-volume-vm1"
        )
    text = ref.with_keyslots(2).to_json()
    # Before login: the adapter refuses, and the card itself shows no such object.
    with module.session(card.token) as s:
        with pytest.raises(TokenError) as e:
            read_from_card(s, text)
        assert e.value.reason == "login_required"
    with raw_session(module, card, login=False) as raw:
        assert raw.findObjects([(PyKCS11.CKA_LABEL, "svmm-volume-vm1")]) == []
        assert raw.findObjects([(PyKCS11.CKA_CLASS, PyKCS11.CKO_SECRET_KEY)]) == []
    # After login, from a fresh load of the module (the object is on the token).
    module.close()
    again = softhsm.open()
    (reloaded,) = [t for t in again.tokens() if t.serial == card.token.serial]
    card = Card(reloaded, card.cert, card.on_card)
    with again.session(card.token) as s:
        s.login(USER_PIN)
        got = read_from_card(s, text)
        assert isinstance(got, bytearray) and got == secret
        assert release(s, text) == secret
    with raw_session(again, card, login=True) as raw:
        (h,) = raw.findObjects([(PyKCS11.CKA_LABEL, "svmm-volume-vm1")])
        attrs = raw.getAttributeValue(
            h,
            [
                PyKCS11.CKA_CLASS,
                PyKCS11.CKA_TOKEN,
                PyKCS11.CKA_PRIVATE,
                PyKCS11.CKA_SENSITIVE,
                PyKCS11.CKA_EXTRACTABLE,
                PyKCS11.CKA_MODIFIABLE,
                PyKCS11.CKA_DERIVE,
                PyKCS11.CKA_ENCRYPT,
            ],
        )
        assert attrs == [PyKCS11.CKO_SECRET_KEY, True, True, False, True, False, False, False]


def test_key_object_refusals(softhsm: SoftHsm, module: Pkcs11Module, ca: LabCA, card_keys) -> None:
    a = make_card(softhsm, module, ca, card_keys["p256-a"], "p256-a")
    b = make_card(softhsm, module, ca, card_keys["p256-b"], "p256-b")
    secret = new_volume_secret()
    with logged_in(module, a, rw=True) as s:
        ref = store_on_card(s, secret, card_certificate=a.cert, object_id=b"\x42", label="vol")
        with pytest.raises(TokenError) as e:
            s.store_secret("vol", b"\x43", new_volume_secret())
        assert e.value.reason == "secret_exists"
    # Another card is not the one the token names.
    with logged_in(module, b) as s:
        with pytest.raises(KeyReleaseFailed) as e:
            read_from_card(s, ref)
        assert e.value.reason == "not_recipient"
    # The object replaced by another secret under the same name: refused by the check.
    with raw_session(module, a, login=True) as raw:
        for h in raw.findObjects([(PyKCS11.CKA_LABEL, "vol")]):
            raw.destroyObject(h)
    with logged_in(module, a, rw=True) as s:
        with pytest.raises(KeyReleaseFailed) as e:
            read_from_card(s, ref)
        assert e.value.reason == "secret_missing"
        s.store_secret("vol", b"\x42", new_volume_secret())
        with pytest.raises(KeyReleaseFailed) as e:
            read_from_card(s, ref)
        assert e.value.reason == "secret_mismatch"


# --- escrow ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_escrow_recovers_what_the_card_holds(
    softhsm: SoftHsm, module: Pkcs11Module, ca: LabCA, card_keys, kind: str
) -> None:
    card = make_card(softhsm, module, ca, card_keys[f"{kind}-a"], f"{kind}-a")
    escrow_key = card_keys[f"{kind}-b"]  # a software key, as the organisation keeps it
    escrow_cert = ca.issue_user("Demo Org Volume Escrow", escrow_key.public_key())
    secret = new_volume_secret()
    card_token = wrap(module, card, secret)
    escrow_token = wrap_for_escrow(escrow_cert, secret)
    assert escrow_token.type == dc.TYPE_ESCROW
    assert unwrap_with_escrow(escrow_key, escrow_token.to_json()) == secret
    with logged_in(module, card) as s:
        assert unwrap_with_card(s, card_token) == secret
        with pytest.raises(KeyReleaseFailed):
            unwrap_with_card(s, escrow_token)
    with pytest.raises(KeyReleaseFailed):
        unwrap_with_escrow(escrow_key, card_token)
