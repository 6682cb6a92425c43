"""Volume keys released by the card at session open, handed to the launcher (svmmd).

Only after the whole login succeeded (card proved, chain valid, not revoked, user mapped,
account allowed by the policy) does the session phase run, and only the volumes of VMs the
allowlist lets this user boot are released: each is unwrapped with the still logged-in card,
checked against its LUKS header, and handed over in one request to svmmd, which keeps them in
memory for this session (QEMU's LUKS driver decrypts in the VMM layer; nothing is mapped on
the host). All or nothing: if one volume fails, whatever was handed over for this session is
dropped again and the session fails with the reason. Every release is audited (user, card,
volume, VM); passphrases live in bytearrays wiped when the operation ends.

That is ``volumes.mode = "vmm"``; ``"dm-crypt"`` (cryptsetup mappings) is services/dmcrypt.py,
which shares ``volumes_to_release``, ``card_unlock`` and ``volume_image`` with this module.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from ..config import Config
from ..domain.allowlist import Allowlist
from ..domain.audit_record import Outcome
from ..errors import SvmmError, VolumeError
from .volumes import NOT_ENROLLED

T = TypeVar("T")

# (event, outcome, reason, vm, detail): the caller writes the audit record.
Audit = Callable[[str, Outcome, str, str, str], None]
Send = Callable[[dict[str, Any]], dict[str, Any]]
Hold = Callable[..., Any]  # Launcher.hold_keys: keyword arguments in, a Reply out


@dataclass(frozen=True)
class Released:
    volume: str
    vms: tuple[str, ...]


def volumes_to_release(allowlist: Allowlist) -> dict[str, tuple[str, ...]]:
    """Volume name -> the VMs (that this user may boot) using it."""
    out: dict[str, list[str]] = {}
    for vm, allowance in sorted(allowlist.vms.items()):
        if "boot" not in allowance.permissions:
            continue
        for volume in allowance.volumes:
            out.setdefault(volume, []).append(vm)
    return {v: tuple(vms) for v, vms in out.items()}


def volume_image(config: Config, name: str) -> Path:
    """The LUKS image of a policy volume: a root-owned regular file, never a symlink."""
    path = config.volumes.dir / f"{name}.img"
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise VolumeError(f"volume {name!r}: {path} does not exist") from None
    if not stat.S_ISREG(st.st_mode) or (st.st_uid != 0 and st.st_uid != os.geteuid()):
        raise VolumeError(f"volume {name!r}: {path} is not a regular file owned by root")
    return path


def attempt(volume: str, vms: tuple[str, ...], audit: Audit, step: Callable[[], T]) -> T | None:
    """``step()`` for one volume; a failure is audited and raised, except that a volume
    this card holds no key for is skipped (None), not a failed session: its holder may use
    the VMs whose disks the card opens; the others will not start (audited so)."""
    try:
        return step()
    except SvmmError as e:
        skip = e.reason == NOT_ENROLLED
        note = "; skipped: its VMs cannot boot in this session" if skip else ""
        audit(
            "key_release",
            Outcome.FAILURE,
            e.reason,
            ",".join(vms),
            f"volume {volume}: {e.message}{note}",
        )
        if skip:
            return None
        raise


def card_unlock(login: Any, wanted: dict[str, tuple[str, ...]], audit: Audit) -> Any:
    """The card of this login as an ``Unlock`` (services.volumes); None (audited per volume,
    ``no_card``) when the session was not opened by a card login: keys need the card."""
    if login is None or login.method != "card" or login.card_session is None:
        for volume, vms in wanted.items():
            audit(
                "key_release",
                Outcome.FAILURE,
                "no_card",
                ",".join(vms),
                f"volume {volume}: the keys need a card login",
            )
        return None
    from .volumes import Card, Unlock

    card = Card(
        certificate=login.chain[0],
        key_id=login.card_key_id,
        token_label=login.card.token,
        token_serial=login.card.token_serial,
    )
    return Unlock.with_card(card, login.card_session)


class KeyRelease:
    def __init__(
        self, config: Config, *, send: Send, volumes: Any = None, hold: Hold | None = None
    ) -> None:
        """``send``: a request to the launcher (svmmd's socket). ``hold``: inside svmmd, its
        launcher's own ``hold_keys``, so the keys never travel as JSON text to itself."""
        self.config = config
        self.send = send
        self.hold = hold
        if volumes is None:
            from ..adapters.luks import Cryptsetup, Pbkdf
            from .volumes import Volumes

            volumes = Volumes(Cryptsetup(), Pbkdf())
        self.volumes = volumes

    def release(
        self,
        allowlist: Allowlist,
        login: Any,
        session_id: str,
        audit: Audit,
        *,
        pid: int | None = None,
    ) -> list[Released]:
        """Release and hand over every volume key this session needs; [] when none.
        ``pid`` (the session's process) is the dm-crypt mode's business; unused here."""
        wanted = volumes_to_release(allowlist)
        if not wanted:
            return []
        unlock = card_unlock(login, wanted, audit)
        if unlock is None:
            return []
        held: list[tuple[str, bytearray]] = []
        handed_over = False
        try:
            for volume, vms in list(wanted.items()):
                image = volume_image(self.config, volume)
                passphrase = attempt(
                    volume, vms, audit, partial(self.volumes.release, image, unlock)
                )
                if passphrase is None:
                    del wanted[volume]
                    continue
                held.append((volume, passphrase))
            if not held:
                return []
            reply = self._hand_over(allowlist, session_id, login, held)
            handed_over = True
            if not reply.get("ok"):
                raise VolumeError(
                    f"the launcher did not take the volume keys: {reply.get('reason')}: "
                    f"{reply.get('message', '')}",
                    reason="key_handover_refused",
                )
        except BaseException as e:
            if handed_over or held:
                self.drop(allowlist.uid, session_id)
            reason = e.reason if isinstance(e, SvmmError) else type(e).__name__
            for volume, _ in held:
                audit(
                    "key_release",
                    Outcome.FAILURE,
                    reason,
                    ",".join(wanted[volume]),
                    f"volume {volume}: rolled back ({reason})",
                )
            raise
        finally:
            for _, p in held:
                p[:] = bytes(len(p))
        for volume, vms in wanted.items():
            audit(
                "key_release",
                Outcome.SUCCESS,
                "released",
                ",".join(vms),
                f"volume {volume}: released by the card, held by the launcher for session "
                f"{session_id}",
            )
        return [Released(v, vms) for v, vms in wanted.items()]

    def _hand_over(
        self, allowlist: Allowlist, session_id: str, login: Any, held: list[tuple[str, bytearray]]
    ) -> dict[str, Any]:
        if self.hold is not None:
            r = self.hold(
                uid=allowlist.uid,
                user=allowlist.user,
                session=session_id,
                card_fingerprint=login.card.fingerprint,
                card_serial=login.card.token_serial,
                keys=dict(held),
            )
            return {"ok": r.ok, "reason": r.reason, "message": r.message}
        # To svmmd in another process: JSON text on its root-only socket, the one copy Python
        # cannot wipe (launcher_client drops the line at once).
        return self.send(
            {
                "op": "hold_keys",
                "uid": allowlist.uid,
                "user": allowlist.user,
                "session": session_id,
                "card_fingerprint": login.card.fingerprint,
                "card_serial": login.card.token_serial,
                "volumes": [{"name": v, "passphrase": p.decode("ascii")} for v, p in held],
            }
        )

    def drop(self, uid: int, session_id: str) -> None:
        """Tell the launcher to forget this session's keys (best effort on a rollback)."""
        with contextlib.suppress(SvmmError):
            self.send({"op": "drop_keys", "uid": uid, "session": session_id})
