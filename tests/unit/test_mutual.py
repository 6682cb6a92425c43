"""Mutual authentication: the card's anchor must vouch for the host, which must hold its key."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest

from pam_svmm.domain.mutual import verify_host
from pam_svmm.errors import HostNotVouched
from svmm_lab.pki import LabCA, new_key


@pytest.fixture(scope="module")
def cas(tmp_path_factory: pytest.TempPathFactory) -> tuple[LabCA, LabCA]:
    def make(name: str) -> LabCA:
        return LabCA.create(
            Path(tmp_path_factory.mktemp(name)),
            crl_base="http://127.0.0.1:1",
            ocsp_url="http://127.0.0.1:2/",
        )

    return make("org"), make("rogue")


def _vouch(ca: LabCA, anchors: list, *, key_matches: bool = True, client_cert: bool = False):
    key = new_key("p256")
    cert = (
        ca.issue_user("lab-host", key.public_key())
        if client_cert
        else ca.issue_host("lab-host", key.public_key())
    )
    return verify_host(
        card_anchors=anchors,
        host_cert=cert,
        host_key=key if key_matches else new_key("p256"),
        intermediates=[ca.intermediate.cert],
        at=dt.datetime.now(dt.UTC),
        nonce=b"n" * 32,
    )


def test_host_vouched_for_by_the_cards_anchor(cas: tuple[LabCA, LabCA]) -> None:
    org, _ = cas
    v = _vouch(org, [org.root.cert])
    assert v.name == "lab-host"
    assert v.anchor.startswith("CN=Demo Org Root CA")


@pytest.mark.parametrize(
    ("case", "words"),
    [
        ("no anchor on the card", "carries no trust anchor"),
        ("host of another organisation", "not vouched for"),
        ("host without its key", "does not hold the key"),
        ("client certificate as host", "not vouched for"),
    ],
)
def test_refusals(cas: tuple[LabCA, LabCA], case: str, words: str) -> None:
    org, rogue = cas
    with pytest.raises(HostNotVouched, match=words):
        if case == "no anchor on the card":
            _vouch(org, [])
        elif case == "host of another organisation":
            _vouch(rogue, [org.root.cert])
        elif case == "host without its key":
            _vouch(org, [org.root.cert], key_matches=False)
        else:
            _vouch(org, [org.root.cert], client_cert=True)
