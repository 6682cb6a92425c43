"""The offline Debian 12 test guest: build it (debootstrap, packages, the product provisioned
by vagrant/provision.sh in a chroot, an ext4 image made without mounting) and boot it with
QEMU, its serial ports on Unix sockets.

    python3 vagrant/guest.py build [--cache DIR]     build or reuse every stage, print timings
    python3 vagrant/guest.py boot  [--cache DIR]     boot a throw-away overlay, wait for login:

Stages are cached under the cache folder, each keyed by a hash of what goes into it:

    base-KEY/      debootstrap (minbase, systemd, the Debian kernel and initramfs)
    pkgs-KEY/      + the product's Debian packages (provision.sh --phase packages)
    deb-KEY/       on the host: pam-svmm_V_amd64.deb built from the tree with debian/ (as
                   `tools/run deb` builds it, pip fetching the venv's wheels), and a second
                   build, V+e2e1 (a changelog entry in the copy), that the e2e upgrades to
    image-KEY/     disk.img (ext4, made with mke2fs -d), vmlinuz, initrd.img: + the package
                   installed with apt as README says, the demo organisation and the system
                   configuration (provision.sh), both .debs in /opt/svmm-e2e/debs

A change to the repository rebuilds the image (and the .debs when it touches what they are
built from); a change to the package list rebuilds from the packages stage. Each run boots
a qcow2 overlay on the cached image, so runs start clean. Standard library only (runs with
Debian's /usr/bin/python3 as root).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # svmm_lab.ccid: the emulated card's NSS database

from svmm_lab import ccid  # noqa: E402

PROVISION = HERE / "provision.sh"
DEFAULT_CACHE = Path(os.environ.get("SVMM_E2E_CACHE", "/var/cache/svmm-e2e"))
SUITE = "bookworm"
MIRROR = os.environ.get("SVMM_E2E_MIRROR", "http://deb.debian.org/debian")
BASE_INCLUDE = (
    "systemd-sysv",
    "udev",
    "kmod",
    "dbus",
    "linux-image-amd64",
    "initramfs-tools",
    "procps",
    "sudo",
    "ca-certificates",
)
# What goes into the image stage's key: the product, its configuration, the provisioning.
# What the image is made from (its cache key); tests/: the device-mapper tests run in it.
PRODUCT_PATHS = (
    "pam_svmm",
    "svmm_lab",
    "config",
    "tests",
    "vagrant/provision.sh",
    "pyproject.toml",
    "constraints.txt",
    "README.md",
)
# What the Debian package is built from (debian/rules and its install lists name these).
PACKAGE_PATHS = (
    "pam_svmm",
    "config",
    "debian",
    "man",
    "completion",
    "pyproject.toml",
    "constraints.txt",
    "README.md",
    "LICENSE",
)
UPGRADE_SUFFIX = "+e2e1"  # the second build's version: V+e2e1 sorts after V (dpkg)
# The e2e's own files in the guest, outside /opt/svmm (the package's, gone after a purge).
GUEST_E2E = "/opt/svmm-e2e"
GUEST_SRC = f"{GUEST_E2E}/src"  # where the repository is copied inside the guest
GUEST_DEBS = f"{GUEST_E2E}/debs"  # the two .debs and debs.json
CCID_CARD = "/var/lib/svmm/ccid-card"  # provision.sh's emulated card files, moved out
HOST_CA = "/etc/ssl/certs/ca-certificates.crt"
BUILD_CA = "/root/.svmm-build-ca.crt"  # the host's CA bundle, for pip in the chroot only


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# --- keys ---------------------------------------------------------------------------------


def digest(obj: object) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def tree_digest(root: Path, paths: Sequence[str]) -> str:
    """A hash of the files under ``paths`` (names and contents; caches and builds skipped)."""
    h = hashlib.sha256()
    for top in paths:
        p = root / top
        files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
        for f in files:
            rel = f.relative_to(root).as_posix()
            if "__pycache__" in rel or rel.endswith((".pyc", ".so")) or "/." in f"/{rel}":
                continue
            h.update(rel.encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def provision_packages(script: Path = PROVISION) -> list[str]:
    """The Debian packages provision.sh installs (its PACKAGES=( ... ) array)."""
    m = re.search(r"^PACKAGES=\(\n(.*?)^\)", script.read_text(), re.S | re.M)
    if m is None:
        raise ValueError(f"no PACKAGES=( ... ) array in {script}")
    body = re.sub(r"#.*", "", m.group(1))
    return body.split()


@dataclass(frozen=True)
class Keys:
    base: str
    pkgs: str
    deb: str
    image: str

    @classmethod
    def compute(cls, repo: Path = REPO) -> Keys:
        base = digest(
            {"suite": SUITE, "mirror": MIRROR, "variant": "minbase", "include": BASE_INCLUDE}
        )
        pkgs = digest(
            {"base": base, "packages": provision_packages(repo / "vagrant" / "provision.sh")}
        )
        deb = digest({"tree": tree_digest(repo, PACKAGE_PATHS), "upgrade": UPGRADE_SUFFIX})
        image = digest({"pkgs": pkgs, "deb": deb, "tree": tree_digest(repo, PRODUCT_PATHS)})
        return cls(base, pkgs, deb, image)


# --- the Debian package ---------------------------------------------------------------------


CHANGELOG_TOP = re.compile(
    r"(?P<package>\S+) \((?P<version>[^)]+)\) (?P<dist>[^;]+); (?P<urgency>.+)"
)


def changelog_version(text: str) -> str:
    """The version of the newest entry of a debian/changelog."""
    m = CHANGELOG_TOP.match(text)
    if m is None:
        raise ValueError("debian/changelog does not start with an entry")
    return m.group("version")


def bumped_changelog(text: str, version: str, when: str) -> str:
    """debian/changelog with an entry for ``version`` on top (same package, distribution,
    urgency and maintainer as the newest entry)."""
    m = CHANGELOG_TOP.match(text)
    maint = re.search(r"^ -- (.+?>)  ", text, re.M)
    if m is None or maint is None:
        raise ValueError("debian/changelog does not start with an entry")
    return (
        f"{m.group('package')} ({version}) {m.group('dist')}; {m.group('urgency')}\n\n"
        f"  * e2e only (vagrant/guest.py): the tree of {m.group('version')} under a newer\n"
        f"    version, to upgrade a host over it. Never published.\n\n"
        f" -- {maint.group(1)}  {when}\n\n{text}"
    )


def build_debs(repo: Path, out: Path, build_log: Path) -> dict[str, str]:
    """pam-svmm built twice with debian/ (dpkg-buildpackage -b, as `tools/run deb` does; its
    lintian check is that command's), in a copy of ``PACKAGE_PATHS``: as the changelog says
    (V), then with an entry V+e2e1 on top. The .debs go to ``out``; returns debs.json's
    content: {"version", "deb", "upgrade_version", "upgrade_deb"}."""
    with tempfile.TemporaryDirectory(prefix="svmm-deb-") as d, build_log.open("w") as blog:
        src = Path(d) / "src"
        copy_paths(repo, src, PACKAGE_PATHS)
        changelog = src / "debian" / "changelog"
        version = changelog_version(changelog.read_text())
        upgrade = version + UPGRADE_SUFFIX
        for v in (version, upgrade):
            if v == upgrade:
                when = time.strftime("%a, %d %b %Y %H:%M:%S +0000", time.gmtime())
                changelog.write_text(bumped_changelog(changelog.read_text(), upgrade, when))
            t0 = time.monotonic()
            proc = subprocess.run(
                ["dpkg-buildpackage", "-b", "--no-sign"],
                cwd=src,
                stdin=subprocess.DEVNULL,
                stdout=blog,
                stderr=subprocess.STDOUT,
                check=False,
            )
            if proc.returncode != 0:
                blog.flush()
                tail = build_log.read_text().splitlines()[-30:]
                raise RuntimeError(
                    f"dpkg-buildpackage of {v} failed ({build_log}):\n" + "\n".join(tail)
                )
            log(f"[guest] pam-svmm {v}: built in {time.monotonic() - t0:.0f} s")
        names = {}
        for v in (version, upgrade):
            (deb,) = Path(d).glob(f"pam-svmm_{v}_*.deb")
            shutil.move(deb, out / deb.name)
            names[v] = deb.name
    return {
        "version": version,
        "deb": names[version],
        "upgrade_version": upgrade,
        "upgrade_deb": names[upgrade],
    }


def copy_paths(repo: Path, dst: Path, paths: Sequence[str]) -> None:
    """The files under ``paths`` of ``repo`` into ``dst`` (caches, byte code, builds and
    dot files left out)."""
    dst.mkdir(parents=True, exist_ok=True)
    for top in paths:
        src = repo / top
        if src.is_dir():
            shutil.copytree(
                src,
                dst / top,
                ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.so", ".*"),
                dirs_exist_ok=True,
            )
        else:
            (dst / top).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / top)


# --- timing -----------------------------------------------------------------------------


@dataclass
class Timings:
    rows: list[tuple[str, float, str]] = field(default_factory=list)

    @contextlib.contextmanager
    def stage(self, name: str, note: str = "") -> Iterator[None]:
        log(f"[guest] {name} ...")
        t0 = time.monotonic()
        yield
        self.add(name, time.monotonic() - t0, note)

    def add(self, name: str, seconds: float, note: str = "") -> None:
        self.rows.append((name, seconds, note))
        log(f"[guest] {name}: {seconds:.1f} s {note}")

    def table(self) -> str:
        return "\n".join(f"  {n:<28} {s:8.1f} s  {note}" for n, s, note in self.rows)


# --- chroot -----------------------------------------------------------------------------


def run(argv: Sequence[str], **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), check=True, text=True, **kw)  # type: ignore[call-overload]


@contextlib.contextmanager
def chroot_mounts(root: Path) -> Iterator[None]:
    """/proc, /sys, /dev, /dev/pts and /dev/shm of the host, bound into ``root`` meanwhile."""
    mounted: list[Path] = []
    try:
        for src, fstype in (
            ("/proc", "proc"),
            ("/sys", "sysfs"),
            ("/dev", None),
            ("/dev/pts", None),
            ("/dev/shm", None),  # noqa: S108 - bound, not written
        ):
            target = root / src.lstrip("/")
            target.mkdir(parents=True, exist_ok=True)
            if fstype is None:
                run(["mount", "--bind", src, str(target)])
            else:
                run(["mount", "-t", fstype, fstype, str(target)])
            mounted.append(target)
        yield
    finally:
        for target in reversed(mounted):
            subprocess.run(["umount", "-l", str(target)], check=False)


def pip_env(root: Path, environ: dict[str, str] | None = None) -> dict[str, str]:
    """The host's pip settings for pip in the chroot ``root``: PIP_* variables, with the
    certificate pointing to the copy of the host's CA bundle (a TLS-intercepting proxy's CA
    included); local folders of wheels the chroot does not have are left out."""
    environ = dict(os.environ) if environ is None else environ
    env = {k: v for k, v in environ.items() if k.startswith("PIP_")}
    for key in ("PIP_FIND_LINKS",):
        links = [
            p for p in env.get(key, "").split() if "://" in p or (root / p.lstrip("/")).is_dir()
        ]
        if links:
            env[key] = " ".join(links)
        else:
            env.pop(key, None)
    env["PIP_CERT"] = BUILD_CA
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def in_chroot(
    root: Path, argv: Sequence[str], *, env: dict[str, str] | None = None, **kw: object
) -> None:
    base = {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": "/root",
        "LANG": "C.UTF-8",
        "DEBIAN_FRONTEND": "noninteractive",
    }
    run(["chroot", str(root), *argv], env=base | (env or {}), **kw)


def prepare_chroot(root: Path) -> None:
    """Name resolution, the host's pip settings and CA bundle, and no service starts."""
    shutil.copy("/etc/resolv.conf", root / "etc" / "resolv.conf")
    if Path("/etc/pip.conf").exists():
        shutil.copy("/etc/pip.conf", root / "etc" / "pip.conf")
    if Path(HOST_CA).exists():
        shutil.copy(HOST_CA, root / BUILD_CA.lstrip("/"))
    policy = root / "usr" / "sbin" / "policy-rc.d"
    policy.write_text("#!/bin/sh\n# no service starts in the build chroot\nexit 101\n")
    policy.chmod(0o755)


