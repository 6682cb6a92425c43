"""`svmm lab`: the built-in demo organisation (CA, responders, soft cards)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("lab", help="the demo lab: soft cards, CA, responders")
    s = p.add_subparsers(dest="cmd", required=True, metavar="SUBCOMMAND")
    d = s.add_parser("demo", help="build the lab and log in with each demo card through PAM")
    d.add_argument("--dir", type=Path, default=Path(".lab"), help="lab folder (default .lab)")
    d.add_argument("--fresh", action="store_true", help="rebuild the lab from scratch")
    d.set_defaults(func=demo)
    sh = s.add_parser("shell", help="run a command with some demo cards inserted")
    sh.add_argument("--dir", type=Path, default=Path(".lab"))
    sh.add_argument("cards", nargs="*", help="cards to insert (e.g. alice bob)")
    sh.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")
    sh.set_defaults(func=shell)


def demo(args: argparse.Namespace) -> int:
    from ..lab.demo import run_demo

    return run_demo(args.dir, fresh=args.fresh)


def shell(args: argparse.Namespace) -> int:
    from ..lab.lab import Lab

    lab = Lab(args.dir)
    command = [c for c in args.command if c != "--"] or [os.environ.get("SHELL", "/bin/sh")]
    reader = lab.insert(*args.cards)
    env = dict(os.environ, SVMM_CONFIG=str(lab.config_path), **reader.env)
    os.execvpe(command[0], command, env)  # noqa: S606 - argv list, no shell
