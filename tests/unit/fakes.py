"""Stand-ins shared by the unit tests: pam_python's handle, the running VMs a card opened, a
policy source serving the example policy (or none)."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from pam_svmm.domain.policy import CompiledPolicy
from pam_svmm.errors import PolicyUnavailable, SvmmError

POLICY = Path(__file__).resolve().parents[2] / "config" / "policy.example.toml"


class PamError(Exception):
    """pam_python's ``pamh.exception``: carries the PAM code."""

    def __init__(self, code: int = 19) -> None:
        super().__init__(code)
        self.pam_result = code


class FakePamh:
    """The parts of pam_python's handle the shim and the entry use, with Linux-PAM's codes.

    ``answers``: what the person types at each prompt (None: prompts get no answer object,
    for tests whose service never prompts); an exhausted list is PAM_CONV_ERR. ``gate``:
    a conversation waits on it first (a slow person). Every message is kept in ``said``
    and, with its style, in ``shown``.
    """

    PAM_SUCCESS = 0
    PAM_SERVICE_ERR = 3
    PAM_SYSTEM_ERR = 4
    PAM_AUTH_ERR = 7
    PAM_AUTHINFO_UNAVAIL = 9
    PAM_USER_UNKNOWN = 10
    PAM_MAXTRIES = 11
    PAM_SESSION_ERR = 14
    PAM_CRED_ERR = 17
    PAM_CONV_ERR = 19
    PAM_IGNORE = 25
    PAM_PROMPT_ECHO_OFF = 1
    PAM_PROMPT_ECHO_ON = 2
    PAM_ERROR_MSG = 3
    PAM_TEXT_INFO = 4
    exception = PamError

    @dataclass
    class Message:
        msg_style: int
        msg: str

    def __init__(
        self,
        user: str | None = "alice",
        *,
        answers: list[str] | None = None,
        tty: str = "/dev/tty1",
    ) -> None:
        self.user = user
        self.service = "login"
        self.tty = tty
        self.rhost = ""
        self.xdisplay = None
        self.env: dict[str, str] = {}
        self.answers = None if answers is None else list(answers)
        self.said: list[str] = []
        self.shown: list[tuple[int, str]] = []
        self.gate: threading.Event | None = None

    def conversation(self, m: Any) -> Any:
        if self.gate is not None:
            self.gate.wait(10)
        self.said.append(m.msg)
        self.shown.append((m.msg_style, m.msg))
        if m.msg_style in (self.PAM_PROMPT_ECHO_OFF, self.PAM_PROMPT_ECHO_ON) and (
            self.answers is not None
        ):
            if not self.answers:
                raise PamError(self.PAM_CONV_ERR)
            return SimpleNamespace(resp=self.answers.pop(0))
        return None


@dataclass
class FakeVm:
    vm_id: str
    user: str = "alice"
    calls: list[str] = field(default_factory=list)
    fail: frozenset[str] = frozenset()

    def pause(self) -> None:
        self.calls.append("pause")
        if "pause" in self.fail:
            raise SvmmError("QMP stop failed")

    def stop(self) -> None:
        self.calls.append("stop")
        if "stop" in self.fail:
            raise RuntimeError("boom")


@dataclass
class FakeRegistry:
    by_card: dict[str, list[FakeVm]] = field(default_factory=dict)

    def vms_opened_by(self, card_serial: str) -> list[FakeVm]:
        return list(self.by_card.get(card_serial, []))


class StubPolicy:
    """The policy source a SessionManager reads: ``compiled``, or PolicyUnavailable for None."""

    host = "lab-host"

    def __init__(self, compiled: CompiledPolicy | None) -> None:
        self._compiled = compiled

    @property
    def compiled(self) -> CompiledPolicy:
        assert self._compiled is not None
        return self._compiled

    def current(self, *, refresh: bool = False) -> StubPolicy:
        if self._compiled is None:
            raise PolicyUnavailable("no accepted policy: test")
        return self
