"""PAM glue: pamh -> plain values -> services -> one PAM code. Never raises into pam_python.

Module arguments (after the shim's path in the PAM rule):
    config=PATH   the TOML file (default /etc/svmm/svmm.toml)
    venv=PATH     read by the shim only
"""

from __future__ import annotations

import contextlib
import os
import syslog
import threading
from dataclasses import dataclass, field, replace
from typing import Any

from .. import config as config_mod
from ..adapters.audit_log import AuditWriteError
from ..errors import ConfigError, ConversationFailed, NoCard
from ..services.auth import LoginRequest
from .codes import pam_code_name

# One LoginService per config file per process: `login` and `sudo` authenticate once,
# but a display manager's long-lived process authenticates many times.
_services: dict[tuple[str, int], Any] = {}
_services_lock = threading.Lock()


@dataclass
class Transaction:
    """What one PAM application's calls share between authenticate and close_session.

    In-process (pam_python) that is this process: one Transaction for its life. svmmd, which
    runs these same functions for many PAM applications (daemon/pam_responder.py), keeps one
    per application and hands it in as ``pamh.svmm_transaction``, with ``pid`` the
    application's (from SO_PEERCRED), so session records name the application's process."""

    # Users authenticated (and how), for acct_mgmt / setcred / open_session.
    logins: dict[str, Any] = field(default_factory=dict)
    # Session ids opened, by user, for close_session.
    sessions: dict[str, list[str]] = field(default_factory=dict)
    pid: int | None = None  # None: this process

    def app_pid(self) -> int:
        return os.getpid() if self.pid is None else self.pid


_process = Transaction()
_logins = _process.logins  # the names the unit tests reach for
_sessions = _process.sessions


def _tx(pamh: Any) -> Transaction:
    try:
        tx = pamh.svmm_transaction
    except AttributeError:  # pam_python's handle: this process
        return _process
    return tx if isinstance(tx, Transaction) else _process


@dataclass(frozen=True)
class ModuleArgs:
    config: str | None = None

    @classmethod
    def parse(cls, argv: list[str]) -> ModuleArgs:
        cfg = None
        for arg in argv[1:]:
            if arg.startswith("config="):
                cfg = arg[len("config=") :]
        return cls(config=cfg)


def _service(args: ModuleArgs, *, early: bool = False) -> Any:
    """The LoginService of this configuration file. ``early`` (pam_sm_authenticate): in a
    PAM process, start the login's card helper as soon as the configuration is read, so
    the helper's interpreter start and imports overlap this process's imports of the login
    code (svmmd keeps its helpers ready instead: ``prefork``)."""
    path = config_mod.resolve_path(args.config)
    try:
        mtime = path.stat().st_mtime_ns
    except OSError:
        mtime = 0
    key = (str(path), mtime)
    with _services_lock:  # svmmd's workers call this side by side: one service per config
        return _service_for(key, path, early)


def _service_for(key: tuple[str, int], path: Any, early: bool = False) -> Any:
    svc = _services.get(key)
    if svc is not None:
        if early and not svc.prefork and svc._early is None:
            svc.adopt_helper(_start_helper(svc.config))
        return svc
    cfg = config_mod.load(path)
    helper = _start_helper(cfg) if early else None
    from ..services.login import LoginService  # the login code: most of a login's imports

    svc = LoginService(cfg, card_helper=True)
    if helper is not None:
        svc.adopt_helper(helper)
    for old in _services.values():
        old.close_spare()  # svmmd: the helper it started ahead, and its forker
    _services.clear()
    _services[key] = svc
    return svc


def _start_helper(cfg: Any) -> Any:
    """A login's card helper, started without waiting for it to load the module (None:
    the login starts its own, and says why if it cannot)."""
    from ..adapters.card_helper import CardHelper
    from ..errors import SvmmError

    p = cfg.pkcs11
    try:
        return CardHelper(
            p.module,
            pass_environment=p.pass_environment,
            user=p.helper_user,
            timeout=cfg.auth.login_timeout,
            wait=False,
        )
    except SvmmError:
        return None


class PamPrompter:
    """The PAM conversation as a Prompter."""

    def __init__(self, pamh: Any) -> None:
        self.pamh = pamh

    def _say(self, style: int, text: str) -> Any:
        try:
            return self.pamh.conversation(self.pamh.Message(style, text))
        except self.pamh.exception as e:
            raise ConversationFailed(f"PAM conversation failed ({e.pam_result})") from None

    def ask_secret(self, prompt: str) -> str:
        resp = self._say(self.pamh.PAM_PROMPT_ECHO_OFF, prompt)
        if resp is None or resp.resp is None:
            raise ConversationFailed("no PIN was entered")
        return resp.resp

    def info(self, text: str) -> None:
        self._say(self.pamh.PAM_TEXT_INFO, text)

    def error(self, text: str) -> None:
        self._say(self.pamh.PAM_ERROR_MSG, text)


