"""Everything the code, tests and benchmarks spawn, load or import comes from a declared package.

`tools/run` installs DEBIAN_PACKAGES and the virtualenv from pyproject.toml; nothing else is on
a fresh machine. The suite once passed only where someone had installed OpenSSL's pkcs11 engine
by hand. This test reads every Python file of the project (AST, not grep), collects

* every string naming an executable (a bare command name found in /usr/bin, /usr/sbin, /bin,
  /sbin, or an absolute path under /usr, /lib, /bin, /sbin),
* every shared library named by path or by file name (``pkcs11.so``),
* every imported top-level module,

and checks that each executable or library belongs to a Debian package in the closure of the
declared list (their Depends and Pre-Depends) or of Debian's essential set, and each module to the
standard library, this project, or a distribution that pyproject.toml's requirements pull in.
vagrant/ runs under /usr/bin/python3 before any virtualenv exists: the standard library only.

A word that happens to name a command but is never run as one is listed in NOT_COMMANDS with
its reason; a path that is test data in NOT_FILES.
"""

from __future__ import annotations

import ast
import contextlib
import functools
import importlib.metadata as md
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCANNED = ("pam_svmm", "svmm_lab", "tests", "bench", "vagrant")
SYSTEM_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"  # no /usr/local: dpkg does not own it

# Words in a command's place (see _command_words) that the code never runs.
NOT_COMMANDS = {
    "file",  # a policy source's name (config.py)
    "bridge",  # a network backend's name (config.py); tap.py runs `ip`
    "kill",  # how a QEMU was ended, in a result tuple
}
# Paths and library names that are test data or a prefix, never opened as they stand.
NOT_FILES = {
    "/usr/lib/x.so",
    "/usr/lib/svmm/pam_svmm.py",
    "/lib/python",
    "junk.so",
    "no-such-module.so",
    "no-such-pkcs11-module.so",
    "libevil.so",  # test_trusted_path: a module a user could replace, never loaded
    "libplanted.so",  # test_card_helper: built by the test from its own C source
}

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{1,63}")
SYS_PATH = re.compile(r"/(?:usr|lib|lib64|bin|sbin)/[A-Za-z0-9._+/-]+")
LIB_NAME = re.compile(r"[A-Za-z0-9_+-][A-Za-z0-9._+-]*\.so(?:\.\d+)*")


def _files() -> Iterator[Path]:
    for top in SCANNED:
        yield from sorted((REPO / top).rglob("*.py"))


def _strings(tree: ast.AST) -> Iterator[str]:
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            yield node.value


