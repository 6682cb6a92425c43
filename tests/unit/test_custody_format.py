"""The wrapped-key token format and its cryptography (pure), and escrow with software keys."""

from __future__ import annotations

import base64
import json

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from pam_svmm.domain import custody as dc
from pam_svmm.errors import CertificateInvalid, KeyReleaseFailed, KeyTokenInvalid
from pam_svmm.services.custody import (
    new_volume_secret,
    unwrap_with_escrow,
    wrap_for_card,
    wrap_for_escrow,
)


@pytest.fixture(scope="module")
def keys() -> dict[str, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey]:
    return {
        "rsa": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "p256": ec.generate_private_key(ec.SECP256R1()),
        "p384": ec.generate_private_key(ec.SECP384R1()),
    }


KINDS = ("rsa", "p256", "p384")


def edited(token: dc.WrappedKey | dc.CardObjectRef, **changes: object) -> dict:
    d = token.to_dict()
    for k, v in changes.items():
        if v is None:
            d.pop(k.replace("_", "-"), None)
        else:
            d[k.replace("_", "-")] = v
    return d


def flip_b64(value: str, index: int = 3) -> str:
    raw = bytearray(base64.b64decode(value))
    raw[index] ^= 0x01
    return base64.b64encode(bytes(raw)).decode()


# --- round trips -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_escrow_wrap_and_unwrap_with_a_software_key(keys, kind: str) -> None:
    key = keys[kind]
    secret = new_volume_secret()
    token = wrap_for_escrow(key.public_key(), secret)
    assert token.type == dc.TYPE_ESCROW and token.key_id is None
    assert token.kem is dc.kem_for(key.public_key())
    text = token.with_keyslots(2).to_json()
    released = unwrap_with_escrow(key, text)
    assert isinstance(released, bytearray)
    assert released == secret and len(released) == dc.SECRET_BYTES


@pytest.mark.parametrize("kind", KINDS)
def test_json_round_trip_keeps_every_field(keys, kind: str) -> None:
    token = wrap_for_card(keys[kind].public_key(), new_volume_secret(), key_id=b"\x01\x02")
    token = token.with_keyslots(0, "7")
    assert dc.parse_token(token.to_json()) == token
    assert dc.parse_token(json.loads(token.to_json())) == token
    assert dc.parse_token(token.to_json().encode()) == token
    assert token.keyslots == ("0", "7")


def test_the_secret_is_not_in_the_token(keys) -> None:
    secret = new_volume_secret()
    text = wrap_for_card(keys["p256"].public_key(), secret, key_id=b"\x01").to_json()
    assert secret.hex() not in text
    assert base64.b64encode(bytes(secret)).decode()[:20] not in text


def test_oaep_sha1_tokens_for_cards_that_only_do_sha1(keys) -> None:
    secret = new_volume_secret()
    token = wrap_for_escrow(keys["rsa"].public_key(), secret, oaep_hash="sha1")
    assert token.kem is dc.Kem.RSA_OAEP_SHA1
    assert unwrap_with_escrow(keys["rsa"], token) == secret


def test_keyslots_are_not_authenticated_so_the_luks_adapter_may_set_them(keys) -> None:
    secret = new_volume_secret()
    token = wrap_for_escrow(keys["p256"].public_key(), secret)
    assert unwrap_with_escrow(keys["p256"], edited(token, keyslots=["1", "5"])) == secret


def test_new_volume_secrets_are_random_bytearrays() -> None:
    a, b = new_volume_secret(), new_volume_secret()
    assert isinstance(a, bytearray) and len(a) == dc.SECRET_BYTES and a != b


def test_wipe_zeroes_the_same_buffer() -> None:
    buf = bytearray(b"secret-bytes")
    view = memoryview(buf)
    dc.wipe(buf)
    assert bytes(view) == bytes(len(buf))
    dc.wipe(None)


# --- refusals --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_a_different_key_cannot_unwrap(keys, kind: str) -> None:
    token = wrap_for_escrow(keys[kind].public_key(), new_volume_secret())
    other = {"rsa": "p256", "p256": "p384", "p384": "rsa"}[kind]
    with pytest.raises(KeyReleaseFailed) as e:
        unwrap_with_escrow(keys[other], token)
    assert e.value.reason == "not_recipient"


