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
# lintian, groff-base) or is in the guest's base already (systemd, mount).
TEST_ONLY = {
    "libpam-wrapper", "libnss-wrapper", "libpam-pkcs11",
    "shellcheck", "git", "debootstrap", "e2fsprogs", "systemd", "mount",
    "debhelper", "lintian", "groff-base",
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
        (line,) = f[kind]
        m = re.match(r"(\[[^\]]*\]|\S+)\s+(\S+)\s+(\S+)", line)
        assert m, line
        assert m.group(2, 3) == ("pam_python.so", "/usr/lib/svmm/pam_svmm.py"), kind
    # No card: fall through to the password modules; any other refusal ends the stack.
    auth_control = f["Auth"][0].split("]")[0]
    assert "authinfo_unavail=ignore" in auth_control and "default=die" in auth_control
    # Fail closed: a module error is never ignored in account or session.
    for kind in ("Account", "Session"):
        assert "default=bad" in f[kind][0].split("]")[0], kind


def test_cache_keys_follow_their_inputs(tmp_path: Path) -> None:
    keys = guest.Keys.compute()
    assert keys == guest.Keys.compute()  # stable
    assert len({keys.base, keys.pkgs, keys.image}) == 3
    # A copy of the repository with one product file changed: only the image key moves.
    copy = tmp_path / "repo"
    for top in (*guest.PRODUCT_PATHS, "tools"):
        src = REPO / top
        if src.is_dir():
            shutil.copytree(src, copy / top, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.exists():
            (copy / top).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(src, copy / top)
    same = guest.Keys.compute(copy)
    (copy / "pam_svmm" / "errors.py").write_text("# changed\n")
    changed = guest.Keys.compute(copy)
    assert (changed.base, changed.pkgs) == (same.base, same.pkgs)
    assert changed.image != same.image
    script = copy / "vagrant" / "provision.sh"
    script.write_text(script.read_text().replace("PACKAGES=(\n", "PACKAGES=(\n  extra-pkg\n"))
    more = guest.Keys.compute(copy)
    assert more.base == same.base and more.pkgs != same.pkgs and more.image != changed.image


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