def finish_chroot(root: Path) -> None:
    for p in ("usr/sbin/policy-rc.d", BUILD_CA.lstrip("/")):
        (root / p).unlink(missing_ok=True)
    (root / "etc" / "resolv.conf").write_text("")  # the guest is offline
    shutil.rmtree(root / "var" / "cache" / "apt" / "archives", ignore_errors=True)
    (root / "var" / "cache" / "apt" / "archives" / "partial").mkdir(parents=True, exist_ok=True)


def copy_tree(src: Path, dst: Path) -> None:
    run(["cp", "-a", "--reflink=auto", str(src), str(dst)])


# --- stages -----------------------------------------------------------------------------


@dataclass
class Guest:
    cache: Path
    keys: Keys
    timings: Timings = field(default_factory=Timings)

    @property
    def base_dir(self) -> Path:
        return self.cache / f"base-{self.keys.base}"

    @property
    def pkgs_dir(self) -> Path:
        return self.cache / f"pkgs-{self.keys.pkgs}"

    @property
    def deb_dir(self) -> Path:
        return self.cache / f"deb-{self.keys.deb}"

    @property
    def image_dir(self) -> Path:
        return self.cache / f"image-{self.keys.image}"

    def build(self) -> Path:
        self.cache.mkdir(parents=True, exist_ok=True)
        if not self.base_dir.is_dir():
            self._debootstrap()
        else:
            self.timings.add("debootstrap", 0.0, "(cached)")
        if not self.pkgs_dir.is_dir():
            self._packages()
        else:
            self.timings.add("packages", 0.0, "(cached)")
        if not (self.deb_dir / "debs.json").exists():
            self._debs()
        else:
            self.timings.add("deb build (2 versions)", 0.0, "(cached)")
        if not (self.image_dir / "disk.img").exists():
            self._image()
        else:
            for name in (
                "copy rootfs",
                "apt install .deb + tests",
                "demo org + system",
                "disk image",
            ):
                self.timings.add(name, 0.0, "(cached)")
        self._prune()
        return self.image_dir

    def _debootstrap(self) -> None:
        tmp = self.cache / f"base-{self.keys.base}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        with self.timings.stage("debootstrap"):
            run(
                [
                    "debootstrap",
                    "--variant=minbase",
                    f"--include={','.join(BASE_INCLUDE)}",
                    SUITE,
                    str(tmp),
                    MIRROR,
                ],
                stdout=subprocess.DEVNULL,
            )
        tmp.rename(self.base_dir)

    def _packages(self) -> None:
        tmp = self.cache / f"pkgs-{self.keys.pkgs}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        with self.timings.stage("packages"):
            copy_tree(self.base_dir, tmp)
            self._copy_source(tmp)
            prepare_chroot(tmp)
            with chroot_mounts(tmp):
                in_chroot(tmp, [f"{GUEST_SRC}/vagrant/provision.sh", "--phase", "packages"])
            finish_chroot(tmp)
        tmp.rename(self.pkgs_dir)

    def _debs(self) -> None:
        tmp = self.cache / f"deb-{self.keys.deb}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        with self.timings.stage("deb build (2 versions)"):
            manifest = build_debs(REPO, tmp, tmp / "build.log")
        (tmp / "debs.json").write_text(json.dumps(manifest, indent=1) + "\n")
        tmp.rename(self.deb_dir)

    def _image(self) -> None:
        work = self.cache / f"image-{self.keys.image}.root"
        out = self.cache / f"image-{self.keys.image}.tmp"
        for d in (work, out):
            shutil.rmtree(d, ignore_errors=True)
        with self.timings.stage("copy rootfs"):
            copy_tree(self.pkgs_dir, work)
        self._copy_source(work)
        debs = work / GUEST_DEBS.lstrip("/")
        debs.mkdir(parents=True)
        manifest = json.loads((self.deb_dir / "debs.json").read_text())
        for name in (manifest["deb"], manifest["upgrade_deb"], "debs.json"):
            shutil.copy(self.deb_dir / name, debs / name)
        prepare_chroot(work)
        try:
            with chroot_mounts(work):
                with self.timings.stage("apt install .deb + tests"):
                    in_chroot(
                        work,
                        [
                            f"{GUEST_SRC}/vagrant/provision.sh",
                            "--phase",
                            "product",
                            "--deb",
                            f"{GUEST_DEBS}/{manifest['deb']}",
                            "--phase",
                            "tests",
                        ],
                        env=pip_env(work),
                    )
                with self.timings.stage("demo org + system"):
                    in_chroot(
                        work,
                        [
                            f"{GUEST_SRC}/vagrant/provision.sh",
                            "--phase",
                            "demo",
                            "--phase",
                            "system",
                            "--phase",
                            "guest",
                            "--no-start",
                        ],
                    )
            finish_chroot(work)
            out.mkdir()
            shutil.copy(self.deb_dir / "debs.json", out / "debs.json")
            # The CCID card's keys belong on the host running QEMU (its NSS database),
            # not on the guest's disk.
            card = work / CCID_CARD.lstrip("/")
            if card.is_dir():
                shutil.move(str(card), out / "ccid-card")
            with self.timings.stage("disk image"):
                self._kernel(work, out)
                make_ext4(work, out / "disk.img")
            out.rename(self.image_dir)
        finally:
            shutil.rmtree(work, ignore_errors=True)
            shutil.rmtree(out, ignore_errors=True)

    @staticmethod
    def _copy_source(root: Path) -> None:
        dst = root / GUEST_SRC.lstrip("/")
        shutil.rmtree(dst, ignore_errors=True)
        copy_paths(REPO, dst, PRODUCT_PATHS)

    @staticmethod
    def _kernel(root: Path, out: Path) -> None:
        boot = root / "boot"
        kernels = sorted(boot.glob("vmlinuz-*"))
        if not kernels:
            raise RuntimeError(f"no kernel in {boot}")
        version = kernels[-1].name.removeprefix("vmlinuz-")
        shutil.copy(boot / f"vmlinuz-{version}", out / "vmlinuz")
        shutil.copy(boot / f"initrd.img-{version}", out / "initrd.img")
        (out / "kernel-version").write_text(version + "\n")

    def _prune(self) -> None:
        """Drop stages of other keys (a cache holds one generation of each)."""
        keep = {self.base_dir.name, self.pkgs_dir.name, self.deb_dir.name, self.image_dir.name}
        for p in self.cache.iterdir():
            if p.name.split("-")[0] in ("base", "pkgs", "deb", "image") and p.name not in keep:
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)


