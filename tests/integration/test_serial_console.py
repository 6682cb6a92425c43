"""The e2e serial driver (vagrant/serial_console.py, vagrant/e2e.py's Console) against real
programs on a pseudo-terminal bridged to a Unix socket, the way QEMU exposes a guest's
serial port: a root bash, and a stand-in for /bin/login that asks for a card's PIN.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import pty
import select
import signal
import socket
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "vagrant"))
serial_console = importlib.import_module("serial_console")
e2e = importlib.import_module("e2e")

pytestmark = pytest.mark.integration

# A stand-in for agetty + login + the module's PIN prompt: PIN 123456 gives a shell.
FAKE_LOGIN = r"""
while true; do
  printf '\nsvmm-guest login: '
  read -r user
  [ -n "$user" ] || continue
  printf 'PIN for %s ID card: ' "$user"
  stty -echo; read -r pin; stty echo; echo
  if [ "$pin" = 123456 ]; then
    echo "Linux svmm-guest"
    PS1="$user@svmm-guest:/\$ " bash --noprofile --norc -i
    continue
  fi
  sleep 0.2; echo; echo "Login incorrect"
done
"""


@contextlib.contextmanager
def serial_port(tmp_path: Path, argv: list[str]) -> Iterator[Path]:
    """``argv`` on a pty whose other side is a listening Unix socket (one client)."""
    path = tmp_path / "ttyS.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)
    pid, master = pty.fork()
    if pid == 0:  # the child: the program on the terminal
        env = {"PATH": "/usr/bin:/bin", "TERM": "dumb", "PS1": "# ", "HOME": str(tmp_path)}
        os.execvpe(argv[0], argv, env)  # noqa: S606 - argv list
    stop = threading.Event()

    def bridge() -> None:
        conn, _ = server.accept()
        with conn:
            while not stop.is_set():
                ready, _, _ = select.select([conn, master], [], [], 0.1)
                try:
                    if conn in ready:
                        data = conn.recv(4096)
                        if not data:
                            return
                        os.write(master, data)
                    if master in ready:
                        conn.sendall(os.read(master, 4096))
                except OSError:
                    return

    t = threading.Thread(target=bridge, daemon=True)
    t.start()
    try:
        yield path
    finally:
        stop.set()
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        t.join(5)
        os.close(master)
        server.close()


def test_root_shell_runs_commands_and_reports_their_status(tmp_path: Path) -> None:
    transcript = tmp_path / "t.log"
    bash = ["bash", "--noprofile", "--norc", "-i"]
    with serial_port(tmp_path, bash) as sock, transcript.open("w") as tr:
        port = serial_console.SerialConsole.connect(sock, transcript=tr, name="ttyS1")
        shell = serial_console.RootShell(port)
        shell.setup(timeout=20)
        assert shell.run("echo hello; echo __rc_fake_7__") == (0, "hello\n__rc_fake_7__")
        assert shell.run("printf 'a\\nb\\n'; false") == (1, "a\nb")
        with pytest.raises(RuntimeError, match="exited 3"):
            shell.check("exit_code() { return 3; }; exit_code")
        # A secret sent to a program reading it: not in the transcript.
        port.sendline("read -r -p 'PIN: ' x; echo len=${#x}")
        port.expect(r"PIN: $", 10)
        port.sendline("s3cr3t-pin", secret=True)
        port.expect(r"len=10", 10)
        port.close()
    text = transcript.read_text()
    assert "s3cr3t-pin" not in text and "<secret>" in text and "hello" in text


def test_expect_times_out_with_the_tail_of_the_output(tmp_path: Path) -> None:
    with serial_port(tmp_path, ["bash", "--noprofile", "--norc", "-i"]) as sock:
        port = serial_console.SerialConsole.connect(sock, name="t")
        port.sendline("echo nothing-to-see")
        with pytest.raises(serial_console.ExpectTimeout) as err:
            port.expect(r"never-printed", 1.5)
        assert "nothing-to-see" in err.value.tail
        port.sendline("exit")
        with pytest.raises((serial_console.ConsoleClosed, serial_console.ExpectTimeout)):
            port.expect(r"never-printed", 5)
        port.close()


def test_console_login_types_the_pin_and_tells_success_from_refusal(tmp_path: Path) -> None:
    with serial_port(tmp_path, ["bash", "--noprofile", "--norc", "-c", FAKE_LOGIN]) as sock:
        port = serial_console.SerialConsole.connect(sock, name="ttyS0")
        console = e2e.Console(port)
        ok, said = console.login("alice", "000000")
        assert not ok and "PIN for alice ID card: " in said and "Login incorrect" in said
        ok, said = console.login("alice", "123456")
        assert ok, said
        assert console.run('echo "[$PS1]"') == (0, f"[{e2e.PROMPT}]")
        code, out, asked = console.interactive(
            "read -r -s -p 'PIN for bob ID card: ' p; echo got=${#p}", "654321"
        )
        assert (code, asked) == (0, True) and out.strip().endswith("got=6")
        console.logout()
        ok, _ = console.login("bob", "123456")
        assert ok
        port.close()
