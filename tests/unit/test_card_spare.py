"""svmmd's spare card helper: logins side by side start one helper each, never two.

A login takes the helper started ahead of it and has the next one started. When logins
arrive together, each found no spare and (before this test) each also started one, every
new spare closing the one before it unused: two card helper starts per login under load,
measured by bench/parallel_logins.py as twice the helper CPU of a lone login.
"""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace
from typing import Any

import pytest

from pam_svmm import config as config_mod
from pam_svmm.domain.audit_record import Outcome
from pam_svmm.services import login as login_mod
from pam_svmm.services.login import LoginService


class FakeHelper:
    started = 0
    lock = threading.Lock()

    def __init__(self, *_: Any, **__: Any) -> None:
        time.sleep(0.02)  # a start takes a while; logins arrive meanwhile
        with FakeHelper.lock:
            FakeHelper.started += 1
        self.closed = False

    def alive(self) -> bool:
        return not self.closed

    def close(self, *, wait: bool = False) -> None:
        self.closed = True


@pytest.fixture
def svc(monkeypatch: pytest.MonkeyPatch) -> LoginService:
    import pam_svmm.adapters.card_helper as card_helper

    FakeHelper.started = 0
    monkeypatch.setattr(card_helper, "CardHelper", FakeHelper)
    s = LoginService(config_mod.parse({}), card_helper=True)
    s.prefork = True
    return s


def _settle(svc: LoginService) -> None:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and any(
        t.name == "svmm-card-spare" for t in threading.enumerate()
    ):
        time.sleep(0.01)


def test_logins_side_by_side_start_at_most_one_spare(svc: LoginService) -> None:
    n = 20
    barrier = threading.Barrier(n)
    taken: list[Any] = []

    def login() -> None:
        barrier.wait()
        taken.append(svc.login_module())

    threads = [threading.Thread(target=login) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    _settle(svc)
    assert len({id(h) for h in taken}) == n  # never one helper for two logins
    assert FakeHelper.started <= n + 1  # each login's own, plus one spare ahead
    svc.close_spare()


def test_a_lone_login_still_leaves_a_spare_for_the_next(svc: LoginService) -> None:
    first = svc.login_module()
    _settle(svc)
    assert svc._spare is not None
    spare = svc._spare[1]
    second = svc.login_module()
    assert second is spare and second is not first
    _settle(svc)
    assert FakeHelper.started == 3  # first, the spare taken by second, the next spare
    svc.close_spare()


def test_an_old_spare_is_closed_not_used(
    svc: LoginService, monkeypatch: pytest.MonkeyPatch
) -> None:
    svc.login_module()
    _settle(svc)
    assert svc._spare is not None
    old = svc._spare[1]
    monkeypatch.setattr(login_mod, "SPARE_MAX_AGE", 0.0)
    fresh = svc.login_module()
    assert fresh is not old and old.closed
    _settle(svc)
    svc.close_spare()


class _Result:
    card_session = None
    notes = ()


def _login(svc: LoginService, monkeypatch: pytest.MonkeyPatch, fail_when: Any) -> list[Any]:
    """card_login with an authenticator that raises NoCard when ``fail_when(module)``."""
    from pam_svmm.errors import NoCard
    from pam_svmm.services.auth import LoginRequest

    seen: list[Any] = []

    class Auth:
        def __init__(self, module: Any) -> None:
            self.module = module

        def authenticate(self, request: Any, prompter: Any, attempt: Any, **_: Any) -> Any:
            seen.append(self.module)
            if fail_when(self.module, prompter):
                raise NoCard("the card was removed (CKR_DEVICE_REMOVED from slot 0)")
            return _Result()

    monkeypatch.setattr(svc, "authenticator", Auth)
    monkeypatch.setattr(svc, "audit_event", lambda *a, **k: seen.append(a[3]))
    prompter = SimpleNamespace(ask_secret=lambda prompt: "123456")
    svc.card_login(LoginRequest(service="login", pam_user="alice", host="h"), prompter=prompter)
    return seen


def test_a_card_swapped_since_the_spare_started_is_read_by_a_helper_started_now(
    svc: LoginService, monkeypatch: pytest.MonkeyPatch
) -> None:
    """svmmd's spare loaded the module before the card was swapped: OpenSC answers it
    CKR_DEVICE_REMOVED. Before any prompt, the login tries once more with a new helper."""
    svc.login_module().close()
    _settle(svc)
    assert svc._spare is not None
    spare = svc._spare[1]
    seen = _login(svc, monkeypatch, lambda m, p: getattr(m, "started_ahead", False))
    assert seen[0] is spare and spare.closed
    assert seen[1] is not spare and not getattr(seen[1], "started_ahead", False)
    assert seen[2:] == [Outcome.SUCCESS]  # one audit record, for the login that counted
    _settle(svc)
    svc.close_spare()


def test_no_second_try_once_the_person_was_asked(
    svc: LoginService, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pam_svmm.errors import NoCard

    svc.login_module().close()
    _settle(svc)

    def asked_then_gone(module: Any, prompter: Any) -> bool:
        prompter.ask_secret  # noqa: B018 - the PIN prompt was reached
        return True

    with pytest.raises(NoCard):
        _login(svc, monkeypatch, asked_then_gone)
    _settle(svc)
    svc.close_spare()


def test_a_spare_started_before_a_card_event_is_not_handed_out(svc: LoginService) -> None:
    """svmmd's card watch saw a card leave or come back (LoginService.card_changed): the
    spare loaded the module before it. The next login closes it and gets a helper started
    now; the spare is not closed at the event itself (the reader is going away then)."""
    svc.login_module().close()
    _settle(svc)
    assert svc._spare is not None
    stale = svc._spare[1]
    svc.card_changed()
    assert not stale.closed
    got = svc.login_module()
    assert got is not stale and stale.closed
    assert not getattr(got, "started_ahead", False)
    _settle(svc)
    assert svc._spare is not None
    nxt = svc._spare[1]
    assert svc.login_module() is nxt  # a spare started after the event is fine
    _settle(svc)
    svc.close_spare()