def _code(pamh: Any, error: BaseException) -> int:
    return int(getattr(pamh, pam_code_name(error)))


def _ask_user(pamh: Any) -> str:
    try:
        return str(pamh.get_user(None) or "")
    except pamh.exception as e:
        raise ConversationFailed(f"could not get the user name ({e.pam_result})") from None


def _request(pamh: Any, svc: Any) -> LoginRequest:
    return LoginRequest(
        service=pamh.service or "",
        host=svc.host_name(),
        pam_user=pamh.user or None,
        tty=pamh.tty or "",
        rhost=pamh.rhost or "",
    )


def _log_failure(where: str, error: BaseException) -> None:
    """Syslog what the audit trail cannot hold: bugs, and a configuration that does not load
    (then there is no audit path). Decisions are audited by the services."""
    from ..errors import ConfigError, SvmmError

    if isinstance(error, SvmmError) and not isinstance(error, ConfigError):
        return
    text = (
        error.message
        if isinstance(error, ConfigError)
        else f"internal error {type(error).__name__}"
    )
    syslog.openlog("svmm", syslog.LOG_PID, syslog.LOG_AUTHPRIV)
    syslog.syslog(syslog.LOG_ERR, f"pam_svmm {where}: {text}")


# --- a configuration that does not load (invariant 15): shim.broken's truth table ---------
BROKEN = "Smart-card login is unavailable on this host: its configuration is broken."


def _config_broken(pamh: Any, where: str, error: BaseException) -> int:
    """Loud (syslog names the problem; the person is told), then shim.broken's answer:
    could not decide for local accounts, refused for anyone else."""
    from . import shim

    _log_failure(where, error)
    if where == "authenticate":
        with contextlib.suppress(ConversationFailed):
            PamPrompter(pamh).error(BROKEN)
    return shim.broken(pamh, where.removeprefix("pam_sm_"))


UNAUDITED = "Smart-card login is unavailable on this host: its audit trail cannot be written."


def _unaudited(pamh: Any, where: str, error: AuditWriteError) -> int:
    """A decision that could not be audited is refused ([audit] disk_full_action = "refuse";
    the writer has told syslog why), by shim.broken's table: a full disk never locks a
    local account out (pam_unix decides), and never lets a directory user in."""
    from . import shim

    if where == "authenticate":
        with contextlib.suppress(ConversationFailed):
            PamPrompter(pamh).error(UNAUDITED)
    return shim.broken(pamh, where)


def _tell_user(pamh: Any, error: BaseException) -> None:
    from ..errors import SvmmError

    if not isinstance(error, SvmmError):
        return
    # If the application cannot show it, the code still says no.
    with contextlib.suppress(ConversationFailed):
        PamPrompter(pamh).error(error.message)


def pam_sm_authenticate(pamh: Any, flags: int, argv: list[str]) -> int:
    svc = None
    try:
        svc = _service(ModuleArgs.parse(argv), early=True)
        prompter = PamPrompter(pamh)
        request = _request(pamh, svc)
        try:
            result = svc.card_login(request, prompter)
        except NoCard:
            # Without a card, ID/password where policy allows it; else "no card" stands, so
            # the stack can fall through to another method.
            if not svc.password_allowed(request.service):
                raise
            if request.pam_user is None:
                request = replace(request, pam_user=_ask_user(pamh))
            result = svc.password_login(request, prompter)
        if pamh.user != result.user:
            pamh.user = result.user
        _tx(pamh).logins[result.user] = result
        return int(pamh.PAM_SUCCESS)
    except ConfigError as error:
        return _config_broken(pamh, "authenticate", error)
    except AuditWriteError as error:
        return _unaudited(pamh, "authenticate", error)
    except Exception as error:
        _log_failure("authenticate", error)
        _tell_user(pamh, error)
        return _code(pamh, error)
    finally:
        if svc is not None:
            svc.close_early()  # started for this login, and not taken (it failed before)


def pam_sm_setcred(pamh: Any, flags: int, argv: list[str]) -> int:
    # No credentials to establish at this layer (volume keys come with the session).
    try:
        logins = _tx(pamh).logins
        return int(pamh.PAM_SUCCESS if (pamh.user or "") in logins else pamh.PAM_IGNORE)
    except Exception as error:
        _log_failure("setcred", error)
        return _code(pamh, error)


