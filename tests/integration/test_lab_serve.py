"""`svmm lab serve` does what README says after the demo: the lab's OCSP responder, CRL
server *and directory*, on the ports the lab recorded (stable from run to run); and a demo
started while they run says what holds the port and what to do, instead of "Address in use".

The lab here is a small one (one card) with its directory built and its ports recorded as the
demo does (host.lab_ports), so the test does not play the whole demo."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from svmm_lab import host
from svmm_lab.directory import Slapd
from svmm_lab.lab import DEMO_CARDS, Lab

pytestmark = pytest.mark.integration


def svmm(*args: str, **kw: object) -> list[str]:
    return [sys.executable, "-m", "pam_svmm.cli.main", *args]


@pytest.fixture
def small_lab(tmp_path: Path) -> Lab:
    lab = Lab(tmp_path / "lab")
    ports = host.lab_ports(lab)
    lab.build(crl_port=ports.crl, ocsp_port=ports.ocsp, cards=DEMO_CARDS[:1],
              venv=Path(sys.prefix))  # fmt: skip
    host.record_ports(lab, ports)
    slapd = Slapd(lab.folder / "directory", ca=lab.ca, port=ports.ldap, ldaps_port=ports.ldaps)
    slapd.build()
    lab.write_config(lab.directory_overrides(slapd))
    return lab


@pytest.fixture
def serving(small_lab: Lab) -> Iterator[subprocess.Popen[str]]:
    p = subprocess.Popen(svmm("lab", "serve", "--dir", str(small_lab.folder)),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    assert p.stdout is not None
    try:
        seen = []
        deadline = time.monotonic() + 60
        while not any(line.startswith("directory ") for line in seen):
            line = p.stdout.readline()
            assert line and time.monotonic() < deadline, (seen, p.stderr and p.stderr.read())
            seen.append(line)
        yield p
    finally:
        p.send_signal(signal.SIGTERM)
        p.communicate(timeout=30)


def test_the_ports_a_lab_records_are_the_ports_it_uses_next_time(small_lab: Lab) -> None:
    first = host.lab_ports(small_lab)
    again = host.lab_ports(Lab(small_lab.folder))
    assert first == again and len({first.crl, first.ocsp, first.ldap, first.ldaps}) == 4
    assert small_lab.ca.crl_base.endswith(f":{first.crl}")


def test_lab_serve_runs_the_directory_too(small_lab: Lab, serving: subprocess.Popen[str]) -> None:
    env = dict(os.environ, SVMM_CONFIG=str(small_lab.config_path))
    p = subprocess.run(svmm("id", "alice"), capture_output=True, text=True, env=env,
                       timeout=60, check=False)  # fmt: skip
    assert p.returncode == 0, p.stdout + p.stderr
    assert p.stdout.startswith("uid=10001(alice)")
    serving.send_signal(signal.SIGTERM)
    assert serving.wait(timeout=30) == 0
    p = subprocess.run(svmm("id", "alice"), capture_output=True, text=True, env=env,
                       timeout=60, check=False)  # fmt: skip
    assert p.returncode == 3  # the directory went with `lab serve`


def test_a_demo_while_lab_serve_runs_says_what_holds_the_port(
    small_lab: Lab, serving: subprocess.Popen[str]
) -> None:
    p = subprocess.run(svmm("lab", "demo", "--dir", str(small_lab.folder)), capture_output=True,
                       text=True, timeout=120, check=False)  # fmt: skip
    assert p.returncode != 0
    assert "internal error" not in p.stderr and "Address in use" not in p.stderr, p.stderr
    assert f"pid {serving.pid}" in p.stderr and "lab serve" in p.stderr, p.stderr
    assert "stop it" in p.stderr
