"""The organisation's LDAP directory, through ldap3: entries, accounts, roles, binds.

* Failover over ``config.uris`` in order, our own rather than ldap3's ServerPool: the pool's
  availability check is a bare TCP connect, which a hung slapd passes (the kernel completes
  the handshake from the listen backlog), so it cannot pass over the servers that cost the
  most; it keeps every Connection ever opened on it (``pool_states``: a leak in svmmd) and
  times its "exhaust" in whole wall-clock seconds. The policy here:
  - the first server not left aside is asked; one that fails (refused, no TLS, no answer)
    is left aside for ``retry_interval`` and the call goes on to the next, each server at
    most once per call; when every server is aside the call fails at once, so a login's
    lookups after the first pay nothing for a directory that is down;
  - setting up a connection (TCP, TLS or StartTLS, the service bind) must finish within
    ``connect_timeout``, one request within ``search_timeout``, and the whole call within
    ``total_timeout`` (never more than the login's own timeout: config.py);
  - the service connection is reused while its server answers; a server back from aside is
    preferred again at the next call (the first URI is the provider; a consumer may lag).
  No DNS SRV lookup: the standard library has none and no resolver library is installed.
* TLS: ldaps:// URIs, or StartTLS on ldap:// (``tls = "starttls"``), verified against
  ``ca_file`` (CERT_REQUIRED, host name checked).
* Every ldap3 exception is translated here, once: a server that cannot be reached, times
  out or fails TLS -> DirectoryUnavailable naming the servers tried; a refused password on
  ``bind_as`` -> PasswordIncorrect; any other failure -> DirectoryUnavailable saying what.
* Filters are built only from escaped values (invariant 6): ``ldap3.utils.conv``.
"""

from __future__ import annotations

import datetime as dt
import os
import ssl
import stat
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import ldap3
from ldap3.core import exceptions as lexc
from ldap3.utils.conv import escape_filter_chars
from ldap3.utils.dn import parse_dn

from ..config import DirectoryConfig, TlsMode
from ..domain.identity import AccountState, AccountStatus, Identity, PosixAccount, PosixGroup
from ..errors import AmbiguousUser, ConfigError, DirectoryUnavailable, PasswordIncorrect

PAGE_SIZE = 500
# A mapping filter needs "none, one, or more than one": cap what the server sends.
MAPPING_SIZE_LIMIT = 16
# Exceptions that mean "this server did not answer properly": try the next one.
_UNREACHABLE: tuple[type[BaseException], ...] = (
    lexc.LDAPCommunicationError,
    lexc.LDAPStartTLSError,
    lexc.LDAPCertificateError,
    lexc.LDAPResponseTimeoutError,
    lexc.LDAPSocketOpenError,
    lexc.LDAPMaximumRetriesError,
    ssl.SSLError,
    OSError,
)
_SUCCESS = 0
_SIZE_LIMIT_EXCEEDED = 4
_INVALID_CREDENTIALS = 49
_ATTR_EXISTS = 20
_NO_SUCH_OBJECT = 32
_PAGED_OID = "1.2.840.113556.1.4.319"

T = TypeVar("T")


