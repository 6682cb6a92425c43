"""Invariant 10 (sshd's StrictModes): root trusts a file only if it and every directory above
it, as written and after symlinks, are root's and writable by no one else."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pam_svmm import config
from pam_svmm.errors import ConfigError
from pam_svmm.trusted_path import problem

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chown, the root rule)")
NOBODY = 65534


@pytest.fixture
def root_dir(tmp_path: Path) -> Path:
    d = tmp_path / "etc"
    d.mkdir(mode=0o755)
    os.chmod(d, 0o755)  # noqa: S103 - the modes are what is tested
    return d


def test_a_file_only_root_can_change_is_trusted(root_dir: Path) -> None:
    f = root_dir / "anchor.pem"
    f.write_text("x")
    os.chmod(f, 0o644)
    assert problem(f) is None


@pytest.mark.parametrize(
    ("mode", "owner", "why"),
    [(0o664, 0, "writable by its group"), (0o646, 0, "writable by others"),
     (0o644, NOBODY, f"owned by uid {NOBODY}")],
)  # fmt: skip
def test_the_file_itself(root_dir: Path, mode: int, owner: int, why: str) -> None:
    f = root_dir / "anchor.pem"
    f.write_text("x")
    os.chmod(f, mode)
    os.chown(f, owner, 0)
    assert why in (problem(f) or "") and str(f) in (problem(f) or "")


def test_a_folder_above_that_others_may_write(root_dir: Path) -> None:
    f = root_dir / "anchor.pem"
    f.write_text("x")
    os.chmod(root_dir, 0o777)  # noqa: S103
    assert problem(f) == f"{root_dir} is writable by others (mode 0777)"
    os.chmod(root_dir, 0o1777)  # noqa: S103 - sticky, like /tmp: no one may replace root's entries
    assert problem(f) is None


def test_a_missing_file_in_a_folder_a_user_owns(root_dir: Path) -> None:
    theirs = root_dir / "theirs"
    theirs.mkdir()
    os.chown(theirs, NOBODY, NOBODY)
    assert f"{theirs} is owned by uid {NOBODY}" in (problem(theirs / "seal.key") or "")


def test_a_symlink_to_a_users_file(root_dir: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir()
    os.chown(home, NOBODY, NOBODY)
    target = home / "evil.pem"
    target.write_text("x")
    os.chown(target, NOBODY, NOBODY)
    link = root_dir / "anchor.pem"
    link.symlink_to(target)
    assert "owned by uid 65534" in (problem(link) or "")


def test_config_load_refuses_a_writable_anchor_naming_the_key(root_dir: Path) -> None:
    anchor = root_dir / "root.pem"
    anchor.write_text("x")
    os.chmod(anchor, 0o664)
    cfg = root_dir / "svmm.toml"
    cfg.write_text(f'[trust]\nanchors = ["{anchor}"]\n[audit]\nseal_key = "{root_dir}/k"\n')
    with pytest.raises(ConfigError) as e:
        config.load(cfg)
    assert e.value.key == "trust.anchors" and str(anchor) in e.value.message
    os.chmod(anchor, 0o644)
    os.chmod(cfg, 0o666)  # noqa: S103
    with pytest.raises(ConfigError) as e:
        config.load(cfg)
    assert e.value.key == "configuration"
    os.chmod(cfg, 0o644)
    config.load(cfg)


def test_a_pkcs11_module_a_user_could_replace_is_never_loaded(root_dir: Path) -> None:
    lib = root_dir / "libevil.so"
    lib.write_bytes(b"\x7fELF")
    os.chown(lib, NOBODY, 0)
    cfg = root_dir / "svmm.toml"
    cfg.write_text(f'[pkcs11]\nmodule = "{lib}"\n[audit]\nseal_key = "{root_dir}/k"\n')
    with pytest.raises(ConfigError) as e:
        config.load(cfg)
    assert e.value.key == "pkcs11.module"
