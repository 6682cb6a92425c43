"""An expect-style driver for a guest's serial console on a Unix socket (QEMU's
``-chardev socket,path=...,server=on``): wait for a regular expression with a timeout, send a
line, run a command on a root shell and get its exit status. Everything read and sent is
appended to a transcript file (secrets typed at a prompt are written as ``<secret>``).

Standard library only: the e2e runner uses Debian's /usr/bin/python3, without the product.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import socket
import time
from pathlib import Path
from typing import IO


class ExpectTimeout(TimeoutError):
    """The pattern did not appear in time; ``tail`` is the end of what was read."""

    def __init__(self, pattern: str, timeout: float, tail: str) -> None:
        super().__init__(f"no {pattern!r} within {timeout:.0f} s; last output: {tail[-400:]!r}")
        self.pattern = pattern
        self.tail = tail


class ConsoleClosed(ConnectionError):
    """The guest side went away (QEMU exited)."""


# Terminal escape sequences (colours, cursor moves) that agetty and bash print.
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][A-Za-z0-9]|\x1b[=>]")


def clean(text: str) -> str:
    """What a person would read: no escape sequences, no carriage returns."""
    return _ANSI.sub("", text).replace("\r", "")


class SerialConsole:
    """One serial port. ``buffer`` holds what was read but not yet consumed by ``expect``."""

    def __init__(
        self, sock: socket.socket, transcript: IO[str] | None = None, name: str = ""
    ) -> None:
        self.sock = sock
        self.sock.setblocking(False)
        self.transcript = transcript
        self.name = name
        self.buffer = ""

    @classmethod
    def connect(
        cls, path: Path, *, transcript: IO[str] | None = None, name: str = "", timeout: float = 30
    ) -> SerialConsole:
        """Connect to QEMU's listening socket (it may not exist yet)."""
        deadline = time.monotonic() + timeout
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(os.fspath(path))
                return cls(s, transcript, name)
            except (FileNotFoundError, ConnectionRefusedError):
                s.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    # --- transcript -------------------------------------------------------------------

    def _log(self, direction: str, text: str) -> None:
        if self.transcript is not None and text:
            self.transcript.write(text if direction == "<" else f"\u00ab{text}\u00bb")
            self.transcript.flush()

    def note(self, text: str) -> None:
        """A line in the transcript from the driver itself (what a step is about)."""
        if self.transcript is not None:
            self.transcript.write(f"\n### [{self.name}] {text}\n")
            self.transcript.flush()

    # --- reading and writing ----------------------------------------------------------

    def _read_some(self, wait: float) -> bool:
        import select

        ready, _, _ = select.select([self.sock], [], [], max(wait, 0))
        if not ready:
            return False
        try:
            data = self.sock.recv(65536)
        except BlockingIOError:
            return False
        if not data:
            raise ConsoleClosed(f"serial console {self.name} closed")
        text = data.decode("utf-8", errors="replace")
        self._log("<", text)
        self.buffer += clean(text)
        return True

    def expect(self, pattern: str | re.Pattern[str], timeout: float) -> re.Match[str]:
        """Wait until ``pattern`` matches the unread output; consume up to the match's end."""
        rx = re.compile(pattern) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        while True:
            m = rx.search(self.buffer)
            if m is not None:
                self.buffer = self.buffer[m.end() :]
                return m
            left = deadline - time.monotonic()
            if left <= 0:
                raise ExpectTimeout(rx.pattern, timeout, self.buffer)
            self._read_some(min(left, 0.5))

    def drain(self, quiet: float = 0.3, limit: float = 5.0) -> str:
        """Read until the guest is quiet for ``quiet`` seconds; return and consume it all."""
        end = time.monotonic() + limit
        while time.monotonic() < end and self._read_some(quiet):
            pass
        out, self.buffer = self.buffer, ""
        return out

    def send(self, text: str, *, secret: bool = False) -> None:
        self._log(">", "<secret>" if secret else text)
        data = text.encode()
        while data:
            try:
                n = self.sock.send(data)
            except BlockingIOError:
                time.sleep(0.01)
                continue
            data = data[n:]

    def sendline(self, line: str = "", *, secret: bool = False) -> None:
        # A serial terminal sends CR for Enter; the tty's ICRNL turns it into NL.
        self.send(line + "\r", secret=secret)


class RootShell:
    """A root shell on a serial port: run a command, get (exit status, output).

    Each command ends with an echo of a random marker and ``$?``; the marker in the echoed
    command line is followed by ``$?``, not digits, so only the real output matches."""

    def __init__(self, console: SerialConsole) -> None:
        self.console = console

    def setup(self, timeout: float = 60) -> None:
        """Wait for the shell, then turn off echo and the prompt so output is just output."""
        c = self.console
        deadline = time.monotonic() + timeout
        while True:
            c.sendline("")
            try:
                c.expect(r"[#$] ?$", 2)
                break
            except ExpectTimeout:
                if time.monotonic() > deadline:
                    raise
        c.sendline("stty -echo; export PS1='' PS2='' TERM=dumb; unset PROMPT_COMMAND")
        self.run("true", timeout=10)
        c.drain()

    def run(self, command: str, *, timeout: float = 60) -> tuple[int, str]:
        tag = secrets.token_hex(4)
        self.console.note(command)
        self.console.sendline(f"{command}; echo __rc_{tag}_$?__")
        m = self.console.expect(rf"(?s)(.*?)__rc_{tag}_(\d+)__\n?", timeout)
        return int(m.group(2)), m.group(1).strip("\n")

    def check(self, command: str, *, timeout: float = 60) -> str:
        code, out = self.run(command, timeout=timeout)
        if code != 0:
            raise RuntimeError(f"{command!r} exited {code}: {out[-1000:]}")
        return out
