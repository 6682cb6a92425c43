"""`svmm crl refresh`: CRLs fetched, verified and indexed ahead of need, so that a login's
revocation check only looks up the cache and makes no request to the CRL server.

The lab's CRL server runs in this process (a thread), so its handler is wrapped to count the
requests it gets."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from svmm_lab import responders
from svmm_lab.lab import Lab
from tests.unit.cli_schemas import CRL_REFRESH, parse

pytestmark = pytest.mark.integration
PIN = "123456"


@pytest.fixture
def crl_requests(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The paths the lab's CRL server is asked for while the test runs."""
    seen: list[str] = []
    original = responders._CrlHandler.do_GET

    def counting(self: responders._CrlHandler) -> None:
        seen.append(self.path)
        original(self)

    monkeypatch.setattr(responders._CrlHandler, "do_GET", counting)
    yield seen


def _variant(lab: Lab, name: str, cache: Path) -> tuple[str, Path]:
    """A service checking end entity and CA by CRL only (fetched from the distribution points)
    with its own, empty cache."""
    service = lab.variant(
        name,
        f'[revocation]\nend_entity = "require"\nca = "require"\nmethods = ["crl"]\n'
        f'crl_fetch = true\nfetch_timeout = 2\ncache_dir = "{cache}"\n',
    )
    return service, lab.folder / f"{service}.toml"


def _refresh(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pam_svmm.cli.main", "--config", str(config), "crl", "refresh",
         "--json", *args],
        capture_output=True, text=True, timeout=60, check=False, env=dict(os.environ),
    )  # fmt: skip


def _by_name(doc: dict[str, object]) -> dict[str, dict[str, object]]:
    sources = doc["sources"]
    assert isinstance(sources, list)
    return {str(s["source"]).rsplit("/", 1)[-1]: s for s in sources}


def test_a_cold_login_fetches_the_crls(lab: Lab, tmp_path: Path, crl_requests: list[str]) -> None:
    """The control: without a refresh the counter sees the login's own fetches."""
    service, _ = _variant(lab, "crl-cold", tmp_path / "cache")
    report = lab.login(lab.insert("alice"), pin=PIN, user="alice", service=service)
    assert report.ok, report
    assert sorted(crl_requests) == ["/intermediate.crl", "/root.crl"]


def test_after_a_refresh_a_login_fetches_nothing(
    lab: Lab, tmp_path: Path, crl_requests: list[str]
) -> None:
    service, config = _variant(lab, "crl-refresh", tmp_path / "cache")
    leaf_dp = f"{lab.ca.crl_base}/intermediate.crl"  # in the users' certificates only
    p = _refresh(config, "--url", leaf_dp)
    assert p.returncode == 0, p.stdout + p.stderr
    doc = parse(p.stdout, CRL_REFRESH)
    got = _by_name(doc)
    assert doc["ok"] is True
    assert got["intermediate.crl"]["origin"] == "command_line"
    assert got["intermediate.crl"]["action"] == "fetched"
    # The root's CRL comes from the intermediate's own distribution point.
    assert got["root.crl"]["origin"] == "ca_certificate"
    assert got["root.crl"]["action"] == "fetched" and got["root.crl"]["next_update"]
    assert sorted(crl_requests) == ["/intermediate.crl", "/root.crl"]

    crl_requests.clear()
    report = lab.login(lab.insert("alice"), pin=PIN, user="alice", service=service)
    assert report.ok, report
    assert crl_requests == [], "the login fetched a CRL the refresh had indexed"
    # ...and it did check revocation (by CRL, both positions), from the cache.
    record = [r for r in lab.audit_records() if r["event"] == "auth"][-1]
    assert "crl" in str(record).lower(), record

    # A refresh before either CRL is due asks nothing; the leaf's distribution point is
    # remembered from the cache, without --url.
    p = _refresh(config)
    assert p.returncode == 0, p.stdout + p.stderr
    got = _by_name(parse(p.stdout, CRL_REFRESH))
    assert got["intermediate.crl"]["origin"] == "cache"
    assert {s["action"] for s in got.values()} == {"fresh"}, got
    assert crl_requests == []

    # --force fetches again; the same bytes are not indexed again.
    p = _refresh(config, "--force")
    assert p.returncode == 0, p.stdout + p.stderr
    got = _by_name(parse(p.stdout, CRL_REFRESH))
    assert {s["action"] for s in got.values()} == {"unchanged"}
    assert sorted(crl_requests) == ["/intermediate.crl", "/root.crl"]


def test_a_refresh_that_cannot_fetch_fails_and_keeps_the_cache(
    lab: Lab, tmp_path: Path, crl_requests: list[str]
) -> None:
    _, config = _variant(lab, "crl-refresh-bad", tmp_path / "cache")
    p = _refresh(config, "--url", f"{lab.ca.crl_base}/missing.crl")
    assert p.returncode == 3, p.stdout + p.stderr
    doc = parse(p.stdout, CRL_REFRESH)
    got = _by_name(doc)
    assert doc["ok"] is False
    assert got["missing.crl"]["action"] == "failed"
    assert got["root.crl"]["action"] == "fetched"  # the others are refreshed all the same