def make_ext4(root: Path, image: Path, *, headroom_mb: int = 1536) -> None:
    """An ext4 image holding ``root``, without mounting anything (mke2fs -d)."""
    used = int(run(["du", "-sxm", str(root)], capture_output=True).stdout.split()[0])
    size_mb = used + headroom_mb
    run(
        [
            "mke2fs",
            "-q",
            "-F",
            "-t",
            "ext4",
            "-L",
            "svmm-root",
            "-E",
            "root_owner=0:0",
            "-d",
            str(root),
            str(image),
            f"{size_mb}M",
        ]
    )


# --- booting ------------------------------------------------------------------------------


KVM_CPU = "host,arch-capabilities=off"  # some nested hosts refuse the MSR "host" sets


def kvm_usable(image_dir: Path, *, timeout: float = 8.0) -> bool:
    """Whether a KVM guest really runs here: /dev/kvm opens, and the guest kernel prints its
    banner on the serial port in time. (Some nested hosts open /dev/kvm but hang the guest
    once it enters long mode.)"""
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    argv = [
        "qemu-system-x86_64",
        "-m",
        "256",
        "-enable-kvm",
        "-cpu",
        KVM_CPU,
        "-kernel",
        str(image_dir / "vmlinuz"),
        "-append",
        "console=ttyS0 earlyprintk=serial,ttyS0,115200 panic=-1",
        "-display",
        "none",
        "-monitor",
        "none",
        "-nic",
        "none",
        "-no-reboot",
        "-serial",
        "stdio",
    ]
    proc = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    assert proc.stdout is not None
    os.set_blocking(proc.stdout.fileno(), False)
    seen = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            chunk = proc.stdout.read() or b""
            seen += chunk
            if b"Linux version" in seen:
                return True
            time.sleep(0.1)
        return False
    finally:
        proc.kill()
        proc.wait()


