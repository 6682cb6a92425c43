"""A directory that survives a server: two real slapd in syncrepl (a provider with syncprov,
a refreshAndPersist consumer, both on 127.0.0.1 with StartTLS), the configuration listing
the provider first. Logins run through the real PAM stack, each in a fresh process.

What a login may cost: a server that does not set up a connection (TCP, StartTLS, the
service bind) within ``connect_timeout`` is passed over for the next one, a server that
failed is left aside for ``retry_interval``, and no lookup takes longer than
``total_timeout``. SEARCH_TIMEOUT is long on purpose: a hung server must cost the connect
timeout, not the search timeout."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import pytest

from pam_svmm import config as config_mod
from pam_svmm.adapters.directory import DirectoryClient
from pam_svmm.errors import DirectoryUnavailable
from svmm_lab.directory import Slapd
from svmm_lab.lab import Lab
from tests.integration import ldap_fixtures
from tests.integration.logins import login

pytestmark = pytest.mark.integration
slapd_factory, replicated_slapd = ldap_fixtures.slapd_factory, ldap_fixtures.replicated_slapd

CONNECT_TIMEOUT = 1
SEARCH_TIMEOUT = 8
ROLES = "ou=roles,ou=groups,dc=demo,dc=example"
VM_ADMINS = f"cn=vm-admins,{ROLES}"
T = TypeVar("T")


def _replace(text: str, old: str, new: str) -> str:
    assert old in text, f"{old!r} not in the lab's directory overrides"
    return text.replace(old, new)


def overrides(lab: Lab, servers: list[Slapd], tmp_path: Path, **directory: float) -> str:
    """The lab's directory configuration over ``servers`` (in order), with this test's own
    offline cache (empty: a login that succeeds offline says so) and short timeouts."""
    text = lab.directory_overrides(servers[0])
    uris = ", ".join(f'"{s.uri}"' for s in servers)
    text = _replace(text, f'uris = ["{servers[0].uri}"]', f"uris = [{uris}]")
    text = _replace(text, "connect_timeout = 2", f"connect_timeout = {CONNECT_TIMEOUT}")
    text = _replace(text, "search_timeout = 3", f"search_timeout = {SEARCH_TIMEOUT}")
    text = _replace(
        text, f'cache_dir = "{lab.folder / "identity-cache"}"', f'cache_dir = "{tmp_path / "c"}"'
    )
    extra = "".join(f"{k} = {v}\n" for k, v in directory.items())
    return _replace(text, "cache_max_age = 3600\n", f"cache_max_age = 3600\n{extra}")


@contextmanager
def paused(*servers: Slapd) -> Iterator[None]:
    for s in servers:
        s.pause()
    try:
        yield
    finally:
        for s in servers:
            s.resume()


def timed(f: Callable[[], T]) -> tuple[float, T]:
    t0 = time.monotonic()
    result = f()
    return time.monotonic() - t0, result


def fails_in(f: Callable[[], object]) -> tuple[float, DirectoryUnavailable]:
    t0 = time.monotonic()
    with pytest.raises(DirectoryUnavailable) as e:
        f()
    return time.monotonic() - t0, e.value


# --- the lab's replication ------------------------------------------------------------------


def test_the_consumer_holds_what_the_provider_holds_and_refuses_writes(
    replicated_slapd: tuple[Slapd, Slapd],
) -> None:
    provider, consumer = replicated_slapd
    for dn in (provider.user_dn("carol"), provider.user_dn("dave"), VM_ADMINS):
        attrs = ["member", "memberOf", "svmmDisabled", "userCertificate;binary"]
        assert consumer.read_entry(dn, attrs) == provider.read_entry(dn, attrs), dn
    # memberOf comes from the consumer's own overlay (syncrepl does not carry it)
    dave = consumer.read_entry(provider.user_dn("dave"), ["memberOf"])
    assert dave is not None and f"cn=engineering-leads,{ROLES}".encode() in dave["memberof"]
    with pytest.raises(Exception, match="Referral"):
        consumer.add_ldif(
            f"dn: {consumer.user_dn('bob')}\nchangetype: modify\n"
            "replace: loginShell\nloginShell: /bin/sh\n"
        )


# --- logins through the consumer --------------------------------------------------------------


def test_a_card_login_works_through_the_consumer_when_the_provider_is_killed(
    lab: Lab, replicated_slapd: tuple[Slapd, Slapd], tmp_path: Path
) -> None:
    provider, consumer = replicated_slapd
    service = lab.variant("repl-killed", overrides(lab, [provider, consumer], tmp_path))
    provider.kill()
    took, a = timed(lambda: login(lab, "carol", user="carol", service=service))
    assert a.report.ok, a.report
    rec = a.record
    assert rec["offline"] is False and "vm-admins" in rec["roles"]  # the consumer answered
    assert took < 10, f"the login took {took:.1f}s"


def test_a_change_on_the_provider_reaches_the_next_login_through_the_consumer(
    lab: Lab, replicated_slapd: tuple[Slapd, Slapd], tmp_path: Path
) -> None:
    provider, consumer = replicated_slapd
    service = lab.variant("repl-change", overrides(lab, [provider, consumer], tmp_path))
    bob, carol = provider.user_dn("bob"), provider.user_dn("carol")
    provider.add_ldif(f"dn: {bob}\nchangetype: modify\nreplace: svmmDisabled\nsvmmDisabled: TRUE\n")
    provider.add_ldif(f"dn: {VM_ADMINS}\nchangetype: modify\ndelete: member\nmember: {carol}\n")

    def replicated(s: Slapd) -> bool:
        b, c = s.read_entry(bob, ["svmmDisabled"]), s.read_entry(carol, ["memberOf"])
        return (
            b is not None
            and b.get("svmmdisabled") == [b"TRUE"]
            and c is not None
            and VM_ADMINS.encode() not in c.get("memberof", [])
        )

    consumer.wait_until(replicated, timeout=15, what="the changes on the consumer")
    provider.kill()  # only the consumer can answer now
    refused = login(lab, "bob", user="bob", service=service)
    assert refused.report.name == "PAM_PERM_DENIED" and refused.report.step == "acct_mgmt"
    assert refused.audit[-1]["reason"] == "account_disabled"
    assert "svmmDisabled" in refused.audit[-1]["detail"]
    a = login(lab, "carol", user="carol", service=service)
    assert a.report.ok, a.report
    assert a.record["offline"] is False
    assert "vm-users" in a.record["roles"] and "vm-admins" not in a.record["roles"]


def test_a_paused_provider_is_passed_over_within_the_connect_timeout(
    lab: Lab, replicated_slapd: tuple[Slapd, Slapd], tmp_path: Path
) -> None:
    """A hung provider still accepts TCP connections (the kernel's backlog): only a
    connection that does not come up within connect_timeout shows it is gone."""
    provider, consumer = replicated_slapd
    service = lab.variant("repl-paused", overrides(lab, [provider, consumer], tmp_path))
    baseline, _ = timed(lambda: login(lab, "bob", user="bob", service=service))
    with paused(provider):
        took, a = timed(lambda: login(lab, "carol", user="carol", service=service))
    assert a.report.ok, a.report
    assert a.record["offline"] is False
    # one connect timeout for the hung server (auth and account share the client), never
    # the search timeout
    assert took < baseline + CONNECT_TIMEOUT + 3, f"{took:.1f}s (baseline {baseline:.1f}s)"


def test_a_hung_directory_costs_a_cached_login_one_connect_timeout_per_server(
    lab: Lab, replicated_slapd: tuple[Slapd, Slapd], tmp_path: Path
) -> None:
    """Both servers hung: every server is tried once, then left aside, so the offline login
    pays each connect timeout once, not once per lookup (auth, account) and server."""
    provider, consumer = replicated_slapd
    service = lab.variant("repl-hung", overrides(lab, [provider, consumer], tmp_path))
    baseline, first = timed(lambda: login(lab, "bob", user="bob", service=service))
    assert first.report.ok  # fills the offline cache
    with paused(provider, consumer):
        took, a = timed(lambda: login(lab, "bob", user="bob", service=service))
        refused = login(lab, "carol", user="carol", service=service)
    assert a.report.ok and a.record["offline"] is True, a.report
    assert took < baseline + 2 * CONNECT_TIMEOUT + 3, f"{took:.1f}s (baseline {baseline:.1f}s)"
    assert refused.report.name == "PAM_AUTHINFO_UNAVAIL"
    assert refused.record["reason"] == "directory_unavailable"


# --- the client's failover policy -------------------------------------------------------------


def client_for(servers: list[Slapd], tmp_path: Path, **directory: float) -> DirectoryClient:
    d = {
        "enabled": True,
        "uris": [s.uri for s in servers],
        "base_dn": servers[0].base_dn,
        "users_base": f"ou=people,{servers[0].base_dn}",
        "bind_dn": servers[0].service_dn,
        "bind_password_file": str(tmp_path / "unused"),
        "ca_file": str(servers[0].ca_file),
        "connect_timeout": CONNECT_TIMEOUT,
        "search_timeout": SEARCH_TIMEOUT,
        "cache_dir": str(tmp_path / "cache"),
        **directory,
    }
    rules = [{"name": "uid", "map": "(uid={cn})"}]
    cfg = config_mod.parse({"directory": d, "certmap": {"rules": rules}})
    return DirectoryClient(cfg.directory, bind_password=servers[0].service_password)


def test_a_pooled_connection_to_a_dead_server_is_dropped_then_the_first_server_taken_back(
    replicated_slapd: tuple[Slapd, Slapd], tmp_path: Path
) -> None:
    provider, consumer = replicated_slapd
    client = client_for([provider, consumer], tmp_path, retry_interval=1)
    alice = provider.user_dn("alice")
    assert client.search_users("(uid=alice)") == [alice]
    assert client.server_in_use == provider.uri
    provider.kill()  # the pooled connection is now to a dead server
    took, found = timed(lambda: client.search_users("(uid=alice)"))
    assert found == [alice] and client.server_in_use == consumer.uri
    assert took < CONNECT_TIMEOUT + 1, f"{took:.1f}s"
    provider.start()
    assert client.search_users("(uid=alice)") == [alice]
    assert client.server_in_use == consumer.uri  # the provider is left aside a while
    time.sleep(1.1)
    assert client.search_users("(uid=alice)") == [alice]
    assert client.server_in_use == provider.uri  # back to the first server
    client.close()


def test_no_lookup_takes_longer_than_total_timeout(
    slapd_factory: ldap_fixtures.SlapdFactory, tmp_path: Path
) -> None:
    servers = [slapd_factory(), slapd_factory(), slapd_factory()]
    client = client_for(servers, tmp_path, connect_timeout=2, total_timeout=3)
    with paused(*servers):
        took, _ = fails_in(lambda: client.search_users("(uid=x)"))
        # the next lookup tries only the server the first had no time for ...
        again, _ = fails_in(lambda: client.identity("uid=x"))
        # ... and once every server failed a moment ago, a lookup says so at once
        last, e = fails_in(lambda: client.search_users("(uid=x)"))
    assert 2.9 < took < 3.5, f"{took:.1f}s"
    assert 1.9 < again < 2.5, f"{again:.1f}s"
    assert last < 0.2, f"{last:.1f}s"
    assert all(s.uri in e.message for s in servers), e.message
    client.close()
