"""constraints.txt pins what every install path puts in a venv (tools/run, debian/rules, the
e2e guest): the venv running these tests must hold exactly those versions, and every
requirement pyproject names must be pinned there."""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
NOT_PINNED = {"pip", "setuptools", "wheel", "pam-svmm"}  # the installer, and the product itself


def _name(text: str) -> str:
    return re.sub(r"[-_.]+", "-", text).lower()


def pins() -> dict[str, str]:
    out = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not name==version"
            out[_name(name)] = version
    return out


def test_the_venv_holds_exactly_the_pinned_versions() -> None:
    installed = {
        _name(d.metadata["Name"]): d.version
        for d in metadata.distributions()
        if _name(d.metadata["Name"]) not in NOT_PINNED
    }
    pinned = pins()
    wrong = {n: (v, pinned.get(n)) for n, v in installed.items() if pinned.get(n) != v}
    assert not wrong, f"installed (version, pinned) that differ from constraints.txt: {wrong}"


def test_every_requirement_is_pinned() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = [*project["dependencies"], *project["optional-dependencies"]["test"]]
    names = {_name(re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0]) for r in wanted}
    assert names - set(pins()) == set()
