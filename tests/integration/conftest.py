"""The lab for the login tests: CA, soft cards, an OCSP responder and a CRL server, shared by
the session (building it takes a few seconds; each login runs in its own PAM process)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from svmm_lab.lab import DEMO_CARDS, CardSpec, Lab, free_ports

TEST_CARDS = (
    *DEMO_CARDS,
    CardSpec("nyv", "nyv", "p256", state="not_yet_valid"),
    CardSpec("noeku", "noeku", "p256", state="no_eku"),
    CardSpec("scl", "scl", "p256", state="smartcard_only"),
    CardSpec("rogue", "alice", "p256", state="untrusted"),
    CardSpec("broken", "broken", "p256", state="malformed"),
    CardSpec("pad", "pad", "p256", pinpad=True),
    CardSpec("tries", "tries", "rsa", tries_left=3, max_tries=3, pin="914273"),
    CardSpec("renewed", "renewed", "p256", state="renewed"),
    CardSpec("twin", "twin", "p256", upn=False),  # e-mail shared by two directory entries
    CardSpec("ghost", "ghost", "p256"),  # not in the directory
    CardSpec("dora", "dora", "p256"),  # disabled in the directory
)


@pytest.fixture(scope="session")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    lab = Lab(tmp_path_factory.mktemp("lab"))
    crl_port, ocsp_port = free_ports(2)
    lab.build(crl_port=crl_port, ocsp_port=ocsp_port, cards=TEST_CARDS, venv=Path(sys.prefix))
    with lab.responders():
        yield lab
