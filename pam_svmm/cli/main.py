"""The `svmm` command: one parser, one table from errors to exit codes.

Each command group lives in its own module and registers its subcommands; `main()` runs the
chosen one and turns errors into a message on stderr and an exit code.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from .. import config as config_mod
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


def exit_code(error: BaseException) -> int:
    for cls, code in EXIT_CODES:
        if isinstance(error, cls):
            return code
    return EXIT_INTERNAL


def build_parser() -> argparse.ArgumentParser:
    from . import audit, card, cert, certmap, doctor, lab, nss, policy, vm, volume

    parser = argparse.ArgumentParser(
        prog="svmm", description="Smart-card identity for a secure VMM host."
    )
    parser.add_argument(
        "--config", help="configuration file (default: $SVMM_CONFIG or /etc/svmm/svmm.toml)"
    )
    sub = parser.add_subparsers(dest="group", required=True, metavar="COMMAND")
    for module in (cert, certmap, card, doctor, lab, nss, audit, policy, volume, vm):
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # The command runs with its caller's rights, so the caller may choose the file; the PAM
    # module and svmmd never read the environment for it (config.resolve_path).
    args.config = args.config or os.environ.get(config_mod.ENV_VAR) or None
    try:
        return int(args.func(args) or EXIT_OK)
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


if __name__ == "__main__":
    sys.exit(main())
