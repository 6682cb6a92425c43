"""The e2e guest's build pieces that run without building anything: provision.sh (syntax,
shellcheck, its package list against tools/run's), the pam-auth-update profile, the cache
keys, pip settings for the chroot, QEMU's argv, and the serial driver's text handling.

`tools/run e2e` runs the whole thing (minutes); these run in `tools/run test` (.ci/run).
"""

from __future__ import annotations

import importlib
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
VAGRANT = REPO / "vagrant"
sys.path.insert(0, str(VAGRANT))
guest = importlib.import_module("guest")
serial_console = importlib.import_module("serial_console")

# Packages tools/run installs only for the tests and the lab's PAM harness, not for a host.
# The rest builds and checks (shellcheck, git, debootstrap, e2fsprogs; the .deb's debhelper,
# lintian, groff-base), measures (strace, for bench/) or is in the guest's base already
# (systemd, mount).
TEST_ONLY = {
    "libpam-wrapper", "libnss-wrapper", "libpam-pkcs11",
    "shellcheck", "git", "debootstrap", "e2fsprogs", "systemd", "mount",
    "debhelper", "lintian", "groff-base", "strace",
    "libnss3-tools",  # the host that runs the e2e guest: its emulated card's NSS database
}  # fmt: skip


def _tools_run_packages() -> list[str]:
    text = (REPO / "tools" / "run").read_text()
    m = re.search(r"^DEBIAN_PACKAGES=\(\n(.*?)^\)", text, re.S | re.M)
    assert m, "no DEBIAN_PACKAGES in tools/run"
    return re.sub(r"#.*", "", m.group(1)).split()


def test_provision_installs_every_runtime_package_tools_run_names() -> None:
    missing = set(_tools_run_packages()) - TEST_ONLY - set(guest.provision_packages())
    assert not missing, f"vagrant/provision.sh PACKAGES lacks {sorted(missing)}"


def test_provision_packages_parse_ignores_comments(tmp_path: Path) -> None:
    script = tmp_path / "p.sh"
    script.write_text("X=1\nPACKAGES=(\n  a b # c d\n  e\n)\nY=(z)\n")
    assert guest.provision_packages(script) == ["a", "b", "e"]
    script.write_text("PACKAGES=(a b)\n")
    with pytest.raises(ValueError, match="PACKAGES"):
        guest.provision_packages(script)


