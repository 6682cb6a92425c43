"""Build and steer ``pinguard.c``, the PKCS#11 interposer that gives SoftHSM2 card behaviour.

SoftHSM2 has no PIN retry counter, lockout, pinpad or card removal (see pinguard.c). The lab
and the tests load the compiled interposer as their PKCS#11 module and set per-token state
files with the helpers below. The environment variables are read by the module in-process:
``SVMM_PINGUARD_MODULE`` (the real module) and ``SVMM_PINGUARD_STATE`` (the state directory).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .cbuild import build_c

SOURCE = Path(__file__).with_name("pinguard.c")
HEADER_DIR = "/usr/include/p11-kit-1"
ENV_MODULE = "SVMM_PINGUARD_MODULE"
ENV_STATE = "SVMM_PINGUARD_STATE"
DEFAULT_REAL_MODULE = "/usr/lib/softhsm/libsofthsm2.so"


def build_pinguard(
    out_dir: str | os.PathLike[str], *, cc: str = "gcc", default_state: Path | None = None
) -> Path:
    """Compile pinguard.c into ``out_dir`` (cached by source hash); return the .so path.

    ``default_state``: the state folder used when ``SVMM_PINGUARD_STATE`` is not set (a host
    whose login, su and sudo run the module without the lab's environment)."""
    state = () if default_state is None else (f'-DPINGUARD_DEFAULT_STATE="{default_state}"',)
    return build_c(
        SOURCE,
        out_dir,
        suffix=".so",
        flags=("-shared", "-fPIC", "-fvisibility=hidden", f"-I{HEADER_DIR}", *state),
        libs=("-ldl", "-lpthread"),
        cc=cc,
    )


# --- state files ----------------------------------------------------------------------------


def _state_file(state_dir: str | os.PathLike[str], token_serial: str) -> Path:
    serial = token_serial.rstrip(" ")
    if not re.fullmatch(r"[A-Za-z0-9]+", serial):
        raise ValueError(f"token serial {token_serial!r} is not alphanumeric")
    return Path(state_dir) / serial


def read_state(state_dir: str | os.PathLike[str], token_serial: str) -> dict[str, str]:
    """The key=value pairs of a token's state file (empty when there is none)."""
    try:
        text = _state_file(state_dir, token_serial).read_text()
    except FileNotFoundError:
        return {}
    pairs = (line.split("=", 1) for line in text.splitlines() if "=" in line)
    return {k: v for k, v in pairs}


def _update(state_dir: str | os.PathLike[str], token_serial: str, **changes: str | None) -> None:
    path = _state_file(state_dir, token_serial)
    state = read_state(state_dir, token_serial)
    for k, v in changes.items():
        if v is None:
            state.pop(k, None)
        else:
            state[k] = v
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text("".join(f"{k}={v}\n" for k, v in state.items()))
    os.replace(tmp, path)


def set_pin_tries(
    state_dir: str | os.PathLike[str], token_serial: str, max_tries: int, left: int | None = None
) -> None:
    """Give the token a user-PIN retry counter (``left`` defaults to ``max_tries``)."""
    left = max_tries if left is None else left
    if max_tries < 1 or not 0 <= left <= max_tries:
        raise ValueError("need max_tries >= 1 and 0 <= left <= max_tries")
    _update(state_dir, token_serial, max_tries=str(max_tries), tries_left=str(left))


def clear_pin_tries(state_dir: str | os.PathLike[str], token_serial: str) -> None:
    _update(state_dir, token_serial, max_tries=None, tries_left=None)


def set_pinpad(
    state_dir: str | os.PathLike[str], token_serial: str, pin_file: str | os.PathLike[str] | None
) -> None:
    """Mark the token as having a pinpad whose "keypad" is ``pin_file`` (None: no pinpad).

    Write the PIN with ``write_pinpad_pin``; a missing file makes a NULL-PIN login report
    that the user cancelled on the keypad.
    """
    if pin_file is not None and not os.path.isabs(pin_file):
        raise ValueError("pin_file must be an absolute path")
    _update(state_dir, token_serial, pinpad=None if pin_file is None else os.fspath(pin_file))


def write_pinpad_pin(pin_file: str | os.PathLike[str], pin: str) -> None:
    """Create the keypad file, readable by its owner only (pinguard refuses anything else)."""
    fd = os.open(pin_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(pin)
    os.chmod(pin_file, 0o600)


def set_removed(state_dir: str | os.PathLike[str], token_serial: str, removed: bool) -> None:
    """Pull the token out of its reader (True) or put it back (False)."""
    _update(state_dir, token_serial, removed="1" if removed else None)
