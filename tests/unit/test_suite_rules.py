"""tests/conftest.py's rule, run on a throw-away suite: a missing package fails, a machine's
limit still skips."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["pytester"]
CONFTEST = Path(__file__).resolve().parents[1] / "conftest.py"


def test_a_missing_package_fails_and_a_machine_limit_skips(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(CONFTEST.read_text())
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.skipif(True, reason="frobnicate not installed")
        def test_needs_a_tool():
            pass

        def test_needs_a_kernel_feature():
            pytest.skip("no device-mapper on this host")
        """
    )
    result = pytester.runpytest("-q", "-p", "no:cacheprovider")
    outcomes = result.parseoutcomes()
    assert outcomes.get("skipped") == 1
    assert outcomes.get("failed", 0) + outcomes.get("errors", 0) == 1, outcomes
    result.stdout.fnmatch_lines(["*frobnicate not installed: tools/run installs*"])
