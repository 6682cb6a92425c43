"""The card adapter against real SoftHSM2 tokens (through the pinguard interposer)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from pam_svmm.adapters.token import (
    KeySpec,
    Pkcs11Module,
    plan_signature,
)
from pam_svmm.domain.pkcs11_uri import parse
from pam_svmm.domain.signing import KeyType, SignatureScheme
from pam_svmm.errors import (
    ConversationFailed,
    NoCard,
    PinIncorrect,
    PinInvalid,
    PinLocked,
    PinTries,
    TokenError,
)
from tests.integration.softhsm import USER_PIN, pinguard_so, self_signed, softhsm  # noqa: F401

pytestmark = pytest.mark.integration

KEYS = {
    "rsa": lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048),
    "p256": lambda: ec.generate_private_key(ec.SECP256R1()),
    "p384": lambda: ec.generate_private_key(ec.SECP384R1()),
}
EXPECTED_SCHEME = {
    "rsa": SignatureScheme.RSA_PKCS1_SHA256,
    "p256": SignatureScheme.ECDSA_SHA256,
    "p384": SignatureScheme.ECDSA_SHA384,
}


@pytest.fixture(scope="module")
def keys():
    return {name: make() for name, make in KEYS.items()}


def verify(public_key, scheme: SignatureScheme, signature: bytes, data: bytes) -> None:
    """Raise InvalidSignature unless ``signature`` verifies under ``scheme``."""
    if scheme is SignatureScheme.RSA_PKCS1_SHA256:
        public_key.verify(signature, data, padding.PKCS1v15(), hashes.SHA256())
    elif scheme is SignatureScheme.ECDSA_SHA256:
        public_key.verify(signature, data, ec.ECDSA(hashes.SHA256()))
    elif scheme is SignatureScheme.ECDSA_SHA384:
        public_key.verify(signature, data, ec.ECDSA(hashes.SHA384()))
    else:
        raise AssertionError(scheme)


@pytest.fixture
def card(softhsm, keys):  # noqa: F811
    """An open module with one RSA card for 'alice' (and an anchor on it)."""
    module = softhsm.open()
    key = keys["rsa"]
    anchor = self_signed(keys["p256"], "Org Root")
    token = softhsm.provision(module, "alice", key, self_signed(key, "alice"), anchors=(anchor,))
    return module, token


# --- listing -----------------------------------------------------------------------------------


def test_lists_token_and_certificates_without_login(card, keys):
    module, token = card
    (found,) = module.tokens()
    assert found == token
    assert (found.label, found.manufacturer) == ("alice", "SoftHSM project")
    assert found.model == "SoftHSM v2"
    assert found.login_required and not found.protected_auth_path
    assert found.pin_tries is PinTries.UNKNOWN

    certs = module.certificates(token)
    by_label = {c.label: c for c in certs}
    assert set(by_label) == {"auth", "svmm-trust-anchor"}
    auth = by_label["auth"]
    assert auth.id == b"\x01"
    assert auth.load().public_key() == keys["rsa"].public_key()
    assert by_label["svmm-trust-anchor"].load().subject.rfc4514_string() == "CN=Org Root"
    with module.session(token) as s:
        anchor = s.find_certificate("svmm-trust-anchor")
        assert anchor is not None and anchor.der == by_label["svmm-trust-anchor"].der
        assert s.find_certificate("nope") is None


def test_uri_selects_among_two_tokens(softhsm, keys):  # noqa: F811
    module = softhsm.open()
    alice = softhsm.provision(module, "alice", keys["rsa"], self_signed(keys["rsa"], "alice"))
    bob = softhsm.provision(
        module, "bob", keys["p256"], self_signed(keys["p256"], "bob"), key_id=b"\xb0\x0b"
    )
    assert {t.label for t in module.tokens()} == {"alice", "bob"}
    assert module.tokens(parse("pkcs11:token=bob")) == [bob]
    assert module.tokens(parse(f"pkcs11:serial={alice.serial}")) == [alice]
    assert module.tokens(parse(f"pkcs11:slot-id={bob.slot_id}")) == [bob]
    assert module.tokens(parse("pkcs11:model=SoftHSM%20v2;token=alice")) == [alice]
    assert module.tokens(parse("pkcs11:token=carol")) == []
    assert module.tokens(parse("pkcs11:manufacturer=Yubico")) == []
    assert module.tokens(parse("pkcs11:library-manufacturer=OpenSC%20Project")) == []
    assert len(module.tokens(parse("pkcs11:library-manufacturer=SoftHSM"))) == 2

    assert [c.id for c in module.certificates(bob, parse("pkcs11:id=%b0%0b"))] == [b"\xb0\x0b"]
    assert module.certificates(bob, parse("pkcs11:id=%01")) == []
    assert [c.label for c in module.certificates(alice, parse("pkcs11:object=auth"))] == ["auth"]


def test_no_token_gives_empty_list_and_nocard_after_timeout(softhsm):  # noqa: F811
    module = softhsm.open()
    assert module.tokens() == []  # SoftHSM's blank slot is not a card
    start = time.monotonic()
    with pytest.raises(NoCard, match=r"within 0\.3 s"):
        module.wait_for_token(None, timeout=0.3)
    assert 0.3 <= time.monotonic() - start < 2
    with pytest.raises(NoCard):
        module.wait_for_token(None, timeout=0)


def test_module_that_does_not_exist_is_token_error(tmp_path):
    path = tmp_path / "no-such-module.so"
    with pytest.raises(TokenError, match=str(path)) as exc:
        Pkcs11Module(path)
    assert not isinstance(exc.value, NoCard)
    not_a_module = tmp_path / "junk.so"
    not_a_module.write_bytes(b"not an ELF file")
    with pytest.raises(TokenError, match=r"junk\.so"):
        Pkcs11Module(not_a_module)


def test_importing_the_adapter_loads_neither_pykcs11_nor_cryptography():
    code = (
        "import sys, pam_svmm.adapters.token\n"
        "bad = [m for m in ('PyKCS11', 'cryptography') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=30)


# --- signing -----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["rsa", "p256", "p384"])
def test_imported_key_signs_and_certificate_key_verifies(softhsm, keys, kind):  # noqa: F811
    module = softhsm.open()
    key = keys[kind]
    token = softhsm.provision(module, f"card-{kind}", key, self_signed(key, kind))
    (cert,) = module.certificates(token)
    challenge = b"host challenge \x00\xff" * 4
    with module.session(token) as s:
        s.login(USER_PIN)
        scheme, signature = s.sign(cert.id, challenge)
    assert scheme is EXPECTED_SCHEME[kind]
    public = cert.load().public_key()
    verify(public, scheme, signature, challenge)
    with pytest.raises(InvalidSignature):
        verify(public, scheme, signature, challenge + b"x")


@pytest.mark.parametrize(
    ("spec", "scheme"),
    [
        (KeySpec.RSA_2048, SignatureScheme.RSA_PKCS1_SHA256),
        (KeySpec.EC_P256, SignatureScheme.ECDSA_SHA256),
        (KeySpec.EC_P384, SignatureScheme.ECDSA_SHA384),
    ],
)
def test_key_generated_on_card_signs(softhsm, spec, scheme):  # noqa: F811
    module = softhsm.open()
    token = module.init_token("gen", "12345678", USER_PIN)
    with module.session(token, rw=True) as s:
        s.login(USER_PIN)
        public = s.generate_key_pair(spec, key_id=b"\x07", label="gen")
    with module.session(token) as s:
        s.login(USER_PIN)
        got_scheme, signature = s.sign(b"\x07", b"data")
        # The private key stays on the card: not extractable, sensitive.
        import PyKCS11 as pk

        (h,) = s._s.findObjects([(pk.CKA_CLASS, pk.CKO_PRIVATE_KEY), (pk.CKA_ID, b"\x07")])
        sensitive, extractable = s._s.getAttributeValue(h, [pk.CKA_SENSITIVE, pk.CKA_EXTRACTABLE])
    assert got_scheme is scheme
    verify(public, scheme, signature, b"data")
    assert sensitive and not extractable
    if spec is KeySpec.RSA_2048:
        assert isinstance(public, rsa.RSAPublicKey) and public.key_size == 2048


def test_raw_rsa_pkcs_fallback_builds_a_valid_digestinfo(card, keys):
    module, token = card
    with module.session(token) as s:
        s.login(USER_PIN)
        s._mechanisms = frozenset({"CKM_RSA_PKCS"})  # a card without CKM_SHA256_RSA_PKCS
        scheme, signature = s.sign(b"\x01", b"payload")
    assert scheme is SignatureScheme.RSA_PKCS1_SHA256
    verify(keys["rsa"].public_key(), scheme, signature, b"payload")


def test_sign_with_unknown_key_id_is_token_error(card):
    module, token = card
    with module.session(token) as s:
        s.login(USER_PIN)
        with pytest.raises(TokenError) as exc:
            s.sign(b"\x99", b"x")
    assert exc.value.reason == "private_key_missing"


def test_sign_without_login_finds_no_private_key(card):
    module, token = card
    with module.session(token) as s, pytest.raises(TokenError, match="no private key"):
        s.sign(b"\x01", b"x")


def test_signing_plan_prefers_on_card_hashing():
    both = frozenset({"CKM_ECDSA", "CKM_ECDSA_SHA256", "CKM_ECDSA_SHA384"})
    assert plan_signature(KeyType.EC, "secp256r1", both).mechanism == "CKM_ECDSA_SHA256"
    p384 = plan_signature(KeyType.EC, "secp384r1", both)
    assert (p384.mechanism, p384.scheme) == ("CKM_ECDSA_SHA384", SignatureScheme.ECDSA_SHA384)
    raw = plan_signature(KeyType.EC, "secp384r1", frozenset({"CKM_ECDSA"}))
    assert (raw.mechanism, raw.prehash) == ("CKM_ECDSA", "sha384")
    with pytest.raises(TokenError, match="no RSA signing mechanism"):
        plan_signature(KeyType.RSA, None, frozenset({"CKM_ECDSA"}))


# --- PIN handling ------------------------------------------------------------------------------


def test_wrong_pin_counts_down_to_locked(card, softhsm):  # noqa: F811
    module, token = card
    softhsm.set_pin_tries(token, max_tries=3)
    assert module.token_info(token.slot_id).pin_tries is PinTries.UNKNOWN

    with module.session(token) as s, pytest.raises(PinIncorrect) as exc:
        s.login("000000")
    assert exc.value.tries is PinTries.COUNT_LOW
    with module.session(token) as s, pytest.raises(PinIncorrect) as exc:
        s.login("000000")
    assert exc.value.tries is PinTries.FINAL_TRY
    assert module.token_info(token.slot_id).pin_tries is PinTries.FINAL_TRY
    assert "000000" not in str(exc.value)

    with module.session(token) as s, pytest.raises(PinLocked):
        s.login("000000")  # the last try: now locked
    assert module.token_info(token.slot_id).pin_tries is PinTries.LOCKED
    with module.session(token) as s, pytest.raises(PinLocked):
        s.login(USER_PIN)  # even the right PIN


def test_right_pin_resets_the_counter(card, softhsm):  # noqa: F811
    module, token = card
    softhsm.set_pin_tries(token, max_tries=3, left=1)
    assert module.tokens()[0].pin_tries is PinTries.FINAL_TRY
    with module.session(token) as s:
        s.login(USER_PIN)
    assert module.token_info(token.slot_id).pin_tries is PinTries.UNKNOWN


def test_wrong_pin_on_plain_softhsm_reports_count_low(card):
    module, token = card  # no pinguard state: SoftHSM2's own COUNT_LOW flag
    with module.session(token) as s, pytest.raises(PinIncorrect) as exc:
        s.login("000000")
    assert exc.value.tries is PinTries.COUNT_LOW


def test_empty_pin_is_pin_invalid_not_a_pinpad_login(card):
    module, token = card
    with module.session(token) as s, pytest.raises(PinInvalid):
        s.login("")  # PyKCS11 would send it as NULL, i.e. a PIN pad login


@pytest.mark.parametrize(
    ("code", "error", "reason"),
    [
        ("CKR_PIN_INCORRECT", PinIncorrect, "pin_incorrect"),
        ("CKR_PIN_LOCKED", PinLocked, "pin_locked"),
        ("CKR_PIN_LEN_RANGE", PinInvalid, "pin_invalid"),
        ("CKR_PIN_INVALID", PinInvalid, "pin_invalid"),
        ("CKR_TOKEN_NOT_PRESENT", NoCard, "no_card"),
        ("CKR_DEVICE_REMOVED", NoCard, "no_card"),
        ("CKR_SLOT_ID_INVALID", NoCard, "no_card"),
        ("CKR_SESSION_HANDLE_INVALID", TokenError, "token_error"),  # the card is still there
        ("CKR_FUNCTION_CANCELED", ConversationFailed, "conversation_failed"),
        ("CKR_DEVICE_ERROR", TokenError, "token_error"),
        ("CKR_GENERAL_ERROR", TokenError, "token_error"),
    ],
)
def test_translation_table(softhsm, code, error, reason):  # noqa: F811
    import PyKCS11 as pk

    module = softhsm.open()  # no card needed: no slot, so tries read as unknown
    err = module._translate(getattr(pk, code), None, login=True)
    assert type(err) is error
    assert err.reason == reason
    if error is TokenError:
        assert code in str(err)


def test_session_handle_invalid_after_removal_is_no_card(card, softhsm):  # noqa: F811
    import PyKCS11 as pk

    module, token = card
    softhsm.set_removed(token)
    err = module._translate(pk.CKR_SESSION_HANDLE_INVALID, token.slot_id, login=False)
    assert type(err) is NoCard


def test_pinpad_login_with_none(card, softhsm):  # noqa: F811
    module, token = card
    with module.session(token) as s, pytest.raises(TokenError) as exc:
        s.login(None)
    assert exc.value.reason == "pinpad_unavailable"

    softhsm.set_pinpad(token, USER_PIN)
    (token,) = module.tokens()
    assert token.protected_auth_path
    with module.session(token) as s:
        s.login(None)
        scheme, signature = s.sign(b"\x01", b"via pinpad")
    (cert,) = [c for c in module.certificates(token) if c.id == b"\x01"]
    verify(cert.load().public_key(), scheme, signature, b"via pinpad")


def test_pinpad_cancel_and_wrong_pin(card, softhsm):  # noqa: F811
    module, token = card
    softhsm.set_pinpad(token, None)  # the user presses cancel
    (token,) = module.tokens()
    with module.session(token) as s, pytest.raises(ConversationFailed):
        s.login(None)
    softhsm.set_pinpad(token, "999999")
    softhsm.set_pin_tries(token, max_tries=3)
    with module.session(token) as s, pytest.raises(PinIncorrect) as exc:
        s.login(None)
    assert exc.value.tries is PinTries.COUNT_LOW


# --- removal -----------------------------------------------------------------------------------


def test_removed_token_is_no_card(card, softhsm):  # noqa: F811
    module, token = card
    session = module.session(token)
    session.login(USER_PIN)
    softhsm.set_removed(token)

    assert module.tokens() == []
    with pytest.raises(NoCard):
        module.wait_for_token(None, timeout=0.2)
    with pytest.raises(NoCard):
        session.sign(b"\x01", b"x")
    with pytest.raises(NoCard):
        session.certificates()
    with pytest.raises(NoCard):
        module.session(token)
    with pytest.raises(NoCard):
        module.token_info(token.slot_id)
    session.close()  # closing a session on a pulled card is quiet


def test_wait_for_token_sees_reinsertion(card, softhsm):  # noqa: F811
    module, token = card
    softhsm.set_removed(token)
    timer = threading.Timer(0.3, softhsm.set_removed, args=(token, False))
    timer.start()
    try:
        start = time.monotonic()
        found = module.wait_for_token(parse("pkcs11:token=alice"), timeout=5)
    finally:
        timer.cancel()
    assert found.serial == token.serial
    assert 0.25 <= time.monotonic() - start < 3


def test_certificate_der_is_what_was_written(card):
    module, token = card
    (auth,) = [c for c in module.certificates(token) if c.label == "auth"]
    assert isinstance(auth.load(), x509.Certificate)