def qemu_argv(
    image_dir: Path,
    overlay: Path,
    sockets: Sequence[Path],
    *,
    kvm: bool,
    memory_mb: int = 2048,
    cpus: int = 2,
    extra: Sequence[str] = (),
) -> list[str]:
    """QEMU for the guest: direct kernel boot, a virtio disk, serial ports on sockets, no
    network (the guest is offline), no display."""
    argv = ["qemu-system-x86_64", "-name", "svmm-e2e", "-m", str(memory_mb), "-smp", str(cpus)]
    argv += ["-enable-kvm", "-cpu", KVM_CPU] if kvm else ["-accel", "tcg", "-cpu", "max"]
    argv += [
        "-kernel",
        str(image_dir / "vmlinuz"),
        "-initrd",
        str(image_dir / "initrd.img"),
        "-append",
        "root=/dev/vda rw console=ttyS0,115200 quiet loglevel=3 "
        "systemd.show_status=false net.ifnames=0",
        "-drive",
        f"file={overlay},if=virtio,format=qcow2,cache=unsafe",
        "-display",
        "none",
        "-monitor",
        "none",
        "-nic",
        "none",
        "-no-reboot",
    ]
    for i, sock in enumerate(sockets):
        argv += [
            "-chardev",
            f"socket,id=ser{i},path={sock},server=on,wait=off",
            "-serial",
            f"chardev:ser{i}",
        ]
    return argv + list(extra)


