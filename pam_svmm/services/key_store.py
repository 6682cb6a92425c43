"""svmmd's volume keys: what PAM sessions released, held in memory only, wiped when let go.

Keys are kept per uid, per session, per volume name, each in its own bytearray that this store
owns: it is zeroed when its session drops it, when it is replaced, and when the store is
closed (service stop). Nothing here is ever written to a file, a log or an exception message.
A volume whose key two sessions of one user hold stays usable until both have dropped it.

Python cannot promise that no other copy exists (the request line and its JSON strings are
immutable and only freed); the buffers the store controls are wiped.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field


def wipe(buf: bytearray) -> None:
    buf[:] = bytes(len(buf))


@dataclass
class _Session:
    user: str
    card_fingerprint: str
    card_serial: str
    keys: dict[str, bytearray] = field(default_factory=dict, repr=False)


@dataclass(frozen=True)
class Dropped:
    """One key let go (for the audit trail: no key material)."""

    session: str
    volume: str
    user: str
    card_fingerprint: str
    card_serial: str


class KeyStore:
    """Thread-safe; ``close()`` wipes everything."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: dict[int, dict[str, _Session]] = {}

    def hold(
        self,
        uid: int,
        session: str,
        keys: Mapping[str, bytearray],
        *,
        user: str,
        card_fingerprint: str = "",
        card_serial: str = "",
    ) -> None:
        """Take ownership of ``keys`` (volume -> passphrase) for ``uid``'s ``session``; a key
        the session already held for the same volume is wiped and replaced."""
        with self._lock:
            s = self._held.setdefault(uid, {}).get(session)
            if s is None:
                s = self._held[uid][session] = _Session(user, card_fingerprint, card_serial)
            else:
                s.user, s.card_fingerprint, s.card_serial = user, card_fingerprint, card_serial
            for name, buf in keys.items():
                old = s.keys.pop(name, None)
                if old is not None and old is not buf:
                    wipe(old)
                s.keys[name] = buf

    def drop(self, uid: int, session: str | None = None) -> list[Dropped]:
        """Wipe and forget the keys of ``uid``'s ``session`` (None: all its sessions)."""
        out: list[Dropped] = []
        with self._lock:
            sessions = self._held.get(uid, {})
            names = list(sessions) if session is None else [session]
            for sid in names:
                s = sessions.pop(sid, None)
                if s is None:
                    continue
                for volume, buf in sorted(s.keys.items()):
                    wipe(buf)
                    out.append(Dropped(sid, volume, s.user, s.card_fingerprint, s.card_serial))
                s.keys.clear()
            if not sessions:
                self._held.pop(uid, None)
        return out

    def drop_card(self, card_serial: str) -> list[Dropped]:
        """Wipe and forget every session opened with the card of token serial ``card_serial``
        (the card was pulled out: its sessions' keys must not outlive it)."""
        serial = card_serial.rstrip(" ")
        out: list[Dropped] = []
        if not serial:
            return out
        with self._lock:
            for uid in list(self._held):
                sessions = self._held[uid]
                for sid in [sid for sid, s in sessions.items() if s.card_serial == serial]:
                    s = sessions.pop(sid)
                    for volume, buf in sorted(s.keys.items()):
                        wipe(buf)
                        out.append(Dropped(sid, volume, s.user, s.card_fingerprint, serial))
                    s.keys.clear()
                if not sessions:
                    del self._held[uid]
        return out

    def card_serials(self, uid: int | None = None) -> set[str]:
        """The token serials of the cards whose sessions hold keys (of ``uid``, or anyone's)."""
        with self._lock:
            users = self._held.values() if uid is None else [self._held.get(uid, {})]
            return {s.card_serial for u in users for s in u.values() if s.card_serial}

    def card_for(self, uid: int, volumes: Iterable[str], fingerprint: str = "") -> str:
        """The token serial of the card whose session gives ``uid``'s keys for ``volumes``
        (the newest session holding the first one, as ``borrow`` takes); with no volumes,
        the newest session of the card ``fingerprint`` (else the newest). "" if none."""
        first = next(iter(volumes), None)
        with self._lock:
            sessions = list(self._held.get(uid, {}).values())[::-1]  # newest first
            if first is not None:
                chosen = [s for s in sessions if first in s.keys]
            else:
                chosen = [s for s in sessions if s.card_fingerprint == fingerprint] or sessions
            return chosen[0].card_serial if chosen else ""

    def held(self, uid: int) -> set[str]:
        """The volume names ``uid`` has a key for, in any session."""
        with self._lock:
            return {v for s in self._held.get(uid, {}).values() for v in s.keys}

    def sessions(self, uid: int) -> list[str]:
        with self._lock:
            return sorted(self._held.get(uid, {}))

    def borrow(self, uid: int, volumes: Iterable[str]) -> dict[str, bytearray]:
        """Copies of ``uid``'s keys for ``volumes`` (the latest session's, if several hold
        one); the caller wipes them when done. KeyError names a volume not held."""
        with self._lock:
            sessions = list(self._held.get(uid, {}).values())
            out: dict[str, bytearray] = {}
            try:
                for v in volumes:
                    for s in reversed(sessions):  # dicts keep insertion order: newest last
                        if v in s.keys:
                            out[v] = bytearray(s.keys[v])
                            break
                    else:
                        raise KeyError(v)
            except KeyError:
                for buf in out.values():
                    wipe(buf)
                raise
            return out

    def close(self) -> None:
        """Wipe every key (service stop)."""
        with self._lock:
            for sessions in self._held.values():
                for s in sessions.values():
                    for buf in s.keys.values():
                        wipe(buf)
                    s.keys.clear()
            self._held.clear()
