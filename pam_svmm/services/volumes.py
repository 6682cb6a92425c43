"""Encrypted VM volumes whose keys the cards hold: create, enroll, status, rekey, recover.

A volume has one keyslot per enrolled card and one recovery keyslot, each described by a
custody token (``pam_svmm.domain.custody``: ``svmm-card`` wrapped to the card's key or naming
a secret object on the card; ``svmm-escrow`` wrapped to the organisation's escrow
certificate), plus one ``svmm-volume`` token bound to no keyslot: owner (user or role),
custody mode, and a description of each enrolled card by its key (for status and rekey).
Tokens live in the LUKS2 header, or for LUKS1 in ``IMAGE.svmm.json`` beside it.

The secret custody wraps is 32 random bytes; the LUKS passphrase is their unpadded
base64url text (``luks_passphrase``, 43 ASCII characters), because QEMU's LUKS driver reads
its key secret as UTF-8 text and refuses binary ("Data from secret is not valid UTF-8").
Whoever opens a volume (cryptsetup or QEMU) hands over ``luks_passphrase(secret)``. Both live
in bytearrays wiped when each operation ends.

Every step that fails rolls back what the operation changed: a new image (and its sidecar)
is removed, an existing device gets its first 16 MiB back, a slot added for a failed
enrolment is killed again.
"""

from __future__ import annotations

import base64
import contextlib
import secrets
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives.asymmetric import rsa

from ..adapters import luks
from ..adapters.luks import Cryptsetup, LuksHeader, Pbkdf, SidecarTokens
from ..domain.custody import TYPE_CARD, TYPE_ESCROW, Custody, spki_sha256, wipe
from ..errors import VolumeError
from . import custody as keys

if TYPE_CHECKING:
    from cryptography import x509

    from ..adapters.token import TokenSession

VOLUME = "svmm-volume"
KEY_OBJECT_PREFIX = "svmm-volume "  # + the LUKS UUID: one secret object per volume and card
# cryptsetup's default header sizes, and the least image size that leaves room for data.
HEADER_SIZE = {"luks1": 2 << 20, "luks2": 16 << 20}
MIN_SIZE = {"luks1": 4 << 20, "luks2": 20 << 20}
# The card holds no key for the volume: a fact about the enrolment, not a broken card.
NOT_ENROLLED = "card_not_enrolled"

Progress = Callable[[str], None]


@dataclass(frozen=True)
class Owner:
    kind: str  # "user" | "role"
    name: str

    def __post_init__(self) -> None:
        if self.kind not in ("user", "role") or not self.name or len(self.name) > 256:
            raise VolumeError(f"owner must be a user or a role with a name, not {self!r}")


@dataclass(frozen=True)
class Card:
    """An enrolment target: the card's certificate and where its key lives (CKA_ID)."""

    certificate: x509.Certificate
    key_id: bytes
    token_label: str = ""
    token_serial: str = ""

    @property
    def recipient(self) -> str:
        """spki_sha256 of the card key, hex: how custody tokens name the card."""
        return spki_sha256(self.certificate.public_key()).hex()  # type: ignore[arg-type]

    def describe(self) -> dict[str, str]:
        from ..domain.certpolicy import fingerprint

        return {
            "subject": self.certificate.subject.rfc4514_string(),
            "cert-sha256": fingerprint(self.certificate),
            "token-label": self.token_label,
            "token-serial": self.token_serial,
        }


@dataclass(frozen=True)
class Unlock:
    """The right to change a volume: an enrolled card with a logged-in session, or the
    escrow private key."""

    card: Card | None = None
    session: TokenSession | None = None
    escrow_key: Any = None

    @classmethod
    def with_card(cls, card: Card, session: TokenSession) -> Unlock:
        return cls(card=card, session=session)

    @classmethod
    def with_escrow(cls, private_key: Any) -> Unlock:
        return cls(escrow_key=private_key)


@dataclass(frozen=True)
class SlotStatus:
    slot: int
    kind: str  # "card", "escrow", "other" (no svmm token describes it)
    token_id: int | None = None
    custody: str | None = None
    recipient: str | None = None  # spki_sha256 hex of the key the slot's secret is for
    card: Mapping[str, str] | None = None  # subject, cert-sha256, token label and serial


