"""The Debian package's sources (debian/, man/, completion/), checked without building.

`tools/run deb` builds the .deb and runs the slow check (debian/check-deb: its file list, the
conffile, lintian). These hold what a build would only find late or not at all: every file
debian/ names exists, the completion knows svmm's parser, the man pages render without a
warning, tmpfiles.d applies, svmmd's shipped unit keeps what svmmd needs, and the
maintainer scripts never enable the PAM profile nor delete an audit log or a volume.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

from pam_svmm.cli.main import build_parser

REPO = Path(__file__).resolve().parents[2]
DEBIAN = REPO / "debian"
MAN_PAGES = ("man/svmm.1", "man/svmmd.8", "man/pam_svmm.8", "man/svmm.toml.5")
COMPLETION = REPO / "completion" / "svmm"
SCRIPTS = ("pam-svmm.postinst", "pam-svmm.prerm", "pam-svmm.postrm")
UNITS = ("svmmd.socket", "svmmd.service", "svmm-nss-sync.service", "svmm-nss-sync.timer",
         "svmm-crl-refresh.service", "svmm-crl-refresh.timer")  # fmt: skip


def _lines(name: str) -> list[str]:
    text = (DEBIAN / name).read_text()
    return [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]


def _install_sources() -> list[str]:
    return [ln.split()[0] for ln in _lines("pam-svmm.install")]


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, list[str]]:
    """svmm's commands and each one's subcommands, in the parser's order."""
    out: dict[str, list[str]] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out[name] = [
                    n
                    for a in sub._actions
                    if isinstance(a, argparse._SubParsersAction)
                    for n in a.choices
                ]
    return out


def test_every_file_the_install_files_name_exists() -> None:
    missing = [src for src in _install_sources() if not (REPO / src).is_file()]
    missing += [p for p in _lines("pam-svmm.manpages") if not (REPO / p).is_file()]
    missing += [p for p in _lines("pam-svmm.examples") if not (REPO / p).is_file()]
    assert not missing, f"debian/ names files the tree does not have: {missing}"
    assert sorted(_lines("pam-svmm.manpages")) == sorted(MAN_PAGES)


def test_every_file_debian_rules_copies_exists() -> None:
    rules = (DEBIAN / "rules").read_text()
    copied = re.search(r"^\tcp -a (.+) \$\(SRC\)/$", rules, re.M)
    assert copied, "debian/rules no longer copies the tree for pip"
    installed = re.findall(r"^\tinstall -D -m 0644 (\S+) ", rules, re.M)
    assert "pam_svmm/pam/shim.py" in installed
    missing = [p for p in copied.group(1).split() + installed if not (REPO / p).exists()]
    assert not missing, missing
    assert "svmm_lab" not in copied.group(1).split(), "the product venv is built without the lab"


def test_the_links_point_at_the_entry_points_pyproject_makes() -> None:
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    links = dict(ln.split() for ln in _lines("pam-svmm.links"))
    assert links == {f"opt/svmm/venv/bin/{n}": f"usr/bin/{n}" for n in ("svmm", "svmmd")}
    assert {"svmm", "svmmd"} <= set(scripts)


def test_the_units_installed_are_the_ones_rules_handles() -> None:
    installed = {Path(src).name for src in _install_sources() if src.startswith("config/systemd/")}
    assert installed == set(UNITS)
    rules = (DEBIAN / "rules").read_text()
    calls = [ln.split() for ln in rules.splitlines() if ln.startswith("\tdh_installsystemd ")]
    handled = {w for call in calls for w in call if w.endswith((".service", ".socket", ".timer"))}
    assert handled == set(UNITS)
    # An upgrade must not drop the keys svmmd holds: neither of its units is stopped then.
    for unit in ("svmmd.socket", "svmmd.service"):
        line = next(ln for ln in rules.splitlines() if ln.rstrip().endswith(unit))
        assert "--no-stop-on-upgrade" in line, line


def test_control_and_changelog_agree_with_pyproject() -> None:
    control = (DEBIAN / "control").read_text()
    assert re.search(r"^Source: pam-svmm$", control, re.M)
    assert re.search(r"^Package: pam-svmm$", control, re.M)
    assert re.search(r"^Build-Depends: debhelper-compat \(= 13\)", control, re.M)
    for dep in ("libpam-python", "python3 (>= 3.11~)", "python3 (<< 3.12)", "qemu-system-x86"):
        assert dep in control
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    first = (DEBIAN / "changelog").read_text().splitlines()[0]
    assert first.startswith(f"pam-svmm ({version})"), first
    copyright_ = (DEBIAN / "copyright").read_text()
    assert copyright_.startswith(
        "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/"
    )
    assert "License: Apache-2.0" in copyright_
    assert "Apache License" in (REPO / "LICENSE").read_text()


