"""The card helper (adapters/card_helper.py): card middleware never runs with the caller's
environment or root's capabilities, and a helper that misbehaves is a refusal.

Real parts: OpenSC's PKCS#11 module and its configuration file, SoftHSM2 behind pinguard,
the PAM stack (pam_wrapper) with the shim in-process, gcc for the "driver" a user plants.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from pam_svmm.adapters.card_helper import BASE_ENV, CardHelper, HelperForker
from pam_svmm.adapters.token import Pkcs11Module
from pam_svmm.errors import PinIncorrect, TokenError
from svmm_lab.lab import Lab, Reader
from tests.integration import softhsm as fixtures
from tests.integration.logins import PIN
from tests.integration.softhsm import USER_PIN, SoftHsm

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (capabilities, PAM as root)"),
]
pinguard_so = fixtures.pinguard_so
softhsm = fixtures.softhsm
OPENSC = Path("/usr/lib/x86_64-linux-gnu/opensc-pkcs11.so")
EVIL_C = """
#include <stdio.h>
#include <unistd.h>
__attribute__((constructor)) static void planted(void) {
    FILE *f = fopen(MARKER, "w");
    if (f) { fprintf(f, "%d\\n", (int)geteuid()); fclose(f); }
}
void *sc_module_init(const char *name) { (void)name; return 0; }
const char *sc_driver_version(void) { return "0.23.0"; }
"""


@pytest.fixture
def planted(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """A user's opensc.conf naming a card driver of theirs, and the file it writes when
    loaded: what `OPENSC_CONF=~/evil.conf su alice` hands to code running as root."""
    marker = tmp_path / "loaded-as"
    lib = tmp_path / "libevil.so"
    src = tmp_path / "evil.c"
    src.write_text(EVIL_C)
    subprocess.run(["gcc", "-shared", "-fPIC", f'-DMARKER="{marker}"', "-o", str(lib), str(src)],
                   check=True)  # fmt: skip
    conf = tmp_path / "opensc.conf"
    conf.write_text(
        textwrap.dedent(f"""\
        app default {{
            card_drivers = evil, internal;
            card_driver evil {{ module = {lib}; }}
        }}
    """)
    )
    return {"OPENSC_CONF": str(conf)}, marker


def test_opensc_loads_the_driver_a_users_configuration_names(
    planted: tuple[dict[str, str], Path],
) -> None:
    """The probe: the planted configuration does work on a process that loads OpenSC with
    the caller's environment (what the in-process PAM module did)."""
    env, marker = planted
    code = f"from pam_svmm.adapters.token import Pkcs11Module; Pkcs11Module({str(OPENSC)!r})"
    subprocess.run([sys.executable, "-c", code], env=dict(os.environ, **env), check=True)
    assert marker.read_text().strip() == "0"  # loaded, as root


def test_su_with_a_planted_opensc_conf_never_loads_it(
    lab: Lab, planted: tuple[dict[str, str], Path]
) -> None:
    """su runs the PAM module as root with the caller's environment; the module's card
    helper gets the product's environment, so OpenSC reads the system's configuration."""
    env, marker = planted
    svc = lab.variant("opensc", f'[pkcs11]\nmodule = "{OPENSC}"\n')
    reader = lab.insert("alice")
    report = lab.login(Reader(reader.folder, {**reader.env, **env}), pin=PIN, user="alice",
                       service=svc)  # fmt: skip
    assert report.code != 0  # OpenSC has no reader here: no card
    assert not marker.exists(), "the caller's opensc.conf loaded a module as root"


def _status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return dict(line.split(":\t", 1) for line in lines if ":\t" in line)


Start = Callable[..., CardHelper]


@pytest.fixture(params=["spawned", "forked"])
def start(request: pytest.FixtureRequest) -> Iterator[Start]:
    """A helper of its own (the PAM process, the CLI), or forked by svmmd's forker: each
    property below holds for both."""
    forkers: list[HelperForker] = []

    def make(path: str, *, pass_environment: tuple[str, ...] = (), **kw: object) -> CardHelper:
        if request.param == "spawned":
            return CardHelper(path, pass_environment=pass_environment, **kw)  # type: ignore[arg-type]
        forkers.append(HelperForker(pass_environment=pass_environment))
        return CardHelper(path, forker=forkers[-1], **kw)  # type: ignore[arg-type]

    yield make
    for f in forkers:
        f.close()


def _gone(pid: int, within: float = 5.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.02)
    return False