def read_secret_file(path: Path, *, key: str = "directory.bind_password_file") -> str:
    """A password from a root-only file (first line, newline stripped).

    Refused, with the file named: a symlink, not a regular file, owned by someone other
    than root or us, or any access for group or others.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        raise ConfigError(key, f"cannot open {path}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(key, f"{path} is not a regular file")
        if st.st_uid not in (0, os.geteuid()):
            raise ConfigError(key, f"{path} is owned by uid {st.st_uid}, not root")
        if st.st_mode & 0o077:
            raise ConfigError(
                key,
                f"{path} is accessible by group or others (mode {stat.S_IMODE(st.st_mode):o}); "
                f"it must be readable by root only (chmod 600)",
            )
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(4096)
    finally:
        os.close(fd)
    try:
        secret = data.decode("utf-8").split("\n", 1)[0].rstrip("\r")
    except UnicodeDecodeError:
        raise ConfigError(key, f"{path} is not UTF-8 text") from None
    if not secret:
        raise ConfigError(key, f"{path} is empty")
    return secret


@dataclass(frozen=True)
class _Entry:
    dn: str
    attrs: dict[str, list[bytes]]  # lower-case attribute names -> raw values

    def texts(self, name: str) -> list[str]:
        return [v.decode("utf-8", "replace") for v in self.attrs.get(name.lower(), [])]

    def text(self, name: str, default: str = "") -> str:
        values = self.texts(name)
        return values[0] if values else default

    def raw(self, name: str) -> list[bytes]:
        return self.attrs.get(name.lower(), [])


def _entries(response: Iterable[dict[str, Any]] | None) -> list[_Entry]:
    out = []
    for item in response or ():
        if item.get("type") != "searchResEntry":
            continue  # referrals are not followed
        attrs = {k.lower(): list(v) for k, v in item.get("raw_attributes", {}).items()}
        out.append(_Entry(item["dn"], attrs))
    return out


def _int(text: str) -> int | None:
    try:
        return int(text)
    except ValueError:
        return None


def esc(value: str) -> str:
    """An assertion value for a filter (RFC 4515 escaping)."""
    return escape_filter_chars(value)


@dataclass
class _Server:
    """One URI and what the client knows of it."""

    server: ldap3.Server
    aside_until: float = 0.0  # monotonic; left aside until then after a failure
    last_error: str = ""

    @property
    def name(self) -> str:
        return str(self.server.name)


# Service connections kept open between calls, and for how long one is reused: svmmd's
# logins run side by side, each on one connection for its call; an older one may have been
# dropped by the server or a firewall, and a dead one would leave its server aside.
MAX_IDLE = 8
IDLE_REUSE = 120.0  # seconds


class _OutOfTime(TimeoutError):
    """The call's total_timeout ran out."""


@dataclass
class _Call:
    """One public call's budget."""

    deadline: float
    tried: list[str] = field(default_factory=list)

    def left(self) -> float:
        return self.deadline - time.monotonic()


