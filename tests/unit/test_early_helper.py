"""A PAM process starts its login's card helper as soon as it has read the configuration,
before it imports the login code, so the helper's interpreter start and imports run beside
its own (bench/login_latency.py's in-process rows); svmmd keeps its helpers ready instead."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from pam_svmm.pam import entry

PROBE = textwrap.dedent(
    """
    import sys
    from pam_svmm.adapters import card_helper
    from pam_svmm.pam import entry

    seen = []

    class Recorder:
        def __init__(self, path, **kw):
            seen.append(("login code imported", "pam_svmm.services.login" in sys.modules))
            seen.append(("waits", kw.get("wait", True)))
            self.closed = False

        def alive(self):
            return not self.closed

        def close(self, wait=False):
            self.closed = True

    card_helper.CardHelper = Recorder
    svc = entry._service(entry.ModuleArgs(config=sys.argv[1]), early=True)
    taken = svc.login_module()
    seen.append(("taken by the login", isinstance(taken, Recorder)))
    again = entry._service(entry.ModuleArgs(config=sys.argv[1]), early=True)
    seen.append(("one service", again is svc))
    svc.close_early()
    print(seen)
    """
)


def test_the_helper_starts_before_the_login_code_is_imported(tmp_path: Path) -> None:
    conf = tmp_path / "svmm.toml"
    conf.write_text('[pkcs11]\nmodule = "/usr/lib/softhsm/libsofthsm2.so"\n')
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(conf)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(
        [
            ("login code imported", False),
            ("waits", False),
            ("taken by the login", True),
            ("login code imported", True),  # the second login of this process
            ("waits", False),
            ("one service", True),
        ]
    )


def test_svmmd_starts_no_early_helper(tmp_path: Path) -> None:
    """In svmmd the service is made (and set to prefork) before its first PAM call."""
    from pam_svmm.services.login import LoginService

    svc = LoginService.__new__(LoginService)
    svc.prefork, svc._early = True, None
    key = ("x", 0)
    entry._services[key] = svc
    try:
        assert entry._service_for(key, Path("x"), early=True) is svc
        assert svc._early is None
    finally:
        entry._services.pop(key, None)