@pytest.fixture
def card(softhsm: SoftHsm) -> Iterator[SoftHsm]:
    key = ec.generate_private_key(ec.SECP256R1())
    with softhsm.open() as module:
        softhsm.provision(module, "alice", key, fixtures.self_signed(key, "alice"))
    yield softhsm


def test_the_helper_has_no_capabilities_and_only_the_products_environment(
    card: SoftHsm, monkeypatch: pytest.MonkeyPatch, start: Start
) -> None:
    monkeypatch.setenv("OPENSC_CONF", "/home/mallory/opensc.conf")
    monkeypatch.setenv("PCSCLITE_CSOCK_NAME", "/home/mallory/pcscd.comm")
    passed = tuple(card.env())
    with start(str(card.module_path), pass_environment=passed) as helper:
        assert [t.label for t in helper.tokens()] == ["alice"]
        pid = helper.pid  # setpriv execs the interpreter in place: the same pid
        status = _status(pid)
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    assert status["CapEff"] == status["CapPrm"] == status["CapBnd"] == "0000000000000000"
    assert status["NoNewPrivs"] == "1"
    names = {e.split(b"=", 1)[0].decode() for e in environ if e}
    assert names == set(BASE_ENV) | set(passed)


def test_a_wrong_and_a_right_pin_through_the_helper(card: SoftHsm, start: Start) -> None:
    with start(str(card.module_path), pass_environment=tuple(card.env())) as helper:
        (token,) = helper.tokens()
        (cert,) = helper.certificates(token)
        with helper.session(token) as s:
            with pytest.raises(PinIncorrect):
                s.login("000000")
            assert not s.logged_in
            s.login(USER_PIN)
            _scheme, signature = s.sign(cert.id, b"challenge")
    public = cert.load().public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    public.verify(signature, b"challenge", ec.ECDSA(hashes.SHA256()))


def test_one_application_logged_in_is_card_busy_never_a_success(card: SoftHsm) -> None:
    """Within one PKCS#11 application (the CLI's in-process module), a second session's
    C_Login answers "already logged in" without checking the PIN: card_busy."""
    with Pkcs11Module(card.module_path) as module:
        (token,) = module.tokens()
        with module.session(token) as first, module.session(token) as second:
            first.login(USER_PIN)
            with pytest.raises(TokenError) as e:
                second.login("000000")
            assert e.value.reason == "card_busy"
            assert not second.logged_in


def test_a_helper_that_dies_is_a_refusal(card: SoftHsm, start: Start) -> None:
    with start(str(card.module_path), pass_environment=tuple(card.env())) as helper:
        (token,) = helper.tokens()
        os.kill(helper.pid, signal.SIGKILL)
        with pytest.raises(TokenError) as e:
            helper.certificates(token)
        assert e.value.reason == "card_helper_failed"
        with pytest.raises(TokenError):
            helper.tokens()  # and stays refused: the helper is not silently replaced


def test_a_helper_that_hangs_is_cut_off_at_its_timeout(card: SoftHsm, start: Start) -> None:
    with start(str(card.module_path), pass_environment=tuple(card.env()),
               timeout=1.0) as helper:  # fmt: skip
        os.kill(helper.pid, signal.SIGSTOP)
        with pytest.raises(TokenError) as e:
            helper.tokens()
        assert e.value.reason == "card_helper_failed"
        assert "in time" in e.value.message
    assert _gone(helper.pid)  # killed and reaped, not left stopped


PLANTED_MODULE_C = """
#include <stdlib.h>
__attribute__((constructor)) static void planted(void) {
    system("touch " MARKER);  /* a shell: fork + execve */
}
"""


def test_a_module_that_runs_a_program_cannot_in_the_helper(tmp_path: Path, start: Start) -> None:
    """A module (or a driver it loads) that starts a program as root: in-process it would;
    in the helper execve fails (seccomp), and loading it is a refusal."""
    marker = tmp_path / "ran"
    lib, src = tmp_path / "libplanted.so", tmp_path / "planted.c"
    src.write_text(PLANTED_MODULE_C)
    subprocess.run(["gcc", "-shared", "-fPIC", f'-DMARKER="{marker}"', "-o", str(lib), str(src)],
                   check=True)  # fmt: skip
    probe = f"import ctypes; ctypes.CDLL({str(lib)!r})"
    subprocess.run([sys.executable, "-c", probe], check=True)
    assert marker.exists()  # the probe: loaded in a plain process, it runs its program
    marker.unlink()
    with pytest.raises(TokenError):
        start(str(lib))
    assert not marker.exists(), "the planted module ran a program from the card helper"