class DirectoryClient:
    """One directory: a read-only service connection (lazy) and per-call user binds."""

    def __init__(self, config: DirectoryConfig, *, bind_password: str | None = None) -> None:
        if not config.uris:
            raise ConfigError("directory.uris", "at least one URI is required")
        if config.bind_dn and bind_password is None:
            raise ConfigError("directory.bind_password_file", "a password is needed for bind_dn")
        self.config = config
        self._bind_password = bind_password
        self.users_base = config.users_base or config.base_dn
        self.groups_base = config.groups_base or config.base_dn
        self.role_base = config.role_groups_base or self.groups_base
        self._tls = self._make_tls()
        self._servers = [_Server(self._make_server(u)) for u in config.uris]
        # The service connection in use, the server it is to and the running call's budget
        # are each thread's own for the call: svmmd's workers share this client, and an
        # ldap3 Connection (or a call's deadline) used by two threads at once would mix
        # their requests. Between calls a connection waits in ``_idle`` for whichever
        # thread calls next (svmmd's pool hands logins to any of its workers: a connection
        # per thread cost most logins a TLS handshake and a bind). What is learnt of a
        # server (left aside after a failure) is everyone's.
        self._local = threading.local()
        self._idle: list[tuple[ldap3.Connection, _Server, float]] = []  # (conn, server, since)
        self._idle_lock = threading.Lock()

    @property
    def _conn(self) -> ldap3.Connection | None:
        return getattr(self._local, "conn", None)

    @_conn.setter
    def _conn(self, conn: ldap3.Connection | None) -> None:
        self._local.conn = conn

    @property
    def _conn_server(self) -> _Server | None:
        return getattr(self._local, "conn_server", None)

    @_conn_server.setter
    def _conn_server(self, server: _Server | None) -> None:
        self._local.conn_server = server

    @property
    def _call(self) -> _Call | None:
        return getattr(self._local, "call", None)

    @_call.setter
    def _call(self, call: _Call | None) -> None:
        self._local.call = call

    @classmethod
    def from_config(cls, config: DirectoryConfig) -> DirectoryClient:
        """Reads the service account's password from its root-only file."""
        password = None
        if config.bind_dn and config.bind_password_file is not None:
            password = read_secret_file(config.bind_password_file)
        return cls(config, bind_password=password)

    @property
    def server_in_use(self) -> str | None:
        """The URI the service connection is open to: this thread's in a call, else the
        one the next call takes (None: no connection)."""
        if self._conn is not None and not self._conn.closed and self._conn_server is not None:
            return self._conn_server.name
        with self._idle_lock:
            open_ = [server for conn, server, _since in self._idle if not conn.closed]
        return open_[-1].name if open_ else None

    # --- connections ----------------------------------------------------------------------

    def _make_tls(self) -> ldap3.Tls | None:
        uses_tls = self.config.tls is TlsMode.STARTTLS or any(
            u.startswith("ldaps://") for u in self.config.uris
        )
        if not uses_tls:
            return None
        ca = self.config.ca_file
        try:
            return ldap3.Tls(
                validate=ssl.CERT_REQUIRED,
                ca_certs_file=str(ca) if ca is not None else None,
                version=ssl.PROTOCOL_TLS_CLIENT,
            )
        except lexc.LDAPSSLConfigurationError as e:
            raise ConfigError("directory.ca_file", f"{ca}: {e}") from None

    def _make_server(self, uri: str) -> ldap3.Server:
        return ldap3.Server(
            uri,
            use_ssl=uri.startswith("ldaps://"),
            tls=self._tls,
            connect_timeout=self.config.connect_timeout,
            get_info=ldap3.NONE,
        )

    def _timeout(self, limit: float) -> float:
        """``limit``, or less when the call's total_timeout is nearer."""
        if self._call is None:
            return limit
        left = self._call.left()
        if left <= 0:
            raise _OutOfTime(f"total_timeout ({self.config.total_timeout:g} s) ran out")
        return min(limit, left)

    def _request_timeout(self, conn: ldap3.Connection) -> None:
        """Bound the next request on ``conn`` by search_timeout (and the call's budget)."""
        sock = conn.socket
        if sock is not None:
            sock.settimeout(self._timeout(self.config.search_timeout))

    def _open(
        self, target: _Server, user: str | None, password: str | None, *, bind: bool = False
    ) -> ldap3.Connection:
        """An open, TLS-protected (as configured) connection to ``target``, bound as ``user``
        when ``bind`` (a refused bind is the caller's to judge: ``conn.bound`` is False).
        All of it within connect_timeout: a hung server accepts TCP but never answers
        StartTLS, and that is how it is told from a slow search."""
        setup = self._timeout(self.config.connect_timeout)
        target.server.connect_timeout = setup
        conn = ldap3.Connection(
            target.server,
            user=user,
            password=password,
            # None: ldap3 then keeps the connect timeout on the socket for the TLS handshake,
            # StartTLS and the bind (its own receive_timeout takes whole seconds only).
            receive_timeout=None,
            raise_exceptions=False,
            read_only=user is None or user == self.config.bind_dn,
            auto_referrals=False,
            check_names=False,
        )
        try:
            conn.open(read_server_info=False)
            if (
                self.config.tls is TlsMode.STARTTLS
                and not conn.server.ssl
                and not conn.start_tls(read_server_info=False)
            ):
                raise lexc.LDAPStartTLSError(f"StartTLS refused: {conn.result.get('description')}")
            if bind:
                conn.bind()
            self._request_timeout(conn)
        except BaseException:
            _close(conn)
            raise
        return conn

    def _service(self, target: _Server) -> ldap3.Connection:
        """The service connection to ``target``: the open one if it is to ``target``, else
        a new one (which replaces the old only once it is bound)."""
        if self._conn is not None and not self._conn.closed and self._conn_server is target:
            self._request_timeout(self._conn)
            return self._conn
        bind_dn = self.config.bind_dn
        conn = self._open(target, bind_dn or None, self._bind_password, bind=bool(bind_dn))
        if bind_dn and not conn.bound:
            result = dict(conn.result)
            _close(conn)
            raise DirectoryUnavailable(
                f"the directory refused the service account {bind_dn!r} "
                f"({result.get('description')}: {result.get('message')})",
                reason="directory_bind_failed",
            )
        self._drop()
        self._conn, self._conn_server = conn, target
        return conn

    def _take_idle(self) -> None:
        """At a call's start: this thread takes a waiting service connection, if any (the
        newest; one idle longer than IDLE_REUSE is closed, not trusted to be alive)."""
        if self._conn is not None:
            return
        now = time.monotonic()
        stale = []
        with self._idle_lock:
            while self._idle:
                conn, server, since = self._idle.pop()
                if conn.closed or now - since > IDLE_REUSE:
                    stale.append(conn)
                    continue
                self._conn, self._conn_server = conn, server
                break
            if stale:  # the older ones are staler still
                stale += [c for c, _s, _t in self._idle]
                self._idle.clear()
        for conn in stale:
            _close(conn)

    def _give_back(self) -> None:
        """At a call's end: the thread's service connection waits for the next call (at
        most MAX_IDLE wait; one more is closed)."""
        conn, server = self._conn, self._conn_server
        self._conn = self._conn_server = None
        if conn is None or server is None or conn.closed:
            return
        with self._idle_lock:
            if len(self._idle) < MAX_IDLE:
                self._idle.append((conn, server, time.monotonic()))
                return
        _close(conn)

    def _failover(
        self,
        what: str,
        op: Callable[[ldap3.Connection], T],
        connect: Callable[[_Server], ldap3.Connection] | None = None,
    ) -> T:
        """``op`` on a connection from ``connect`` (default: the service connection) to the
        first server not left aside; on a server that fails, again on the next one."""
        now = time.monotonic()
        call = _Call(now + self.config.total_timeout)
        ready = [s for s in self._servers if s.aside_until <= now]
        if not ready:
            raise DirectoryUnavailable(
                f"{what}: no directory server answered lately; {self._aside(now)}"
            )
        self._call = call
        self._take_idle()
        try:
            for target in ready:
                if call.left() <= 0:
                    call.tried.append(f"{target.name} (not tried: total_timeout ran out)")
                    continue
                try:
                    return op((connect or self._service)(target))
                except _UNREACHABLE as e:
                    if target is self._conn_server:
                        self._drop()
                    target.last_error = _describe(e)
                    target.aside_until = time.monotonic() + self.config.retry_interval
                    call.tried.append(f"{target.name} ({target.last_error})")
                except lexc.LDAPException as e:
                    self._drop()
                    raise DirectoryUnavailable(f"{what}: {_describe(e)}") from None
        finally:
            self._call = None
            self._give_back()
        untried = [s for s in self._servers if s not in ready]
        aside = f"; {self._aside(time.monotonic(), untried)}" if untried else ""
        raise DirectoryUnavailable(
            f"{what}: no directory server answered; tried {'; '.join(call.tried)}{aside}"
        )

    def _aside(self, now: float, servers: list[_Server] | None = None) -> str:
        parts = [
            f"{s.name} ({s.last_error}; left aside {max(0.0, s.aside_until - now):.0f} s more)"
            for s in (self._servers if servers is None else servers)
        ]
        return "left aside: " + "; ".join(parts)

    def _drop(self) -> None:
        """Close this thread's service connection (a failed server's, or a replaced one)."""
        if self._conn is not None:
            _close(self._conn)
            self._conn = None
            self._conn_server = None

    def close(self) -> None:
        """Close this thread's service connection and every one waiting."""
        self._drop()
        with self._idle_lock:
            idle, self._idle = self._idle, []
        for conn, _server, _since in idle:
            _close(conn)

    def __enter__(self) -> DirectoryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- searching ------------------------------------------------------------------------

    def _search(
        self,
        conn: ldap3.Connection,
        base: str,
        ldap_filter: str,
        attributes: Iterable[str],
        *,
        scope: str = ldap3.SUBTREE,
        size_limit: int = 0,
        missing_base_ok: bool = False,
    ) -> list[_Entry]:
        self._request_timeout(conn)
        conn.search(
            base,
            ldap_filter,
            search_scope=scope,
            attributes=list(attributes) or [ldap3.NO_ATTRIBUTES],
            size_limit=size_limit,
            time_limit=max(1, int(self.config.search_timeout)),
        )
        code = conn.result.get("result")
        if code == _NO_SUCH_OBJECT and missing_base_ok:
            return []
        if code not in (_SUCCESS, _SIZE_LIMIT_EXCEEDED):
            raise DirectoryUnavailable(
                f"search under {base!r} failed: {conn.result.get('description')} "
                f"{conn.result.get('message') or ''}".rstrip()
            )
        return _entries(conn.response)

    def read_attribute(self, dn: str, attribute: str) -> bytes | None:
        """The first raw value of ``attribute`` on the entry at ``dn``; None when the entry or
        the value does not exist (for the signed policy bundle, svmmPolicyBundle)."""

        def op(conn: ldap3.Connection) -> bytes | None:
            found = self._search(
                conn, dn, "(objectClass=*)", [attribute], scope=ldap3.BASE, missing_base_ok=True
            )
            values = found[0].raw(attribute) if found else []
            return bytes(values[0]) if values else None

        return self._failover(f"reading {attribute} of {dn}", op)

    def search_users(self, ldap_filter: str) -> list[str]:
        """DNs of user entries (``user_filter`` AND ``ldap_filter``) under users_base."""
        full = f"(&{self.config.user_filter}{ldap_filter})"

        def op(conn: ldap3.Connection) -> list[str]:
            found = self._search(conn, self.users_base, full, [], size_limit=MAPPING_SIZE_LIMIT)
            return sorted({e.dn for e in found})

        return self._failover(f"searching {full}", op)

    def user_filter_for(self, ldap_filter: str) -> str:
        """The filter search_users actually sends (for `svmm cert map`)."""
        return f"(&{self.config.user_filter}{ldap_filter})"

    def user_by_name(self, name: str) -> Identity | None:
        dns = self.search_users(f"(uid={esc(name)})")
        if not dns:
            return None
        if len(dns) > 1:
            raise AmbiguousUser(f"{len(dns)} directory entries have uid {name!r}: {dns}")
        return self.identity(dns[0])

    def identity(self, dn: str, *, now: dt.datetime | None = None) -> Identity:
        """The entry at ``dn`` as an Identity: account, roles, POSIX groups, state, certs."""
        at = now or dt.datetime.now(dt.UTC)

        def op(conn: ldap3.Connection) -> Identity:
            found = self._search(
                conn, dn, "(objectClass=*)", self._identity_attributes(), scope=ldap3.BASE
            )
            if not found:
                raise DirectoryUnavailable(f"entry {dn!r} vanished while it was read")
            return self._identity_of(conn, found[0], at)

        return self._failover(f"reading {dn}", op)

    def identity_for(
        self, ldap_filter: str, *, now: dt.datetime | None = None
    ) -> tuple[list[str], Identity | None]:
        """The user entries ``search_users`` finds, and the Identity of the only one (None
        for none or several). One search reads the entries with what an identity needs, so a
        login does not ask again for the entry it just found."""
        at = now or dt.datetime.now(dt.UTC)
        full = f"(&{self.config.user_filter}{ldap_filter})"

        def op(conn: ldap3.Connection) -> tuple[list[str], Identity | None]:
            found = self._search(
                conn,
                self.users_base,
                full,
                self._identity_attributes(),
                size_limit=MAPPING_SIZE_LIMIT,
            )
            dns = sorted({e.dn for e in found})
            if len(dns) != 1:
                return dns, None
            return dns, self._identity_of(conn, found[0], at)

        return self._failover(f"searching {full}", op)

    def _identity_attributes(self) -> list[str]:
        cfg = self.config
        attrs = [
            "uid",
            "cn",
            "gecos",
            "uidNumber",
            "gidNumber",
            "homeDirectory",
            "loginShell",
            "userCertificate;binary",
            "shadowExpire",
            "pwdAccountLockedTime",
            "memberOf",
        ]
        return attrs + [a for a in (cfg.disabled_attribute, cfg.role_attribute) if a]

    def _identity_of(self, conn: ldap3.Connection, entry: _Entry, now: dt.datetime) -> Identity:
        account = _account(entry)
        if account is None:
            raise DirectoryUnavailable(
                f"entry {entry.dn!r} is not a POSIX account (uid, uidNumber, gidNumber)",
                reason="directory_entry_malformed",
            )
        roles = self._roles(conn, entry, account.name)
        groups = self._posix_groups(conn, entry.dn, account)
        certs = tuple(entry.raw("userCertificate;binary") or entry.raw("userCertificate"))
        return Identity(
            dn=entry.dn,
            account=account,
            roles=roles,
            groups=groups,
            state=_state(entry, self.config.disabled_attribute, now),
            certificates=certs,
            source="directory",
            fetched_at=now,
        )

    # --- roles and groups -----------------------------------------------------------------

    def _roles(self, conn: ldap3.Connection, entry: _Entry, uid: str) -> tuple[str, ...]:
        """Group cns under role_base holding the user (member, uniqueMember, memberUid or
        the entry's memberOf), nested up to nested_depth levels, plus role_attribute values.
        """
        found: dict[str, tuple[str, str]] = {}  # normalised DN -> (DN, cn)
        base_key = _dn_key(self.role_base)

        def search(f: str, base: str = self.role_base, scope: str = ldap3.SUBTREE) -> list[_Entry]:
            return self._search(conn, base, f, ["cn"], scope=scope, missing_base_ok=True)

        direct = f"(|(member={esc(entry.dn)})(uniqueMember={esc(entry.dn)})(memberUid={esc(uid)}))"
        for g in search(direct):
            found.setdefault(_dn_key(g.dn), (g.dn, g.text("cn")))
        for dn in entry.texts("memberOf"):
            key = _dn_key(dn)
            if key not in found and _under(key, base_key):
                for g in search("(objectClass=*)", base=dn, scope=ldap3.BASE):
                    found[key] = (g.dn, g.text("cn"))
        frontier = [dn for dn, _ in found.values()]
        for _ in range(self.config.nested_depth):
            if not frontier:
                break
            parts = "".join(f"(member={esc(dn)})(uniqueMember={esc(dn)})" for dn in frontier)
            frontier = []
            for g in search(f"(|{parts})"):
                key = _dn_key(g.dn)
                if key in found:
                    continue  # a cycle, or a group reached twice
                found[key] = (g.dn, g.text("cn"))
                frontier.append(g.dn)
        roles = [cn for _, cn in found.values() if cn]
        if self.config.role_attribute:
            roles += entry.texts(self.config.role_attribute)
        return tuple(sorted(set(roles)))

    def _posix_groups(
        self, conn: ldap3.Connection, dn: str, account: PosixAccount
    ) -> tuple[PosixGroup, ...]:
        f = (
            f"(&(objectClass=posixGroup)(|(memberUid={esc(account.name)})(member={esc(dn)})"
            f"(gidNumber={account.gid})))"
        )
        out = {}
        for g in self._search(
            conn, self.groups_base, f, ["cn", "gidNumber", "memberUid"], missing_base_ok=True
        ):
            group = _group(g)
            if group is not None:
                out[group.gid, group.name] = group
        return tuple(sorted(out.values(), key=lambda g: (g.gid, g.name)))

    # --- enumeration (NSS bridge) ---------------------------------------------------------

    def _paged(self, base: str, ldap_filter: str, attrs: list[str]) -> Iterator[_Entry]:
        cookie: bytes | None = None
        while True:

            def op(conn: ldap3.Connection, c: bytes | None = cookie) -> Any:
                self._request_timeout(conn)
                conn.search(
                    base,
                    ldap_filter,
                    attributes=attrs,
                    paged_size=PAGE_SIZE,
                    paged_cookie=c,
                    time_limit=max(1, int(self.config.search_timeout)),
                )
                if conn.result.get("result") != _SUCCESS:
                    raise DirectoryUnavailable(
                        f"paged search under {base!r} failed: {conn.result.get('description')}"
                    )
                ctrl = conn.result.get("controls", {}).get(_PAGED_OID, {})
                return _entries(conn.response), ctrl.get("value", {}).get("cookie")

            # A page fetched after a failover would continue a cookie the new server does
            # not know: a failure mid-enumeration is reported, not papered over.
            entries, cookie = self._failover(f"listing {base}", op)
            yield from entries
            if not cookie:
                return

    def accounts(self) -> Iterator[PosixAccount]:
        attrs = ["uid", "cn", "gecos", "uidNumber", "gidNumber", "homeDirectory", "loginShell"]
        for e in self._paged(self.users_base, self.config.user_filter, attrs):
            account = _account(e)
            if account is not None:
                yield account

    def groups(self) -> Iterator[PosixGroup]:
        attrs = ["cn", "gidNumber", "memberUid"]
        for e in self._paged(self.groups_base, "(objectClass=posixGroup)", attrs):
            group = _group(e)
            if group is not None:
                yield group

    # --- binds and writes -----------------------------------------------------------------

    def _bound(self, dn: str, password: str, what: str) -> ldap3.Connection:
        """A connection bound as ``dn``; PasswordIncorrect if the directory refuses."""
        if not password:
            # An empty password would be an unauthenticated bind, which "succeeds".
            raise PasswordIncorrect(f"{what}: empty password for {dn!r}")

        def op(conn: ldap3.Connection) -> ldap3.Connection:
            try:
                self._request_timeout(conn)
                if conn.bind():
                    return conn
            except BaseException:
                _close(conn)
                raise
            result = dict(conn.result)
            _close(conn)
            if result.get("result") == _INVALID_CREDENTIALS:
                raise PasswordIncorrect(f"the directory refused the password for {dn!r}")
            raise DirectoryUnavailable(
                f"{what}: bind as {dn!r} failed: {result.get('description')} "
                f"{result.get('message') or ''}".rstrip()
            )

        return self._failover(what, op, connect=lambda target: self._open(target, dn, password))

    def bind_as(self, dn: str, password: str) -> None:
        """Check ``password`` by binding as ``dn`` (over TLS as configured)."""
        if self.config.tls is TlsMode.NONE and not all(
            u.startswith("ldaps://") for u in self.config.uris
        ):
            raise DirectoryUnavailable(
                "password binds need TLS (directory.tls is 'none')", reason="directory_no_tls"
            )
        conn = self._bound(dn, password, "password check")
        _close(conn)

    def publish_certificate(self, dn: str, der: bytes, *, bind_dn: str, password: str) -> None:
        """Add ``der`` to the entry's userCertificate;binary (idempotent)."""
        conn = self._bound(bind_dn, password, "publishing a certificate")
        try:
            self._request_timeout(conn)
            ok = conn.modify(dn, {"userCertificate;binary": [(ldap3.MODIFY_ADD, [der])]})
            code = conn.result.get("result")
            if not ok and code != _ATTR_EXISTS:
                raise DirectoryUnavailable(
                    f"publishing a certificate to {dn!r} failed: {conn.result.get('description')} "
                    f"{conn.result.get('message') or ''}".rstrip(),
                    reason="directory_write_failed",
                )
        except _UNREACHABLE as e:
            raise DirectoryUnavailable(
                f"publishing a certificate to {dn!r}: {_describe(e)}"
            ) from None
        finally:
            _close(conn)


