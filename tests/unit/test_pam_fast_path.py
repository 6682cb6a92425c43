"""The fast path's protocol: pam/shim.py's client against svmmd's PAM responder, real socket.

The PAM functions svmmd runs are replaced by small stand-ins here (the real ones are
exercised through the real PAM stack in tests/integration/test_fast_path.py)."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from pam_svmm.daemon import pam_responder
from pam_svmm.daemon.server import serving
from pam_svmm.pam import entry
from pam_svmm.pam import shim as thin
from tests.unit.fakes import FakePamh

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the client accepts only root's svmmd")


def _authenticate(pamh: Any, flags: int, argv: list[str]) -> int:
    pin = pamh.conversation(pamh.Message(pamh.PAM_PROMPT_ECHO_OFF, "PIN for card: "))
    if pin.resp != "123456":
        pamh.conversation(pamh.Message(pamh.PAM_ERROR_MSG, "wrong PIN"))
        return pamh.PAM_AUTH_ERR
    pamh.svmm_transaction.logins["alice"] = pamh.svmm_transaction.pid
    pamh.user = "alice"
    return pamh.PAM_SUCCESS


def _open_session(pamh: Any, flags: int, argv: list[str]) -> int:
    if pamh.user not in pamh.svmm_transaction.logins:
        return pamh.PAM_SESSION_ERR
    pamh.env["SVMM_SESSION_ID"] = "tty1:1:abc"
    return pamh.PAM_SUCCESS


def _acct_mgmt(pamh: Any, flags: int, argv: list[str]) -> int:
    return 12345  # not a PAM code this side knows


STUB = SimpleNamespace(
    Transaction=entry.Transaction,
    pam_sm_authenticate=_authenticate,
    pam_sm_open_session=_open_session,
    pam_sm_acct_mgmt=_acct_mgmt,
)


@pytest.fixture
def svmmd(tmp_path: Path) -> Iterator[tuple[thin.ModuleOptions, pam_responder.PamResponder]]:
    responder = pam_responder.PamResponder(None)
    responder._entry = STUB  # type: ignore[assignment]
    sock = socket.socket(socket.AF_UNIX)
    path = tmp_path / "svmmd.sock"
    sock.bind(str(path))
    sock.listen()
    thin._token = None
    with serving(SimpleNamespace(), sock, responder):  # type: ignore[arg-type]
        yield thin.ModuleOptions(["shim", f"socket={path}"]), responder


def test_a_login_runs_in_svmmd_and_its_state_carries_to_the_session(svmmd: Any) -> None:
    options, responder = svmmd
    pamh = FakePamh(None, answers=["123456"])
    assert thin.call("authenticate", pamh, 0, options) == FakePamh.PAM_SUCCESS
    assert pamh.user == "alice" and pamh.shown == [(1, "PIN for card: ")]
    assert thin._token is not None and len(responder) == 1
    assert thin.call("open_session", pamh, 0, options) == FakePamh.PAM_SUCCESS
    assert pamh.env["SVMM_SESSION_ID"] == "tty1:1:abc"
    # The transaction is this process's: svmmd recorded our pid from the kernel.
    held = next(iter(responder._held.values()))
    assert held.pid == os.getpid() and held.transaction.logins["alice"] == os.getpid()


def test_wrong_pin_and_its_message_reach_the_application(svmmd: Any) -> None:
    options, _ = svmmd
    pamh = FakePamh(None, answers=["000000"])
    assert thin.call("authenticate", pamh, 0, options) == FakePamh.PAM_AUTH_ERR
    assert pamh.shown[-1] == (3, "wrong PIN") and pamh.user is None


def test_a_conversation_error_is_the_application_s_answer(svmmd: Any) -> None:
    options, _ = svmmd
    pamh = FakePamh(None, answers=[])  # the application cannot prompt
    assert thin.call("authenticate", pamh, 0, options) == FakePamh.PAM_SYSTEM_ERR


def test_a_token_of_another_process_is_not_its_transaction(svmmd: Any) -> None:
    options, responder = svmmd
    assert thin.call("authenticate", FakePamh(None, answers=["123456"]), 0, options) == 0
    token = thin._token
    held = responder._held[token]
    held.pid = 1  # as if init had authenticated: our pid no longer matches
    assert thin.call("open_session", FakePamh(user="alice"), 0, options) == 14
    assert thin._token != token  # a fresh, empty transaction


def test_unknown_result_codes_fail_closed(svmmd: Any) -> None:
    options, _ = svmmd
    assert thin.call("acct_mgmt", FakePamh(user="alice"), 0, options) == FakePamh.PAM_SYSTEM_ERR


def test_no_svmmd_means_run_in_process(tmp_path: Path) -> None:
    options = thin.ModuleOptions(["shim", f"socket={tmp_path / 'none.sock'}"])
    assert thin.call("authenticate", FakePamh(None), 0, options) is None


def test_svmmd_without_a_responder_means_run_in_process(tmp_path: Path) -> None:
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(tmp_path / "s.sock"))
    sock.listen()
    options = thin.ModuleOptions(["shim", f"socket={tmp_path / 's.sock'}"])
    with serving(SimpleNamespace(), sock):  # type: ignore[arg-type]
        assert thin.call("authenticate", FakePamh(None), 0, options) is None


def test_a_broken_reply_mid_call_fails_closed(tmp_path: Path) -> None:
    """After the request went out, anything but a result is an error, never a fallback."""
    path = tmp_path / "evil.sock"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.listen()

    def answer() -> None:
        conn, _ = server.accept()
        conn.recv(65536)
        conn.sendall(thin.encode({"conv.style": 1, "conv.text": "PIN: "}))
        conn.recv(65536)
        conn.sendall(thin.encode({"result": "PAM_SUCCESS"})[:-3])  # cut short
        conn.close()

    t = threading.Thread(target=answer)
    t.start()
    pamh = FakePamh(None, answers=["123456"])
    assert thin.call("authenticate", pamh, 0, thin.ModuleOptions(["s", f"socket={path}"])) == 4
    t.join(5)
    server.close()


def test_a_slow_pin_entry_does_not_hold_up_other_logins(svmmd: Any) -> None:
    options, _ = svmmd
    slow = FakePamh(None, answers=["123456"])
    slow.gate = threading.Event()  # this person has not typed their PIN yet
    result: list[int | None] = []
    t = threading.Thread(target=lambda: result.append(thin.call("authenticate", slow, 0, options)))
    t.start()
    time.sleep(0.2)
    other: list[int | None] = []
    t2 = threading.Thread(
        target=lambda: other.append(thin.call("acct_mgmt", FakePamh(None), 0, options))
    )
    t2.start()
    t2.join(5)
    served_meanwhile = not t2.is_alive()
    slow.gate.set()
    t2.join(10)
    assert served_meanwhile and other == [4]
    t.join(10)
    assert result == [0]


@pytest.mark.parametrize(
    "fields",
    [{"a": "b"}, {"call": "authenticate", "item.user": "alice", "empty": ""},
     {"conv.text": "PIN for Alice's card\n(\u00e9): ", "x": "=y=z"}, {}],
)  # fmt: skip
def test_frames_round_trip(fields: dict[str, str]) -> None:
    frame = thin.encode(fields)
    assert int.from_bytes(frame[:4], "big") == len(frame) - 4
    assert thin.decode(frame[4:]) == fields


@pytest.mark.parametrize("body", [b"no-equals", b"a=1\0a=2", b"\xff=1", b"=value", b"a=1\0\0b=2"])
def test_malformed_frames_are_refused(body: bytes) -> None:
    with pytest.raises(ValueError):
        thin.decode(body)


def test_what_cannot_be_sent_is_refused() -> None:
    for fields in ({"a": "x\0y"}, {"a=b": "1"}, {"": "1"}, {"a": "x" * 70000}):
        with pytest.raises(ValueError):
            thin.encode(fields)


def test_an_oversized_frame_is_refused_before_reading_it() -> None:
    data = [(thin.MAX_FRAME + 1).to_bytes(4, "big")]
    with pytest.raises(ValueError, match="too large"):
        thin.read_frame(lambda n: data.pop(0) if data else b"")


def test_a_launcher_request_still_works_beside_pam_calls(svmmd: Any) -> None:
    """svmmd tells the two protocols apart by the first byte: JSON lines are untouched."""
    options, _ = svmmd

    class Launcher:
        def handle(self, uid: int, line: bytes) -> Any:
            from pam_svmm.services.launcher import Reply

            return Reply(True, "ok", line.decode())

    sock = socket.socket(socket.AF_UNIX)
    path = Path(options.socket).with_name("l.sock")
    sock.bind(str(path))
    sock.listen()
    with serving(Launcher(), sock), socket.socket(socket.AF_UNIX) as c:  # type: ignore[arg-type]
        c.connect(str(path))
        c.sendall(b'{"op":"list"}\n{"op":"status"}\n')
        f = c.makefile("rb")
        assert b'{\\"op\\":\\"list\\"}' in f.readline()
        assert b"status" in f.readline()


def test_process_start_tells_a_reused_pid() -> None:
    assert pam_responder.process_start(os.getpid()) is not None
    assert pam_responder.process_start(2**22 + 7) is None


@pytest.mark.parametrize(
    "arg", ["daemom=off", "config", "config=", "socket", "debug", "venv=/opt/svmm/venv x"]
)
def test_an_unknown_or_malformed_module_argument_is_refused_and_named(
    arg: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A misspelt argument (`daemom=off`) was silently ignored: the module then ran with
    defaults the administrator did not mean. Now the call refuses and syslog names it."""
    said: list[str] = []
    monkeypatch.setattr(thin, "_syslog", said.append)
    argv = ["shim", "daemon=off", *arg.split(" ")]
    assert not thin.ModuleOptions(argv).valid
    pamh = FakePamh(None)
    pamh.PAM_AUTHINFO_UNAVAIL = 9  # type: ignore[attr-defined]
    pamh.user = "root"  # type: ignore[attr-defined]
    # Could not decide (shim.broken's table): root's password, after us, still works.
    assert thin.pam_sm_authenticate(pamh, 0, argv) == 9
    assert said and repr(arg.split(" ")[-1]) in said[0], said


