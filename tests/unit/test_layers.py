"""Dependencies point down: no package of the product imports a package above it.

The layers, bottom first (README "Layout"): errors, domain (pure rules and the vocabulary of
settings they own), trusted_path, config (the only reader of the file), adapters, services,
pam, then daemon and cli at the top. The demo lab (svmm_lab) sits above everything and the
product never imports it: a host installed from the Debian package has no lab. Every import
counts, at module level, in a function or under TYPE_CHECKING.

The suite keeps the same direction among its own files: no file under tests/, svmm_lab/ or
bench/ imports a test module (tests/**/test_*.py). What several test modules share lives in
a helper module named for what it holds (tests/unit/fakes.py, tests/integration/logins.py,
...) or in a conftest.py; importing a test module runs it a second time under another name
and ties one test file's refactoring to another's.
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


# --- the suite: no file imports a test module ---------------------------------------------

SUITE_DIRS = ("tests", "svmm_lab", "bench")


def _is_test_module(module: str, test_stems: set[str]) -> bool:
    """tests.<...>.test_x, or a bare test_x that names a test file (pytest puts each test
    directory on sys.path, so `import test_login` would load tests/**/test_login.py)."""
    parts = module.split(".")
    if parts[0] == "tests":
        return parts[-1].startswith("test_")
    return len(parts) == 1 and parts[0] in test_stems


def imports_of_test_modules(root: Path) -> list[str]:
    """file:line for every import, at any depth in a file, of a test module (a ``test_*`` name
    imported from a tests module counts too: a test module, or a test that would run twice)."""
    test_stems = {p.stem for p in (root / "tests").rglob("test_*.py")}
    found = []
    for top in SUITE_DIRS:
        for path in sorted((root / top).rglob("*.py")):
            rel = path.relative_to(root)
            package = list(rel.parent.parts)
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                targets: list[str] = []
                if isinstance(node, ast.Import):
                    targets = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom):
                    if node.level:
                        base = package[: len(package) - (node.level - 1)]
                        module = ".".join([*base, *([node.module] if node.module else [])])
                    else:
                        module = node.module or ""
                    # from tests.unit import test_x: the name may be the module itself
                    targets = [module, *(f"{module}.{a.name}" for a in node.names)]
                for target in targets:
                    if _is_test_module(target, test_stems):
                        found.append(f"{rel}:{node.lineno} imports the test module {target}")
                        break
    return found


def test_no_file_imports_a_test_module() -> None:
    found = imports_of_test_modules(ROOT)
    assert found == [], (
        "move what test modules share into a helper module (not test_*.py) or a conftest.py:\n"
        + "\n".join(found)
    )


B = "tests.unit.test_b"  # the test module the cases below import


@pytest.mark.parametrize(
    ("file", "source", "says"),
    [
        ("tests/unit/test_a.py", f"from {B} import X\n", "test_a.py:1 imports"),
        ("tests/integration/test_a.py", f"import {B}\n", B),
        ("tests/unit/test_a.py", "from tests.unit import test_b\n", B),
        ("tests/unit/x.py", "from . import test_b\n", B),
        ("tests/unit/test_a.py", f"def f():\n    from {B} import X\n", ":2 imports"),
        ("tests/unit/test_a.py", "import test_b\n", "imports the test module test_b"),
        ("tests/unit/helper.py", f"if True:\n    import {B} as b\n", "helper.py:2"),
        ("bench/x.py", f"from {B} import X\n", "bench/x.py:1"),
        ("svmm_lab/x.py", f"from {B} import X\n", "svmm_lab/x.py:1"),
    ],
)
def test_the_check_sees_a_test_module_import(
    tmp_path: Path, file: str, source: str, says: str
) -> None:
    for top in SUITE_DIRS:
        (tmp_path / top).mkdir()
    (tmp_path / "tests" / "unit").mkdir()
    (tmp_path / "tests" / "unit" / "test_b.py").write_text("X = 1\n")
    path = tmp_path / file
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(source)
    (found,) = imports_of_test_modules(tmp_path)
    assert says in found


def test_the_check_lets_helper_modules_be_imported(tmp_path: Path) -> None:
    for top in SUITE_DIRS:
        (tmp_path / top / "unit").mkdir(parents=True)
    (tmp_path / "tests" / "unit" / "test_a.py").write_text(
        "from tests.unit.fakes import FakeVm\nfrom tests.unit import fakes\nimport pytest\n"
    )
    (tmp_path / "bench" / "x.py").write_text("from tests.unit.launcher_fixtures import ROOT\n")
    assert imports_of_test_modules(tmp_path) == []