def pam_sm_acct_mgmt(pamh: Any, flags: int, argv: list[str]) -> int:
    try:
        # Accounts this process logged in, and any directory account (however it was
        # authenticated): disabled or expired ones are refused. For other accounts this
        # module has nothing to say.
        svc = _service(ModuleArgs.parse(argv))
        decided = svc.account(_request(pamh, svc), _tx(pamh).logins.get(pamh.user or ""))
        return int(pamh.PAM_SUCCESS if decided else pamh.PAM_IGNORE)
    except ConfigError as error:
        return _config_broken(pamh, "acct_mgmt", error)
    except AuditWriteError as error:
        return _unaudited(pamh, "acct_mgmt", error)
    except Exception as error:
        _log_failure("acct_mgmt", error)
        _tell_user(pamh, error)
        return _code(pamh, error)


# --- sessions --------------------------------------------------------------------------
#
# PAM has no session id, so pam_sm_open_session makes one: TTY (or X display), this process
# id and a random token, e.g. "tty1:4242:9f3c2a1b5d7e0c48". XDG_SESSION_ID is not used as
# the id: it is not one per PAM handle (su or sudo inside a logind session carry the same
# one, and closing theirs would close the login's), and whether it is set depends on the
# stack's order; when present it goes into the session record. The id is kept in this
# Transaction (``sessions``) and in the PAM environment (SVMM_SESSION_ID), and close accepts
# it only for a session this process opened (the record holds the pid), since a PAM
# environment variable may come from somewhere a user can write.

SESSION_ENV = "SVMM_SESSION_ID"
# One SessionManager per LoginService; it shares the service's policy (loaded once).
_managers: dict[int, tuple[Any, Any]] = {}


def _session_manager(svc: Any) -> Any:
    with _services_lock:
        return _session_manager_for(svc)


def _session_manager_for(svc: Any) -> Any:
    held = _managers.get(id(svc))
    if held is None or held[0] is not svc:
        from ..services.session import SessionManager

        held = (svc, SessionManager(svc.config, policy=svc.policy))
        _managers.clear()
        _managers[id(svc)] = held
    return held[1]


def _env(pamh: Any, name: str) -> str:
    try:
        return str(pamh.env[name] or "")
    except (KeyError, pamh.exception):
        return ""  # unset, or an application without a PAM environment


def _new_session_id(pamh: Any) -> str:
    import re
    import secrets

    where = str(getattr(pamh, "xdisplay", None) or pamh.tty or "-")
    where = re.sub(r"[^A-Za-z0-9._-]", "_", where.removeprefix("/dev/"))[:32]
    return f"{where}:{_tx(pamh).app_pid()}:{secrets.token_hex(8)}"


def _session_subject(svc: Any, tx: Transaction, user: str) -> tuple[Any, Any, str]:
    """(SessionSubject or None, Attempt for the audit record, why there is no subject).

    The user's own login in this process when there is one. A directory account that
    another module authenticated gets no allowlist (the allowlist says how its holder
    logged in: card or password, by this module): audited, then ignored. Accounts this
    module knows nothing about: ("", no audit), ignored."""
    import pwd

    from ..services.auth import Attempt
    from ..services.session import SessionSubject

    result = tx.logins.get(user)
    if result is None:
        if not user or not svc.config.directory.enabled:
            return None, None, ""
        from ..errors import Undecided

        try:
            identity = svc._identity_by_name(user)
        except Undecided:
            return None, None, ""  # only asked to audit: no allowlist either way
        if identity is None:
            return None, None, ""
        return None, Attempt(user=user, identity=identity, method=""), "not_logged_in_by_svmm"
    attempt = Attempt(card=result.card, user=user, identity=result.identity, method=result.method)
    card = result.card if result.card.fingerprint else None
    if result.identity is not None:
        return SessionSubject.of(result.identity, card, result.method), attempt, ""
    # Mapped from the certificate alone (no directory): the uid comes from NSS, no roles.
    try:
        uid = pwd.getpwnam(user).pw_uid
    except KeyError:
        return None, attempt, "no_posix_account"
    return SessionSubject(user, uid, (), card, result.method), attempt, ""