@pytest.mark.parametrize("kind", KINDS)
def test_the_wrong_shared_secret_does_not_authenticate(keys, kind: str) -> None:
    """Below the recipient check: the AEAD itself refuses a key that is not the recipient's."""
    token = wrap_for_escrow(keys[kind].public_key(), new_volume_secret())
    with pytest.raises(KeyReleaseFailed) as e:
        dc.open_wrapped(token, bytearray(48))
    assert e.value.reason == "key_unwrap_failed"


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("field", ["ciphertext", "nonce", "key-id", "type", "enc", "kem"])
def test_an_altered_token_is_refused(keys, kind: str, field: str) -> None:
    key = keys[kind]
    secret = new_volume_secret()
    token = wrap_for_card(key.public_key(), secret, key_id=b"\x01")
    d = token.to_dict()
    if field in ("ciphertext", "nonce"):
        d[field] = flip_b64(d[field])
    elif field == "enc":
        d[field] = flip_b64(d[field], index=10)
    elif field == "key-id":
        d[field] = "02"
    elif field == "type":
        d.pop("key-id")
        d[field] = dc.TYPE_ESCROW
    elif field == "kem":
        d[field] = {"rsa": "rsa-oaep-sha1", "p256": "ecdh-p384", "p384": "ecdh-p256"}[kind]
    with pytest.raises((KeyReleaseFailed, KeyTokenInvalid)) as e:
        unwrap_with_escrow(key, d)
    assert secret.hex() not in str(e.value)
    if field in ("ciphertext", "nonce", "key-id", "type"):
        assert e.value.reason == "key_unwrap_failed"


def test_a_token_for_another_recipient_is_refused_before_any_key_use(keys) -> None:
    token = wrap_for_escrow(keys["p256"].public_key(), new_volume_secret())
    d = edited(token, recipient_spki_sha256=dc.spki_sha256(keys["p384"].public_key()).hex())
    with pytest.raises(KeyTokenInvalid, match="kem"):
        unwrap_with_escrow(keys["p384"], d)


@pytest.fixture(scope="module")
def good(keys) -> dict:
    return wrap_for_card(keys["p256"].public_key(), new_volume_secret(), key_id=b"\x01").to_dict()


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"type": "systemd-pkcs11"}, "type"),
        ({"svmm-version": 2}, "svmm-version"),
        ({"svmm-version": True}, "svmm-version"),
        ({"custody": "tpm"}, "custody"),
        ({"kem": "ecdh-p521"}, "kem"),
        ({"nonce": None}, "nonce"),
        ({"extra": "x"}, "extra"),
        ({"nonce": "AAAA"}, "nonce"),
        ({"nonce": "!!not base64!!"}, "nonce"),
        ({"ciphertext": base64.b64encode(bytes(47)).decode()}, "ciphertext"),
        ({"recipient-spki-sha256": "AB" * 32}, "recipient-spki-sha256"),
        ({"recipient-spki-sha256": "ab" * 31}, "recipient-spki-sha256"),
        ({"recipient-spki-sha256": "ab " * 32}, "recipient-spki-sha256"),
        ({"key-id": "00" * 65}, "key-id"),
        ({"key-id": 1}, "key-id"),
        ({"keyslots": [1]}, "keyslots"),
        ({"keyslots": "1"}, "keyslots"),
        ({"enc": base64.b64encode(b"\x04" + bytes(64)).decode()}, "enc"),
        ({"enc": base64.b64encode(bytes(65)).decode()}, "enc"),
    ],
)
def test_malformed_tokens_name_the_field(good: dict, change: dict, field: str) -> None:
    d = dict(good)
    for k, v in change.items():
        if v is None:
            d.pop(k)
        else:
            d[k] = v
    with pytest.raises(KeyTokenInvalid) as e:
        dc.parse_token(d)
    assert f"key token: {field}:" in str(e.value)


@pytest.mark.parametrize("text", ["", "not json", "[1, 2]", '"x"', "null"])
def test_tokens_that_are_not_json_objects(text: str) -> None:
    with pytest.raises(KeyTokenInvalid):
        dc.parse_token(text)


def test_a_compressed_point_is_refused(keys, good: dict) -> None:
    point = (
        ec.generate_private_key(ec.SECP256R1())
        .public_key()
        .public_bytes(serialization.Encoding.X962, serialization.PublicFormat.CompressedPoint)
    )
    with pytest.raises(KeyTokenInvalid, match="uncompressed"):
        dc.parse_token(good | {"enc": base64.b64encode(point).decode()})


def test_an_escrow_token_names_no_card_key(good: dict) -> None:
    with pytest.raises(KeyTokenInvalid, match="key-id"):
        dc.parse_token(good | {"type": dc.TYPE_ESCROW})


def test_rsa_enc_must_be_as_long_as_the_modulus(keys) -> None:
    token = wrap_for_escrow(keys["rsa"].public_key(), new_volume_secret())
    d = token.to_dict() | {"enc": base64.b64encode(bytes(384)).decode()}
    with pytest.raises(KeyTokenInvalid, match="kem"):
        unwrap_with_escrow(keys["rsa"], d)


