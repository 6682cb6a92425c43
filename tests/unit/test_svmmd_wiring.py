"""svmmd's one composition: the PAM calls it answers write the launcher's audit trail and
decide with the launcher's policy service, also after the configuration file changed."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from pam_svmm.config import load
from pam_svmm.daemon.pam_responder import PamResponder
from pam_svmm.pam import entry
from pam_svmm.services.launcher import Launcher


def _write(path: Path, audit: Path, *, timeout: int) -> None:
    path.write_text(
        f'[auth]\nhost_name = "h"\nlogin_timeout = {timeout}\n'
        f'[audit]\npath = "{audit}"\nsyslog = false\n'
        f'[launcher]\nsocket = "{path.parent / "l.sock"}"\n'
        f'run_dir = "{path.parent / "vms"}"\nregistry_dir = "{path.parent / "reg"}"\n'
    )


def test_svmmd_logins_share_the_launchers_audit_trail_and_policy(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "svmm.toml"
    _write(path, tmp_path / "audit.jsonl", timeout=30)
    launcher = Launcher.from_config(load(path), syslog_mirror=False)
    responder = PamResponder(path, launcher=launcher)
    entry._services.clear()
    try:
        responder._wire()
        svc = entry._service(entry.ModuleArgs(str(path)))
        assert svc.audit is launcher.audit and svc.policy is launcher.policy
        assert svc.local_launcher is launcher

        # The file changes: a login setting applies at once; the trail moved in the file
        # stays the one svmmd writes until it restarts, and the log says so.
        _write(path, tmp_path / "elsewhere.jsonl", timeout=45)
        os.utime(path, ns=(1, os.stat(path).st_mtime_ns + 10**9))
        with caplog.at_level(logging.WARNING, logger="pam_svmm.daemon.pam_responder"):
            responder._wire()
        fresh = entry._service(entry.ModuleArgs(str(path)))
        assert fresh is not svc and fresh.config.auth.login_timeout == 45
        assert fresh.audit is launcher.audit
        assert "[audit] take effect when svmmd restarts" in caplog.text
    finally:
        entry._services.clear()
        launcher.close()


def test_a_pam_application_gone_mid_login_is_audited_as_a_failed_conversation() -> None:
    """The e2e guest's console login that quit while svmmd asked its PIN was audited
    "error: internal:ProtocolError"; the person's application went away, nothing broke."""
    from pam_svmm.daemon.pam_responder import ProtocolError
    from pam_svmm.domain.audit_record import Outcome
    from pam_svmm.services.login import outcome_of, reason_of

    gone = ProtocolError("the PAM client went away: [Errno 32] Broken pipe")
    assert outcome_of(gone) is Outcome.UNDECIDED
    assert reason_of(gone) == "conversation_failed"
