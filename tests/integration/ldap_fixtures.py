"""A real slapd for integration tests (svmm_lab.directory.Slapd), loaded with the
product schema and config/ldap/example-org.ldif, TLS certificate from the lab CA.

Use the fixtures from a test module (bound as module attributes, so parameters of the
same name do not trip ruff's F811; `from ... import slapd  # noqa: F401` works too)::

    from tests.integration import ldap_fixtures

    slapd, fresh_slapd = ldap_fixtures.slapd, ldap_fixtures.fresh_slapd

    def test_x(slapd):            # session-wide server: do not stop, pause or break it
        ...
    def test_y(fresh_slapd):      # this test's own server: stop it, pause it, change it
        fresh_slapd.pause()
    def test_z(slapd_factory):    # several servers (failover), or other data / base DN
        a, b = slapd_factory(), slapd_factory(data=[...])
    def test_r(replicated_slapd): # a syncrepl provider and its consumer, in sync
        provider, consumer = replicated_slapd

The CA is the session's lab CA (the `lab` fixture of conftest.py), so the lab's cards and the
directory share one trust anchor (``lab.ca_dir / "root.pem"`` == ``slapd.ca_file`` content).
The session server has the lab cards' certificates of ``PUBLISHED_CARDS`` in their holders'
entries (userCertificate;binary); the other holders have none (carol has svmmCertMapping).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

from svmm_lab.directory import Slapd
from svmm_lab.lab import Lab

PUBLISHED_CARDS = ("alice", "bob")

SlapdFactory = Callable[..., Slapd]


def publish_certificate(server: Slapd, uid: str, der: bytes) -> None:
    """Add a certificate to a person's userCertificate;binary (as the admin)."""
    import base64

    server.add_ldif(
        f"dn: {server.user_dn(uid)}\nchangetype: modify\nadd: userCertificate;binary\n"
        f"userCertificate;binary:: {base64.b64encode(der).decode()}\n-\n"
    )


def publish_card_certificates(server: Slapd, lab: Lab, cards: Iterable[str]) -> None:
    for name in cards:
        cert = lab.card_cert(name)
        holder = str(lab.card(name).get("holder", name))
        publish_certificate(server, holder, cert.public_bytes(serialization.Encoding.DER))


@pytest.fixture(scope="session")
def slapd(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Slapd]:
    if not Path("/usr/sbin/slapd").exists():
        pytest.skip("slapd not installed (Debian packages slapd, ldap-utils)")
    server = Slapd(tmp_path_factory.mktemp("slapd"), ca=lab.ca)
    server.start()
    try:
        publish_card_certificates(server, lab, PUBLISHED_CARDS)
        yield server
    finally:
        server.stop()


@pytest.fixture
def slapd_factory(lab: Lab, tmp_path: Path) -> Iterator[SlapdFactory]:
    """Start servers of this test (keyword arguments as for Slapd); all stopped afterwards."""
    if not Path("/usr/sbin/slapd").exists():
        pytest.skip("slapd not installed (Debian packages slapd, ldap-utils)")
    made: list[Slapd] = []

    def make(**kwargs: Any) -> Slapd:
        server = Slapd(tmp_path / f"slapd{len(made)}", ca=lab.ca, **kwargs)
        made.append(server)
        server.start()
        return server

    try:
        yield make
    finally:
        for server in made:
            server.stop()


@pytest.fixture
def replicated_slapd(slapd_factory: SlapdFactory, lab: Lab) -> tuple[Slapd, Slapd]:
    """A syncrepl provider with the example organisation and the published cards, and a
    consumer that has replicated all of it (kill, pause or change either freely)."""
    provider = slapd_factory(syncprov=True)
    publish_card_certificates(provider, lab, PUBLISHED_CARDS)
    consumer = slapd_factory(consumer_of=provider)  # returns once in sync
    return provider, consumer


@pytest.fixture
def fresh_slapd(slapd_factory: SlapdFactory) -> Slapd:
    """A server of this test only, with the example organisation (stop or pause it freely)."""
    return slapd_factory()