def test_the_completion_knows_every_command_and_subcommand() -> None:
    text = COMPLETION.read_text()
    table = dict(re.findall(r'^\s+\[([\w-]+)\]="([^"]*)"$', text, re.M))
    commands = re.search(r'^_svmm_commands="([^"]*)"$', text, re.M)
    assert commands
    parsed = _subcommands(build_parser())
    assert commands.group(1).split() == list(parsed)
    assert {k: v.split() for k, v in table.items()} == parsed


def _complete(words: list[str], tmp_path: Path) -> list[str]:
    """COMPREPLY for ``words`` (the cursor on the last one), with a fake `svmm` on PATH."""
    fake = tmp_path / "svmm"
    fake.write_text(
        "#!/bin/sh\n"
        f'echo "$@" > {tmp_path}/args\n'
        """echo '{"ok": true, "data": {"allowed": [{"vm": "web"}, {"vm": "db"}],"""
        """ "running": ["other"]}}'\n"""
    )
    fake.chmod(0o755)
    script = (
        f"source {COMPLETION}\n"
        f"COMP_WORDS=({' '.join(repr(w) for w in words)})\n"
        f"COMP_CWORD={len(words) - 1}\n"
        "_svmm\n"
        'printf "%s\\n" "${COMPREPLY[@]}"\n'
    )
    env = dict(os.environ, PATH=f"{tmp_path}:/usr/bin:/bin")
    proc = subprocess.run(
        ["bash", "--norc", "-c", script], capture_output=True, text=True, env=env, check=True
    )
    return [w for w in proc.stdout.splitlines() if w]


