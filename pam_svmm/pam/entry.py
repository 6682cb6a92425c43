"""PAM glue: pamh -> plain values -> services -> one PAM code. Never raises into pam_python.

Module arguments (after the shim's path in the PAM rule):
    config=PATH   the TOML file (default /etc/svmm/svmm.toml)
    venv=PATH     read by the shim only
"""

from __future__ import annotations

import contextlib
import syslog
from dataclasses import dataclass, replace
from typing import Any

from .. import config as config_mod
from ..errors import ConversationFailed, NoCard
from ..services.auth import LoginRequest
from .codes import pam_code_name

# One LoginService per config file per process: `login` and `sudo` authenticate once,
# but a display manager's long-lived process authenticates many times.
_services: dict[tuple[str, int], Any] = {}
# Users this process authenticated (and how), for pam_sm_acct_mgmt / setcred.
_logins: dict[str, Any] = {}


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


def _service(args: ModuleArgs) -> Any:
    from ..services.login import LoginService

    path = config_mod.resolve_path(args.config)
    try:
        mtime = path.stat().st_mtime_ns
    except OSError:
        mtime = 0
    key = (str(path), mtime)
    svc = _services.get(key)
    if svc is None:
        svc = LoginService(config_mod.load(path))
        _services.clear()
        _services[key] = svc
    return svc


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


def _tell_user(pamh: Any, error: BaseException) -> None:
    from ..errors import SvmmError

    if not isinstance(error, SvmmError):
        return
    # If the application cannot show it, the code still says no.
    with contextlib.suppress(ConversationFailed):
        PamPrompter(pamh).error(error.message)


def pam_sm_authenticate(pamh: Any, flags: int, argv: list[str]) -> int:
    try:
        svc = _service(ModuleArgs.parse(argv))
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
        _logins[result.user] = result
        return int(pamh.PAM_SUCCESS)
    except Exception as error:
        _log_failure("authenticate", error)
        _tell_user(pamh, error)
        return _code(pamh, error)


def pam_sm_setcred(pamh: Any, flags: int, argv: list[str]) -> int:
    # No credentials to establish at this layer (volume keys come with the session).
    try:
        return int(pamh.PAM_SUCCESS if (pamh.user or "") in _logins else pamh.PAM_IGNORE)
    except Exception as error:
        _log_failure("setcred", error)
        return _code(pamh, error)


def pam_sm_acct_mgmt(pamh: Any, flags: int, argv: list[str]) -> int:
    try:
        # Accounts this process logged in, and any directory account (however it was
        # authenticated): disabled or expired ones are refused. For other accounts this
        # module has nothing to say.
        svc = _service(ModuleArgs.parse(argv))
        decided = svc.account(_request(pamh, svc), _logins.get(pamh.user or ""))
        return int(pamh.PAM_SUCCESS if decided else pamh.PAM_IGNORE)
    except Exception as error:
        _log_failure("acct_mgmt", error)
        _tell_user(pamh, error)
        return _code(pamh, error)


def pam_sm_open_session(pamh: Any, flags: int, argv: list[str]) -> int:
    return int(pamh.PAM_SUCCESS)


def pam_sm_close_session(pamh: Any, flags: int, argv: list[str]) -> int:
    return int(pamh.PAM_SUCCESS)


__all__ = [
    "ModuleArgs",
    "pam_sm_acct_mgmt",
    "pam_sm_authenticate",
    "pam_sm_close_session",
    "pam_sm_open_session",
    "pam_sm_setcred",
]
