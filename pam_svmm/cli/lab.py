"""`svmm lab`: the built-in demo organisation (CA, responders, soft cards)."""

from __future__ import annotations

import argparse
import contextlib
import os
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("lab", help="the demo lab: soft cards, CA, responders")
    s = p.add_subparsers(dest="cmd", required=True, metavar="SUBCOMMAND")
    d = s.add_parser("demo", help="build the lab and log in with each demo card through PAM")
    d.add_argument("--dir", type=Path, default=Path(".lab"), help="lab folder (default .lab)")
    d.add_argument("--fresh", action="store_true", help="rebuild the lab from scratch")
    d.set_defaults(func=demo)
    sv = s.add_parser(
        "serve", help="run the lab's OCSP responder, CRL server and directory until stopped"
    )
    sv.add_argument("--dir", type=Path, default=Path(".lab"))
    sv.set_defaults(func=serve)
    sh = s.add_parser("shell", help="run a command with some demo cards inserted")
    sh.add_argument("--dir", type=Path, default=Path(".lab"))
    sh.add_argument(
        "--card",
        dest="cards",
        action="append",
        default=[],
        help="a card to insert (repeat for several: --card alice --card bob)",
    )
    sh.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")
    sh.set_defaults(func=shell)


def demo(args: argparse.Namespace) -> int:
    from ..lab.demo import run_demo

    return run_demo(args.dir, fresh=args.fresh)


def serve(args: argparse.Namespace) -> int:
    import signal
    import threading

    from ..lab.lab import Lab

    lab = Lab(args.dir)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with lab.responders() as (ocsp, crl):
        print(f"OCSP {ocsp.url}  CRLs {crl.url}  (Ctrl-C to stop)", flush=True)  # type: ignore[attr-defined]
        with contextlib.suppress(KeyboardInterrupt):
            stop.wait()
    return 0


def shell(args: argparse.Namespace) -> int:
    from ..lab.lab import Lab

    lab = Lab(args.dir)
    command = [c for c in args.command if c != "--"] or [os.environ.get("SHELL", "/bin/sh")]
    reader = lab.insert(*args.cards)
    env = dict(os.environ, SVMM_CONFIG=str(lab.config_path), **reader.env)
    os.execvpe(command[0], command, env)  # noqa: S606 - argv list, no shell
