"""Drive the real PAM stack from the lab and the tests.

Two PAM applications, both run as separate processes with pam_wrapper preloaded so PAM reads
the lab's service files instead of /etc/pam.d:

* ``pamclient.c``, built on first use: authenticate, acct_mgmt, setcred, and a JSON report of
  each code, every message the modules showed and the final PAM_USER;
* ``pamtester``, Debian's generic PAM test application, for whole-process runs.

The PIN always goes on stdin, never in argv. python-pam cannot be the client here: it would
load pam_python (and so a second Python runtime) into a Python process, which crashes.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .cbuild import build_c

PAM_WRAPPER_LIB = Path("/usr/lib/x86_64-linux-gnu/libpam_wrapper.so")
SOURCE = Path(__file__).with_name("pamclient.c")

# The PAM codes the tests and the demo talk about (Linux-PAM values).
CODE_NAMES = {
    0: "PAM_SUCCESS",
    3: "PAM_SERVICE_ERR",
    4: "PAM_SYSTEM_ERR",
    6: "PAM_PERM_DENIED",
    7: "PAM_AUTH_ERR",
    9: "PAM_AUTHINFO_UNAVAIL",
    10: "PAM_USER_UNKNOWN",
    11: "PAM_MAXTRIES",
    19: "PAM_CONV_ERR",
    25: "PAM_IGNORE",
}
PAM_ERROR_MSG = 3
PAM_TEXT_INFO = 4


def pam_env(service_dir: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment that makes a process use the lab's PAM service files."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PAM_WRAPPER", "LD_PRELOAD"))}
    env.update(
        {
            "LD_PRELOAD": str(PAM_WRAPPER_LIB),
            "PAM_WRAPPER": "1",
            "PAM_WRAPPER_SERVICE_DIR": str(service_dir),
        }
    )
    env.update(extra or {})
    return env


@dataclass(frozen=True)
class PamReport:
    code: int
    step: str  # the PAM call that gave ``code`` (authenticate, acct_mgmt, setcred)
    reason: str  # pam_strerror
    messages: tuple[str, ...]  # info and error messages (prompts excluded)
    prompts: tuple[str, ...]
    user: str  # PAM_USER at the end

    @property
    def name(self) -> str:
        return CODE_NAMES.get(self.code, str(self.code))

    @property
    def ok(self) -> bool:
        return self.code == 0


def build_client(out_dir: Path) -> Path:
    return build_c(SOURCE, out_dir, suffix="", libs=("-lpam",))


def run_client(
    client: Path,
    service_dir: Path,
    service: str,
    user: str,
    pin: str,
    *,
    env: dict[str, str] | None = None,
    timeout: float = 60,
) -> PamReport:
    proc = subprocess.run(
        [str(client), service, user],
        input=pin + "\n",
        capture_output=True,
        text=True,
        env=pam_env(service_dir, env),
        timeout=timeout,
        check=False,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(('{"messages"', '{"step"'))]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"PAM client failed ({proc.returncode}): {proc.stderr[-2000:]}")
    data = json.loads(lines[-1])
    msgs = data.get("messages", [])
    return PamReport(
        code=int(data["code"]),
        step=str(data.get("step", "")),
        reason=str(data.get("reason", "")),
        messages=tuple(m["text"] for m in msgs if m["style"] in (PAM_ERROR_MSG, PAM_TEXT_INFO)),
        prompts=tuple(m["text"] for m in msgs if m["style"] not in (PAM_ERROR_MSG, PAM_TEXT_INFO)),
        user=str(data.get("user", "")),
    )
