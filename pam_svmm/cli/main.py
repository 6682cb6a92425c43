"""The `svmm` command: one parser, one table from errors to exit codes.

Each command group lives in its own module and registers its subcommands; `main()` runs the
chosen one and turns errors into a message on stderr and an exit code.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from ..errors import AuditTampered, AuthFailed, ConfigError, PinLocked, SvmmError, Undecided

# The ONE table from errors to exit codes (first match wins).
EXIT_OK = 0
EXIT_CODES: tuple[tuple[type[BaseException], int], ...] = (
    (PinLocked, 4),
    (AuthFailed, 1),  # the answer is no (a certificate fails, a login is refused)
    (AuditTampered, 1),  # the audit trail does not verify
    (Undecided, 3),  # could not find out
    (ConfigError, 5),
    (SvmmError, 6),
)
EXIT_USAGE = 2
EXIT_INTERNAL = 70  # EX_SOFTWARE: a bug
# The reader of our output went away (`svmm audit show | head -1`). 141 is 128 + SIGPIPE,
# what the shell reports for a C tool killed by the signal (`yes | head -1`): the output was
# cut short, so a `set -o pipefail` script must not take it for a complete answer (0 would
# claim that), and it is no error of ours to print (nothing goes to stderr).
EXIT_PIPE = 141

DISTRIBUTION = "pam_svmm"
PYPROJECT = Path(__file__).resolve().parents[2] / "pyproject.toml"


# Each command group's modules, in the order they register (certmap adds to cert's group).
# `svmm vm start` imports only cli/vm.py: a user's command at the shell pays for its own
# group, not for the certificate, policy and directory code of the others.
MODULES = ("cert", "certmap", "card", "crl", "doctor", "lab", "nss", "audit", "policy",
           "volume", "vm")  # fmt: skip
GROUPS: dict[str, tuple[str, ...]] = {
    "cert": ("cert", "certmap"), "card": ("card",), "crl": ("crl",), "doctor": ("doctor",),
    "lab": ("lab",), "id": ("nss",), "nss": ("nss",), "audit": ("audit",),
    "policy": ("policy",), "volume": ("volume",), "vm": ("vm",),
}  # fmt: skip
ENV_VAR = "SVMM_CONFIG"  # config.ENV_VAR, without importing the configuration reader


def version() -> str:
    """The installed distribution's version; in a checkout that is not installed, the one
    pyproject.toml declares."""
    import importlib.metadata
    import tomllib

    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        pass
    try:
        return str(tomllib.loads(PYPROJECT.read_text())["project"]["version"])
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        return "unknown"


def exit_code(error: BaseException) -> int:
    for cls, code in EXIT_CODES:
        if isinstance(error, cls):
            return code
    return EXIT_INTERNAL


class _Version(argparse.Action):
    """--version, reading the version only when asked."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kw: object) -> None:
        super().__init__(option_strings, dest, nargs=0, help="show the version and exit")

    def __call__(self, parser: argparse.ArgumentParser, *_: object) -> None:
        print(f"svmm {version()}")  # on stdout, as argparse's own "version" action
        parser.exit()


def chosen_group(argv: Sequence[str]) -> str | None:
    """The command group argv names (None: none, or one we do not know: help and errors
    need the whole parser)."""
    rest = list(argv)
    while rest:
        word = rest.pop(0)
        if word == "--config":
            rest = rest[1:]
        elif word.startswith("--config="):
            continue
        elif word.startswith("-"):
            return None
        else:
            return word if word in GROUPS else None
    return None


def build_parser(group: str | None = None) -> argparse.ArgumentParser:
    """The parser; ``group``: register only that command group's modules."""
    parser = argparse.ArgumentParser(
        prog="svmm", description="Smart-card identity for a secure VMM host."
    )
    parser.add_argument(
        "--config", help="configuration file (default: $SVMM_CONFIG or /etc/svmm/svmm.toml)"
    )
    parser.add_argument("--version", action=_Version)
    sub = parser.add_subparsers(dest="group", required=True, metavar="COMMAND")
    for name in GROUPS.get(group or "", MODULES):
        importlib.import_module(f"{__package__}.{name}").register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(chosen_group(argv))
    args = parser.parse_args(argv)
    # The command runs with its caller's rights, so the caller may choose the file; the PAM
    # module and svmmd never read the environment for it (config.resolve_path).
    args.config = args.config or os.environ.get(ENV_VAR) or None
    try:
        code = int(args.func(args) or EXIT_OK)
        sys.stdout.flush()  # a closed pipe shows here, not at the interpreter's exit
        return code
    except BrokenPipeError:
        _drop_stdout()
        return EXIT_PIPE
    except SvmmError as e:
        print(f"svmm: {e.message}", file=sys.stderr)
        return exit_code(e)
    except KeyboardInterrupt:
        return 130
    except Exception as e:
        # A bug: say what kind, keep the exit code distinct; run with SVMM_DEBUG=1 for a trace.
        if os.environ.get("SVMM_DEBUG"):
            raise
        print(f"svmm: internal error: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_INTERNAL


def _drop_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's final flush of what is still buffered
    cannot fail again ("Exception ignored ... BrokenPipeError" on stderr)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # no real stdout (a test's capture): nothing to protect
        pass


if __name__ == "__main__":
    sys.exit(main())
