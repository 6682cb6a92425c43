"""PAM sessions through the real stack: a card login opens a session, the session hook writes
the user's VM allowlist from the signed policy (real slapd for identity and roles, a bundle
signed under the lab CA), sessions of one user are refcounted, the last close removes it."""

from __future__ import annotations

import os
import signal
import stat
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization

from pam_svmm.domain.policy_bundle import make_bundle
from svmm_lab.directory import Slapd
from svmm_lab.lab import PAM_PYTHON, SHIM, Lab
from svmm_lab.pamclient import PamSession
from svmm_lab.pki import new_key
from tests.integration import ldap_fixtures

pytestmark = pytest.mark.integration
slapd = ldap_fixtures.slapd
PIN = "123456"
POLICY = Path(__file__).resolve().parents[2] / "config" / "policy.example.toml"
CAROL, BOB = 10003, 10002


@pytest.fixture(scope="module")
def policy_overrides(lab: Lab) -> str:
    folder = lab.folder / "session-policy"
    folder.mkdir(mode=0o700, exist_ok=True)
    key = new_key("p256")
    signer = lab.ca.issue_policy_signer("Demo policy signer", key.public_key())
    bundle = folder / "policy.bundle"
    # the example policy, with this file's PAM services among those that may log in
    text = POLICY.read_text().replace('"svmm-login"]', '"svmm-login", "svmm-session"]')
    assert "svmm-session" in text
    bundle.write_bytes(make_bundle(text.encode(), key, [signer, lab.ca.intermediate.cert]))
    return f"""
[policy]
enabled = true
source = "file"
file = "{bundle}"
state_dir = "{folder / "state"}"
"""


@pytest.fixture(scope="module")
def service(lab: Lab, slapd: Slapd, policy_overrides: str) -> str:
    return lab.variant("session", lab.directory_overrides(slapd) + policy_overrides)


@pytest.fixture(autouse=True)
def _no_session_left(lab: Lab) -> Iterator[None]:
    yield
    # every test closes what it opened: nothing may be left for the next one
    leftovers = os.listdir(lab.allowlist_dir) if lab.allowlist_dir.exists() else []
    assert leftovers == [], leftovers


def _open(lab: Lab, card: str, user: str, service: str) -> PamSession:
    s = lab.login(lab.insert(card), pin=PIN, user=user, service=service, session=True)
    assert s.opened == 0, s.report
    return s


def _events(records: list[dict[str, Any]], event: str) -> list[dict[str, Any]]:
    return [r for r in records if r["event"] == event]


def test_card_login_opens_a_session_with_the_allowlist(lab: Lab, service: str) -> None:
    before = len(lab.audit_records())
    with _open(lab, "carol", "carol", service) as s:
        path = lab.allowlist_dir / f"{CAROL}.json"
        st = path.stat()
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 0, 0o644)
        assert stat.S_IMODE(lab.allowlist_dir.stat().st_mode) == 0o755
        doc = lab.allowlist(CAROL)
        assert doc is not None
        auth = _events(lab.audit_records()[before:], "auth")[-1]
        assert doc["user"] == "carol" and doc["uid"] == CAROL and doc["method"] == "card"
        assert doc["roles"] == sorted(auth["roles"]) and "vm-admins" in doc["roles"]
        assert doc["card"]["fingerprint"] == auth["card"]["fingerprint"]
        assert doc["host"] == "lab-host" and doc["policy_version"] == 1
        assert doc["vms"]["vm-db"] == {
            "permissions": ["boot", "console", "network:internal"],
            "volumes": ["db-disk", "db-logs"],
        }
        assert "usb:046d:c52b" in doc["vms"]["vm-web"]["permissions"]
        assert len(doc["sessions"]) == 1 and f":{s.pid}:" in doc["sessions"][0]
    report = s.close()
    assert report.ok and report.session_open == 0 and report.session_close == 0
    assert lab.allowlist(CAROL) is None
    records = lab.audit_records()[before:]
    assert [r["event"] for r in records if r["event"] != "policy_load"] == [
        "auth",
        "account",
        "session_open",
        "session_close",
    ]
    opened, closed = _events(records, "session_open")[0], _events(records, "session_close")[0]
    assert opened["outcome"] == "success" and opened["reason"] == "allowlist_written"
    assert doc["sessions"][0] in opened["detail"] and "vm-db" in opened["detail"]
    assert opened["card"]["fingerprint"] == doc["card"]["fingerprint"]
    assert closed["outcome"] == "success" and closed["reason"] == "allowlist_removed"
    assert doc["sessions"][0] in closed["detail"]
    # one policy load per login: the account phase's, shared by the session
    assert [r["outcome"] for r in _events(records, "policy_load")] == ["success"]