# --- the cryptographic choices ------------------------------------------------------------------


def test_wrap_key_is_hkdf_sha256_with_the_documented_info() -> None:
    shared, enc, recipient = bytes(range(32)), b"\x04" + bytes(64), bytes(32)
    info = b"pam_svmm volume key wrap v1\x00ecdh-p256\x00" + recipient + enc
    expected = HKDF(hashes.SHA256(), 32, salt=None, info=info).derive(shared)
    assert dc.derive_wrap_key(dc.Kem.ECDH_P256, shared, enc, recipient) == expected


def test_wrap_keys_are_bound_to_kem_recipient_and_enc() -> None:
    shared, enc, recipient = bytes(32), b"\x04" + bytes(64), bytes(32)
    base = dc.derive_wrap_key(dc.Kem.ECDH_P256, shared, enc, recipient)
    assert base != dc.derive_wrap_key(dc.Kem.ECDH_P384, shared, enc, recipient)
    assert base != dc.derive_wrap_key(dc.Kem.ECDH_P256, shared, enc, b"\x01" + bytes(31))
    assert base != dc.derive_wrap_key(
        dc.Kem.ECDH_P256, shared, b"\x04" + bytes(63) + b"\x01", recipient
    )


def test_the_aad_is_the_canonical_header_without_keyslots_and_ciphertext(keys) -> None:
    token = wrap_for_card(keys["p256"].public_key(), new_volume_secret(), key_id=b"\x01")
    header = json.loads(token.aad())
    assert "keyslots" not in header and "ciphertext" not in header
    assert header == {
        k: v for k, v in token.to_dict().items() if k not in ("keyslots", "ciphertext")
    }
    assert token.aad() == json.dumps(header, sort_keys=True, separators=(",", ":")).encode()


def test_oaep_parameters(keys) -> None:
    assert dc.Kem.RSA_OAEP_SHA256.oaep_hash == "sha256"
    pad = dc.Kem.RSA_OAEP_SHA256.oaep_padding()
    assert isinstance(pad.algorithm, hashes.SHA256)
    assert isinstance(pad._mgf._algorithm, hashes.SHA256)  # MGF1 with the same hash
    with pytest.raises(ValueError):
        _ = dc.Kem.ECDH_P256.oaep_hash


@pytest.mark.parametrize(
    "key",
    [
        rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key(),  # noqa: S505
        ec.generate_private_key(ec.SECP521R1()).public_key(),
        ed25519.Ed25519PrivateKey.generate().public_key(),
    ],
    ids=["rsa1024", "p521", "ed25519"],
)
def test_unsuitable_recipient_keys_are_refused(key) -> None:
    with pytest.raises(CertificateInvalid):
        wrap_for_escrow(key, new_volume_secret())


def test_seal_wants_a_32_byte_secret(keys) -> None:
    with pytest.raises(ValueError):
        wrap_for_escrow(keys["p256"].public_key(), bytearray(16))


# --- card-object tokens -------------------------------------------------------------------------


def test_card_object_token_round_trip_and_check(keys) -> None:
    secret = new_volume_secret()
    ref = dc.make_card_object_ref(
        recipient=dc.spki_sha256(keys["p256"].public_key()),
        object_id=b"\x20",
        label="svmm-volume-vm1",
        secret=secret,
    ).with_keyslots(3)
    assert dc.parse_token(ref.to_json()) == ref
    assert secret.hex() not in ref.to_json()
    dc.verify_card_object(ref, secret)
    with pytest.raises(KeyReleaseFailed) as e:
        dc.verify_card_object(ref, new_volume_secret())
    assert e.value.reason == "secret_mismatch"
    # The check covers the header: the same secret under another label is refused.
    other = dc.parse_token(edited(ref, object_label="svmm-volume-vm2"))
    with pytest.raises(KeyReleaseFailed):
        dc.verify_card_object(other, secret)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"object-label": ""}, "object-label"),
        ({"object-label": "a\nb"}, "object-label"),
        ({"object-id": ""}, "object-id"),
        ({"type": dc.TYPE_ESCROW}, "custody"),
        ({"check": None}, "check"),
    ],
)
def test_malformed_card_object_tokens(keys, change: dict, field: str) -> None:
    ref = dc.make_card_object_ref(
        recipient=bytes(32), object_id=b"\x20", label="v", secret=new_volume_secret()
    )
    with pytest.raises(KeyTokenInvalid) as e:
        dc.parse_token(edited(ref, **{k.replace("-", "_"): v for k, v in change.items()}))
    assert f"key token: {field}:" in str(e.value)
