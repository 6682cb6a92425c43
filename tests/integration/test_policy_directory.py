"""The signed policy bundle from the directory (svmmPolicyBundle of cn=vm-policy) through a
real slapd: accepted, kept while the directory is down, rollback refused."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest

from pam_svmm.adapters.directory import DirectoryClient
from pam_svmm.adapters.policy_store import DirectorySource, LoadEvent, PolicyStore
from pam_svmm.config import DirectoryConfig, PolicyConfig, PolicySource
from pam_svmm.domain.policy_bundle import make_bundle
from svmm_lab.directory import Slapd
from svmm_lab.lab import Lab
from svmm_lab.pki import new_key
from tests.integration.ldap_fixtures import (  # noqa: F401 - pytest fixtures
    fresh_slapd,
    slapd_factory,
)

pytestmark = pytest.mark.integration

POLICY_DN = "cn=vm-policy,ou=policies,dc=demo,dc=example"
EXAMPLE = Path(__file__).resolve().parents[2] / "config" / "policy.example.toml"


def _publish(server: Slapd, bundle: bytes) -> None:
    server.add_ldif(
        f"dn: {POLICY_DN}\nchangetype: modify\nreplace: svmmPolicyBundle\n"
        f"svmmPolicyBundle:: {base64.b64encode(bundle).decode()}\n-\n"
    )


def _bundle(lab: Lab, version: int) -> bytes:
    key = new_key("p256")
    cert = lab.ca.issue_policy_signer("Demo Policy Signer", key.public_key())
    text = EXAMPLE.read_text().replace("version = 1", f"version = {version}")
    return make_bundle(text.encode(), key, [cert, lab.ca.intermediate.cert])


def test_policy_from_the_directory(lab: Lab, fresh_slapd: Slapd, tmp_path: Path) -> None:  # noqa: F811
    directory = DirectoryConfig(
        enabled=True,
        uris=(fresh_slapd.uri,),
        base_dn="dc=demo,dc=example",
        bind_dn=fresh_slapd.service_dn,
        ca_file=fresh_slapd.ca_file,
        connect_timeout=1.0,
        search_timeout=1.0,
    )
    client = DirectoryClient(directory, bind_password=fresh_slapd.service_password)
    # no value yet, and no such entry: None (not an error)
    assert client.read_attribute(POLICY_DN, "svmmPolicyBundle") is None
    assert client.read_attribute("cn=nothing,ou=policies,dc=demo,dc=example", "cn") is None

    config = PolicyConfig(
        source=PolicySource.DIRECTORY, directory_dn=POLICY_DN, state_dir=tmp_path / "state"
    )
    store = PolicyStore(config, DirectorySource(client, POLICY_DN), anchors=[lab.ca.root.cert])
    assert store.load().event is LoadEvent.NONE

    v2 = _bundle(lab, 2)
    _publish(fresh_slapd, v2)
    assert client.read_attribute(POLICY_DN, "svmmPolicyBundle") == v2
    r = store.load()
    assert r.event is LoadEvent.ACCEPTED and r.policy is not None and r.policy.version == 2

    _publish(fresh_slapd, _bundle(lab, 1))
    r = store.load()
    assert r.event is LoadEvent.KEPT and r.reason == "policy_rollback"

    fresh_slapd.pause()
    try:
        r = store.load()
    finally:
        fresh_slapd.resume()
    assert r.event is LoadEvent.KEPT and r.reason == "directory_unavailable"
    assert r.policy is not None and r.policy.version == 2
    client.close()