def _str(node: ast.AST | None) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def _command_words(tree: ast.AST) -> Iterator[str]:
    """Bare names in a command's place: an argv literal's first item, ``which(NAME)``, or an
    UPPER_CASE constant (``OPENSSL = "openssl"``)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.List | ast.Tuple) and node.elts:
            word = _str(node.elts[0])
        elif (
            isinstance(node, ast.Call)
            and node.args
            and (
                getattr(node.func, "attr", None) == "which"
                or getattr(node.func, "id", None) == "which"
            )
        ):
            word = _str(node.args[0])
        elif isinstance(node, ast.Assign) and len(node.targets) == 1:
            target = node.targets[0]
            upper = isinstance(target, ast.Name) and target.id.isupper()
            word = _str(node.value) if upper else None
        else:
            word = None
        if word is not None:
            yield word


def _imports(tree: ast.AST) -> Iterator[str]:
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module.split(".")[0]


@functools.cache
def _parsed() -> dict[Path, ast.AST]:
    return {p: ast.parse(p.read_text(), str(p)) for p in _files()}


def declared_debian_packages() -> list[str]:
    text = (REPO / "tools" / "run").read_text()
    m = re.search(r"^DEBIAN_PACKAGES=\(\n(.*?)^\)", text, re.S | re.M)
    assert m, "no DEBIAN_PACKAGES in tools/run"
    return re.sub(r"#.*", "", m.group(1)).split()


def _names(field: str) -> Iterator[str]:
    for alternative in re.split(r"[,|]", field):
        name = alternative.strip().split(" ")[0].split(":")[0]
        if name:
            yield name


@functools.cache
def _installed() -> tuple[dict[str, set[str]], set[str], dict[str, set[str]]]:
    """(package -> its dependencies' names, the essential packages, virtual name -> providers)."""
    out = subprocess.run(
        [
            "dpkg-query",
            "-W",
            "-f",
            "${Package}\t${Essential}\t${Provides}\t${Depends}, ${Pre-Depends}"
            "\t${db:Status-Abbrev}\n",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    deps: dict[str, set[str]] = {}
    essential: set[str] = set()
    provides: dict[str, set[str]] = {}
    for line in out.splitlines():
        pkg, ess, prov, dep, status = line.split("\t")
        if not status.startswith("ii"):
            continue
        deps[pkg] = set(_names(dep))
        if ess == "yes":
            essential.add(pkg)
        for v in _names(prov):
            provides.setdefault(v, set()).add(pkg)
    return deps, essential, provides


def _closure(roots: set[str]) -> set[str]:
    deps, _essential, provides = _installed()
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        name = todo.pop()
        for pkg in {name} | provides.get(name, set()):
            if pkg in seen or pkg not in deps:
                continue
            seen.add(pkg)
            todo.extend(deps[pkg])
    return seen


@functools.cache
def allowed_debian() -> frozenset[str]:
    _deps, essential, _provides = _installed()
    return frozenset(_closure(set(declared_debian_packages()) | essential))


def _owners(patterns: set[str]) -> dict[str, set[str]]:
    """One dpkg -S for all patterns: pattern -> the packages owning what it matched."""
    proc = subprocess.run(["dpkg", "-S", *sorted(patterns)], capture_output=True, text=True)
    found: dict[str, set[str]] = {}
    for line in proc.stdout.splitlines():
        if line.startswith("diversion "):
            continue
        pkgs, _, path = line.partition(": ")
        owners = {p.strip().split(":")[0] for p in pkgs.split(",")}
        for pattern in (path, "*/" + path.rsplit("/", 1)[-1]):
            if pattern in patterns:
                found.setdefault(pattern, set()).update(owners)
    return found


def _variants(path: str) -> list[str]:
    """A path as dpkg may know it (merged /usr: /bin/x is /usr/bin/x), following symlinks."""
    out: list[str] = []
    p = Path(path)
    for _ in range(8):
        s = str(p)
        for v in (s, s.removeprefix("/usr") if s.startswith("/usr/") else "/usr" + s):
            if v not in out:
                out.append(v)
        if not p.is_symlink():
            break
        p = (p.parent / p.readlink()).resolve() if not p.readlink().is_absolute() else p.readlink()
    return out


def used_system_files() -> dict[str, set[Path]]:
    """path-or-pattern -> the project files that name it."""
    used: dict[str, set[Path]] = {}
    for path, tree in _parsed().items():
        if path == Path(__file__):
            continue
        targets: set[str] = set()
        for s in set(_strings(tree)) - NOT_FILES:
            if SYS_PATH.fullmatch(s):
                targets.add(s)
            elif LIB_NAME.fullmatch(s):
                targets.add("*/" + s)
        for word in set(_command_words(tree)) - NOT_COMMANDS:
            exe = shutil.which(word, path=SYSTEM_PATH) if NAME.fullmatch(word) else None
            if exe:
                targets.add(exe)
        for target in targets:
            used.setdefault(target, set()).add(path.relative_to(REPO))
    return used


def test_every_executable_and_library_comes_from_a_declared_package() -> None:
    used = used_system_files()
    allowed = allowed_debian()
    variants = {t: [t] if t.startswith("*/") else _variants(t) for t in used}
    owners_of = _owners({v for vs in variants.values() for v in vs})
    problems = []
    for target, where in sorted(used.items()):
        named = f"(named in {sorted(map(str, where))})"
        owners = set().union(*(owners_of.get(v, set()) for v in variants[target]))
        if not owners:
            if target.startswith("*/") or not Path(target).exists():
                problems.append(f"{target.removeprefix('*/')}: no installed package has it {named}")
            continue  # an existing file no package owns: made at run time, or the venv's
        if not owners & allowed:
            problems.append(
                f"{target.removeprefix('*/')} comes from {sorted(owners)}, which tools/run's "
                f"DEBIAN_PACKAGES does not install {named}"
            )
    assert not problems, "\n".join(problems)


def _requirement_names(reqs: list[str]) -> set[str]:
    return {re.split(r"[\s\[<>=!~;(]", r.strip(), maxsplit=1)[0] for r in reqs if r.strip()}


def _normal(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@functools.cache
def allowed_distributions() -> frozenset[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    roots = set(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        roots |= set(extra)
    todo = list(_requirement_names(sorted(roots)))
    seen: set[str] = set()
    while todo:
        name = _normal(todo.pop())
        if name in seen:
            continue
        seen.add(name)
        with contextlib.suppress(md.PackageNotFoundError):
            todo.extend(_requirement_names(md.distribution(name).requires or []))
    return frozenset(seen)


def _local_modules() -> set[str]:
    names = {"pam_svmm", "svmm_lab", "tests", "bench", "vagrant"}
    for top in ("bench", "vagrant", "tests"):
        names |= {p.stem for p in (REPO / top).rglob("*.py")}
    return names


def test_every_imported_module_is_stdlib_ours_or_a_declared_requirement() -> None:
    dists = md.packages_distributions()
    allowed = allowed_distributions()
    local = _local_modules()
    problems = []
    for path, tree in _parsed().items():
        rel = path.relative_to(REPO)
        system_python = rel.parts[0] == "vagrant"  # run by /usr/bin/python3, no venv
        for mod in sorted(set(_imports(tree))):
            if mod in sys.stdlib_module_names or mod == "__future__" or mod in local:
                continue
            if system_python:
                problems.append(f"{rel}: imports {mod}; vagrant/ runs with the standard library")
                continue
            owners = {_normal(d) for d in dists.get(mod, [])}
            if not owners & allowed:
                problems.append(
                    f"{rel}: imports {mod} (from {sorted(owners) or 'nothing installed'}), "
                    "which pyproject.toml's requirements do not pull in"
                )
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("import subprocess\nsubprocess.run(['openssl', 'version'])", "openssl"),
        ("LIB = 'pkcs11.so'", "*/pkcs11.so"),
        ("P = '/usr/sbin/slapd'", "/usr/sbin/slapd"),
    ],
)
def test_the_scanner_sees_commands_libraries_and_paths(source: str, expected: str) -> None:
    tree = ast.parse(source)
    kinds = {"*/" + s if LIB_NAME.fullmatch(s) else s for s in _strings(tree)}
    kinds |= set(_command_words(tree))
    assert expected in kinds


def test_the_closure_follows_dependencies_and_no_further() -> None:
    """qemu-system-x86 pulls in qemu-system-common; openssl's closure has no QEMU in it."""
    assert "qemu-system-common" in _closure({"qemu-system-x86"})
    assert "qemu-system-x86" not in _closure({"openssl"})
    assert set(_installed()[0]) - allowed_debian(), "the closure is not everything installed"
