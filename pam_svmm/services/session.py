"""The session manager: at session open the user's VM allowlist is (re)written from the policy;
sessions of one user are refcounted and the last close removes it.

Per user (uid), under the user's lock (``SessionRecords.locked``):

    open:  record += session; allowlist := build(policy, subject, record's sessions)
    close: record -= session; record empty -> allowlist removed, else its sessions updated

Each step writes the allowlist first and the record second; if the record cannot be
written the allowlist is put back as it was, so a failure leaves neither a half-written
allowlist nor a refcount that disagrees with it. The policy is loaded before the lock is
taken (it may be slow); only the list of sessions is filled in under it.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from ..adapters.allowlist_store import AllowlistStore, SessionRecords, UserSessions
from ..config import Config
from ..domain.audit_record import CardFacts
from ..errors import SessionFailed

if TYPE_CHECKING:
    from ..domain.allowlist import Allowlist
    from ..domain.identity import Identity
    from ..domain.policy import CompiledPolicy


class _Accepted(Protocol):
    @property
    def compiled(self) -> CompiledPolicy: ...


class PolicySource(Protocol):
    """Something that gives the policy in force: services.policy.PolicyService."""

    @property
    def host(self) -> str: ...

    def current(self, *, refresh: bool = False) -> _Accepted: ...


@dataclass(frozen=True)
class SessionSubject:
    """Who the session is for, as the login (or the directory) established it."""

    user: str
    uid: int
    roles: tuple[str, ...]
    card: CardFacts | None
    method: str  # card, password

    @classmethod
    def of(cls, identity: Identity, card: CardFacts | None, method: str) -> SessionSubject:
        return cls(identity.name, identity.account.uid, tuple(identity.roles), card, method)


@dataclass(frozen=True)
class Opened:
    allowlist: Allowlist
    path: Path
    sessions: int  # open sessions of the user, this one included
    pruned: tuple[str, ...] = ()  # sessions dropped because their process is gone


@dataclass(frozen=True)
class Closed:
    uid: int
    remaining: int  # sessions of the user still open (0: the allowlist was removed)
    path: Path


class SessionManager:
    def __init__(
        self,
        config: Config,
        *,
        policy: PolicySource,
        store: AllowlistStore | None = None,
        records: SessionRecords | None = None,
    ) -> None:
        self.config = config
        self.policy = policy
        self.store = store or AllowlistStore(config.session.allowlist_dir)
        self.records = records or SessionRecords(config.session.state_dir)

    def open(
        self,
        subject: SessionSubject,
        session_id: str,
        *,
        now: dt.datetime,
        facts: Mapping[str, Any] | None = None,
    ) -> Opened:
        """Count the session and (re)write the user's allowlist with fresh grants.

        ``facts`` (service, tty, pid, ...) are kept in the session record for the operator.
        Raises PolicyUnavailable (no policy), SessionFailed (I/O, tampering) or ConfigError
        (an unsafe folder); then nothing changed."""
        from ..domain.allowlist import build_allowlist

        # The policy service's policy in force: in a PAM process the one the account phase
        # just loaded (one load per login); PolicyUnavailable when there is none.
        compiled = self.policy.current().compiled
        built = build_allowlist(
            compiled,
            user=subject.user,
            uid=subject.uid,
            roles=subject.roles,
            card=subject.card,
            method=subject.method,
            sessions=[session_id],
            host=self.policy.host,
            now=now,
            ttl=self.config.session.allowlist_ttl,
        )
        record = {"opened_at": now.astimezone(dt.UTC).isoformat(timespec="seconds")}
        record |= dict(facts or {})
        with self.records.locked(subject.uid) as held:
            state = held.load()
            pruned = _prune_dead(state)
            state.user = subject.user
            state.sessions[session_id] = record
            allowlist = built.with_sessions(sorted(state.sessions))
            self._write_then_save(held, state, subject.uid, allowlist.to_json())
        return Opened(allowlist, self.store.path(subject.uid), len(state.sessions), pruned)

    def close(self, user: str, session_id: str, *, pid: int | None = None) -> Closed | None:
        """Forget the session; the last one of the user removes the allowlist.

        None when no open session of ``user`` has this id (never opened here, or closed
        already). ``pid``: only a session opened by this process id is closed (the id came
        from somewhere a user could have written, see pam.entry)."""
        uid = self._uid_of(user, session_id)
        if uid is None:
            return None
        with self.records.locked(uid) as held:
            state = held.load()
            record = state.sessions.get(session_id)
            if record is None or state.user != user:
                return None
            if pid is not None and record.get("pid") != pid:
                return None
            del state.sessions[session_id]
            _prune_dead(state)
            if state.sessions:
                current = self._current(uid)
                data = (
                    current.with_sessions(sorted(state.sessions)).to_json()
                    if current is not None
                    else None
                )
                self._write_then_save(held, state, uid, data)
            else:
                self._write_then_save(held, state, uid, None)
        return Closed(uid, len(state.sessions), self.store.path(uid))

    # --- internals -----------------------------------------------------------------------

    def _write_then_save(
        self, held: Any, state: UserSessions, uid: int, data: bytes | None
    ) -> None:
        """Allowlist first (``None``: remove it), then the record; the allowlist is put back
        if the record cannot be saved."""
        try:
            previous = self.store.read_bytes(uid)
        except SessionFailed:
            previous = None  # not ours to keep (and it is replaced whole)
        if data is None:
            self.store.remove(uid)
        else:
            self.store.write_bytes(uid, data)
        try:
            held.save(state)
        except BaseException:
            if previous is None:
                self.store.remove(uid)
            else:
                self.store.write_bytes(uid, previous)
            raise

    def _current(self, uid: int) -> Allowlist | None:
        from ..domain.allowlist import parse_allowlist
        from ..errors import AllowlistInvalid

        try:
            data = self.store.read_bytes(uid)
            return parse_allowlist(data) if data is not None else None
        except (SessionFailed, AllowlistInvalid):
            # Not what we wrote: the remaining sessions get none until their next open.
            return None

    def _uid_of(self, user: str, session_id: str) -> int | None:
        """The uid whose record holds ``session_id`` for ``user``: close needs no directory."""
        return self.records.find(user, session_id)


def session_alive(record: object) -> bool:
    """A session lives as long as the PAM application that opened it (its pid and start
    time, invariant 12); a record that names no process proves nothing."""
    from ..adapters.processes import alive

    if not isinstance(record, dict):
        return False
    return alive(record.get("pid"), record.get("pid_start"))


def _prune_dead(state: UserSessions) -> tuple[str, ...]:
    """Drop sessions whose opening process is gone: it crashed or was killed before it could
    close them, and would otherwise keep the allowlist alive until it expires."""
    dead = [sid for sid, record in state.sessions.items() if not session_alive(record)]
    for sid in dead:
        del state.sessions[sid]
    return tuple(dead)


def make_session_manager(
    config: Config, *, now: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC)
) -> SessionManager:
    """The manager with the real policy service (services.policy)."""
    from .policy import PolicyService

    return SessionManager(config, policy=PolicyService(config, now=now))
