"""svmmd as its own process, for the lab, the demo, the tests and the benchmarks.

`python -m pam_svmm.daemon.server --config TOML` with this interpreter. Its environment
decides which cards it sees (SOFTHSM2_CONF and pinguard's variables, as a reader's ``env``),
as a PAM process's own environment does in the in-process path. Its log goes to a file: a
pipe that nobody reads would block it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

START_TIMEOUT = 30.0


class SvmmdProcess:
    def __init__(self, config: Path, socket_path: Path, env: dict[str, str], log: Path) -> None:
        self.config, self.socket, self.env, self.log = config, socket_path, env, log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = START_TIMEOUT) -> SvmmdProcess:
        """Start it and wait until it listens. RuntimeError (with its log's tail) if not."""
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **self.env}
        with self.log.open("ab") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "pam_svmm.daemon.server", "--config", str(self.config)],
                env=env,
                cwd="/",
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"svmmd exited ({self.proc.returncode}): {self.tail()}")
            try:
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(str(self.socket))
                return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"svmmd did not listen within {timeout:.0f} s: {self.tail()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def tail(self) -> str:
        try:
            return " | ".join(self.log.read_text().strip().splitlines()[-3:])[-400:]
        except OSError:
            return "(no log)"

    def __enter__(self) -> SvmmdProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
