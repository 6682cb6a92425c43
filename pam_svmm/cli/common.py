"""What the commands share: the ``--json`` option and its printer, a C library's stderr.

``--json``: the command prints one JSON document (sorted keys) to stdout instead of its
text. Each command builds that document in one function (``*_json`` beside the command) and
prints its text from the same document, so the two cannot disagree. The shape is stable: keys
are added, never renamed or removed. A command that fails still prints its document (with
``"ok": false`` where it has one) before the error goes to stderr and the exit code says it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from ..errors import SvmmError

if TYPE_CHECKING:
    from ..adapters.token import Pkcs11Module
    from ..services.login import LoginService

JSON_HELP = "print one JSON document instead of text"


def lab(module: str) -> Any:
    """``svmm_lab.<module>``: the demo lab, which only a source checkout has.

    The Debian package installs the product without it; a lab command there says so instead
    of failing with an import error.
    """
    import importlib

    try:
        return importlib.import_module(f"svmm_lab.{module}")
    except ModuleNotFoundError as e:
        if e.name is None or not (e.name == "svmm_lab" or e.name.startswith("svmm_lab.")):
            raise
        raise SvmmError(
            "this needs the demo lab (svmm_lab), which a source checkout has and an installed"
            " host does not: run it from a checkout (tools/run demo)",
            reason="lab_not_installed",
        ) from None


def add_json(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help=JSON_HELP)


def print_json(doc: Any) -> None:
    print(json.dumps(doc, indent=1, sort_keys=True))


@contextlib.contextmanager
def c_stderr_captured() -> Iterator[list[str]]:
    """Send file descriptor 2 to a temporary file meanwhile; the list gets its lines after.

    PKCS#11 libraries print to the process's stderr as they load (the lab's pinguard says
    "pinguard: cannot load ...", a SoftHSM built with stderr logging its "SoftHSM.cpp(...)"
    lines): on a terminal those interleave with our output and say nothing our error does not.
    The CLI runs one thread, so nothing of ours is lost meanwhile (Python's own stderr is
    flushed first)."""
    lines: list[str] = []
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no fd 2 at all: nothing can leak
        yield lines
        return
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield lines
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            lines.extend(x for x in tmp.read(8192).decode("utf-8", "replace").splitlines() if x)


def _with_library_words(e: SvmmError, said: list[str]) -> SvmmError:
    """The error, with what the library printed while it failed (its own words help)."""
    if said:
        e.args = (f"{e.message} (the module said: {'; '.join(said)[:300]})", *e.args[1:])
    return e


def load_module(path: str) -> Pkcs11Module:
    """A PKCS#11 module, loaded with its stderr captured."""
    from ..adapters.token import Pkcs11Module

    said: list[str] = []
    try:
        with c_stderr_captured() as said:
            return Pkcs11Module(path)
    except SvmmError as e:  # ``said`` is complete once the block has left
        raise _with_library_words(e, said) from None


def service_module(svc: LoginService) -> Pkcs11Module:
    """``svc.module`` (loaded once, on first use) with its stderr captured."""
    said: list[str] = []
    try:
        with c_stderr_captured() as said:
            return svc.module
    except SvmmError as e:
        raise _with_library_words(e, said) from None
