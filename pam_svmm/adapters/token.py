"""The PKCS#11 card adapter (PyKCS11): list tokens and certificates, log in, sign; provision.

PyKCS11 raises one exception type for every return code; ``Pkcs11Module._translate`` turns
codes into the typed errors of ``pam_svmm.errors`` and is the only place that does so.
PyKCS11 and cryptography are imported inside functions so that importing this module (for
example by the PAM entry point before it knows whether a card is needed) stays cheap.

Typical use::

    with Pkcs11Module(cfg.pkcs11.module) as module:
        token = module.wait_for_token(uri, timeout=cfg.pkcs11.wait_for_card)
        certs = module.certificates(token, uri)            # public objects, no login
        with module.session(token) as s:
            s.login(pin)                                    # None: the reader's PIN pad
            scheme, signature = s.sign(certs[0].id, challenge)
"""

from __future__ import annotations

import enum
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING, Any

from ..domain.pkcs11_uri import Pkcs11Uri
from ..domain.signing import KeyType, SignatureScheme
from ..errors import (
    CertificateInvalid,
    ConversationFailed,
    KeyReleaseFailed,
    NoCard,
    PinIncorrect,
    PinInvalid,
    PinLocked,
    PinTries,
    SvmmError,
    TokenError,
)

if TYPE_CHECKING:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric.types import (
        PrivateKeyTypes,
        PublicKeyTypes,
    )

_ANY = Pkcs11Uri()

# Return codes that mean the card is gone (or the slot with it).
_GONE = frozenset({"CKR_TOKEN_NOT_PRESENT", "CKR_DEVICE_REMOVED", "CKR_SLOT_ID_INVALID"})
# Codes that mean "gone" only when the token is indeed no longer present.
_MAYBE_GONE = frozenset({"CKR_SESSION_HANDLE_INVALID", "CKR_SESSION_CLOSED"})
# The card says the ciphertext is not for its key (wrong card, or an altered token).
_NOT_FOR_THIS_KEY = frozenset({"CKR_ENCRYPTED_DATA_INVALID", "CKR_ENCRYPTED_DATA_LEN_RANGE"})


def _pk() -> Any:
    import PyKCS11

    return PyKCS11


@dataclass(frozen=True)
class TokenInfo:
    """A token in a slot, as C_GetTokenInfo describes it (text fields without padding)."""

    slot_id: int
    label: str
    manufacturer: str
    model: str
    serial: str
    pin_tries: PinTries
    protected_auth_path: bool
    login_required: bool

    def describe(self) -> str:
        return f"{self.label!r} (serial {self.serial})"


@dataclass(frozen=True)
class CardCertificate:
    """A public X.509 certificate object on a token; ``id`` is its CKA_ID."""

    label: str
    id: bytes
    der: bytes

    def load(self) -> x509.Certificate:
        from cryptography import x509

        from ..domain.certpolicy import PARSE_ERRORS

        try:
            return x509.load_der_x509_certificate(self.der)
        except PARSE_ERRORS as e:  # InvalidVersion is no ValueError
            raise CertificateInvalid(
                f"certificate {self.label!r} on the card: {e}", reason="certificate_malformed"
            ) from None


class KeySpec(enum.Enum):
    """Key pairs the provisioning helpers generate on a card."""

    RSA_2048 = "rsa2048"
    EC_P256 = "ec-p256"
    EC_P384 = "ec-p384"


def pin_tries_from_flags(flags: int) -> PinTries:
    pk = _pk()
    if flags & pk.CKF_USER_PIN_LOCKED:
        return PinTries.LOCKED
    if flags & pk.CKF_USER_PIN_FINAL_TRY:
        return PinTries.FINAL_TRY
    if flags & pk.CKF_USER_PIN_COUNT_LOW:
        return PinTries.COUNT_LOW
    return PinTries.UNKNOWN


def poll_for_token(
    tokens: Callable[[Pkcs11Uri | None], list[TokenInfo]],
    uri: Pkcs11Uri | None,
    timeout: float,
    interval: float = 0.1,
) -> TokenInfo:
    """The first token ``tokens(uri)`` lists, asking every ``interval`` seconds for up to
    ``timeout``; NoCard after that."""
    deadline = time.monotonic() + max(0.0, timeout)
    while True:
        found = tokens(uri)
        if found:
            return found[0]
        left = deadline - time.monotonic()
        if left <= 0:
            waited = f" within {timeout:g} s" if timeout > 0 else ""
            raise NoCard(f"no card matching the configured URI is present{waited}")
        time.sleep(min(interval, left))