@dataclass(frozen=True)
class VolumeStatus:
    path: Path
    luks_version: int
    uuid: str
    owner: Owner | None
    custody: Custody | None
    slots: tuple[SlotStatus, ...]

    def card_slots(self) -> list[SlotStatus]:
        return [s for s in self.slots if s.kind == "card"]


# --- secrets ------------------------------------------------------------------------------


def luks_passphrase(secret: bytes | bytearray) -> bytearray:
    """The LUKS passphrase of a 32-byte volume secret: unpadded base64url, ASCII."""
    if len(secret) != 32:
        raise VolumeError("a volume secret is 32 bytes")
    return bytearray(base64.urlsafe_b64encode(secret).rstrip(b"="))


@contextlib.contextmanager
def _held(*bufs: bytearray) -> Iterator[None]:
    try:
        yield
    finally:
        for b in bufs:
            wipe(b)


# --- tokens, header or sidecar --------------------------------------------------------------


class _Tokens:
    def __init__(self, cs: Cryptsetup, path: Path, head: LuksHeader) -> None:
        self.cs, self.path, self.head = cs, path, head
        self.side = SidecarTokens(path, head.uuid) if head.version == 1 else None

    def all(self) -> dict[int, Mapping[str, Any]]:
        if self.side is not None:
            return dict(self.side.read())
        return self.cs.header(self.path).svmm_tokens()

    def add(self, token: Mapping[str, Any], slot: int | None) -> int:
        if self.side is not None:
            return self.side.add(token, slot=slot)
        return self.cs.import_token(self.path, token, slot=slot)

    def remove(self, token_id: int) -> None:
        if self.side is not None:
            self.side.remove(token_id)
        else:
            self.cs.remove_token(self.path, token_id)


def _slot_of(token: Mapping[str, Any]) -> int | None:
    slots = token.get("keyslots") or []
    try:
        return int(slots[0]) if len(slots) == 1 else None
    except (TypeError, ValueError):
        return None


# --- the service --------------------------------------------------------------------------