def test_provision_script_is_valid_bash() -> None:
    proc = subprocess.run(["bash", "-n", str(VAGRANT / "provision.sh")], capture_output=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_provision_script_is_shellcheck_clean() -> None:
    proc = subprocess.run(
        ["shellcheck", str(VAGRANT / "provision.sh"), str(REPO / "tools" / "run")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout


def test_provision_refuses_unknown_phases_and_arguments() -> None:
    for args in (["--phase", "nonsense"], ["--bogus"]):
        proc = subprocess.run(
            ["bash", str(VAGRANT / "provision.sh"), *args], capture_output=True, text=True
        )
        assert proc.returncode == 2, (args, proc.stdout, proc.stderr)


def _profile() -> dict[str, list[str]]:
    """config/pam-configs/svmm as pam-auth-update reads it: fields and their lines."""
    fields: dict[str, list[str]] = {}
    current = ""
    for line in (REPO / "config" / "pam-configs" / "svmm").read_text().splitlines():
        if line.startswith(("\t", " ")):
            fields[current].append(line.strip())
        elif line.strip():
            key, _, value = line.partition(":")
            current = key
            fields[key] = [value.strip()] if value.strip() else []
    return fields


def test_pam_profile_names_the_shim_for_auth_account_and_session() -> None:
    f = _profile()
    assert f["Default"] == ["no"]  # the admin enables it: pam-auth-update --enable svmm
    assert int(f["Priority"][0]) > 256  # before pam_unix (card, else password)
    assert f["Auth-Type"] == ["Primary"]
    for kind in ("Auth", "Auth-Initial", "Account", "Session"):
        line = f[kind][-1]  # Session: pam_mkhomedir first (below)
        m = re.match(r"(\[[^\]]*\]|\S+)\s+(\S+)\s+(\S+)", line)
        assert m, line
        assert m.group(2, 3) == ("pam_python.so", "/usr/lib/svmm/pam_svmm.py"), kind
    # No card: fall through to the password modules; any other refusal ends the stack.
    auth_control = f["Auth"][0].split("]")[0]
    assert "authinfo_unavail=ignore" in auth_control and "default=die" in auth_control
    # Fail closed: a module error is never ignored in account or session.
    for kind in ("Account", "Session"):
        assert "default=bad" in f[kind][-1].split("]")[0], kind
    for kind in ("Auth", "Auth-Initial", "Account", "Account-Initial"):
        assert len(f[kind]) == 1, kind


def test_pam_profile_makes_a_home_directory_at_first_login() -> None:
    """A directory user has no home until their first interactive login: pam_mkhomedir, in
    the profile's session before the module, makes it (mode 0700) and never refuses."""
    f = _profile()
    assert f["Session-Interactive-Only"] == ["yes"]
    for kind in ("Session", "Session-Initial"):
        assert len(f[kind]) == 2, kind
        control, module, *args = f[kind][0].split()
        assert (control, module, args) == ("optional", "pam_mkhomedir.so", ["umask=0077"]), kind


def test_cache_keys_follow_their_inputs(tmp_path: Path) -> None:
    keys = guest.Keys.compute()
    assert keys == guest.Keys.compute()  # stable
    assert len({keys.base, keys.pkgs, keys.deb, keys.image}) == 4
    # A copy of the repository with one product file changed: the .debs and the image move.
    copy = tmp_path / "repo"
    guest.copy_paths(REPO, copy, (*guest.PRODUCT_PATHS, *guest.PACKAGE_PATHS, "tools"))
    same = guest.Keys.compute(copy)
    (copy / "pam_svmm" / "errors.py").write_text("# changed\n")
    changed = guest.Keys.compute(copy)
    assert (changed.base, changed.pkgs) == (same.base, same.pkgs)
    assert changed.deb != same.deb and changed.image != same.image
    # The lab and the tests are not in the package: only the image moves.
    (copy / "svmm_lab" / "ports.py").write_text("# changed\n")
    lab = guest.Keys.compute(copy)
    assert lab.deb == changed.deb and lab.image != changed.image
    # debian/ is what the package is built from.
    (copy / "debian" / "rules").write_text("# changed\n")
    rules = guest.Keys.compute(copy)
    assert rules.deb != lab.deb and rules.image != lab.image and rules.pkgs == lab.pkgs
    script = copy / "vagrant" / "provision.sh"
    script.write_text(script.read_text().replace("PACKAGES=(\n", "PACKAGES=(\n  extra-pkg\n"))
    more = guest.Keys.compute(copy)
    assert more.base == same.base and more.pkgs != same.pkgs and more.image != changed.image


def test_the_upgrade_build_gets_a_newer_changelog_entry() -> None:
    text = (REPO / "debian" / "changelog").read_text()
    version = guest.changelog_version(text)
    bumped = guest.bumped_changelog(
        text, version + guest.UPGRADE_SUFFIX, "Thu, 03 Dec 2026 08:00:00 +0000"
    )
    assert guest.changelog_version(bumped) == version + "+e2e1"
    assert bumped.endswith(text)  # the old entries, unchanged, below
    entry = bumped[: len(bumped) - len(text)]
    assert entry.splitlines()[0].startswith(f"pam-svmm ({version}+e2e1) ")
    assert re.search(r"^ -- .+> {2}Thu, 03 Dec 2026 08:00:00 \+0000$", entry, re.M)
    if shutil.which("dpkg-parsechangelog"):
        changelog = REPO / "debian" / "changelog"
        parsed = subprocess.run(
            ["dpkg-parsechangelog", "-l-", "-S", "Version"],
            input=bumped, capture_output=True, text=True, check=True,
        )  # fmt: skip
        assert parsed.stdout.strip() == version + "+e2e1", changelog
    if shutil.which("dpkg"):  # dpkg takes it for newer: an upgrade, not a downgrade
        newer = [version + guest.UPGRADE_SUFFIX, "gt", version]
        assert subprocess.run(["dpkg", "--compare-versions", *newer]).returncode == 0


def test_the_debs_are_built_from_what_debian_names() -> None:
    """PACKAGE_PATHS (the .debs' cache key and the build copy) holds what debian/rules copies
    and every source its install lists name."""
    rules = (REPO / "debian" / "rules").read_text()
    copied = re.search(r"^\tcp -a (.+) \$\(SRC\)/$", rules, re.M)
    assert copied
    named = copied.group(1).split()
    for name in ("pam-svmm.install", "pam-svmm.manpages", "pam-svmm.examples"):
        for line in (REPO / "debian" / name).read_text().splitlines():
            if line.strip() and not line.startswith("#"):
                named.append(line.split()[0])
    tops = {Path(p).parts[0] for p in named}
    assert tops <= set(guest.PACKAGE_PATHS), tops - set(guest.PACKAGE_PATHS)
    assert "debian" in guest.PACKAGE_PATHS and "svmm_lab" not in guest.PACKAGE_PATHS
    assert "svmm_lab" in guest.PRODUCT_PATHS  # the demo organisation comes from the tree


def test_pip_in_the_chroot_uses_the_host_settings_and_ca(tmp_path: Path) -> None:
    (tmp_path / "opt" / "wheels").mkdir(parents=True)
    environ = {
        "PIP_INDEX_URL": "https://pypi.example/simple",
        "PIP_FIND_LINKS": "/opt/wheels /not/in/chroot https://wheels.example/",
        "PIP_CERT": "/etc/ssl/certs/ca-certificates.crt",
        "HOME": "/root",
    }
    env = guest.pip_env(tmp_path, environ)
    assert env["PIP_INDEX_URL"] == "https://pypi.example/simple"
    assert env["PIP_FIND_LINKS"] == "/opt/wheels https://wheels.example/"
    assert env["PIP_CERT"] == guest.BUILD_CA  # the copy of the host's bundle
    assert "HOME" not in env
    assert "PIP_FIND_LINKS" not in guest.pip_env(tmp_path, {"PIP_FIND_LINKS": "/nowhere"})


def test_qemu_argv_boots_the_image_offline_with_serial_sockets(tmp_path: Path) -> None:
    socks = [tmp_path / "a.sock", tmp_path / "b.sock"]
    argv = guest.qemu_argv(tmp_path, tmp_path / "o.qcow2", socks, kvm=False)
    assert argv[0] == "qemu-system-x86_64"
    assert "-enable-kvm" not in argv and argv[argv.index("-accel") + 1] == "tcg"
    assert argv[argv.index("-nic") + 1] == "none"
    assert argv[argv.index("-kernel") + 1] == str(tmp_path / "vmlinuz")
    assert "console=ttyS0" in argv[argv.index("-append") + 1]
    drive = argv[argv.index("-drive") + 1]
    assert drive.startswith(f"file={tmp_path / 'o.qcow2'},if=virtio,format=qcow2")
    chardevs = [argv[i + 1] for i, a in enumerate(argv) if a == "-chardev"]
    assert chardevs == [
        f"socket,id=ser{i},path={s},server=on,wait=off" for i, s in enumerate(socks)
    ]
    kvm = guest.qemu_argv(tmp_path, tmp_path / "o.qcow2", socks, kvm=True)
    assert "-enable-kvm" in kvm and "tcg" not in kvm


def test_make_ext4_does_not_mount(tmp_path: Path) -> None:
    """mke2fs -d: an image of a folder with no loop device; debugfs reads the file back."""
    if shutil.which("mke2fs") is None or shutil.which("debugfs") is None:
        pytest.skip("e2fsprogs not installed")
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "hostname").write_text("svmm-guest\n")
    image = tmp_path / "disk.img"
    guest.make_ext4(root, image, headroom_mb=16)
    out = subprocess.run(
        ["debugfs", "-R", "cat /etc/hostname", str(image)], capture_output=True, text=True
    )
    assert out.stdout == "svmm-guest\n"


def test_console_text_is_cleaned_of_escapes_and_carriage_returns() -> None:
    raw = "\x1b[0m\x1b[?2004hDebian GNU/Linux 12 svmm-guest ttyS0\r\n\r\nsvmm-guest login: "
    assert serial_console.clean(raw) == "Debian GNU/Linux 12 svmm-guest ttyS0\n\nsvmm-guest login: "
