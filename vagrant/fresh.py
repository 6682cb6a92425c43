"""`tools/run fresh`: the README's two commands on a fresh Debian 12 root.

The suite once passed only on machines where someone had installed a package by hand. This
builds a minimal Debian 12 root (debootstrap --variant=minbase, nothing included; cached under
the e2e cache as fresh-base-KEY), copies it to a throw-away folder, clones the repository's
committed HEAD into /root/p (root's home, mode 0700, as on a real machine) and runs, inside it
with chroot and /proc, /sys, /dev bound in:

    bash tools/run test      (lint and the whole suite; tools/run installs what it needs)
    bash tools/run demo      (the lab's story)

Each stage prints its time; the last line is "fresh: N passed, M failed" over the stages.
Parts of the suite that cannot run in such a root skip, saying why, as on the host: the
device-mapper tests (this kernel has no device-mapper; the e2e guest runs them). KVM is not
used anywhere (QEMU runs under TCG). apt's downloads are kept between runs in the cache.

Standard library only (Debian's /usr/bin/python3, as root).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from guest import (  # noqa: E402 - guest.py sits beside this file, not in a package
    DEFAULT_CACHE,
    MIRROR,
    SUITE,
    Timings,
    chroot_mounts,
    copy_tree,
    digest,
    in_chroot,
    pip_env,
    prepare_chroot,
    run,
)

REPO = HERE.parent
COMMANDS = (("tools/run test", ["bash", "tools/run", "test"]),
            ("tools/run demo", ["bash", "tools/run", "demo"]))  # fmt: skip
APT_CONF_SKIP = {"docker-clean"}  # it deletes downloads after each install: keep the cache


def base_key() -> str:
    return digest({"suite": SUITE, "mirror": MIRROR, "variant": "minbase", "include": []})


def build_base(cache: Path, timings: Timings) -> Path:
    base = cache / f"fresh-base-{base_key()}"
    if base.is_dir():
        timings.add("debootstrap (minbase)", 0.0, "(cached)")
        return base
    tmp = base.with_suffix(".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    cache.mkdir(parents=True, exist_ok=True)
    with timings.stage("debootstrap (minbase)"):
        run(["debootstrap", "--variant=minbase", SUITE, str(tmp), MIRROR],
            stdout=subprocess.DEVNULL)  # fmt: skip
    tmp.rename(base)
    return base


def host_apt(root: Path) -> None:
    """The host's apt sources and settings: a fresh machine reaches the same registry."""
    etc = Path("/etc/apt")
    for name in ("sources.list.d", "trusted.gpg.d", "keyrings"):
        if (etc / name).is_dir():
            shutil.rmtree(root / "etc/apt" / name, ignore_errors=True)
            shutil.copytree(etc / name, root / "etc/apt" / name, symlinks=True)
    if (etc / "sources.list").exists():
        shutil.copy(etc / "sources.list", root / "etc/apt/sources.list")
    elif (etc / "sources.list.d").is_dir():
        (root / "etc/apt/sources.list").write_text("")  # debootstrap's own is replaced
    for conf in sorted((etc / "apt.conf.d").iterdir()):
        if conf.name not in APT_CONF_SKIP and conf.is_file():
            shutil.copy(conf, root / "etc/apt/apt.conf.d" / conf.name)
    (root / "etc/apt/apt.conf.d/docker-clean").unlink(missing_ok=True)


def chroot_step(root: Path, name: str, argv: Sequence[str], log: Path, timings: Timings) -> bool:
    env = pip_env(root) | {"CI": "true", "TERM": "dumb"}
    cmd = ["env", "-C", "/root/p", *argv]
    with timings.stage(name), log.open("w") as out:
        try:
            in_chroot(root, cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
            ok = True
        except subprocess.CalledProcessError as e:
            ok = False
            print(f"[fresh] {name}: exit {e.returncode}; last lines of {log}:", flush=True)
    tail = log.read_text(errors="replace").splitlines()[-15 if not ok else -3 :]
    print("\n".join(f"    {line}" for line in tail), flush=True)
    return ok


def _mounted_under(folder: Path) -> list[str]:
    mounts = Path("/proc/self/mounts").read_text().splitlines()
    points = [line.split()[1] for line in mounts if len(line.split()) > 1]
    return [p for p in points if p == str(folder) or p.startswith(f"{folder}/")]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="cache folder")
    p.add_argument("--keep", action="store_true", help="keep the root afterwards (its path)")
    p.add_argument("--only", choices=["test", "demo"], help="run one of the two commands")
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("fresh: run as root (debootstrap, chroot)", file=sys.stderr)
        return 2
    timings = Timings()
    t_all = time.monotonic()
    base = build_base(args.cache, timings)
    archives = args.cache / "fresh-apt-archives"
    (archives / "partial").mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="svmm-fresh-", dir="/var/tmp"))
    root = work / "root"
    logs = args.cache / "logs" / time.strftime("fresh-%Y%m%dT%H%M%S")
    logs.mkdir(parents=True, exist_ok=True)
    results: list[tuple[str, bool]] = []
    try:
        with timings.stage("copy the root"):
            copy_tree(base, root)
            prepare_chroot(root)
            host_apt(root)
        with timings.stage("clone HEAD into /root/p"):
            run(["git", "clone", "-q", str(REPO), str(root / "root/p")])
            os.chmod(root / "root", 0o700)
        apt_cache = root / "var/cache/apt/archives"
        # The root a mount point of its own, as on a real machine: else a private mount
        # namespace inside it cannot change "/"'s propagation (the NSS tests use one).
        run(["mount", "--bind", str(root), str(root)])
        with contextlib.ExitStack() as undo:
            undo.callback(subprocess.run, ["umount", "-l", str(root)], check=False)
            undo.enter_context(chroot_mounts(root))
            run(["mount", "--bind", str(archives), str(apt_cache)])
            try:
                for name, cmd in COMMANDS:
                    if args.only and not name.endswith(args.only):
                        continue
                    log = logs / (name.replace(" ", "-").replace("/", "-") + ".log")
                    results.append((name, chroot_step(root, name, cmd, log, timings)))
            finally:
                subprocess.run(["umount", "-l", str(apt_cache)], check=False)
    finally:
        if args.keep:
            print(f"[fresh] root kept: {root}")
        elif _mounted_under(work):
            # Never rmtree through a bind mount of the host's /dev or /proc.
            print(f"[fresh] {work} still has mounts ({_mounted_under(work)}); left in place")
        else:
            shutil.rmtree(work, ignore_errors=True)
    timings.add("total", time.monotonic() - t_all)
    print("\n[fresh] stages:\n" + timings.table())
    print("[fresh] not run in the fresh root: the device-mapper tests (no device-mapper in this "
          "kernel; tools/run e2e runs them in its guest). Logs: " + str(logs))  # fmt: skip
    passed = sum(ok for _n, ok in results)
    print(f"fresh: {passed} passed, {len(results) - passed} failed")
    return 0 if results and passed == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