class Vm:
    """A booted throw-away copy of the guest; a context manager that always stops QEMU."""

    def __init__(self, image_dir: Path, workdir: Path, *, kvm: bool | None = None) -> None:
        self.image_dir = image_dir
        self.workdir = workdir
        self.kvm = kvm_usable(image_dir) if kvm is None else kvm
        self.overlay = workdir / "overlay.qcow2"
        self.sockets = [workdir / "ttyS0.sock", workdir / "ttyS1.sock"]
        self.qmp_socket = workdir / "qmp.sock"
        self.card_device = ""  # the CCID card's -device (and device_add) text; "": none
        self.proc: subprocess.Popen[bytes] | None = None

    def _card_reader(self) -> list[str]:
        """A USB CCID reader holding alice's emulated card (svmm_lab/ccid.py), when the image
        carries the card's files and this host has NSS's tools."""
        bundle = self.image_dir / "ccid-card"
        if not (bundle / ccid.MANIFEST).exists() or shutil.which("certutil") is None:
            return []
        db = self.workdir / "nssdb"
        shutil.rmtree(db, ignore_errors=True)
        nicknames = ccid.nss_database(bundle, db)
        self.card_device = ccid.card_device(db, nicknames)
        return ccid.qemu_devices(db, nicknames)

    def qmp(self, command: str, arguments: dict[str, object] | None = None) -> dict[str, object]:
        """One QMP command on the guest's monitor: its answer ("return" or "error")."""
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(30)
            s.connect(str(self.qmp_socket))
            f = s.makefile("rw")
            f.readline()  # the greeting
            for cmd in ({"execute": "qmp_capabilities"}, {"execute": command}):
                if cmd["execute"] == command and arguments:
                    cmd["arguments"] = arguments
                f.write(json.dumps(cmd) + "\n")
                f.flush()
                while True:
                    answer = json.loads(f.readline())
                    if "return" in answer or "error" in answer:
                        break
            return dict(answer)

    def __enter__(self) -> Vm:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.overlay.unlink(missing_ok=True)
        run(
            [
                "qemu-img",
                "create",
                "-q",
                "-f",
                "qcow2",
                "-F",
                "raw",
                "-b",
                str(self.image_dir / "disk.img"),
                str(self.overlay),
            ]
        )
        extra = ["-qmp", f"unix:{self.qmp_socket},server=on,wait=off"]
        extra += self._card_reader()
        argv = qemu_argv(self.image_dir, self.overlay, self.sockets, kvm=self.kvm, extra=extra)
        (self.workdir / "qemu.argv").write_text(json.dumps(argv, indent=1))
        with (self.workdir / "qemu.log").open("wb") as qlog:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=qlog, stderr=qlog)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        self.overlay.unlink(missing_ok=True)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="cache folder")
    p.add_argument(
        "--accel",
        choices=["auto", "kvm", "tcg"],
        default="auto",
        help="auto: KVM when a KVM guest really runs here, else TCG",
    )
    p.add_argument(
        "--reuse",
        action="store_true",
        help="boot the newest image in the cache even if the sources changed",
    )


