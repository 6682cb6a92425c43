"""The demo: build the lab (CA, responders, soft cards, a directory), then log in through the
real PAM stack with each card, and with passwords, and say what happened and why.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from .host import lab_ports, port_names, record_ports
from .lab import DEMO_CARDS, LOGIN_SERVICE, CardSpec, Lab
from .ports import ensure_free
from .userland import userland
from .volumes import make_volume

PIN = "123456"
POLICY_EXAMPLE = Path(__file__).resolve().parents[1] / "config" / "policy.example.toml"
PASSWORD = "demo-password"  # alice's and paul's in config/ldap/example-org.ldif
PASSWORD_SERVICE = "svmm-login"
LAUNCHER = "launcher.sock"

DIRECTORY_CARDS = (
    CardSpec("twin", "twin", "p256", upn=False, story="e-mail only, two entries share it"),
    CardSpec("ghost", "ghost", "p256", story="a valid card for someone not in the directory"),
    CardSpec("dora", "dora", "p256", story="the directory disables her account"),
)


@dataclass(frozen=True)
class Scene:
    title: str
    cards: tuple[str, ...]
    secret: str  # the PIN, or the password when no card is inserted
    user: str = ""
    expect: str = "PAM_SUCCESS"
    before: str = ""  # an action on the lab before the login


SCENES: tuple[Scene, ...] = (
    Scene(
        "alice logs in with her card (RSA 2048); the directory gives her roles",
        ("alice",),
        PIN,
        "alice",
    ),
    Scene("bob logs in; PAM_USER is taken from his card (EC P-256)", ("bob",), PIN),
    Scene("carol logs in (EC P-384)", ("carol",), PIN, "carol"),
    Scene("alice types a wrong PIN", ("alice",), "000000", "alice", "PAM_AUTH_ERR"),
    Scene("alice's card is used to log in as bob", ("alice",), PIN, "bob", "PAM_AUTH_ERR"),
    Scene(
        "mallory's card was revoked: refused, and it unlocks nothing",
        ("mallory",),
        PIN,
        "mallory",
        "PAM_AUTH_ERR",
    ),
    Scene("eve's certificate has expired", ("eve",), PIN, "eve", "PAM_AUTH_ERR"),
    Scene(
        "a forged card: alice's certificate, another key", ("forged",), PIN, "alice", "PAM_AUTH_ERR"
    ),
    Scene(
        "dave has one PIN try left and mistypes it: the PIN locks",
        ("dave",),
        "999999",
        "dave",
        "PAM_MAXTRIES",
    ),
    Scene(
        "dave's PIN is locked: the right PIN no longer helps",
        ("dave",),
        PIN,
        "dave",
        "PAM_MAXTRIES",
    ),
    Scene(
        "two cards inserted (bob's and alice's): alice's is picked for alice",
        ("bob", "alice"),
        PIN,
        "alice",
    ),
    Scene(
        "a card whose e-mail address two directory entries share: ambiguous, refused",
        ("twin",),
        PIN,
        "",
        "PAM_AUTH_ERR",
    ),
    Scene(
        "a valid card of someone the directory does not know", ("ghost",), PIN, "", "PAM_AUTH_ERR"
    ),
    Scene(
        "dora's card is fine, but the directory disables her account",
        ("dora",),
        PIN,
        "dora",
        "PAM_PERM_DENIED",
    ),
    Scene("no card: alice logs in with her directory password", (), PASSWORD, "alice"),
    Scene(
        "no card: paul's password is refused, his role (vm-admins) demands a card",
        (),
        PASSWORD,
        "paul",
        "PAM_AUTH_ERR",
    ),
    Scene(
        "the OCSP responder is down: the CRL answers instead",
        ("alice",),
        PIN,
        "alice",
        before="stop-ocsp",
    ),
    Scene(
        "the directory is down: alice's card still logs her in, offline",
        ("alice",),
        PIN,
        "alice",
        before="stop-directory",
    ),
)


def run_demo(folder: Path, *, fresh: bool = False, out: TextIO = sys.stdout) -> int:
    from .directory import Slapd

    def say(text: str = "") -> None:
        print(text, file=out, flush=True)

    if fresh and folder.exists():
        shutil.rmtree(folder)
    lab = Lab(folder)
    ports = lab_ports(lab)  # the same every run: the configuration it writes stays right
    # The demo runs the lab's services itself; `svmm lab serve` (or an earlier demo) holding
    # their ports is said as such, not as "Address in use" from deep inside.
    ensure_free(
        port_names(ports),
        advice="stop it (the demo runs the lab's services itself) and run the demo again",
    )
    t0 = time.monotonic()
    say(f"Building the demo lab in {folder} ...")
    lab.build(
        crl_port=ports.crl,
        ocsp_port=ports.ocsp,
        cards=(*DEMO_CARDS, *DIRECTORY_CARDS),
        venv=Path(sys.prefix),
    )
    record_ports(lab, ports)
    failures = 0
    with ExitStack() as stack:
        ocsp, _crl = stack.enter_context(lab.responders())
        slapd = stack.enter_context(
            Slapd(lab.folder / "directory", ca=lab.ca, port=ports.ldap, ldaps_port=ports.ldaps)
        )
        bundle = lab.write_policy(POLICY_EXAMPLE.read_bytes())
        for volume in ("web-disk", "bank-a-data"):  # the volumes of the VMs alice may boot
            make_volume(lab, volume, "alice")
        socket_dir = _socket_dir(lab)
        lab.write_config(
            lab.directory_overrides(slapd, password_services=[PASSWORD_SERVICE])
            + lab.policy_overrides(bundle)
            + lab.launcher_overrides(socket_dir, card_poll_interval=0.3)
        )
        launcher = stack.enter_context(_launcher(lab))
        say(f"  CA: {lab.ca.root.cert.subject.rfc4514_string()}")
        say(f"      -> {lab.ca.intermediate.cert.subject.rfc4514_string()}")
        say(f"  OCSP responder {lab.ca.ocsp_url}   CRLs {lab.ca.crl_base}/intermediate.crl")
        say(f"  directory {slapd.uri} (StartTLS), {slapd.base_dn}")
        say(f"  VM policy {POLICY_EXAMPLE.name}, signed: {bundle}")
        say(f"  encrypted volumes (LUKS1, wrapped to alice's card): {lab.folder / 'volumes'}")
        say(f"  VM launcher svmmd on {socket_dir / 'launcher.sock'}")
        say(f"  PAM service {lab.pam_dir / 'svmm-login'}, configuration {lab.config_path}")
        say(f"  ready in {time.monotonic() - t0:.1f} s")
        say()
        failures += _session_and_policy(lab, say, launcher, socket_dir)
        failures += _fast_path(lab, say, socket_dir)
        for i, scene in enumerate(SCENES, 1):
            if scene.before == "stop-ocsp":
                ocsp.stop()
            elif scene.before == "stop-directory":
                slapd.stop()
            failures += _play(lab, i, scene, say)
        reader = lab.insert("bob")
        proc = lab.pamtester(reader, pin=PIN, user="bob")
        say("pamtester, a separate PAM application, logs bob in (offline too):")
        for line in (proc.stdout + proc.stderr).splitlines():
            if line.startswith("pamtester:"):
                say(f"    {line}")
        if proc.returncode != 0:
            failures += 1
    say()
    failures += _audit_trail(lab, say)
    say()
    say(f"Audit trail: {lab.audit_path} ({len(lab.audit_records())} records). Try:")
    say(f"  export SVMM_CONFIG={lab.config_path}")
    say(f"  {sys.prefix}/bin/svmm lab serve --dir {folder} &")
    say(f"  {sys.prefix}/bin/svmm cert verify {lab.cards_dir / 'mallory' / 'cert.pem'}")
    say(f"  {sys.prefix}/bin/svmm cert map {lab.cards_dir / 'twin' / 'cert.pem'}")
    say(f"  {sys.prefix}/bin/svmm id alice")
    say(f"  {sys.prefix}/bin/svmm policy explain alice bank-b --running bank-a")
    say(f"  {sys.prefix}/bin/svmm audit show --user alice")
    say(
        f"  {sys.prefix}/bin/svmm lab shell --dir {folder} --card alice -- "
        f"{sys.prefix}/bin/svmm card list"
    )
    say()
    say(
        "Demo finished: every scene as expected."
        if not failures
        else f"Demo finished: {failures} scene(s) NOT as expected."
    )
    return 0 if not failures else 1


def _session_and_policy(lab: Lab, say: Any, launcher: Any, socket_dir: Path) -> int:
    """alice opens a session: the allowlist the launcher will read, the volume keys her card
    releases, her VM booted with its decrypted disk; then what the policy says about VMs she
    may not start."""
    say(" *  alice logs in with her card and opens a session: her VM allowlist")
    before = len(lab.audit_records())
    failures = 0
    with lab.login(lab.insert("alice"), pin=PIN, user="alice", session=True) as session:
        if session.opened != 0:
            say(f"    session not opened: {session.report}")
            return 1
        allow = lab.allowlist(10001)
        if allow is None:
            say("    NO ALLOWLIST WRITTEN")
            return 1
        path = lab.allowlist_dir / "10001.json"
        st = path.stat()
        say(
            f"    {path} (uid {st.st_uid}, mode {st.st_mode & 0o777:o}),"
            f" expires {allow['expires_at']}"
        )
        say(f"    user {allow['user']} uid {allow['uid']} roles {', '.join(allow['roles'])}")
        say(
            f"    card {str((allow.get('card') or {}).get('fingerprint', ''))[:16]}"
            f"  method {allow['method']}  policy version {allow['policy_version']}"
        )
        for vm, grant in sorted(allow["vms"].items()):
            say(f"      {vm:8} {', '.join(grant['permissions'])}")
        for rec in lab.audit_records()[before:]:
            if rec["event"] == "key_release":
                say(f"    audit:  key_release {rec['outcome']} vm={rec['vm']} {rec['detail']}")
        failures += _boot(lab, say, launcher, socket_dir)
    gone = lab.allowlist(10001) is None
    say(f"    session closed: allowlist {'removed' if gone else 'STILL THERE'}")
    for rec in lab.audit_records()[before:]:
        if rec["event"] == "key_drop":
            say(f"    audit:  key_drop {rec['outcome']} {rec['detail']}")
    say()
    failures += 0 if gone else 1
    for args, expect in (
        (["alice", "bank-b", "--running", "bank-a"], 1),
        (["bob", "vm-db"], 1),
        (["carol", "vm-db", "--action", "console"], 0),
    ):
        p = _svmm(lab, "policy", "explain", *args)
        say(f" *  svmm policy explain {' '.join(args)}")
        for line in p.stdout.strip().splitlines():
            say(f"    {line}")
        if p.returncode != expect:
            say(f"    EXPECTED exit {expect}, got {p.returncode}: {p.stderr.strip()}")
            failures += 1
        say()
    return failures


def _fast_path(lab: Lab, say: Any, socket_dir: Path) -> int:
    """The same card login through svmmd: the PAM process is only its client, svmmd holds the
    reader, the CRL index, the directory connection and the policy. The PAM process's own
    reader is empty here, so only svmmd can have done it."""
    from statistics import median

    service = "login"  # a PAM service the policy lets alice use on lab-host
    lab.write_pam_service(name=service, args=f"daemon=required socket={socket_dir / LAUNCHER}")
    say(
        " *  the fast path: alice logs in through svmmd (PAM module argument daemon=required);"
        " her card is in svmmd's reader, the PAM process's reader is empty"
    )
    failures = 0
    times: dict[str, list[float]] = {"svmmd": [], "process": []}
    for i in range(4):
        for where, reader, name in (
            ("svmmd", lab.insert(), service),
            ("process", lab.insert("alice"), LOGIN_SERVICE),
        ):
            t0 = time.monotonic()
            report = lab.login(reader, pin=PIN, user="alice", service=name)
            ms = (time.monotonic() - t0) * 1000
            if not report.ok:
                say(f"    {where}: NOT LOGGED IN: {report.name} {'; '.join(report.messages)}")
                failures += 1
            if i:  # the first loads what svmmd keeps: not a fair sample
                times[where].append(ms)
    say(
        f"    authenticate + account, median of 3: through svmmd {median(times['svmmd']):.0f} ms,"
        f" in the PAM process {median(times['process']):.0f} ms"
        " (bench/login_latency.py measures it properly)"
    )
    say()
    return failures


def _boot(lab: Lab, say: Any, launcher: Any, socket_dir: Path) -> int:
    """alice boots vm-web through svmmd; its QEMU process reads and writes the decrypted
    disk; bob may not boot it."""
    code, started = _vm(socket_dir, 10001, "start", "vm-web")
    say(" *  as alice (uid 10001): svmm vm start vm-web")
    if code != 0 or not started.get("ok"):
        say(f"    NOT STARTED: {started}")
        return 1
    data = started["data"]
    say(
        f"    started: pid {data['pid']} (QEMU as its own uid), disk: {', '.join(data['volumes'])}"
        " (QEMU's LUKS driver, key from alice's card through a pipe)"
    )
    handle = launcher.registry.get("vm-web")
    handle.qmp.hmp('qemu-io web-disk "write -P 0x5a 0 65536"')
    handle.qmp.hmp('qemu-io web-disk "read -P 0x5a 0 65536"')
    removal = _card_removal(lab, say, launcher, socket_dir)
    _vm(socket_dir, 10001, "stop", "vm-web")
    log = (Path(handle.record.run_dir) / "qemu.log").read_text()
    ok = log.count("65536/65536") == 2 and "verification failed" not in log
    clear = b"\x5a" * 4096 not in (lab.folder / "volumes" / "web-disk.img").read_bytes()
    say(
        "    through QMP the VM wrote and read back 64 KiB of its disk: "
        f"{'ok' if ok else 'FAILED'};"
        f" on the host the image holds {'only ciphertext' if clear else 'PLAINTEXT'}"
    )
    code, other = _vm(socket_dir, 10002, "start", "vm-web")
    say(f" *  as bob (uid 10002): svmm vm start vm-web -> refused: {other.get('reason')}")
    return int(not ok) + int(not clear) + int(code == 0) + removal


def _card_removal(lab: Lab, say: Any, launcher: Any, socket_dir: Path) -> int:
    """alice's VM runs; she pulls her card: the launcher pauses the VM and forgets its keys;
    putting the card back resumes nothing by itself."""
    from . import pinguard

    _vm(socket_dir, 10001, "resume", "vm-web")
    serial = str(lab.card("alice")["serial"])
    status = launcher.registry.get("vm-web").status()["status"]
    say(f" *  vm-web is {status}; alice pulls her card out of the reader")
    pinguard.set_removed(lab.pinguard_state, serial, True)
    try:
        deadline = time.monotonic() + 5
        while launcher.registry.get("vm-web").status()["status"] != "paused":
            if time.monotonic() > deadline:
                say("    VM NOT PAUSED")
                return 1
            time.sleep(0.05)
        code, listed = _vm(socket_dir, 10001, "list")
        held = listed.get("data", {}).get("keys_held", ["?"])
        say(f"    the launcher paused vm-web; keys held now: {', '.join(held) or 'none'}")
    finally:
        pinguard.set_removed(lab.pinguard_state, serial, False)
    time.sleep(1.0)  # a few polls: the card is seen again
    code, again = _vm(socket_dir, 10001, "resume", "vm-web")
    say(
        f"    card back in: vm-web stays paused; resume -> {again.get('reason')}"
        " (a new login with the card hands the keys over again)"
    )
    return int(bool(held)) + int(code == 0)


def _vm(socket_dir: Path, uid: int, *args: str) -> tuple[int, dict[str, Any]]:
    import subprocess

    p = subprocess.run(
        userland().argv("-m", "pam_svmm.cli.main", "vm", "--socket",
                        str(socket_dir / "launcher.sock"), "--json", *args),
        capture_output=True, text=True, timeout=120, check=False,
        user=uid, group=uid, extra_groups=[], env=userland().env(), cwd="/",
    )  # fmt: skip
    try:
        return p.returncode, json.loads(p.stdout)
    except ValueError:
        return p.returncode, {"reason": p.stderr.strip()}


def _socket_dir(lab: Lab) -> Path:
    """The launcher socket's folder: root-owned, reachable by every user (the lab folder is
    root-only)."""
    import hashlib
    import os

    d = Path("/tmp") / f"svmm-lab-{hashlib.sha256(str(lab.folder).encode()).hexdigest()[:12]}"
    d.mkdir(exist_ok=True)
    os.chmod(d, 0o755)  # noqa: S103 - every user reaches the socket; only root writes here
    return d


@contextmanager
def _launcher(lab: Lab) -> Iterator[Any]:
    """svmmd's wiring, served from a thread of the demo (the demo reads the VM's QMP)."""
    import os

    from pam_svmm.adapters.card_helper import WatchHelper
    from pam_svmm.config import load
    from pam_svmm.daemon.pam_responder import PamResponder
    from pam_svmm.daemon.server import bind_socket, serving
    from pam_svmm.services.launcher import Launcher

    config = load(lab.config_path)
    launcher = Launcher.from_config(config, syslog_mirror=False)
    # The card watch sees the cards of a reader like the one alice logs in with (the same
    # tokens; pulling a card marks it removed by serial, see pinguard.c).
    for name, value in lab.insert("alice").env.items():
        os.environ[name] = value
    launcher.start_card_watch(
        WatchHelper(config.pkcs11.module, pass_environment=config.pkcs11.pass_environment)
    )
    # It answers PAM calls too (the fast path): with the same reader, as svmmd would.
    pam = PamResponder(lab.config_path, launcher=launcher)
    try:
        with serving(launcher, bind_socket(config.launcher.socket), pam):
            yield launcher
    finally:
        pam.close()
        launcher.stop_card_watch()
        for vm in list(launcher.registry.running()):
            launcher.registry.stop(vm, quit_timeout=2, term_timeout=2, kill_timeout=2)
        launcher.close()


def _audit_trail(lab: Lab, say: Any) -> int:
    """The trail verifies; a copy with one record edited does not."""
    key = lab.folder / "audit-seal.key"
    ok = _svmm(lab, "audit", "verify", "--path", str(lab.audit_path), "--key", str(key))
    say(f" *  svmm audit verify: {(ok.stdout or ok.stderr).strip()}")
    copy = lab.folder / "tampered"
    copy.mkdir(mode=0o700, exist_ok=True)
    tampered = copy / "audit.jsonl"
    data = lab.audit_path.read_bytes().replace(b'"outcome":"failure"', b'"outcome":"success"', 1)
    tampered.write_bytes(data)
    head = lab.audit_path.with_name(lab.audit_path.name + ".head")
    if head.exists():
        shutil.copy(head, copy / "audit.jsonl.head")
    bad = _svmm(lab, "audit", "verify", "--path", str(tampered), "--key", str(key))
    say(" *  a copy of the trail with one refusal turned into a success:")
    say(f"    svmm audit verify: {(bad.stdout + bad.stderr).strip()}")
    return int(ok.returncode != 0) + int(bad.returncode == 0)


def _svmm(lab: Lab, *args: str) -> Any:
    import os
    import subprocess

    env = dict(os.environ, SVMM_CONFIG=str(lab.config_path))
    return subprocess.run(
        [sys.executable, "-m", "pam_svmm.cli.main", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


def _play(lab: Lab, i: int, scene: Scene, say: Any) -> int:
    """One login; returns 1 if it did not end as the scene expects."""
    reader = lab.insert(*scene.cards)
    inserted = ", ".join(f"{c}'s card" for c in scene.cards) or "nothing"
    say(f"{i:2}. {scene.title}")
    say(f"    reader: {inserted}; PAM_USER: {scene.user or '(unset)'}")
    before = len(lab.audit_records())
    t = time.monotonic()
    outcome = lab.login(reader, pin=scene.secret, user=scene.user)
    ms = (time.monotonic() - t) * 1000
    for m in outcome.messages:
        say(f"    the module said: {m}")
    verdict = "as expected" if outcome.name == scene.expect else f"EXPECTED {scene.expect}"
    who = f" as {outcome.user}" if outcome.ok else ""
    say(f"    result: {outcome.name}{who} ({ms:.0f} ms) -- {verdict}")
    for rec in lab.audit_records()[before:]:
        card = rec.get("card", {})
        fp = str(card.get("fingerprint", ""))[:16] if isinstance(card, dict) else ""
        extra = f" roles={','.join(rec['roles'])}" if rec.get("roles") else ""
        extra += " OFFLINE" if rec.get("offline") else ""
        say(
            f"    audit:  {rec['event']} {rec['outcome']} reason={rec['reason']}"
            f" method={rec.get('method') or '-'} user={rec['user'] or '-'} card={fp or '-'}{extra}"
        )
        if rec.get("detail") and rec["outcome"] != "success":
            say(f"            {rec['detail']}")
    say()
    return 0 if outcome.name == scene.expect else 1