@dataclass
class Volumes:
    """Volume operations. ``pbkdf`` applies to every new keyslot (the default is
    cryptsetup's strong benchmark; tests pass ``Pbkdf.fast()``)."""

    cryptsetup: Cryptsetup = field(default_factory=Cryptsetup)
    pbkdf: Pbkdf = field(default_factory=Pbkdf)
    progress: Progress = luks._quiet

    # -- create --

    def create(
        self,
        path: Path,
        *,
        owner: Owner,
        custody: Custody,
        card: Card,
        escrow_certificate: x509.Certificate,
        size: int | None = None,
        luks_type: str = "luks2",
        card_session: TokenSession | None = None,
    ) -> VolumeStatus:
        """Make ``path`` a volume: a new image of ``size`` bytes, or (size None) an existing
        file or device formatted over. ``card_session`` (logged in; RW for card-object
        custody, which writes the secret onto the card) also lets the card prove it can
        release the key before the volume is kept."""
        if luks_type == "luks1" and self.pbkdf.kind != "pbkdf2":
            raise VolumeError("LUKS1 volumes (QEMU 7.2's LUKS driver) need --pbkdf pbkdf2")
        least = MIN_SIZE.get(luks_type)
        if size is not None and least is not None and size < least:
            # cryptsetup formats it, and only `open` says "too small for activation".
            raise VolumeError(
                f"{path}: {size >> 20} MiB is too small for {luks_type.upper()} (its header "
                f"takes {HEADER_SIZE[luks_type] >> 20} MiB); give at least {least >> 20} MiB"
            )
        card_secret, recovery = keys.new_volume_secret(), keys.new_volume_secret()
        card_pw, recovery_pw = luks_passphrase(card_secret), luks_passphrase(recovery)
        with (
            _held(card_secret, recovery, card_pw, recovery_pw),
            self._rollback_create(path, size),
        ):
            if size is not None:
                self.progress(f"creating image {path} ({size >> 20} MiB)")
                luks.create_image(path, size)
            self.progress(
                f"formatting {luks_type.upper()} on {path} (key derivation:"
                f" {self.pbkdf.describe()})"
            )
            self.cryptsetup.format(path, card_pw, pbkdf=self.pbkdf, luks_type=luks_type)
            head = self.cryptsetup.header(path)
            tokens = _Tokens(self.cryptsetup, path, head)
            card_slot = min(head.keyslots)
            self.progress(f"adding the recovery keyslot (key derivation: {self.pbkdf.describe()})")
            rec_slot = self.cryptsetup.add_key(
                path, card_pw, recovery_pw, pbkdf=self.pbkdf, luks_type=luks_type
            )
            card_token = self._card_token(custody, card, card_secret, card_session, head.uuid)
            tokens.add(card_token, card_slot)
            self.progress(f"escrowing the recovery key to {_subject(escrow_certificate)}")
            tokens.add(keys.wrap_for_escrow(escrow_certificate, recovery).to_dict(), rec_slot)
            tokens.add(
                {
                    "type": VOLUME,
                    "owner": {owner.kind: owner.name},
                    "custody": custody.value,
                    "cards": {card.recipient: card.describe()},
                },
                None,
            )
            self.progress("checking the keyslots")
            self._check(path, card_pw, card_slot)
            self._check(path, recovery_pw, rec_slot)
            if card_session is not None:
                self._prove(path, card, card_session)
        return self.status(path)

    @contextlib.contextmanager
    def _rollback_create(self, path: Path, size: int | None) -> Iterator[None]:
        side = path.with_name(path.name + ".svmm.json")
        if size is not None:
            if path.exists() or path.is_symlink():
                raise VolumeError(f"{path} exists; refusing to overwrite it")
            with luks.removed_on_failure(path, side):
                yield
            return
        if not path.exists():
            raise VolumeError(f"{path} does not exist; give a size to create an image")
        if side.exists():
            raise VolumeError(f"{side} exists; remove it before formatting {path}")
        with luks.removed_on_failure(side), luks.prefix_restored_on_failure(path):
            yield

    # -- enroll / rekey / recover --

    def enroll(
        self,
        path: Path,
        unlock: Unlock,
        card: Card,
        *,
        card_session: TokenSession | None = None,
        custody: Custody | None = None,
    ) -> int:
        """Add a keyslot for ``card`` (refused if already enrolled); returns the slot."""
        slot, pw = self._enroll(path, unlock, card, card_session, custody)
        wipe(pw)
        return slot

    def _enroll(
        self,
        path: Path,
        unlock: Unlock,
        card: Card,
        card_session: TokenSession | None,
        custody: Custody | None,
    ) -> tuple[int, bytearray]:
        """enroll; also returns the new slot's passphrase (the caller wipes it)."""
        head = self.cryptsetup.header(path)
        current = self.status(path)
        if any(s.recipient == card.recipient for s in current.card_slots()):
            raise VolumeError(f"{path}: card {card.recipient[:16]} is already enrolled")
        mode = custody or current.custody or Custody.WRAPPED
        tokens = _Tokens(self.cryptsetup, path, head)
        existing = self.release(path, unlock)
        secret = keys.new_volume_secret()
        new_pw = luks_passphrase(secret)
        with _held(existing, secret):
            self.progress(
                f"adding a keyslot for {_subject(card.certificate)} (key derivation:"
                f" {self.pbkdf.describe()})"
            )
            try:
                slot = self.cryptsetup.add_key(
                    path, existing, new_pw, pbkdf=self.pbkdf, luks_type=f"luks{head.version}"
                )
            except BaseException:
                wipe(new_pw)
                raise
            added: int | None = None
            try:
                token = self._card_token(mode, card, secret, card_session, head.uuid)
                added = tokens.add(token, slot)
                self._check(path, new_pw, slot)
                if card_session is not None:
                    self._prove(path, card, card_session)
                self._describe_cards(tokens, add=card)
            except BaseException:
                wipe(new_pw)
                with contextlib.suppress(VolumeError):
                    if added is not None:
                        tokens.remove(added)
                    self.cryptsetup.kill_slot(path, slot, existing)
                raise
        return slot, new_pw

    def rekey(
        self,
        path: Path,
        unlock: Unlock,
        new_card: Card,
        *,
        old: str,
        card_session: TokenSession | None = None,
    ) -> int:
        """Replace the card ``old`` (a prefix of its key's or its certificate's SHA-256) by
        ``new_card``: enrol the new one first, then remove the old slot and its token."""
        old_slot = self._card_slot(path, old)
        slot, pw = self._enroll(path, unlock, new_card, card_session, None)
        with _held(pw):
            self._drop(path, old_slot, pw)
        return slot

    def recover(
        self,
        path: Path,
        escrow_key: Any,
        new_card: Card,
        *,
        replace: bool = True,
        card_session: TokenSession | None = None,
    ) -> int:
        """Enrol ``new_card`` with the escrowed recovery key (no old card needed); with
        ``replace`` every other card slot goes (a lost card then opens nothing)."""
        others = self.status(path).card_slots()
        slot, pw = self._enroll(path, Unlock.with_escrow(escrow_key), new_card, card_session, None)
        with _held(pw):
            if replace:
                for old in others:
                    self._drop(path, old, pw)
        return slot

    def _drop(self, path: Path, old: SlotStatus, remaining: bytearray) -> None:
        """Kill ``old``'s keyslot (``remaining`` opens another one) and forget its token."""
        self.progress(f"removing keyslot {old.slot} ({(old.card or {}).get('subject', '?')})")
        self.cryptsetup.kill_slot(path, old.slot, remaining)
        tokens = _Tokens(self.cryptsetup, path, self.cryptsetup.header(path))
        if old.token_id is not None:
            tokens.remove(old.token_id)
        if old.recipient is not None:
            self._describe_cards(tokens, drop=old.recipient)

    def _card_slot(self, path: Path, ref: str) -> SlotStatus:
        fp = ref.lower().replace(":", "")
        if len(fp) < 8:
            raise VolumeError("name the old card by at least 8 hex digits of its fingerprint")
        found = [
            s
            for s in self.status(path).card_slots()
            if (s.recipient or "").startswith(fp)
            or (s.card or {}).get("cert-sha256", "").startswith(fp)
        ]
        if len(found) != 1:
            raise VolumeError(f"{path}: {len(found)} enrolled cards match {ref!r}; need one")
        return found[0]

    # -- releasing a key --

    def release(self, path: Path, unlock: Unlock) -> bytearray:
        """The LUKS passphrase of the slot ``unlock`` opens, checked with cryptsetup (the
        caller wipes it). A card uses the token whose recipient is its key."""
        head = self.cryptsetup.header(path)
        tokens = _Tokens(self.cryptsetup, path, head).all()
        if unlock.card is not None:
            if unlock.session is None:
                raise VolumeError("a logged-in card session is needed to release the key")
            mine = [
                t
                for t in tokens.values()
                if t.get("type") == TYPE_CARD
                and t.get("recipient-spki-sha256") == unlock.card.recipient
            ]
            if not mine:
                raise VolumeError(
                    f"{path}: card {unlock.card.recipient[:16]} is not enrolled",
                    reason=NOT_ENROLLED,
                )
            token = mine[0]
            secret = keys.release(unlock.session, token)
        elif unlock.escrow_key is not None:
            esc = [t for t in tokens.values() if t.get("type") == TYPE_ESCROW]
            if not esc:
                raise VolumeError(f"{path}: no escrow token", reason="volume_key_refused")
            token = esc[0]
            self.progress("unwrapping the recovery key with the escrow key")
            secret = keys.unwrap_with_escrow(unlock.escrow_key, token)
        else:
            raise VolumeError("no card and no escrow key to unlock the volume with")
        with _held(secret):
            pw = luks_passphrase(secret)
        slot = _slot_of(token)
        if (
            slot is None
            or slot not in head.keyslots
            or not self.cryptsetup.test_passphrase(path, pw, slot=slot)
        ):
            wipe(pw)
            raise VolumeError(
                f"{path}: the released key does not open its keyslot", reason="volume_key_refused"
            )
        return pw

    # -- status --

    def status(self, path: Path) -> VolumeStatus:
        head = self.cryptsetup.header(path)
        tokens = _Tokens(self.cryptsetup, path, head).all()
        owner = mode = None
        cards: Mapping[str, Mapping[str, str]] = {}
        by_slot: dict[int, tuple[int, Mapping[str, Any]]] = {}
        for i, t in tokens.items():
            if t.get("type") == VOLUME:
                (kind, name), *_ = (t.get("owner") or {"?": "?"}).items()
                with contextlib.suppress(VolumeError):
                    owner = Owner(kind, name)
                with contextlib.suppress(ValueError):
                    mode = Custody(t.get("custody"))
                cards = t.get("cards") or {}
            elif (s := _slot_of(t)) is not None:
                by_slot[s] = (i, t)
        slots = []
        for s in sorted(head.keyslots):
            if s not in by_slot:
                slots.append(SlotStatus(s, "other"))
                continue
            i, t = by_slot[s]
            kind = {TYPE_CARD: "card", TYPE_ESCROW: "escrow"}.get(str(t.get("type")), "other")
            rcpt = t.get("recipient-spki-sha256")
            slots.append(SlotStatus(s, kind, i, t.get("custody"), rcpt, cards.get(rcpt or "")))
        return VolumeStatus(path, head.version, head.uuid, owner, mode, tuple(slots))

    # -- tokens --

    def _card_token(
        self,
        mode: Custody,
        card: Card,
        secret: bytearray,
        session: TokenSession | None,
        uuid: str,
    ) -> dict[str, Any]:
        if mode is Custody.WRAPPED:
            oaep = "sha256"
            if isinstance(card.certificate.public_key(), rsa.RSAPublicKey) and session:
                oaep = keys.card_oaep_hash(session, _card_cert(card))
            self.progress(f"wrapping the volume key to {_subject(card.certificate)}")
            return keys.wrap_for_card(
                card.certificate, secret, key_id=card.key_id, oaep_hash=oaep
            ).to_dict()
        if session is None:
            raise VolumeError("card-object custody needs the card logged in (its PIN)")
        self.progress(f"storing the volume key on the card {card.token_label!r}")
        return keys.store_on_card(
            session,
            secret,
            card_certificate=card.certificate,
            object_id=secrets.token_bytes(8),
            label=KEY_OBJECT_PREFIX + uuid,
        ).to_dict()

    def _describe_cards(
        self, tokens: _Tokens, *, add: Card | None = None, drop: str | None = None
    ) -> None:
        """Rewrite the svmm-volume token's card list: the new token first, then the old
        one goes (a crash in between leaves two, and status reads the newest)."""
        found = [(i, t) for i, t in tokens.all().items() if t.get("type") == VOLUME]
        if not found:
            return
        old_id, meta = max(found, key=lambda it: it[0])
        cards = dict(meta.get("cards") or {})
        if add is not None:
            cards[add.recipient] = add.describe()
        if drop is not None:
            cards.pop(drop, None)
        body = {k: v for k, v in meta.items() if k != "keyslots"}
        tokens.add({**body, "cards": cards}, None)
        tokens.remove(old_id)

    def _prove(self, path: Path, card: Card, session: TokenSession) -> None:
        """The card releases the key it was just given (catches a card that cannot)."""
        self.progress(f"checking that {card.token_label or 'the card'} releases the key")
        pw = self.release(path, Unlock.with_card(card, session))
        wipe(pw)

    def _check(self, path: Path, key: bytearray, slot: int) -> None:
        if not self.cryptsetup.test_passphrase(path, key, slot=slot):
            raise VolumeError(f"{path}: keyslot {slot} does not open with its key")


def _card_cert(card: Card) -> Any:
    from cryptography.hazmat.primitives import serialization

    from ..adapters.token import CardCertificate

    der = card.certificate.public_bytes(serialization.Encoding.DER)
    return CardCertificate(label=card.token_label, id=card.key_id, der=der)


def _subject(cert: x509.Certificate) -> str:
    return cert.subject.rfc4514_string()
