"""`svmm lab`: the built-in demo organisation (CA, responders, soft cards)."""

from __future__ import annotations

import argparse
import contextlib
import os
from pathlib import Path

from .common import lab as lab_module


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("lab", help="the demo lab: soft cards, CA, responders")
    s = p.add_subparsers(dest="cmd", required=True, metavar="SUBCOMMAND")
    d = s.add_parser("demo", help="build the lab and log in with each demo card through PAM")
    d.add_argument("--dir", type=Path, default=Path(".lab"), help="lab folder (default .lab)")
    d.add_argument("--fresh", action="store_true", help="rebuild the lab from scratch")
    d.set_defaults(func=demo)
    sv = s.add_parser(
        "serve",
        help="run the lab's OCSP responder, CRL server and directory until stopped",
        description="The lab's OCSP responder and CRL server, and its directory (slapd) when "
        "the demo or `svmm lab provision` built one, on the ports the lab recorded "
        "(<dir>/host.json): those its configuration names.",
    )
    sv.add_argument("--dir", type=Path, default=Path(".lab"))
    sv.add_argument(
        "--directory",
        action="store_true",
        help="fail unless the lab has a directory to run (the demo organisation's unit)",
    )
    sv.set_defaults(func=serve)
    pv = s.add_parser(
        "provision",
        help="install the demo organisation on this host (vagrant/provision.sh, the e2e guest)",
    )
    pv.add_argument("--dir", type=Path, default=Path("/var/lib/svmm/demo"))
    pv.add_argument("--config-out", type=Path, default=Path("/etc/svmm/svmm.toml"))
    pv.add_argument("--reader", action="append", default=[], help="a card in the host's reader")
    pv.add_argument("--volume-mode", choices=["vmm", "dm-crypt"], default="vmm")
    pv.set_defaults(func=provision)
    rd = s.add_parser("reader", help="the host's reader (svmm lab provision): cards in, pulled")
    rd.add_argument("--dir", type=Path, default=Path("/var/lib/svmm/demo"))
    rd.add_argument("cards", nargs="*", help="the cards the reader holds from now on")
    rd.add_argument("--pull", metavar="CARD", help="pull this card out (the launcher notices)")
    rd.add_argument("--back", metavar="CARD", help="put a pulled card back")
    rd.set_defaults(func=reader)
    cc = s.add_parser(
        "ccid-card",
        help="a demo card for QEMU's emulated CCID reader (PKCS#12 files for its NSS database)",
    )
    cc.add_argument("--dir", type=Path, default=Path("/var/lib/svmm/demo"))
    cc.add_argument("--out", type=Path, required=True, help="folder for the card's files")
    cc.add_argument("holder", help="the directory user the card is for")
    cc.set_defaults(func=ccid_card)
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
    run_demo = lab_module("demo").run_demo

    return run_demo(args.dir, fresh=args.fresh)


def serve(args: argparse.Namespace) -> int:
    import signal
    import threading
    from urllib.parse import urlsplit

    from ..errors import SvmmError

    Slapd = lab_module("directory").Slapd
    host_ports = lab_module("host").host_ports
    port_names = lab_module("host").port_names
    Lab = lab_module("lab").Lab
    ensure_free = lab_module("ports").ensure_free

    lab = Lab(args.dir)
    if not (lab.ca_dir / "config.json").exists():
        raise SvmmError(f"no lab in {lab.folder}: run `svmm lab demo` (tools/run demo) first")
    # The directory the demo (or `lab provision`) built, on the ports it recorded: the ones
    # the lab's configuration names.
    ports = host_ports(lab.folder)
    slapd = None
    if ports is not None and (lab.folder / "directory" / ".built").exists():
        slapd = Slapd(lab.folder / "directory", ca=lab.ca, port=ports.ldap, ldaps_port=ports.ldaps)
    elif args.directory:
        print(f"no directory in {lab.folder} (no host.json or directory/): run `svmm lab "
              "provision` or `svmm lab demo` first", flush=True)  # fmt: skip
        return 5
    named = {
        "the lab's CRL server": urlsplit(lab.ca.crl_base).port or 0,
        "the lab's OCSP responder": urlsplit(lab.ca.ocsp_url).port or 0,
    }
    if slapd is not None and ports is not None:
        named |= {k: v for k, v in port_names(ports).items() if "directory" in k}
    ensure_free(named, advice="a demo or another `svmm lab serve` runs the lab: stop it first")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with contextlib.ExitStack() as stack:
        ocsp, crl = stack.enter_context(lab.responders())
        print(f"OCSP {ocsp.url}  CRLs {crl.url}  (Ctrl-C to stop)", flush=True)
        if slapd is not None:
            stack.enter_context(slapd)
            print(f"directory {slapd.uri} (StartTLS), {slapd.base_dn}", flush=True)
        else:
            print(f"no directory in {lab.folder} (the demo builds one)", flush=True)
        _notify_ready()
        with contextlib.suppress(KeyboardInterrupt):
            stop.wait()
    return 0


def _notify_ready() -> None:
    """Tell systemd (Type=notify) that the services answer."""
    import socket

    path = os.environ.get("NOTIFY_SOCKET", "")
    if not path:
        return
    addr = "\0" + path[1:] if path.startswith("@") else path
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.sendto(b"READY=1", addr)


def provision(args: argparse.Namespace) -> int:
    provision_host = lab_module("host").provision

    cards = args.reader or ["alice"]
    out = provision_host(args.dir, args.config_out, reader=cards, volume_mode=args.volume_mode)
    print(f"demo organisation in {args.dir.resolve()}; configuration {out}; reader: "
          f"{', '.join(cards)}")  # fmt: skip
    return 0


def reader(args: argparse.Namespace) -> int:
    set_reader = lab_module("host").set_reader
    set_removed = lab_module("host").set_removed
    Lab = lab_module("lab").Lab

    lab = Lab(args.dir)
    if args.pull or args.back:
        set_removed(lab, args.pull or args.back, removed=bool(args.pull))
    else:
        set_reader(lab, args.cards)
    return 0


def ccid_card(args: argparse.Namespace) -> int:
    issue = lab_module("ccid").issue

    manifest = issue(args.dir, args.holder, args.out)
    print(", ".join(c["nickname"] for c in manifest["certs"]))
    return 0


def shell(args: argparse.Namespace) -> int:
    Lab = lab_module("lab").Lab

    lab = Lab(args.dir)
    command = [c for c in args.command if c != "--"] or [os.environ.get("SHELL", "/bin/sh")]
    reader = lab.insert(*args.cards)
    env = dict(os.environ, SVMM_CONFIG=str(lab.config_path), **reader.env)
    os.execvpe(command[0], command, env)  # noqa: S606 - argv list, no shell
