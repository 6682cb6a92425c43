"""Suite-wide rules.

tools/run installs every Debian package the suite uses (tests/unit/test_declared_packages.py
keeps that list complete), so a test that finds a tool or library missing has found a broken
set-up: it fails instead of skipping quietly. Skips remain for what a machine cannot do
(device-mapper, running as root), each saying why.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

MISSING = "not installed"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[Any]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    if report.skipped and isinstance(report.longrepr, tuple) and MISSING in report.longrepr[2]:
        report.outcome = "failed"
        report.longrepr = (
            f"{report.longrepr[2]}: tools/run installs every package the suite uses "
            "(DEBIAN_PACKAGES), so a missing one is a failure, not a skip"
        )
