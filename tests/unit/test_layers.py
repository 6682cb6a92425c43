"""Dependencies point down: no package of the product imports a package above it.

The layers, bottom first (README "Layout"): errors, domain (pure rules and the vocabulary of
settings they own), trusted_path, config (the only reader of the file), adapters, services,
pam, then daemon and cli at the top. The demo lab (svmm_lab) sits above everything and the
product never imports it: a host installed from the Debian package has no lab. Every import
counts, at module level, in a function or under TYPE_CHECKING.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RANK = {
    "errors": 0,
    "domain": 1,
    "trusted_path": 2,
    "config": 3,
    "adapters": 4,
    "services": 5,
    "pam": 6,
    "daemon": 7,
    "cli": 7,
}


def _layer(module: str) -> str:
    parts = module.split(".")
    if parts[0] == "svmm_lab":
        return "svmm_lab"
    return parts[1] if len(parts) > 1 else ""


def imports(path: Path, module: str) -> list[tuple[str, int]]:
    """(imported module, line) for every import of pam_svmm or svmm_lab in the file."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join([*base, *([node.module] if node.module else [])])
                if node.module is None:  # from .. import x: x is the module
                    out += [(f"{target}.{a.name}", node.lineno) for a in node.names]
                    continue
            else:
                target = node.module or ""
            out.append((target, node.lineno))
        elif isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
    return [(t, n) for t, n in out if t.split(".")[0] in ("pam_svmm", "svmm_lab")]


def violations(root: Path) -> list[str]:
    found = []
    for path in sorted((root / "pam_svmm").rglob("*.py")):
        module = ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
        mine = _layer(module)
        for target, line in imports(path, module):
            theirs = _layer(target)
            if theirs == mine or theirs == "":
                continue
            where = f"{path.relative_to(root)}:{line} imports {target}"
            if theirs == "svmm_lab":
                found.append(f"{where}: the product never imports the demo lab")
            elif mine not in RANK or theirs not in RANK:
                found.append(f"{where}: a layer test_layers.RANK does not name")
            elif RANK[theirs] > RANK[mine]:
                found.append(f"{where}: {mine} is below {theirs}")
    return found


def test_no_package_imports_a_package_above_it() -> None:
    assert violations(ROOT) == []


def test_every_layer_is_named() -> None:
    on_disk = {p.stem if p.is_file() else p.name for p in (ROOT / "pam_svmm").iterdir()}
    on_disk -= {"__init__", "__pycache__", "py"}
    assert on_disk - set(RANK) == set()


@pytest.mark.parametrize(
    ("file", "source", "says"),
    [
        ("domain/x.py", "from ..config import Config\n", "domain is below config"),
        ("adapters/x.py", "def f():\n    from ..services import login\n", "adapters is below"),
        ("services/x.py", "from svmm_lab.pki import LabCA\n", "never imports the demo lab"),
        ("config.py", "from .pam import codes\n", "config is below pam"),
        ("errors.py", "from . import domain\n", "errors is below domain"),
    ],
)
def test_the_check_sees_an_upward_import(tmp_path: Path, file: str, source: str, says: str) -> None:
    path = tmp_path / "pam_svmm" / file
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(source)
    (found,) = violations(tmp_path)
    assert says in found