def prepare(args: argparse.Namespace) -> tuple[Path, Timings, bool]:
    """Build or reuse the image; (image folder, stage timings, use KVM)."""
    guest = Guest(args.cache, Keys.compute())
    images = sorted(args.cache.glob("image-*/disk.img"), key=lambda p: p.stat().st_mtime)
    if args.reuse and images:
        image = images[-1].parent
        log(f"[guest] reusing {image} (--reuse)")
    else:
        image = guest.build()
    kvm = {"kvm": True, "tcg": False}.get(args.accel)
    if kvm is None:
        t0 = time.monotonic()
        kvm = kvm_usable(image)
        guest.timings.add("KVM probe", time.monotonic() - t0, f"-> {'KVM' if kvm else 'TCG'}")
    return image, guest.timings, kvm


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("command", choices=["build", "boot", "keys"])
    add_arguments(p)
    args = p.parse_args(argv)
    if args.command == "keys":
        print(json.dumps(Keys.compute().__dict__, indent=1))
        return 0
    if args.command == "build":
        guest = Guest(args.cache, Keys.compute())
        guest.build()
        log(f"[guest] stages:\n{guest.timings.table()}")
        return 0
    image, timings, kvm = prepare(args)
    sys.path.insert(0, str(HERE))
    from serial_console import SerialConsole

    with tempfile.TemporaryDirectory(prefix="svmm-guest-") as d, Vm(image, Path(d), kvm=kvm) as vm:
        t0 = time.monotonic()
        with (Path(d) / "ttyS0.log").open("w") as tr:
            console = SerialConsole.connect(vm.sockets[0], transcript=tr, name="ttyS0")
            console.expect(r"login: ", 600)
        timings.add("boot to login prompt", time.monotonic() - t0, "(KVM)" if kvm else "(TCG)")
    log(f"[guest] stages:\n{timings.table()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