class Pkcs11Module:
    """One loaded PKCS#11 library. Close it (or use ``with``) to C_Finalize and unload."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        pk = _pk()
        self.path = os.fspath(path)
        lib = pk.PyKCS11Lib()
        try:
            lib.load(self.path)
            info = lib.getInfo()
        except pk.PyKCS11Error as e:
            lib.unload()
            detail = e.text if e.value == -1 else _ckr_name(e.value)
            raise TokenError(f"cannot load PKCS#11 module {self.path}: {detail}") from None
        self._lib: Any = lib
        self.library_manufacturer = _text(info.manufacturerID)
        self.library_description = _text(info.libraryDescription)
        self.library_version: tuple[int, int] = tuple(info.libraryVersion)

    def close(self) -> None:
        if self._lib is not None:
            self._lib.unload()
            self._lib = None

    def __enter__(self) -> Pkcs11Module:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def lib(self) -> Any:
        if self._lib is None:
            raise TokenError(f"PKCS#11 module {self.path} is closed")
        return self._lib

    # --- error translation (the one place) ---------------------------------------------------

    @contextmanager
    def _calls(self, slot_id: int | None = None, *, login: bool = False) -> Iterator[None]:
        """Run PyKCS11 calls; turn a PyKCS11Error into the product's error for it."""
        pk = _pk()
        try:
            yield
        except pk.PyKCS11Error as e:
            raise self._translate(e.value, slot_id, login=login) from e

    def _translate(self, code: int, slot_id: int | None, *, login: bool) -> SvmmError:
        name = _ckr_name(code)
        where = f"slot {slot_id}" if slot_id is not None else self.path
        if name in _GONE or (name in _MAYBE_GONE and not self._present(slot_id)):
            return NoCard(f"the card was removed ({name} from {where})")
        if name == "CKR_PIN_INCORRECT":
            # The code says nothing about the tries left: the token flags do, after the fact.
            tries = self._tries(slot_id)
            if tries is PinTries.LOCKED:
                return PinLocked("wrong PIN; the PIN is now locked")
            return PinIncorrect(tries)
        if name == "CKR_PIN_LOCKED":
            return PinLocked()
        if name in ("CKR_PIN_LEN_RANGE", "CKR_PIN_INVALID"):
            return PinInvalid(f"the card rejected the PIN format ({name})")
        if name == "CKR_FUNCTION_CANCELED":
            return ConversationFailed(f"PIN entry cancelled on the reader ({name})")
        if name in _NOT_FOR_THIS_KEY:
            return KeyReleaseFailed(f"the card could not decrypt the wrapped key ({name})")
        if name == "CKR_KEY_FUNCTION_NOT_PERMITTED":
            return TokenError(
                f"the card's key does not permit this operation ({name} from {where})",
                reason="key_function_not_permitted",
            )
        verb = "login" if login else "call"
        return TokenError(f"PKCS#11 {verb} failed on {where}: {name}")

    def _present(self, slot_id: int | None) -> bool:
        if slot_id is None:
            return True
        try:
            return slot_id in self.lib.getSlotList(tokenPresent=True)
        except _pk().PyKCS11Error:
            return False

    def _tries(self, slot_id: int | None) -> PinTries:
        if slot_id is None:
            return PinTries.UNKNOWN
        try:
            return pin_tries_from_flags(self.lib.getTokenInfo(slot_id).flags)
        except _pk().PyKCS11Error:
            return PinTries.UNKNOWN

    # --- tokens and certificates ---------------------------------------------------------------

    def token_info(self, slot_id: int) -> TokenInfo:
        return self._read_token(slot_id)[0]

    def _read_token(self, slot_id: int) -> tuple[TokenInfo, int]:
        pk = _pk()
        with self._calls(slot_id):
            ti = self.lib.getTokenInfo(slot_id)
        info = TokenInfo(
            slot_id=slot_id,
            label=_text(ti.label),
            manufacturer=_text(ti.manufacturerID),
            model=_text(ti.model),
            serial=_text(ti.serialNumber),
            pin_tries=pin_tries_from_flags(ti.flags),
            protected_auth_path=bool(ti.flags & pk.CKF_PROTECTED_AUTHENTICATION_PATH),
            login_required=bool(ti.flags & pk.CKF_LOGIN_REQUIRED),
        )
        return info, ti.flags

    def _present_tokens(self, *, initialized: bool) -> list[TokenInfo]:
        """Tokens present now, initialized ones or (for provisioning) blank ones."""
        pk = _pk()
        with self._calls():
            slots = self.lib.getSlotList(tokenPresent=True)
        out = []
        for slot in slots:
            try:
                info, flags = self._read_token(slot)
            except NoCard:
                continue  # pulled out while we were looking
            if bool(flags & pk.CKF_TOKEN_INITIALIZED) == initialized:
                out.append(info)
        return out

    def tokens(self, uri: Pkcs11Uri | None = None) -> list[TokenInfo]:
        """Initialized tokens present now that match ``uri`` (empty list: no card)."""
        uri = uri or _ANY
        if not uri.matches_library(
            self.library_manufacturer, self.library_description, self.library_version
        ):
            return []
        out = []
        for info in self._present_tokens(initialized=True):
            slot = info.slot_id
            if uri.slot_description is not None or uri.slot_manufacturer is not None:
                try:
                    with self._calls(slot):
                        si = self.lib.getSlotInfo(slot)
                except NoCard:
                    continue
                if not uri.matches_slot(slot, _text(si.slotDescription), _text(si.manufacturerID)):
                    continue
            if uri.matches_token(info):
                out.append(info)
        return out

    def wait_for_token(
        self, uri: Pkcs11Uri | None = None, timeout: float = 0.0, *, interval: float = 0.1
    ) -> TokenInfo:
        """The first matching token, waiting up to ``timeout`` seconds; NoCard after that.

        This polls C_GetSlotList instead of blocking in C_WaitForSlotEvent: the blocking call
        has no timeout in PKCS#11 and can only be cut short by C_Finalize, which would break
        the bounded login time (invariant 7); many modules also only notice new readers when
        the slot list is re-read.
        """
        return poll_for_token(self.tokens, uri, timeout, interval)

    def certificates(self, token: TokenInfo, uri: Pkcs11Uri | None = None) -> list[CardCertificate]:
        """Public X.509 certificate objects on ``token`` matching ``uri``; no login needed."""
        with self.session(token) as s:
            return s.certificates(uri)

    def mechanisms(self, slot_id: int) -> frozenset[str]:
        with self._calls(slot_id):
            return frozenset(str(m) for m in self.lib.getMechanismList(slot_id))

    def session(self, token: TokenInfo, *, rw: bool = False) -> TokenSession:
        """Open a session on ``token``; use it as a context manager (logout + close on exit)."""
        pk = _pk()
        with self._calls(token.slot_id):
            handle = self.lib.openSession(token.slot_id, pk.CKF_RW_SESSION if rw else 0)
        return TokenSession(self, token, handle)

    # --- provisioning ------------------------------------------------------------------------

    def init_token(self, label: str, so_pin: str, user_pin: str) -> TokenInfo:
        """Initialize the token in the first free slot; set its SO and user PINs."""
        pk = _pk()
        free = self._present_tokens(initialized=False)
        if not free:
            raise TokenError(f"no uninitialized token to initialize in {self.path}")
        slot = free[0].slot_id
        before = {info.serial for info in self._present_tokens(initialized=True)}
        if len(label.encode("utf-8")) > 32:
            raise ValueError(f"token label {label!r} is longer than 32 bytes")
        with self._calls(slot):
            # PyKCS11 would pad the 32-byte label with NULs; PKCS#11 wants spaces.
            self.lib.initToken(slot, so_pin, label + " " * (32 - len(label.encode("utf-8"))))
        # SoftHSM2 moves a freshly initialized token to a new slot: find it by its serial.
        new = [
            info
            for info in self._present_tokens(initialized=True)
            if info.serial not in before and info.label == label
        ]
        if len(new) != 1:
            raise TokenError(f"initialized token {label!r} not found afterwards")
        with self._calls(new[0].slot_id):
            s = self.lib.openSession(new[0].slot_id, pk.CKF_RW_SESSION)
            try:
                s.login(so_pin, user_type=pk.CKU_SO)
                s.initPin(user_pin)
                s.logout()
            finally:
                s.closeSession()
        return self.token_info(new[0].slot_id)