def test_every_documented_module_argument_is_accepted() -> None:
    argv = ["shim", "config=/etc/svmm/svmm.toml", "daemon=required", "socket=/run/s", "venv=/v"]
    options = thin.ModuleOptions(argv)
    assert options.valid and (options.daemon, options.socket) == ("required", "/run/s")


def test_a_full_listen_backlog_is_busy_never_no_svmmd(tmp_path: Path) -> None:
    """Any local user can fill svmmd's listen backlog with idle connections. That must read
    as "svmmd busy" (an error), never as "no svmmd", which with daemon=auto would run the
    login in the PAM process, silently and unaudited by svmmd."""
    path = tmp_path / "busy.sock"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(path))
    server.listen(0)  # never accepted
    fillers = []
    try:
        while True:  # fill the backlog the way an attacker would
            c = socket.socket(socket.AF_UNIX)
            c.setblocking(False)
            try:
                c.connect(str(path))
            except BlockingIOError:
                c.close()
                break
            fillers.append(c)
        options = thin.ModuleOptions(["shim", f"socket={path}"])
        assert thin.call("authenticate", FakePamh(None), 0, options) == FakePamh.PAM_SYSTEM_ERR
    finally:
        for c in fillers:
            c.close()
        server.close()


def test_a_socket_nobody_listens_on_is_no_svmmd(tmp_path: Path) -> None:
    path = tmp_path / "stale.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # the file stays, nothing listens: ECONNREFUSED
    options = thin.ModuleOptions(["shim", f"socket={path}"])
    assert thin.call("authenticate", FakePamh(None), 0, options) is None


def test_the_request_budget_refills_with_time(tmp_path: Path) -> None:
    from pam_svmm.daemon import server as server_mod

    sock = socket.socket(socket.AF_UNIX)
    srv = server_mod.LauncherServer(SimpleNamespace(), sock)  # type: ignore[arg-type]
    try:
        burst = server_mod.REQUEST_BURST
        assert all(srv.admit_request(1000, now=100.0) for _ in range(burst))
        assert not srv.admit_request(1000, now=100.0)
        assert srv.admit_request(1001, now=100.0)  # another user has a budget of their own
        assert srv.admit_request(1000, now=100.0 + 1 / server_mod.REQUESTS_PER_SECOND)
        assert all(srv.admit_request(0, now=100.0) for _ in range(10 * burst))  # root
    finally:
        srv.server_close()