def _release_volume_keys(
    svc: Any,
    tx: Transaction,
    manager: Any,
    request: Any,
    attempt: Any,
    user: str,
    sid: str,
    opened: Any,
) -> list[Any]:
    """The card releases the keys of the volumes this session may use; all or nothing: on a
    failure the session just counted is closed again and the error ends the session open."""
    if not svc.config.volumes.enabled:
        return []
    from ..services.login import _detail, outcome_of, reason_of

    login = tx.logins.get(user)

    def audit(event: str, outcome: Any, reason: str, vm: str, detail: str) -> None:
        svc.audit_event(event, request, attempt, outcome, reason, detail, vm=vm)

    try:
        return list(svc.key_release.release(opened.allowlist, login, sid, audit, pid=tx.app_pid()))
    except BaseException as e:
        with contextlib.suppress(Exception):
            manager.close(user, sid, pid=tx.app_pid())
        svc.audit_event(
            "session_open",
            request,
            attempt,
            outcome_of(e),
            reason_of(e),
            f"session {sid}: volume keys: {_detail(e)}",
        )
        raise
    finally:
        # The card's job in this session is done: log it out.
        if login is not None and getattr(login, "card_session", None) is not None:
            with contextlib.suppress(Exception):
                login.card_session.close()
            tx.logins[user] = replace(login, card_session=None)


def pam_sm_open_session(pamh: Any, flags: int, argv: list[str]) -> int:
    try:
        from ..domain.audit_record import Outcome
        from ..services.login import _detail, outcome_of, reason_of

        tx = _tx(pamh)
        svc = _service(ModuleArgs.parse(argv))
        if not svc.config.policy.enabled:
            return int(pamh.PAM_IGNORE)  # no VM policy here: no grants, no allowlist
        request = _request(pamh, svc)
        user = pamh.user or ""
        subject, attempt, why_not = _session_subject(svc, tx, user)
        if subject is None:
            if attempt is not None:
                svc.audit_event(
                    "session_open", request, attempt, Outcome.FAILURE, why_not, "no allowlist"
                )
            return int(pamh.PAM_IGNORE)
        manager = _session_manager(svc)
        sid = _new_session_id(pamh)
        from ..adapters.processes import start_time

        facts = {
            "pid": tx.app_pid(),
            "pid_start": start_time(tx.app_pid()),  # a pid alone gets reused
            "service": request.service,
            "tty": request.tty,
            "rhost": request.rhost,
            "logind_session": _env(pamh, "XDG_SESSION_ID"),
        }
        if attempt is not None and attempt.card.token_serial:
            # Pulling this card locks the session (launcher.card_removal_locks_sessions).
            facts["token_serial"] = attempt.card.token_serial
            facts["card_fingerprint"] = attempt.card.fingerprint
        try:
            try:
                opened = manager.open(subject, sid, now=svc.now(), facts=facts)
            finally:
                svc.audit_policy_loads(request.service)
        except BaseException as e:
            svc.audit_event(
                "session_open",
                request,
                attempt,
                outcome_of(e),
                reason_of(e),
                f"session {sid}: {_detail(e)}",
            )
            raise
        released = _release_volume_keys(svc, tx, manager, request, attempt, user, sid, opened)
        a = opened.allowlist
        held = "volumes open" if _dm_mode(svc) else "volume keys held"
        try:
            svc.audit_event(
                "session_open",
                request,
                attempt,
                Outcome.SUCCESS,
                "allowlist_written",
                f"session {sid}; {opened.sessions} open; allowlist {opened.path}: "
                f"{len(a.vms)} VMs ({', '.join(sorted(a.vms)) or 'none'}), "
                f"policy version {a.policy_version}, expires {a.expires_at.isoformat()}"
                + (f"; dropped (process gone): {', '.join(opened.pruned)}" if opened.pruned else "")
                + (f"; {held}: {', '.join(r.volume for r in released)}" if released else ""),
            )
        except BaseException:
            # A later step failed (the success record): undo what this session opened.
            if released:
                with contextlib.suppress(Exception):
                    svc.key_release.drop(a.uid, sid)
            with contextlib.suppress(Exception):
                manager.close(user, sid, pid=tx.app_pid())
            raise
        tx.sessions.setdefault(user, []).append(sid)
        with contextlib.suppress(Exception):
            pamh.env[SESSION_ENV] = sid
        return int(pamh.PAM_SUCCESS)
    except ConfigError as error:
        return _config_broken(pamh, "open_session", error)
    except AuditWriteError as error:
        return _unaudited(pamh, "open_session", error)
    except Exception as error:
        _log_failure("open_session", error)
        return int(getattr(pamh, pam_code_name(error, session=True)))