class TokenSession:
    """A session on one token. Created by ``Pkcs11Module.session``."""

    def __init__(self, module: Pkcs11Module, token: TokenInfo, handle: Any) -> None:
        self.module = module
        self.token = token
        self._s = handle
        self._logged_in = False
        self._mechanisms: frozenset[str] | None = None

    def __enter__(self) -> TokenSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Log out and close; a card that is already gone is not an error here."""
        if self._s is None:
            return
        pk = _pk()
        if self._logged_in:
            with suppress(pk.PyKCS11Error):
                self._s.logout()
        with suppress(pk.PyKCS11Error):
            self._s.closeSession()
        self._s = None
        self._logged_in = False

    def _calls(self, *, login: bool = False) -> Any:
        if self._s is None:
            raise TokenError("the token session is closed")
        return self.module._calls(self.token.slot_id, login=login)

    # --- login and signing ---------------------------------------------------------------------

    def login(self, pin: str | None) -> None:
        """C_Login as the user. ``None`` uses the reader's PIN pad (protected auth path)."""
        pk = _pk()
        if pin is None:
            if not self.token.protected_auth_path:
                raise TokenError(
                    f"token {self.token.describe()} has no PIN pad; a PIN is required",
                    reason="pinpad_unavailable",
                )
        elif pin == "":
            # PyKCS11 would pass an empty PIN as NULL, which means "use the PIN pad".
            raise PinInvalid("the PIN is empty")
        with self._calls(login=True):
            try:
                self._s.login(pin)
            except pk.PyKCS11Error as e:
                if e.value != pk.CKR_USER_ALREADY_LOGGED_IN:
                    raise
                # Login state is per token per application: another session of this process
                # (another PAM transaction in svmmd) is logged in, and the card checked no
                # PIN now. Never a success (pam_p11's wrong-PIN bypass); this session stays
                # logged out, so closing it cannot log the other one out either.
                raise TokenError(
                    f"card {self.token.describe()} is logged in for another login that has "
                    "not finished; no PIN was checked, try again",
                    reason="card_busy",
                ) from None
        self._logged_in = True

    def mechanisms(self) -> frozenset[str]:
        if self._mechanisms is None:
            self._mechanisms = self.module.mechanisms(self.token.slot_id)
        return self._mechanisms

    def sign(self, key_id: bytes, data: bytes) -> tuple[SignatureScheme, bytes]:
        """Sign ``data`` with the private key whose CKA_ID is ``key_id`` (after login).

        Returns the scheme and the signature in the encoding cryptography verifies
        (PKCS#1 bytes for RSA, DER Ecdsa-Sig-Value for ECDSA).
        """
        pk = _pk()
        with self._calls():
            keys = self._s.findObjects([(pk.CKA_CLASS, pk.CKO_PRIVATE_KEY), (pk.CKA_ID, key_id)])
            if len(keys) != 1:
                what = "no private key" if not keys else f"{len(keys)} private keys"
                raise TokenError(
                    f"{what} with id {key_id.hex()} on token {self.token.describe()}",
                    reason="private_key_missing",
                )
            key = keys[0]
            (key_type,) = self._s.getAttributeValue(key, [pk.CKA_KEY_TYPE])
            curve = None
            if key_type == pk.CKK_EC:
                (params,) = self._s.getAttributeValue(key, [pk.CKA_EC_PARAMS], allAsBinary=True)
                curve = _curve_name(bytes(params))
            elif key_type != pk.CKK_RSA:
                raise TokenError(
                    f"key {key_id.hex()} has unsupported type {pk.CKK.get(key_type, key_type)}",
                    reason="unsupported_key",
                )
        kt = KeyType.EC if curve is not None else KeyType.RSA
        plan = plan_signature(kt, curve, self.mechanisms())
        to_sign = _prepare(plan, data)
        with self._calls():
            raw = bytes(self._s.sign(key, to_sign, pk.Mechanism(getattr(pk, plan.mechanism))))
        if kt is KeyType.EC:
            raw = _ecdsa_der(raw)
        return plan.scheme, raw

    # --- certificates --------------------------------------------------------------------------

    def certificates(self, uri: Pkcs11Uri | None = None) -> list[CardCertificate]:
        """X.509 certificate objects visible in this session (public ones without login).

        The URI's ``type`` is not applied: a URI naming a private key selects the
        certificate with the same id and label, which is how cards pair them.
        """
        pk = _pk()
        uri = uri or _ANY
        out = []
        with self._calls():
            handles = self._s.findObjects(
                [(pk.CKA_CLASS, pk.CKO_CERTIFICATE), (pk.CKA_CERTIFICATE_TYPE, pk.CKC_X_509)]
            )
            for h in handles:
                label, cka_id, value = self._s.getAttributeValue(
                    h, [pk.CKA_LABEL, pk.CKA_ID, pk.CKA_VALUE], allAsBinary=True
                )
                cert = CardCertificate(
                    label=bytes(label).decode("utf-8", "replace"),
                    id=bytes(cka_id),
                    der=bytes(value),
                )
                if uri.matches_object(cert.label, cert.id):
                    out.append(cert)
        return out

    def find_certificate(self, label: str) -> CardCertificate | None:
        """The first certificate object labelled ``label`` (e.g. the card's trust anchor)."""
        for cert in self.certificates():
            if cert.label == label:
                return cert
        return None

    # --- object management (issuing, rollback) -------------------------------------------------

    def object_ids(self) -> set[bytes]:
        """CKA_IDs of every object this session can see (to pick a free key id)."""
        pk = _pk()
        with self._calls():
            handles = self._s.findObjects([])
            return {
                bytes(self._s.getAttributeValue(h, [pk.CKA_ID], allAsBinary=True)[0])
                for h in handles
            }

    def key_protection(self, key_id: bytes) -> tuple[bool, bool]:
        """(CKA_SENSITIVE, CKA_EXTRACTABLE) of the private key ``key_id``."""
        pk = _pk()
        with self._calls():
            keys = self._s.findObjects([(pk.CKA_CLASS, pk.CKO_PRIVATE_KEY), (pk.CKA_ID, key_id)])
            if len(keys) != 1:
                raise TokenError(
                    f"private key {key_id.hex()} is not on the card", reason="private_key_missing"
                )
            sensitive, extractable = self._s.getAttributeValue(
                keys[0], [pk.CKA_SENSITIVE, pk.CKA_EXTRACTABLE]
            )
        return bool(sensitive), bool(extractable)

    def destroy(
        self,
        *,
        key_id: bytes | None = None,
        kinds: tuple[str, ...] = ("private", "public", "cert"),
        label: str | None = None,
        value: bytes | None = None,
    ) -> int:
        """Destroy objects of these kinds with this CKA_ID (or label); certificates only when
        their value is ``value``, if given. Returns how many were destroyed."""
        pk = _pk()
        classes = {
            "private": pk.CKO_PRIVATE_KEY,
            "public": pk.CKO_PUBLIC_KEY,
            "cert": pk.CKO_CERTIFICATE,
        }
        n = 0
        with self._calls():
            for kind in kinds:
                template = [(pk.CKA_CLASS, classes[kind])]
                if key_id is not None:
                    template.append((pk.CKA_ID, key_id))
                if label is not None:
                    template.append((pk.CKA_LABEL, label))
                for h in self._s.findObjects(template):
                    if value is not None:
                        (v,) = self._s.getAttributeValue(h, [pk.CKA_VALUE], allAsBinary=True)
                        if bytes(v) != value:
                            continue
                    self._s.destroyObject(h)
                    n += 1
        return n

    # --- volume keys (after login) ---------------------------------------------------------------

    @property
    def logged_in(self) -> bool:
        return self._logged_in

    def _need_login(self, what: str) -> None:
        # Private objects are invisible before C_Login: say so rather than "no such key".
        if not self._logged_in:
            raise TokenError(f"log in to the card before {what}", reason="login_required")

    def _private_key(self, key_id: bytes, key_type: int) -> Any:
        pk = _pk()
        keys = self._s.findObjects(
            [(pk.CKA_CLASS, pk.CKO_PRIVATE_KEY), (pk.CKA_ID, key_id), (pk.CKA_KEY_TYPE, key_type)]
        )
        if len(keys) != 1:
            kind = "RSA" if key_type == pk.CKK_RSA else "EC"
            what = f"no {kind} private key" if not keys else f"{len(keys)} {kind} private keys"
            raise TokenError(
                f"{what} with id {key_id.hex()} on token {self.token.describe()}",
                reason="private_key_missing",
            )
        return keys[0]

    def decrypt_rsa_oaep(
        self, key_id: bytes, ciphertext: bytes, *, hash: str = "sha256"
    ) -> bytearray:
        """Decrypt with the RSA key ``key_id`` on the card (CKM_RSA_PKCS_OAEP, MGF1 with the
        same hash, no label). ``hash``: "sha256", or "sha1" for modules that do OAEP only
        with SHA-1 (SoftHSM 2.6 refuses other hashes with CKR_ARGUMENTS_BAD)."""
        pk = _pk()
        mechs = {
            "sha256": (pk.CKM_SHA256, pk.CKG_MGF1_SHA256),
            "sha1": (pk.CKM_SHA_1, pk.CKG_MGF1_SHA1),
        }
        if hash not in mechs:
            raise ValueError(f"unsupported OAEP hash {hash!r}")
        self._need_login("decrypting a volume key")
        with self._calls():
            key = self._private_key(key_id, pk.CKK_RSA)
            raw = self._s.decrypt(key, bytes(ciphertext), pk.RSAOAEPMechanism(*mechs[hash]))
        return _take(raw)

    def ecdh_derive(self, key_id: bytes, peer_public_key: Any) -> bytearray:
        """ECDH of the card's EC key ``key_id`` with ``peer_public_key`` (a cryptography EC
        public key): the shared secret (the x coordinate), as a bytearray to wipe.

        CKM_ECDH1_DERIVE with CKD_NULL, into a session object (CKA_TOKEN false) that is
        extractable so it can be read once, then destroyed. Chosen over a KDF on the card:
        CKD_NULL is what every module offers (PKCS#11 3.0 HKDF is rare and SoftHSM 2.6 lacks
        it) and the host runs one HKDF for cards, escrow and tests alike. The raw secret
        reaching the host costs nothing: each token has its own ephemeral key, so it opens
        only the secret the host is about to receive anyway. The private key never leaves.
        """
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec

        pk = _pk()
        if not isinstance(peer_public_key, ec.EllipticCurvePublicKey):
            raise ValueError("ecdh_derive needs an EC public key")
        self._need_login("deriving a volume key")
        with self._calls():
            key = self._private_key(key_id, pk.CKK_EC)
            (params,) = self._s.getAttributeValue(key, [pk.CKA_EC_PARAMS], allAsBinary=True)
        curve = _curve_name(bytes(params))
        if peer_public_key.curve.name != curve:
            raise KeyReleaseFailed(
                f"the wrapped key is for {peer_public_key.curve.name}; the card key {key_id.hex()}"
                f" is on {curve}",
                reason="curve_mismatch",
            )
        size = (peer_public_key.curve.key_size + 7) // 8
        point = peer_public_key.public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
        template = [
            (pk.CKA_CLASS, pk.CKO_SECRET_KEY),
            (pk.CKA_KEY_TYPE, pk.CKK_GENERIC_SECRET),
            (pk.CKA_TOKEN, False),
            (pk.CKA_PRIVATE, True),
            (pk.CKA_SENSITIVE, False),
            (pk.CKA_EXTRACTABLE, True),
            (pk.CKA_VALUE_LEN, size),
            *_no_usage(pk),
        ]
        with self._calls():
            derived = self._s.deriveKey(key, template, pk.ECDH1_DERIVE_Mechanism(point))
            try:
                (value,) = self._s.getAttributeValue(derived, [pk.CKA_VALUE], allAsBinary=True)
            finally:
                self._s.destroyObject(derived)
        out = bytearray(value)
        del value  # a tuple of ints from PyKCS11: it cannot be wiped, only dropped
        if len(out) != size:
            n = len(out)
            _wipe(out)
            raise TokenError(f"the card derived {n} bytes for a {size}-byte ECDH secret")
        return out

    def store_secret(self, label: str, object_id: bytes, value: bytes | bytearray) -> None:
        """Store a 256-bit secret as a private token object (RW session, after login).

        A CKO_SECRET_KEY of type CKK_GENERIC_SECRET with CKA_PRIVATE (invisible before login),
        CKA_SENSITIVE false and CKA_EXTRACTABLE true: its value can be read after login, which
        is the point (it is the volume passphrase), and also the trade-off: whoever has the
        card and its PIN can copy the secret and keep it after the card is revoked, where a
        wrapped key needs the card at every unlock. No on-card use (no encrypt, sign, derive)
        and not modifiable, so it cannot be repurposed.
        """
        pk = _pk()
        if len(value) != 32:
            raise ValueError(f"a volume secret is 32 bytes, not {len(value)}")
        self._need_login("storing a secret")
        data = pk.ckbytelist()
        data.reserve(32)
        for b in value:
            data.append(b)
        template = [
            (pk.CKA_CLASS, pk.CKO_SECRET_KEY),
            (pk.CKA_KEY_TYPE, pk.CKK_GENERIC_SECRET),
            (pk.CKA_TOKEN, True),
            (pk.CKA_PRIVATE, True),
            (pk.CKA_SENSITIVE, False),
            (pk.CKA_EXTRACTABLE, True),
            (pk.CKA_MODIFIABLE, False),
            (pk.CKA_LABEL, label),
            (pk.CKA_ID, object_id),
            (pk.CKA_VALUE, data),
            *_no_usage(pk),
        ]
        try:
            with self._calls():
                clash = self._s.findObjects([(pk.CKA_ID, object_id)]) + self._s.findObjects(
                    [(pk.CKA_LABEL, label), (pk.CKA_CLASS, pk.CKO_SECRET_KEY)]
                )
                if clash:
                    raise TokenError(
                        f"the card already holds an object with id {object_id.hex()} or a"
                        f" secret labelled {label!r}",
                        reason="secret_exists",
                    )
                self._s.createObject(template)
        finally:
            _wipe(data)

    def read_secret(self, *, label: str | None = None, object_id: bytes | None = None) -> bytearray:
        """The value of the private secret object with this label and/or CKA_ID (after
        login). KeyReleaseFailed when the card holds no such object."""
        pk = _pk()
        if label is None and object_id is None:
            raise ValueError("read_secret needs a label or an id")
        self._need_login("reading a secret")
        template = [(pk.CKA_CLASS, pk.CKO_SECRET_KEY), (pk.CKA_PRIVATE, True)]
        if label is not None:
            template.append((pk.CKA_LABEL, label))
        if object_id is not None:
            template.append((pk.CKA_ID, object_id))
        name = f"label {label!r}" if label is not None else f"id {(object_id or b'').hex()}"
        with self._calls():
            found = self._s.findObjects(template)
            if len(found) != 1:
                raise KeyReleaseFailed(
                    f"the card holds {'no' if not found else len(found)} secret objects with"
                    f" {name}",
                    reason="secret_missing",
                )
            (value,) = self._s.getAttributeValue(found[0], [pk.CKA_VALUE], allAsBinary=True)
        out = bytearray(value)
        del value  # PyKCS11 returns a tuple of ints: it cannot be wiped, only dropped
        return out

    # --- provisioning (RW session, logged in as the user) ------------------------------------

    def import_private_key(self, key: PrivateKeyTypes, *, key_id: bytes, label: str) -> None:
        """Store an existing RSA or EC (P-256/P-384) private key, plus its public key object."""
        from cryptography.hazmat.primitives.asymmetric import ec, rsa

        pk = _pk()
        common = [(pk.CKA_TOKEN, True), (pk.CKA_ID, key_id), (pk.CKA_LABEL, label)]
        if isinstance(key, rsa.RSAPrivateKey):
            n = key.private_numbers()
            pub = n.public_numbers
            priv = [
                (pk.CKA_KEY_TYPE, pk.CKK_RSA),
                (pk.CKA_MODULUS, _int(pub.n)),
                (pk.CKA_PUBLIC_EXPONENT, _int(pub.e)),
                (pk.CKA_PRIVATE_EXPONENT, _int(n.d)),
                (pk.CKA_PRIME_1, _int(n.p)),
                (pk.CKA_PRIME_2, _int(n.q)),
                (pk.CKA_EXPONENT_1, _int(n.dmp1)),
                (pk.CKA_EXPONENT_2, _int(n.dmq1)),
                (pk.CKA_COEFFICIENT, _int(n.iqmp)),
            ]
            public = [
                (pk.CKA_KEY_TYPE, pk.CKK_RSA),
                (pk.CKA_MODULUS, _int(pub.n)),
                (pk.CKA_PUBLIC_EXPONENT, _int(pub.e)),
            ]
        elif isinstance(key, ec.EllipticCurvePrivateKey):
            params = _ec_params(key.curve)
            size = (key.curve.key_size + 7) // 8
            priv = [
                (pk.CKA_KEY_TYPE, pk.CKK_EC),
                (pk.CKA_EC_PARAMS, params),
                (pk.CKA_VALUE, key.private_numbers().private_value.to_bytes(size, "big")),
            ]
            public = [
                (pk.CKA_KEY_TYPE, pk.CKK_EC),
                (pk.CKA_EC_PARAMS, params),
                (pk.CKA_EC_POINT, _ec_point(key.public_key())),
            ]
        else:
            raise ValueError(f"unsupported key type {type(key).__name__}: use RSA or EC")
        with self._calls():
            self._s.createObject(
                [
                    (pk.CKA_CLASS, pk.CKO_PRIVATE_KEY),
                    *common,
                    *priv,
                    *_private_key_flags(
                        pk, pk.CKK_RSA if isinstance(key, rsa.RSAPrivateKey) else pk.CKK_EC
                    ),
                ]
            )
            self._s.createObject(
                [
                    (pk.CKA_CLASS, pk.CKO_PUBLIC_KEY),
                    *common,
                    *public,
                    (pk.CKA_PRIVATE, False),
                    (pk.CKA_VERIFY, True),
                ]
            )

    def generate_key_pair(self, spec: KeySpec, *, key_id: bytes, label: str) -> PublicKeyTypes:
        """Generate a key pair on the card; return its public key (cryptography object)."""
        from cryptography.hazmat.primitives.asymmetric import ec, rsa

        pk = _pk()
        common = [(pk.CKA_TOKEN, True), (pk.CKA_ID, key_id), (pk.CKA_LABEL, label)]
        if spec is KeySpec.RSA_2048:
            mech = pk.Mechanism(pk.CKM_RSA_PKCS_KEY_PAIR_GEN)
            pub_t = [(pk.CKA_MODULUS_BITS, 2048), (pk.CKA_PUBLIC_EXPONENT, _int(65537))]
        else:
            curve = ec.SECP256R1() if spec is KeySpec.EC_P256 else ec.SECP384R1()
            mech = pk.Mechanism(pk.CKM_EC_KEY_PAIR_GEN)
            pub_t = [(pk.CKA_EC_PARAMS, _ec_params(curve))]
        with self._calls():
            pub, _ = self._s.generateKeyPair(
                [
                    (pk.CKA_CLASS, pk.CKO_PUBLIC_KEY),
                    *common,
                    *pub_t,
                    (pk.CKA_PRIVATE, False),
                    (pk.CKA_VERIFY, True),
                ],
                [
                    (pk.CKA_CLASS, pk.CKO_PRIVATE_KEY),
                    *common,
                    *_private_key_flags(pk, pk.CKK_RSA if spec is KeySpec.RSA_2048 else pk.CKK_EC),
                ],
                mech,
            )
            if spec is KeySpec.RSA_2048:
                n, e = self._s.getAttributeValue(
                    pub, [pk.CKA_MODULUS, pk.CKA_PUBLIC_EXPONENT], allAsBinary=True
                )
                return rsa.RSAPublicNumbers(
                    int.from_bytes(bytes(e), "big"), int.from_bytes(bytes(n), "big")
                ).public_key()
            (point,) = self._s.getAttributeValue(pub, [pk.CKA_EC_POINT], allAsBinary=True)
        return ec.EllipticCurvePublicKey.from_encoded_point(curve, _unwrap_point(bytes(point)))

    def write_certificate(self, der: bytes, *, key_id: bytes, label: str) -> None:
        """Store a public X.509 certificate object paired with the key ``key_id``."""
        self._write_cert(der, key_id=key_id, label=label)

    def write_trust_anchor(self, der: bytes, *, label: str) -> None:
        """Store a public certificate (the organisation's anchor) under ``label``, no key id."""
        self._write_cert(der, key_id=None, label=label)

    def _write_cert(self, der: bytes, *, key_id: bytes | None, label: str) -> None:
        from cryptography import x509
        from cryptography.hazmat import asn1

        pk = _pk()
        cert = x509.load_der_x509_certificate(der)
        template = [
            (pk.CKA_CLASS, pk.CKO_CERTIFICATE),
            (pk.CKA_CERTIFICATE_TYPE, pk.CKC_X_509),
            (pk.CKA_TOKEN, True),
            (pk.CKA_PRIVATE, False),
            (pk.CKA_LABEL, label),
            (pk.CKA_SUBJECT, cert.subject.public_bytes()),
            (pk.CKA_ISSUER, cert.issuer.public_bytes()),
            (pk.CKA_SERIAL_NUMBER, asn1.encode_der(cert.serial_number)),
            (pk.CKA_VALUE, der),
        ]
        if key_id is not None:
            template.append((pk.CKA_ID, key_id))
        with self._calls():
            self._s.createObject(template)