def test_the_completion_completes_commands_and_vm_names(tmp_path: Path) -> None:
    assert _complete(["svmm", "po"], tmp_path) == ["policy"]
    assert _complete(["svmm", "vm", "s"], tmp_path) == ["start", "stop", "status"]
    assert _complete(["svmm", "vm", "start", ""], tmp_path) == ["db", "other", "web"]
    # The configuration and socket given on the line are the ones asked.
    words = ["svmm", "--config", "/x.toml", "vm", "--socket", "/s", "console", "w"]
    assert _complete(words, tmp_path) == ["web"]
    assert (tmp_path / "args").read_text().split() == [
        "--config", "/x.toml", "vm", "--socket", "/s", "--json", "list",
    ]  # fmt: skip
    assert _complete(["svmm", "vm", "list", ""], tmp_path) == []
    assert _complete(["svmm", "vm", "stop", "web", ""], tmp_path) == []


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_the_shell_files_are_shellcheck_clean() -> None:
    files = [COMPLETION, DEBIAN / "check-deb", *(DEBIAN / s for s in SCRIPTS)]
    proc = subprocess.run(
        ["shellcheck", "-s", "bash", "-e", "SC2034", str(COMPLETION)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stdout
    proc = subprocess.run(["shellcheck", *map(str, files[1:])], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


@pytest.mark.skipif(shutil.which("groff") is None, reason="groff not installed")
@pytest.mark.parametrize("page", MAN_PAGES)
def test_the_man_pages_render_without_warnings(page: str) -> None:
    proc = subprocess.run(
        ["groff", "-man", "-ww", "-z", str(REPO / page)], capture_output=True, text=True
    )
    assert proc.returncode == 0 and not proc.stderr, proc.stderr


def test_svmm_1_names_every_command() -> None:
    text = (REPO / "man" / "svmm.1").read_text()
    documented = set(re.findall(r"^\.BI? \"?([a-z]+)", text, re.M))
    assert set(_subcommands(build_parser())) <= documented


def _tmpfiles() -> list[list[str]]:
    return [ln.split() for ln in _lines("pam-svmm.tmpfiles")]


def test_the_tmpfiles_lines_have_the_shape_of_tmpfiles_d() -> None:
    entries = {fields[1]: fields for fields in _tmpfiles()}
    for fields in entries.values():
        assert len(fields) == 7, fields  # type path mode user group age argument
        kind, path, mode, user, group, age, argument = fields
        assert kind == "d" and path.startswith("/") and age == argument == "-"
        assert re.fullmatch(r"0[0-7]{3}", mode) and user == group == "root"
    assert {p: f[2] for p, f in entries.items()} == {
        "/run/svmm": "0755",  # the launcher socket's folder: anyone may reach the socket
        "/run/svmm/vms": "0700",
        "/run/svmm/registry": "0700",
        "/var/lib/svmm": "0700",
        "/var/log/svmm": "0700",
        "/var/cache/svmm": "0700",
    }


@pytest.mark.skipif(os.geteuid() != 0, reason="systemd-tmpfiles makes root's folders as root")
def test_systemd_tmpfiles_applies_the_file(tmp_path: Path) -> None:
    proc = subprocess.run(
        ["systemd-tmpfiles", f"--root={tmp_path}", "--create", str(DEBIAN / "pam-svmm.tmpfiles")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0 and not proc.stderr, proc.stderr
    for _kind, path, mode, *_ in _tmpfiles():
        st = (tmp_path / path.lstrip("/")).stat()
        assert oct(st.st_mode & 0o7777) == oct(int(mode, 8)) and st.st_uid == 0, path


def _unit(name: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for ln in (REPO / "config" / "systemd" / name).read_text().splitlines():
        if "=" in ln and not ln.startswith(("#", "[")):
            key, _, value = ln.partition("=")
            out.setdefault(key, []).append(value)
    return out


def test_the_shipped_svmmd_unit_keeps_what_svmmd_needs() -> None:
    unit = _unit("svmmd.service")
    assert unit["ExecStart"] == ["/opt/svmm/venv/bin/svmmd"]
    caps = set(unit["CapabilityBoundingSet"][0].split())
    # unshare's mount namespace and cryptsetup (SYS_ADMIN), setpriv to the VM's uid, taps.
    assert {"CAP_SYS_ADMIN", "CAP_SETUID", "CAP_SETGID", "CAP_NET_ADMIN"} <= caps
    assert unit["KillMode"] == ["process"]  # VMs outlive svmmd
    assert unit["RestrictNamespaces"] == ["mnt"]
    families = set(unit["RestrictAddressFamilies"][0].split())
    assert {"AF_UNIX", "AF_NETLINK", "AF_INET", "AF_INET6"} <= families
    # Settings that would break it: the per-VM uids' processes must stay visible in /proc,
    # /proc/devices and /proc/misc readable, /dev/kvm, tun and device-mapper reachable.
    for key in ("ProtectProc", "ProcSubset", "PrivateDevices", "DeviceAllow", "ProtectClock",
                "PrivateUsers", "MemoryDenyWriteExecute", "PrivateNetwork"):  # fmt: skip
        assert key not in unit, key


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd not installed")
def test_svmmd_unit_exposure_stays_at_most_4_5(tmp_path: Path) -> None:
    for unit in ("svmmd.service", "svmmd.socket"):
        shutil.copy(REPO / "config" / "systemd" / unit, tmp_path / unit)
    proc = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--threshold=45",
         str(tmp_path / "svmmd.service")],
        capture_output=True,
        text=True,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-400:]


def test_the_maintainer_scripts_are_valid_sh() -> None:
    for name in SCRIPTS:
        proc = subprocess.run(["sh", "-n", str(DEBIAN / name)], capture_output=True, text=True)
        assert proc.returncode == 0, (name, proc.stderr)
        assert "#DEBHELPER#" in (DEBIAN / name).read_text(), name


def test_no_maintainer_script_enables_the_pam_profile() -> None:
    profile = (REPO / "config" / "pam-configs" / "svmm").read_text()
    assert re.search(r"^Default: no$", profile, re.M)
    for name in SCRIPTS:
        for line in _lines(name):
            if "pam-auth-update" in line:
                assert "--enable" not in line, (name, line)
    assert "pam-auth-update --package --remove svmm" in (DEBIAN / "pam-svmm.prerm").read_text()


def test_purge_never_removes_an_audit_log_or_a_volume() -> None:
    kept = ("/var/log/svmm", "/var/lib/svmm/volumes", "/etc/svmm/audit-seal.key")
    removed = []
    for name in SCRIPTS:
        for line in _lines(name):
            # rmdir fails on a folder that is not empty: only rm and find can lose data.
            for cmd in re.findall(r"\b(?:rm|find)\s+([^;&|]+)", line):
                removed += [w for w in cmd.split() if w.startswith("/")]
    assert removed, "no removal found: the parse is broken"
    for path in removed:
        for keep in kept:
            assert not keep.startswith(path.rstrip("/") + "/") and path != keep, path
    # Only rmdir may name /var/lib/svmm itself (it fails unless the folder is empty).
    postrm = (DEBIAN / "pam-svmm.postrm").read_text()
    assert "rm -rf /var/lib/svmm\n" not in postrm and "rmdir /var/lib/svmm " in postrm


def test_the_package_depends_on_every_pam_module_its_profile_names() -> None:
    """The profile's session runs pam_mkhomedir (a directory user's home at first login):
    libpam-modules has it, and the package says it needs it."""
    profile = (REPO / "config" / "pam-configs" / "svmm").read_text()
    modules = set(re.findall(r"\b(pam_\w+)\.so\b", profile))
    assert modules == {"pam_python", "pam_mkhomedir"}
    control = (DEBIAN / "control").read_text()
    depends = re.search(r"^Package: pam-svmm$.*?^Depends:(.*?)^\S", control, re.S | re.M)
    assert depends
    names = {d.strip().split()[0] for d in depends.group(1).split(",") if d.strip()}
    assert {"libpam-python", "libpam-modules", "libpam-runtime"} <= names