def _drop_volume_keys(svc: Any, request: Any, attempt: Any, uid: int, sid: str) -> None:
    """The session's volume keys leave the launcher's memory (audited either way)."""
    from ..domain.audit_record import Outcome
    from ..services.login import _detail, outcome_of, reason_of

    try:
        # session_closed: svmmd applies [launcher] on_last_logout if it was the last one.
        reply = svc.launcher_call(
            {"op": "drop_keys", "uid": uid, "session": sid, "session_closed": True}
        )
    except Exception as e:
        svc.audit_event(
            "key_drop",
            request,
            attempt,
            outcome_of(e),
            reason_of(e),
            f"session {sid}: {_detail(e)}",
        )
        return
    ok = bool(reply.get("ok"))
    svc.audit_event(
        "key_drop",
        request,
        attempt,
        Outcome.SUCCESS if ok else Outcome.ERROR,
        "dropped" if ok else str(reply.get("reason", "refused")),
        f"session {sid}",
    )


def _dm_mode(svc: Any) -> bool:
    from ..config import VolumeMode

    return bool(svc.config.volumes.mode is VolumeMode.DMCRYPT)


def _close_mappings(svc: Any, request: Any, attempt: Any, sid: str) -> None:
    """dm-crypt mode: the session's mappings that no other session holds are closed
    (services/dmcrypt.py); each close, deferred close or failure is audited."""
    from ..domain.audit_record import Outcome
    from ..services.login import _detail, outcome_of, reason_of

    try:
        events = svc.key_release.close_session(sid)
    except Exception as e:
        svc.audit_event("volume_close", request, attempt, outcome_of(e), reason_of(e),
                        f"session {sid}: {_detail(e)}")  # fmt: skip
        return
    for ev in events:
        svc.audit_event("volume_close", request, attempt,
                        Outcome.SUCCESS if ev.ok else Outcome.ERROR, ev.reason,
                        f"session {sid}; volume {ev.volume}: {ev.detail}")  # fmt: skip


def pam_sm_close_session(pamh: Any, flags: int, argv: list[str]) -> int:
    try:
        from ..domain.audit_record import Outcome
        from ..services.auth import Attempt
        from ..services.login import _detail, outcome_of, reason_of

        tx = _tx(pamh)
        user = pamh.user or ""
        mine = tx.sessions.get(user, [])
        from_env = _env(pamh, SESSION_ENV)
        candidates = [sid for sid in (from_env, *reversed(mine)) if sid]
        if not candidates:
            return int(pamh.PAM_IGNORE)  # not a session this module opened
        svc = _service(ModuleArgs.parse(argv))
        request = _request(pamh, svc)
        result = tx.logins.get(user)
        attempt = Attempt(
            card=result.card if result else Attempt().card,
            user=user,
            identity=result.identity if result else None,
            method=result.method if result else "",
        )
        manager = _session_manager(svc)
        closed = None
        sid = candidates[0]
        try:
            for sid in dict.fromkeys(candidates):
                closed = manager.close(user, sid, pid=tx.app_pid())
                if closed is not None:
                    break
        except BaseException as e:
            svc.audit_event(
                "session_close",
                request,
                attempt,
                outcome_of(e),
                reason_of(e),
                f"session {sid}: {_detail(e)}",
            )
            raise
        if closed is None:
            svc.audit_event(
                "session_close",
                request,
                attempt,
                Outcome.ERROR,
                "session_unknown",
                f"no open session {', '.join(candidates)} of {user} from this process",
            )
            return int(pamh.PAM_SESSION_ERR)
        if sid in mine:
            mine.remove(sid)
        last_logout = svc.config.launcher.on_last_logout.value != "keep"
        if svc.config.volumes.enabled or last_logout:
            # svmmd first: its last-logout action may stop the VMs that use the mappings.
            _drop_volume_keys(svc, request, attempt, closed.uid, sid)
        if svc.config.volumes.enabled and _dm_mode(svc):
            _close_mappings(svc, request, attempt, sid)
        if closed.remaining:
            what = f"{closed.remaining} still open; allowlist {closed.path} kept"
        else:
            what = f"last session: allowlist {closed.path} removed"
        svc.audit_event(
            "session_close",
            request,
            attempt,
            Outcome.SUCCESS,
            "allowlist_removed" if not closed.remaining else "session_closed",
            f"session {sid}; {what}",
        )
        return int(pamh.PAM_SUCCESS)
    except ConfigError as error:
        return _config_broken(pamh, "close_session", error)
    except AuditWriteError as error:
        return _unaudited(pamh, "close_session", error)
    except Exception as error:
        _log_failure("close_session", error)
        return int(getattr(pamh, pam_code_name(error, session=True)))


__all__ = [
    "ModuleArgs",
    "Transaction",
    "pam_sm_acct_mgmt",
    "pam_sm_authenticate",
    "pam_sm_close_session",
    "pam_sm_open_session",
    "pam_sm_setcred",
]
