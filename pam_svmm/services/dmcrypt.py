"""``volumes.mode = "dm-crypt"``: the card's keys open the user's volumes with cryptsetup at
session open; the last session that uses a mapping closes it (refcounted like pam_mount).

Session open (after the whole login succeeded, for the volumes of VMs the allowlist lets the
user boot, exactly as the VMM mode decides: ``key_release.volumes_to_release``): each volume's
key is released by the still logged-in card (and checked against its keyslot), then

* no mapping ``svmm-<volume>`` yet: ``cryptsetup open`` (key on stdin), node made root's 0600;
* a mapping our state says a session opened: reused (refcount + 1); resumed with the key
  (``luksResume``) if card removal suspended it; a deferred close of it is cancelled;
* a mapping of that name our state knows nothing of: refused (``mapping_foreign``), never
  adopted.

All or nothing: if one volume fails, the mappings this session opened are closed again (and
the ones it resumed suspended again), nothing is recorded and the session fails with the
reason. A host without device-mapper fails the session (``dm_unavailable``) before any key
is released. Every step is audited (user, card, volume, VMs); keys live in bytearrays wiped
after use and reach cryptsetup through a pipe (adapters/luks.py).

Session close: the session's entry goes; a mapping no other session holds is closed; if a
running QEMU still has it open, the close is deferred (the kernel removes it when QEMU lets
go) and remembered, so the next login reuses it instead of calling it foreign.

Card removal (svmmd, after the card's VMs were paused or stopped): the mappings held by that
card's sessions, and by no session of another card still present, are ``luksSuspend``-ed
(I/O blocks, the kernel wipes the key); those sessions no longer count as "open" for the
launcher until a new login with the card resumes the mapping.

The state is the session refcount's own mechanism (adapters/allowlist_store.SessionRecords,
root-only, flock, atomic replace) in ``<session.state_dir>/dmcrypt``: one record for every
mapping (uid 0's slot; a mapping is shared by every session that uses it, whoever's), so one
lock orders all opens and closes (dm-crypt session opens of different users wait for each
other's key derivation: seconds, on a host with few users). Its sessions map a session id to
``{"uid", "user", "pid", "volumes", "token_serial", "card_fingerprint", "card_removed"}``;
the reserved entry ``~mappings`` (not a valid session id) holds ``suspended`` and
``deferred`` volume names.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from ..adapters.allowlist_store import SessionRecords, UserSessions
from ..config import Config
from ..domain.allowlist import Allowlist
from ..domain.audit_record import Outcome
from ..errors import SvmmError, VolumeError
from .key_release import (
    Audit,
    Released,
    attempt,
    card_unlock,
    volume_image,
    volumes_to_release,
)
from .session import _prune_dead

MAPPING_PREFIX = "svmm-"
STATE_SUBDIR = "dmcrypt"
STATE_SLOT = 0  # the one record (SessionRecords keys records by a number)
META = "~mappings"  # reserved entry: "~" is not in a session id
# The launcher's volume name rule (QEMU node names), so every mapping name is valid for dm.
VOLUME_PATTERN = re.compile(r"[a-z][a-z0-9_-]{0,30}")


def mapping_name(volume: str) -> str:
    """``svmm-<volume>``; VolumeError for a name the launcher would refuse too."""
    if not isinstance(volume, str) or not VOLUME_PATTERN.fullmatch(volume):
        shown = str(volume)[:40].encode("unicode_escape").decode("ascii")
        raise VolumeError(f"{shown!r} is not a valid volume name", reason="volume_name_invalid")
    return MAPPING_PREFIX + volume


def mapping_path(volume: str) -> Path:
    return Path("/dev/mapper") / mapping_name(volume)


@dataclass(frozen=True)
class MappingEvent:
    """Something done to a mapping outside a session open, for the caller to audit."""

    volume: str
    event: str  # volume_close, volume_suspend
    ok: bool
    reason: str  # closed, close_deferred, suspended, or an error's reason
    detail: str
    users: tuple[str, ...] = ()
    token_serial: str = ""


@dataclass
class _State:
    sessions: UserSessions
    suspended: set[str]
    deferred: set[str]
    before: frozenset[str] = frozenset()  # every volume the record named when loaded

    def entries(self) -> dict[str, dict[str, Any]]:
        return self.sessions.sessions

    def held(self) -> set[str]:
        """Volumes some session holds (suspended or not)."""
        return {v for e in self.entries().values() for v in e.get("volumes", ())}

    def holders(self, volume: str) -> list[dict[str, Any]]:
        return [e for e in self.entries().values() if volume in e.get("volumes", ())]


class DmcryptVolumes:
    """The dm-crypt mode, for the PAM session hook (``release``, ``close_session``) and
    svmmd (``open_volumes``, ``card_serials``, ``card_removed``).

    ``cryptsetup``: adapters.luks.Cryptsetup (tests pass a stand-in with the same methods);
    ``volumes``: services.volumes.Volumes (releases a key with the card)."""

    def __init__(
        self,
        config: Config,
        *,
        cryptsetup: Any = None,
        volumes: Any = None,
        records: SessionRecords | None = None,
        now: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
    ) -> None:
        if cryptsetup is None:
            from ..adapters.luks import Cryptsetup

            cryptsetup = Cryptsetup()
        if volumes is None:
            from ..adapters.luks import Pbkdf
            from .volumes import Volumes

            volumes = Volumes(cryptsetup, Pbkdf())
        self.config = config
        self.cryptsetup = cryptsetup
        self.volumes = volumes
        self.records = records or SessionRecords(
            config.session.state_dir / STATE_SUBDIR, key="session.state_dir"
        )
        self.now = now

    # --- session open --------------------------------------------------------------------

    def release(
        self,
        allowlist: Allowlist,
        login: Any,
        session_id: str,
        audit: Audit,
        *,
        pid: int | None = None,
    ) -> list[Released]:
        """Open (or reuse) the mapping of every volume this session needs; [] when none.
        ``pid``: the process that holds the session (default: this one)."""
        wanted = volumes_to_release(allowlist)
        if not wanted:
            return []
        unlock = card_unlock(login, wanted, audit)
        if unlock is None:
            return []
        try:
            self.cryptsetup.require_dm()
        except VolumeError as e:
            for volume, vms in wanted.items():
                audit(
                    "key_release",
                    Outcome.FAILURE,
                    e.reason,
                    ",".join(vms),
                    f"volume {volume}: volumes.mode = 'dm-crypt': {e.message}",
                )
            raise VolumeError(
                f"volumes.mode = 'dm-crypt' cannot open volumes: {e.message}", reason=e.reason
            ) from None
        done: list[tuple[str, str]] = []  # (volume, how): opened, reused, resumed
        with self._locked() as (held, state):
            _prune_dead(state.sessions)
            try:
                for volume, vms in list(wanted.items()):
                    how = attempt(
                        volume, vms, audit, partial(self._open_one, volume, state, unlock)
                    )
                    if how is None:  # the card holds no key for it: skipped (audited)
                        del wanted[volume]
                        continue
                    done.append((volume, how))
                state.entries()[session_id] = {
                    "uid": allowlist.uid,
                    "user": allowlist.user,
                    "pid": os.getpid() if pid is None else pid,
                    "volumes": sorted(wanted),
                    "token_serial": login.card.token_serial,
                    "card_fingerprint": login.card.fingerprint,
                    "opened_at": self.now().astimezone(dt.UTC).isoformat(timespec="seconds"),
                }
                closed = self._close_unheld(state)  # left by sessions whose process is gone
                self._save(held, state)
            except BaseException as e:
                reason = e.reason if isinstance(e, SvmmError) else type(e).__name__
                for volume, how in reversed(done):
                    undone = self._undo(volume, how, state)
                    audit(
                        "key_release",
                        Outcome.FAILURE,
                        reason,
                        ",".join(wanted[volume]),
                        f"volume {volume}: rolled back ({reason}): {undone}",
                    )
                state.entries().pop(session_id, None)
                with contextlib.suppress(SvmmError):
                    self._save(held, state)  # what the undo changed (suspended, deferred)
                raise
        for ev in closed:
            audit(
                ev.event,
                Outcome.SUCCESS if ev.ok else Outcome.ERROR,
                ev.reason,
                "",
                f"volume {ev.volume}: {ev.detail} (a session whose process is gone)",
            )
        for volume, how in done:
            audit(
                "key_release",
                Outcome.SUCCESS,
                how,
                ",".join(wanted[volume]),
                f"volume {volume}: {how} /dev/mapper/{mapping_name(volume)} for session "
                f"{session_id}",
            )
        return [Released(v, wanted[v]) for v, _ in done]

    def _open_one(self, volume: str, state: _State, unlock: Any) -> str:
        cs = self.cryptsetup
        name = mapping_name(volume)
        ours = bool(state.holders(volume)) or volume in state.deferred
        active = cs.mapping_active(name)
        if active and not ours:
            raise VolumeError(
                f"volume {volume}: /dev/mapper/{name} exists but was not opened by svmm (no "
                "session state names it); refusing to adopt it: close it first "
                f"(cryptsetup close {name})",
                reason="mapping_foreign",
            )
        # The card releases the key every time, reused mapping or not: a session uses a
        # volume only if its own card can open it.
        key = self.volumes.release(volume_image(self.config, volume), unlock)
        try:
            if not active:
                # A mapping our state names may have been removed behind our back: open anew.
                state.suspended.discard(volume)
                state.deferred.discard(volume)
                cs.open_dmcrypt(volume_image(self.config, volume), name, key)
                try:
                    cs.secure_mapping(name)
                except BaseException:
                    with contextlib.suppress(SvmmError):
                        cs.close_dmcrypt(name)
                    raise
                return "opened"
            how = "reused"
            if volume in state.deferred:
                cs.cancel_deferred(name)
                state.deferred.discard(volume)
            if volume in state.suspended:
                cs.resume(name, key)
                state.suspended.discard(volume)
                how = "resumed"
            return how
        finally:
            key[:] = bytes(len(key))

    def _undo(self, volume: str, how: str, state: _State) -> str:
        """Put a volume back as it was before this session's open (best effort)."""
        name = mapping_name(volume)
        try:
            if how == "opened":
                self.cryptsetup.close_dmcrypt(name)
                return f"closed /dev/mapper/{name}"
            if how == "resumed":
                self.cryptsetup.suspend(name)
                state.suspended.add(volume)
                return f"suspended /dev/mapper/{name} again"
        except SvmmError as e:
            return f"could not undo {how}: {e.message}"
        return "left open for the sessions that hold it"

    # --- session close -------------------------------------------------------------------

    def close_session(self, session_id: str) -> list[MappingEvent]:
        """Forget the session; close each mapping no session holds any more. Returns what
        was done to mappings ([] when the session held none), for the caller to audit."""
        with self._locked() as (held, state):
            if state.entries().pop(session_id, None) is None:
                return []
            _prune_dead(state.sessions)
            events = self._close_unheld(state)
            self._save(held, state)
        return events

    def drop(self, uid: int, session_id: str) -> None:
        """Rollback of a session open that failed after ``release``: close what it opened."""
        with contextlib.suppress(SvmmError):
            self.close_session(session_id)

    def _close_unheld(self, state: _State) -> list[MappingEvent]:
        events: list[MappingEvent] = []
        cs = self.cryptsetup
        for volume in sorted(state.deferred):
            if not cs.mapping_active(mapping_name(volume)):
                state.deferred.discard(volume)  # the kernel removed it when QEMU let go
        for volume in sorted(state.suspended - state.held()):
            state.suspended.discard(volume)  # closed below (a suspended mapping can be)
            state.deferred.discard(volume)
        for volume in sorted(state.before - state.held() - state.deferred):
            name = mapping_name(volume)
            if not cs.mapping_active(name):
                continue
            try:
                cs.close_dmcrypt(name)
                events.append(
                    MappingEvent(
                        volume,
                        "volume_close",
                        True,
                        "closed",
                        f"closed /dev/mapper/{name}: its last session ended",
                    )
                )
            except VolumeError as e:
                try:
                    cs.close_dmcrypt(name, deferred=True)
                except VolumeError as e2:
                    events.append(
                        MappingEvent(
                            volume,
                            "volume_close",
                            False,
                            e2.reason,
                            f"/dev/mapper/{name} stays open: {e.message}; "
                            f"deferred close: {e2.message}",
                        )
                    )
                    state.deferred.add(volume)  # still ours: the next login may reuse it
                    continue
                state.deferred.add(volume)
                events.append(
                    MappingEvent(
                        volume,
                        "volume_close",
                        True,
                        "close_deferred",
                        f"/dev/mapper/{name} is in use ({e.message}); "
                        "removed when its last user closes it",
                    )
                )
        return events

    # --- svmmd ---------------------------------------------------------------------------

    def open_volumes(self, uid: int) -> dict[str, frozenset[str]]:
        """Volume -> the token serials of ``uid``'s sessions holding it, for each mapping that
        is active, not suspended, and held by a live session of ``uid`` whose card is still
        in (``volume_not_open`` for any other)."""
        with self._locked() as (_held, state):
            out: dict[str, set[str]] = {}
            for e in state.entries().values():
                if e.get("uid") != uid or e.get("card_removed") or not _alive(e.get("pid")):
                    continue
                for v in e.get("volumes", ()):
                    if v not in state.suspended:
                        out.setdefault(v, set()).add(str(e.get("token_serial", "")))
            active = [v for v in out if self.cryptsetup.mapping_active(mapping_name(v))]
        return {v: frozenset(out[v]) for v in active}

    def card_serials(self, uid: int | None = None) -> set[str]:
        """Token serials of the live sessions (of ``uid``, or anyone's) that hold mappings and
        whose card is still in: the cards svmmd watches, and those a resume accepts."""
        with self._locked() as (_held, state):
            return {
                str(e.get("token_serial"))
                for e in state.entries().values()
                if e.get("token_serial")
                and not e.get("card_removed")
                and (uid is None or e.get("uid") == uid)
                and _alive(e.get("pid"))
            }

    def card_removed(self, token_serial: str) -> list[MappingEvent]:
        """The card ``token_serial`` left its reader (its VMs are paused or stopped by now):
        its sessions stop counting as open and every mapping only they (or sessions of
        cards also gone) hold is suspended. Returns what was done, for the caller to audit."""
        serial = token_serial.rstrip(" ")
        if not serial:
            return []
        events: list[MappingEvent] = []
        with self._locked() as (held, state):
            mine = [e for e in state.entries().values() if e.get("token_serial") == serial]
            if not mine:
                return []
            for e in mine:
                e["card_removed"] = True
            volumes = {v for e in mine for v in e.get("volumes", ())}
            for volume in sorted(volumes - state.suspended):
                holders = state.holders(volume)
                users = tuple(sorted({str(e.get("user", "")) for e in holders}))
                if any(not e.get("card_removed") for e in holders):
                    events.append(
                        MappingEvent(
                            volume,
                            "volume_suspend",
                            True,
                            "in_use",
                            "not suspended: a session of another card holds it",
                            users,
                            serial,
                        )
                    )
                    continue
                name = mapping_name(volume)
                try:
                    self.cryptsetup.suspend(name)
                except SvmmError as e:
                    events.append(
                        MappingEvent(
                            volume, "volume_suspend", False, e.reason, e.message, users, serial
                        )
                    )
                    continue
                state.suspended.add(volume)
                events.append(
                    MappingEvent(
                        volume,
                        "volume_suspend",
                        True,
                        "suspended",
                        f"/dev/mapper/{name} suspended (key wiped, I/O "
                        "blocked) until a login with the card",
                        users,
                        serial,
                    )
                )
            self._save(held, state)
        return events

    # --- the record ----------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[tuple[Any, _State]]:
        with self.records.locked(STATE_SLOT) as held:
            sessions = held.load()
            meta = sessions.sessions.pop(META, None) or {}
            state = _State(
                sessions,
                set(_names(meta.get("suspended"))),
                set(_names(meta.get("deferred"))),
            )
            state.before = frozenset(state.held() | state.suspended | state.deferred)
            yield held, state

    @staticmethod
    def _save(held: Any, state: _State) -> None:
        sessions = UserSessions(state.sessions.uid, dict(state.entries()), "")
        if state.suspended or state.deferred:
            sessions.sessions[META] = {
                "suspended": sorted(state.suspended),
                "deferred": sorted(state.deferred),
            }
        held.save(sessions)


def _names(value: object) -> Iterable[str]:
    if not isinstance(value, list):
        return ()
    return (v for v in value if isinstance(v, str) and VOLUME_PATTERN.fullmatch(v))


def _alive(pid: object) -> bool:
    # A pid from a record on disk: os.kill of one past pid_t raises OverflowError.
    if not isinstance(pid, int) or isinstance(pid, bool) or not 0 < pid < 1 << 22:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
