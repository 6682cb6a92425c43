"""The logind adapter: a process's session from its cgroup, and loginctl lock-session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pam_svmm.adapters import logind


@pytest.mark.parametrize(
    ("cgroup", "session"),
    [
        ("0::/user.slice/user-10001.slice/session-3.scope\n", "3"),
        ("0::/user.slice/user-0.slice/session-c12.scope/payload\n", "c12"),
        ("12:pids:/user.slice/user-1.slice/session-4.scope\n0::/init.scope\n", "4"),
        ("0::/system.slice/svmmd.service\n", None),  # a service: no session
        ("0::/user.slice/user-1.slice/user@1.service/app.slice/x.scope\n", None),
        ("0::/user.slice/session-x;rm.scope\n", None),  # not an id logind gives
    ],
)
def test_the_session_of_a_process_is_its_scope(tmp_path: Path, cgroup: str, session: str) -> None:
    (tmp_path / "42").mkdir()
    (tmp_path / "42" / "cgroup").write_text(cgroup)
    assert logind.session_of_pid(42, proc=str(tmp_path)) == session


def test_a_process_that_is_gone_is_in_no_session(tmp_path: Path) -> None:
    assert logind.session_of_pid(42, proc=str(tmp_path)) is None


def _loginctl(tmp_path: Path, body: str) -> str:
    script = tmp_path / "loginctl"
    script.write_text(f'#!/bin/sh\necho "$@" > {tmp_path}/args\n{body}\n')
    os.chmod(script, 0o700)
    return str(script)


def test_lock_session_asks_loginctl_for_that_session(tmp_path: Path) -> None:
    logind.lock_session("7", loginctl=_loginctl(tmp_path, "exit 0"))
    assert (tmp_path / "args").read_text() == "lock-session 7\n"


def test_a_refused_lock_says_what_loginctl_said(tmp_path: Path) -> None:
    fake = _loginctl(tmp_path, "echo 'Failed to issue method call: No session' >&2; exit 1")
    with pytest.raises(logind.LockFailed, match="exit 1: Failed to issue method call"):
        logind.lock_session("7", loginctl=fake)


@pytest.mark.parametrize("bad", ["", "7 8", "-h", "x" * 40, "../1"])
def test_only_a_session_id_reaches_loginctl(tmp_path: Path, bad: str) -> None:
    with pytest.raises(logind.LockFailed, match="not a logind session id"):
        logind.lock_session(bad, loginctl=_loginctl(tmp_path, "exit 0"))
    assert not (tmp_path / "args").exists()
