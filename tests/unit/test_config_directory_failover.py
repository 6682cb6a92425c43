"""[directory] failover keys: retry_interval, total_timeout (bounded by auth.login_timeout)."""

from __future__ import annotations

from typing import Any

import pytest

from pam_svmm import config
from pam_svmm.errors import ConfigError

RULES = [{"name": "uid", "map": "(uid={cn})"}]


def parse(directory: dict[str, Any], auth: dict[str, Any] | None = None) -> config.Config:
    d = {"enabled": True, "uris": ["ldap://127.0.0.1:1"], "base_dn": "dc=x", **directory}
    return config.parse({"directory": d, "certmap": {"rules": RULES}, "auth": auth or {}})


def test_defaults() -> None:
    d = parse({}).directory
    assert (d.connect_timeout, d.retry_interval, d.total_timeout) == (3.0, 10.0, 15.0)


def test_a_lookup_may_not_outlast_the_login() -> None:
    with pytest.raises(ConfigError, match=r"directory\.total_timeout.*login_timeout \(10 s\)"):
        parse({}, {"login_timeout": 10})
    assert parse({"total_timeout": 10}, {"login_timeout": 10}).directory.total_timeout == 10


@pytest.mark.parametrize(("key", "value"), [("total_timeout", 0), ("retry_interval", -1)])
def test_out_of_range(key: str, value: float) -> None:
    with pytest.raises(ConfigError, match=f"directory.{key}"):
        parse({key: value})


def test_a_disabled_directory_is_not_held_to_the_login_timeout() -> None:
    cfg = config.parse({"directory": {"enabled": False}, "auth": {"login_timeout": 5}})
    assert cfg.directory.total_timeout == 15.0