# --- entry parsing ------------------------------------------------------------------------


def _account(e: _Entry) -> PosixAccount | None:
    uid, uid_n, gid_n = e.text("uid"), _int(e.text("uidNumber")), _int(e.text("gidNumber"))
    if not uid or uid_n is None or gid_n is None:
        return None
    return PosixAccount(
        name=uid,
        uid=uid_n,
        gid=gid_n,
        gecos=e.text("gecos") or e.text("cn"),
        home=e.text("homeDirectory"),
        shell=e.text("loginShell") or "/bin/sh",
    )


def _group(e: _Entry) -> PosixGroup | None:
    name, gid = e.text("cn"), _int(e.text("gidNumber"))
    if not name or gid is None:
        return None
    return PosixGroup(name=name, gid=gid, members=tuple(e.texts("memberUid")))


def _state(e: _Entry, disabled_attribute: str, now: dt.datetime) -> AccountState:
    if disabled_attribute and e.text(disabled_attribute).upper() == "TRUE":
        return AccountState(AccountStatus.DISABLED, f"{disabled_attribute} TRUE")
    locked = e.text("pwdAccountLockedTime")
    if locked:
        return AccountState(AccountStatus.DISABLED, f"pwdAccountLockedTime {locked}")
    expire = _int(e.text("shadowExpire")) if e.text("shadowExpire") else None
    if expire is not None and expire >= 0:
        today = (now.astimezone(dt.UTC).date() - dt.date(1970, 1, 1)).days
        if expire <= today:
            day = dt.date(1970, 1, 1) + dt.timedelta(days=expire)
            return AccountState(AccountStatus.EXPIRED, f"shadowExpire {expire} ({day})")
    return AccountState()


def _dn_key(dn: str) -> str:
    """A comparable form of a DN (attribute types and values lower-cased)."""
    try:
        parts = parse_dn(dn, escape=True, strip=True)
    except lexc.LDAPInvalidDnError:
        return dn.lower()
    return ",".join(f"{t.lower()}={v.lower()}" for t, v, _sep in parts)


def _under(dn_key: str, base_key: str) -> bool:
    return dn_key == base_key or dn_key.endswith("," + base_key)


def _describe(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    if "timed out" in text or isinstance(e, TimeoutError):
        return f"timed out: {text}"
    return f"{type(e).__name__}: {text}"


def _close(conn: ldap3.Connection) -> None:
    try:
        if conn.bound:
            conn.unbind()
        elif not conn.closed:
            conn.strategy.close()
    except (lexc.LDAPException, OSError):
        pass