def provision_card(
    module: Pkcs11Module,
    *,
    label: str,
    so_pin: str,
    user_pin: str,
    key: PrivateKeyTypes,
    certificate: bytes,
    key_id: bytes = b"\x01",
    key_label: str = "auth",
    anchors: tuple[bytes, ...] = (),
    anchor_label: str = "svmm-trust-anchor",
) -> TokenInfo:
    """Initialize a free token as a user's card: key, its certificate, optional anchors."""
    token = module.init_token(label, so_pin, user_pin)
    with module.session(token, rw=True) as s:
        s.login(user_pin)
        s.import_private_key(key, key_id=key_id, label=key_label)
        s.write_certificate(certificate, key_id=key_id, label=key_label)
        for der in anchors:
            s.write_trust_anchor(der, label=anchor_label)
    return module.token_info(token.slot_id)


# --- signing plan (no I/O) ------------------------------------------------------------------


@dataclass(frozen=True)
class SignPlan:
    scheme: SignatureScheme
    mechanism: str  # a PyKCS11 CKM_ name
    prehash: str | None  # "sha256"/"sha384": the host hashes, the card signs the digest


def plan_signature(key_type: KeyType, curve: str | None, mechanisms: frozenset[str]) -> SignPlan:
    """Choose how to sign with a key of this type on a token offering ``mechanisms``."""
    S = SignatureScheme
    candidates: list[SignPlan]
    if key_type is KeyType.RSA:
        candidates = [
            SignPlan(S.RSA_PKCS1_SHA256, "CKM_SHA256_RSA_PKCS", None),
            SignPlan(S.RSA_PKCS1_SHA256, "CKM_RSA_PKCS", "sha256"),
        ]
    elif curve == "secp384r1":
        candidates = [
            SignPlan(S.ECDSA_SHA384, "CKM_ECDSA_SHA384", None),
            SignPlan(S.ECDSA_SHA384, "CKM_ECDSA", "sha384"),
        ]
    else:
        candidates = [
            SignPlan(S.ECDSA_SHA256, "CKM_ECDSA_SHA256", None),
            SignPlan(S.ECDSA_SHA256, "CKM_ECDSA", "sha256"),
        ]
    for plan in candidates:
        if plan.mechanism in mechanisms:
            return plan
    wanted = " or ".join(p.mechanism for p in candidates)
    raise TokenError(
        f"the token offers no {key_type.value.upper()} signing mechanism ({wanted})",
        reason="no_mechanism",
    )


