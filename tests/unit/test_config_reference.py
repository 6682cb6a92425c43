"""svmm.toml(5)'s KEYS section is what tools/config_reference.py makes of the schema (the
settings dataclasses config.py reads into) and the commented example: every key the reader
accepts, its default, and what the example says of it."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def reference() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "config_reference", ROOT / "tools" / "config_reference.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_man_page_lists_every_key_as_the_schema_and_example_say(
    reference: ModuleType,
) -> None:
    page = (ROOT / "man" / "svmm.toml.5").read_text()
    assert page == reference.with_keys(page, reference.render()), (
        "man/svmm.toml.5 is out of date: run .venv/bin/python tools/config_reference.py --write"
    )


def test_a_key_the_example_does_not_explain_is_an_error(reference: ModuleType) -> None:
    docs = reference.example_docs('[audit]\npath = "/x"   # where\nsyslog = true\n')
    assert docs == {"audit.path": "where", "audit.syslog": ""}
    with pytest.MonkeyPatch.context() as m:
        m.setattr(reference, "example_docs", lambda text: {})
        with pytest.raises(SystemExit, match=r"explains none of these keys: pkcs11\.module"):
            reference.render()


def test_comments_above_and_beside_a_key_and_a_commented_out_key(reference: ModuleType) -> None:
    text = '[a]\n# One.\n# Two.\nk = "x # not a comment"  # three\n\n# gone\n\n# h = 1  # four\n'
    assert reference.example_docs(text) == {"a.k": "One. Two. three", "a.h": "four"}