def test_sessions_of_one_user_are_refcounted(lab: Lab, service: str) -> None:
    first = _open(lab, "bob", "bob", service)
    second = _open(lab, "bob", "bob", service)
    try:
        doc = lab.allowlist(BOB)
        assert doc is not None and len(doc["sessions"]) == 2
        sid_first = next(s for s in doc["sessions"] if f":{first.pid}:" in s)
        sid_second = next(s for s in doc["sessions"] if f":{second.pid}:" in s)
        assert first.close().session_close == 0
        doc = lab.allowlist(BOB)
        assert doc is not None and doc["sessions"] == [sid_second]
        assert "vm-web" in doc["vms"]
    finally:
        last = second.close()
        first.close()
    assert last.session_close == 0 and lab.allowlist(BOB) is None
    closes = [r for r in _events(lab.audit_records(), "session_close") if r["user"] == "bob"]
    assert [r["reason"] for r in closes[-2:]] == ["session_closed", "allowlist_removed"]
    assert sid_first in closes[-2]["detail"] and sid_second in closes[-1]["detail"]


def test_a_signal_ends_the_session_and_closes_it(lab: Lab, service: str) -> None:
    s = _open(lab, "bob", "bob", service)
    assert lab.allowlist(BOB) is not None
    assert s.close(signal=signal.SIGTERM).session_close == 0
    assert lab.allowlist(BOB) is None


def test_session_of_an_account_this_module_does_not_know_is_ignored(
    lab: Lab, slapd: Slapd, policy_overrides: str
) -> None:
    # Another module authenticates (pam_permit stands in); our session hook is optional.
    cfg = lab.write_config(
        lab.directory_overrides(slapd) + policy_overrides, lab.folder / "session-only.toml"
    )
    module = f"{PAM_PYTHON} {SHIM} venv={sys.prefix} config={cfg}"
    (lab.pam_dir / "svmm-session-only").write_text(
        "auth required pam_permit.so\naccount required pam_permit.so\n"
        f"session [success=ok ignore=ignore default=bad] {module}\n"
        "session required pam_permit.so\n"
    )
    before = len(lab.audit_records())
    with lab.login(
        lab.insert(), pin="", user="root", service="svmm-session-only", session=True
    ) as s:
        assert s.opened == 0
    assert s.report is not None and s.report.session_close == 0
    assert lab.audit_records()[before:] == []  # not ours: nothing to say
    # A directory account that another module logged in: audited, no allowlist.
    with lab.login(
        lab.insert(), pin="", user="bob", service="svmm-session-only", session=True
    ) as s:
        assert s.opened == 0
        assert lab.allowlist(BOB) is None
    records = lab.audit_records()[before:]
    assert [(r["event"], r["outcome"], r["reason"]) for r in records] == [
        ("session_open", "failure", "not_logged_in_by_svmm")
    ]


def test_no_policy_is_a_session_error_and_writes_nothing(
    lab: Lab, slapd: Slapd, tmp_path: Path
) -> None:
    missing = f"""
[policy]
enabled = true
source = "file"
file = "{tmp_path / "absent.bundle"}"
state_dir = "{tmp_path / "policy-state"}"
"""
    cfg = lab.write_config(lab.directory_overrides(slapd) + missing, tmp_path / "nopolicy.toml")
    module = f"{PAM_PYTHON} {SHIM} venv={sys.prefix} config={cfg}"
    svc = "svmm-session-nopolicy"
    # account by pam_permit: ours would refuse the login already (no policy, no host rule)
    (lab.pam_dir / svc).write_text(
        f"auth required {module}\naccount required pam_permit.so\nsession required {module}\n"
    )
    before = len(lab.audit_records())
    s = lab.login(lab.insert("bob"), pin=PIN, user="bob", service=svc, session=True)
    assert s.opened == 14  # PAM_SESSION_ERR
    report = s.close()
    assert report.ok and report.session_open == 14 and report.session_close is None
    assert lab.allowlist(BOB) is None
    opened = _events(lab.audit_records()[before:], "session_open")
    assert [(r["outcome"], r["reason"]) for r in opened] == [("undecided", "policy_unavailable")]


def test_the_allowlist_key_material_is_public_only(lab: Lab, service: str) -> None:
    """The file is world-readable by contract: it must hold no PIN and no key."""
    with _open(lab, "bob", "bob", service):
        text = (lab.allowlist_dir / f"{BOB}.json").read_text()
    assert PIN not in text and "PRIVATE" not in text
    cert = lab.card_cert("bob").public_bytes(serialization.Encoding.PEM).decode()
    assert cert.splitlines()[1] not in text