def _prepare(plan: SignPlan, data: bytes) -> bytes:
    """What the card signs: the data, a digest (ECDSA), or a DigestInfo (raw RSA PKCS#1)."""
    if plan.prehash is None:
        return data
    from cryptography.hazmat.primitives import hashes

    algorithm = hashes.SHA384() if plan.prehash == "sha384" else hashes.SHA256()
    h = hashes.Hash(algorithm)
    h.update(data)
    digest = h.finalize()
    if plan.mechanism == "CKM_RSA_PKCS":
        return _digest_info_sha256(digest)
    return digest


@cache
def _digest_info_types() -> tuple[Any, Any]:
    """RFC 8017 section 9.2 DigestInfo as cryptography ASN.1 sequences.

    Built with type() and real (not string) annotations because this module uses postponed
    annotations and the classes must stay local to keep the import lazy.
    """
    from cryptography import x509
    from cryptography.hazmat import asn1

    alg: Any = asn1.sequence(
        type(
            "AlgorithmIdentifier",
            (),
            {"__annotations__": {"algorithm": x509.ObjectIdentifier, "parameters": asn1.Null}},
        )
    )
    info: Any = asn1.sequence(
        type("DigestInfo", (), {"__annotations__": {"digest_algorithm": alg, "digest": bytes}})
    )
    return alg, info


