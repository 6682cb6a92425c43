"""The `svmm` command registers only the group argv names, and the table saying which
modules make each group cannot drift from what the modules register."""

from __future__ import annotations

import argparse
import importlib
import subprocess
import sys

import pytest

from pam_svmm.cli import main as cli


def _registered(module: str) -> set[str]:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="group")
    if module == "certmap":  # it adds to the cert group cert.py made
        importlib.import_module("pam_svmm.cli.cert").register(sub)
        before = set(sub.choices)
        importlib.import_module("pam_svmm.cli.certmap").register(sub)
        return set(sub.choices) - before | {"cert"}
    importlib.import_module(f"pam_svmm.cli.{module}").register(sub)
    return set(sub.choices)


def test_every_group_names_the_modules_that_register_it() -> None:
    made: dict[str, set[str]] = {}
    for module in cli.MODULES:
        for group in _registered(module):
            made.setdefault(group, set()).add(module)
    assert {g: set(m) for g, m in cli.GROUPS.items()} == made
    for group, modules in cli.GROUPS.items():
        order = [m for m in cli.MODULES if m in modules]
        assert list(modules) == order, f"{group}: register in MODULES' order"


@pytest.mark.parametrize(
    ("argv", "group"),
    [
        (["vm", "list"], "vm"),
        (["--config", "/x.toml", "vm", "start", "a"], "vm"),
        (["--config=/x.toml", "id", "alice"], "id"),
        (["--help"], None),
        ([], None),
        (["nosuch"], None),
        (["--config"], None),
    ],
)
def test_the_chosen_group(argv: list[str], group: str | None) -> None:
    assert cli.chosen_group(argv) == group


def test_a_vm_command_imports_no_certificate_or_directory_code() -> None:
    code = (
        "import sys; from pam_svmm.cli.main import build_parser; build_parser('vm');"
        "print(sorted(m for m in ('cryptography', 'ldap3', 'PyKCS11', 'pam_svmm.services')"
        " if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_help_and_unknown_commands_still_see_every_group(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    text = capsys.readouterr().out
    for group in cli.GROUPS:
        assert group in text
    with pytest.raises(SystemExit) as e:
        cli.main(["nosuch"])
    assert e.value.code == 2
    assert "invalid choice" in capsys.readouterr().err