def test_the_helper_runs_under_its_seccomp_filter(card: SoftHsm, start: Start) -> None:
    with start(str(card.module_path), pass_environment=tuple(card.env())) as helper:
        assert helper.tokens()
        assert _status(helper.pid)["Seccomp"] == "2"  # SECCOMP_MODE_FILTER


def test_a_screen_locker_running_as_its_user_starts_its_helper_too(tmp_path: Path) -> None:
    """Not root: no capabilities to drop, no bounding set to touch, no user to become; the
    helper still starts (no_new_privs, seccomp) and reads the user's own software token."""
    import pwd
    import shutil
    import tempfile

    from svmm_lab.userland import userland

    nobody = pwd.getpwnam("nobody")
    top = Path(tempfile.mkdtemp(prefix="svmm-helper-", dir="/tmp"))
    try:
        top.chmod(0o755)
        tokens = top / "tokens"
        tokens.mkdir()
        os.chown(tokens, nobody.pw_uid, nobody.pw_gid)
        conf = top / "softhsm2.conf"
        conf.write_text(f"directories.tokendir = {tokens}\nobjectstore.backend = file\n")
        conf.chmod(0o644)
        code = (
            "from pam_svmm.adapters.card_helper import CardHelper\n"
            f"with CardHelper({str(fixtures.SOFTHSM_MODULE)!r},"
            " pass_environment=('SOFTHSM2_CONF',)) as h:\n"
            "    status = open(f'/proc/{h.pid}/status').read()\n"
            "    print(len(h.tokens()), status.count('Seccomp:\\t2'))\n"
        )
        u = userland()
        p = subprocess.run(
            ["setpriv", f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}", "--clear-groups",
             *u.argv("-c", code)],
            env=u.env(SOFTHSM2_CONF=str(conf)), capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert p.returncode == 0, p.stderr
        assert p.stdout.split() == ["0", "1"]  # no initialized token; under its filter
    finally:
        shutil.rmtree(top, ignore_errors=True)


def test_svmmd_takes_a_prestarted_helper_and_never_shares_one(card: SoftHsm) -> None:
    """prefork (svmmd): each login takes a helper started ahead of it, a process of its own."""
    import time

    from pam_svmm import config as config_mod
    from pam_svmm.services.login import LoginService

    cfg = config_mod.parse(
        {"pkcs11": {"module": str(card.module_path), "pass_environment": list(card.env())}}
    )
    svc = LoginService(cfg, card_helper=True)
    svc.prefork = True
    first = svc.login_module()  # none was ready: started now, and a spare behind it
    deadline = time.monotonic() + 20
    while svc._spare is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert svc._spare is not None
    spare_pid = svc._spare[1].pid
    second = svc.login_module()
    try:
        assert second.pid == spare_pid != first.pid
        assert [t.label for t in second.tokens()] == ["alice"]
    finally:
        first.close()
        second.close()
        svc.close_spare()


def test_forked_helpers_are_processes_of_their_own_and_the_card_checks_each_pin(
    card: SoftHsm,
) -> None:
    """svmmd's forker: each login's helper is a new process that loads the module afresh,
    so one logged in never answers "already logged in" (or success) for another's PIN; the
    forker itself never loads a module."""
    forker = HelperForker(pass_environment=tuple(card.env()))
    try:
        with (
            CardHelper(str(card.module_path), forker=forker) as first,
            CardHelper(str(card.module_path), forker=forker) as second,
        ):
            assert len({first.pid, second.pid, forker.pid, os.getpid()}) == 4
            (token,) = first.tokens()
            with first.session(token) as s1, second.session(token) as s2:
                s1.login(USER_PIN)
                with pytest.raises(PinIncorrect):
                    s2.login("000000")
            maps = Path(f"/proc/{forker.pid}/maps").read_text()
            assert str(card.module_path.resolve().name) not in maps
            assert "libsofthsm2" not in maps
            assert (
                str(card.module_path.resolve().name) in Path(f"/proc/{first.pid}/maps").read_text()
            )
    finally:
        forker.close()


def test_a_forker_that_died_is_started_again(card: SoftHsm) -> None:
    forker = HelperForker(pass_environment=tuple(card.env()))
    try:
        with CardHelper(str(card.module_path), forker=forker) as helper:
            old = forker.pid
            assert old is not None
            os.kill(old, signal.SIGKILL)
            assert [t.label for t in helper.tokens()] == ["alice"]  # a helper outlives it
        with CardHelper(str(card.module_path), forker=forker) as helper:
            assert [t.label for t in helper.tokens()] == ["alice"]
            assert forker.pid not in (None, old)
        assert _gone(old)  # reaped when the next login found it dead
    finally:
        forker.close()