def _digest_info_sha256(digest: bytes) -> bytes:
    from cryptography import x509
    from cryptography.hazmat import asn1

    alg_t, info_t = _digest_info_types()
    sha256 = x509.ObjectIdentifier("2.16.840.1.101.3.4.2.1")
    alg = alg_t(algorithm=sha256, parameters=asn1.Null())
    return asn1.encode_der(info_t(digest_algorithm=alg, digest=digest))


# --- small encoders (through cryptography's ASN.1) ----------------------------------------------


def _ckr_name(code: int) -> str:
    name = _pk().CKR.get(code)
    return name if isinstance(name, str) else f"CKR_0x{code & 0xFFFFFFFF:08X}"


def _text(field: str) -> str:
    # Fixed-size PKCS#11 text fields are space padded (some writers pad with NULs).
    return field.rstrip(" \x00")


def _int(value: int) -> bytes:
    return value.to_bytes(max(1, (value.bit_length() + 7) // 8), "big")


def _private_key_flags(pk: Any, key_type: int) -> list[tuple[int, bool]]:
    """Never extractable; signs (login) and releases volume keys: RSA decrypts (OAEP), EC
    derives (ECDH). One key for both, as on cards with a single key pair."""
    usage = (pk.CKA_DECRYPT, True) if key_type == pk.CKK_RSA else (pk.CKA_DERIVE, True)
    return [
        (pk.CKA_PRIVATE, True),
        (pk.CKA_SENSITIVE, True),
        (pk.CKA_EXTRACTABLE, False),
        (pk.CKA_SIGN, True),
        usage,
    ]


def _no_usage(pk: Any) -> list[tuple[int, bool]]:
    """A secret object that is only data: the card may not use it as a key."""
    return [
        (pk.CKA_ENCRYPT, False),
        (pk.CKA_DECRYPT, False),
        (pk.CKA_SIGN, False),
        (pk.CKA_VERIFY, False),
        (pk.CKA_WRAP, False),
        (pk.CKA_UNWRAP, False),
        (pk.CKA_DERIVE, False),
    ]


def _take(raw: Any) -> bytearray:
    """Copy a PyKCS11 ckbytelist into a bytearray and wipe the ckbytelist."""
    out = bytearray(len(raw))
    for i, b in enumerate(raw):
        out[i] = b
    _wipe(raw)
    return out


def _wipe(buf: Any) -> None:
    for i in range(len(buf)):
        buf[i] = 0


_CURVES = {"secp256r1", "secp384r1"}


def _ec_params(curve: Any) -> bytes:
    """CKA_EC_PARAMS: the DER OID of a named curve."""
    from cryptography.hazmat import asn1
    from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurveOID

    oids = {"secp256r1": EllipticCurveOID.SECP256R1, "secp384r1": EllipticCurveOID.SECP384R1}
    if curve.name not in oids:
        raise ValueError(f"unsupported curve {curve.name}: use P-256 or P-384")
    return asn1.encode_der(oids[curve.name])


def _curve_name(params: bytes) -> str:
    from cryptography.hazmat import asn1
    from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurveOID
    from cryptography.x509 import ObjectIdentifier

    names = {EllipticCurveOID.SECP256R1: "secp256r1", EllipticCurveOID.SECP384R1: "secp384r1"}
    try:
        oid = asn1.decode_der(ObjectIdentifier, params)
    except ValueError:
        oid = None
    if oid not in names:
        raise TokenError(
            "the card's EC key is not on P-256 or P-384 (or its parameters are not a named curve)",
            reason="unsupported_key",
        )
    return names[oid]


def _ec_point(public_key: Any) -> bytes:
    """CKA_EC_POINT: the uncompressed point wrapped in a DER OCTET STRING (PKCS#11 2.40)."""
    from cryptography.hazmat import asn1
    from cryptography.hazmat.primitives import serialization

    point = public_key.public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    return asn1.encode_der(point)


def _unwrap_point(value: bytes) -> bytes:
    """CKA_EC_POINT as modules return it: DER OCTET STRING, or (some modules) the raw point."""
    from cryptography.hazmat import asn1

    try:
        return asn1.decode_der(bytes, value)
    except ValueError:
        return value


def _ecdsa_der(raw: bytes) -> bytes:
    """PKCS#11 ECDSA signatures are r || s (equal halves); cryptography verifies DER."""
    from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

    if not raw or len(raw) % 2:
        raise TokenError(f"the card returned a malformed ECDSA signature ({len(raw)} bytes)")
    half = len(raw) // 2
    return encode_dss_signature(
        int.from_bytes(raw[:half], "big"), int.from_bytes(raw[half:], "big")
    )
