"""The end-to-end test (`tools/run e2e`): build or reuse the offline guest (guest.py), boot
it, and play the scenario of issue 7 on its serial consoles, printing a step-by-step report.

The guest has the product from its Debian package (pam-svmm, installed with apt as README
says; the demo lab beside it, never in its venv): the scenario checks the install, upgrades
the package in place to a second build (V+e2e1) while alice's session is live, and purges it
at the end, checking what the package promises for each (debian/).

ttyS0 is the guest's serial login (agetty, /bin/login, the PAM stack pam-auth-update wrote):
the scenario types user names and the card's PIN there, as a person would. ttyS1 is a root
shell of the test guest only: it swaps the cards in the demo reader, pulls a card, reads the
audit trail and the allowlist. Transcripts of both ports go to the log folder.
Exit status: 0 when every step passed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import shlex
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import guest
from serial_console import ExpectTimeout, RootShell, SerialConsole

PIN = "123456"  # the demo cards' PIN (svmm_lab/lab.py)
WRONG_PIN = "000000"
UIDS = {"alice": 10001, "bob": 10002, "mallory": 10006, "scl": 10007}
# On the guest's PATH: the package's svmm (/usr/bin, a link into the venv; checked), and
# svmm-lab (/usr/local/bin, provision.sh): `svmm lab` with the demo lab from the source tree.
SVMM = "svmm"
LAB = "svmm-lab"
VENV = "/opt/svmm/venv"
SEAL_KEY = "/etc/svmm/audit-seal.key"
DEMO = "/var/lib/svmm/demo"
VOLUMES = f"{DEMO}/volumes"  # the demo's LUKS volumes (svmm_lab/host.py)
AUDIT = "/var/log/svmm/audit.jsonl"
CONFIG = "/etc/svmm/svmm.toml"
REPO = Path(__file__).resolve().parent.parent
PROMPT = ""  # no prompt: commands end with a marker (RootShell.run)
LOGIN_TIMEOUT = 180  # a card login under TCG: python, cryptography, OCSP, LDAP, the card


class StepFailed(AssertionError):
    pass


def check(ok: object, detail: str) -> None:
    if not ok:
        raise StepFailed(detail)


@dataclass
class Report:
    rows: list[tuple[str, bool | None, float, str]] = field(default_factory=list)

    @contextlib.contextmanager
    def step(self, name: str, *, fatal: bool = False) -> Iterator[list[str]]:
        """A step; the list it yields collects details. A failure is recorded, and raised
        again only when ``fatal`` (the rest cannot run)."""
        notes: list[str] = []
        t0 = time.monotonic()
        print(f"  ... {name}", flush=True)
        try:
            yield notes
        except Exception as e:
            detail = e.args[0] if isinstance(e, StepFailed) else f"{type(e).__name__}: {e}"
            self._add(name, False, time.monotonic() - t0, f"{detail} {'; '.join(notes)}")
            if not isinstance(e, StepFailed | ExpectTimeout):
                traceback.print_exc()
            if fatal:
                raise
        else:
            self._add(name, True, time.monotonic() - t0, "; ".join(notes))

    def skip(self, name: str, why: str) -> None:
        self._add(name, None, 0.0, why)

    def _add(self, name: str, ok: bool | None, seconds: float, detail: str) -> None:
        self.rows.append((name, ok, seconds, detail))
        verdict = {True: "PASS", False: "FAIL", None: "SKIP"}[ok]
        print(f"  {verdict} {seconds:6.1f} s  {name}" + (f"  -- {detail}" if detail else ""))
        sys.stdout.flush()

    @property
    def failed(self) -> int:
        return sum(1 for r in self.rows if r[1] is False)

    def table(self) -> str:
        lines = []
        for i, (name, ok, secs, detail) in enumerate(self.rows, 1):
            verdict = {True: "PASS", False: "FAIL", None: "SKIP"}[ok]
            lines.append(f"{i:3}  {verdict}  {secs:6.1f} s  {name}")
            if detail and ok is not True:
                lines.append(f"                      {detail[:300]}")
        return "\n".join(lines)


# --- the consoles -------------------------------------------------------------------------


class Console:
    """ttyS0: logins through /bin/login, and the logged-in user's shell."""

    def __init__(self, port: SerialConsole) -> None:
        self.port = port
        self.at_prompt = False  # the last thing read was the login prompt
        self.logged_in = False  # a user's shell is on the console

    def login(self, user: str, pin: str | None) -> tuple[bool, str]:
        """Type ``user`` at the login prompt and ``pin`` at the module's PIN prompt.

        Returns (logged in, what the console said)."""
        p = self.port
        self.wait_prompt()
        self.at_prompt = False
        p.note(f"login {user}")
        p.sendline(user)
        said: list[str] = []
        deadline = time.monotonic() + LOGIN_TIMEOUT
        while True:
            m = p.expect(
                r"(?m)(PIN for [^\n]*?: $|Password: $|Login incorrect|login: $|"
                r"[$#] $|Last login|Linux svmm-guest)",
                max(deadline - time.monotonic(), 1),
            )
            said.append(m.group(1))
            text = m.group(1)
            if text.startswith("PIN for"):
                if pin is None:
                    p.sendline("")
                else:
                    p.sendline(pin, secret=True)
                pin = None  # one PIN per attempt
            elif text.startswith("Password:"):
                p.sendline("")  # no password: this test logs in with cards only
            elif text in ("Login incorrect", "login: "):
                self.at_prompt = text == "login: "
                return False, " | ".join(said)
            elif text in ("$ ", "# "):
                self._setup_shell()
                self.logged_in = True
                return True, " | ".join(said)

    def wait_prompt(self, timeout: float = 90) -> None:
        """Until the login prompt is the last thing on the console. A blank line is sent
        only if none comes: at login's own prompt (after a failure) it would start a login
        with an empty name, which the module answers by asking for any card's PIN."""
        p = self.port
        seen = p.drain(quiet=0.5, limit=5)
        if re.search(r"login: $", seen) or (self.at_prompt and not seen.strip()):
            return
        try:
            p.expect(r"login: $", 20)
        except ExpectTimeout:
            p.sendline("")
            p.expect(r"login: $", timeout)
        p.drain(quiet=0.3, limit=2)
        self.at_prompt = True

    def _setup_shell(self) -> None:
        p = self.port
        p.sendline(f"stty -echo; PS1='{PROMPT}'; PS2=''; TERM=dumb; export TERM")
        RootShell(p).run("true", timeout=30)  # the marker, not the echoed prompt text
        p.drain(quiet=0.3, limit=2)

    def run(self, command: str, timeout: float = 120) -> tuple[int, str]:
        """A command in the user's shell: (exit status, output)."""
        self._need_shell()
        return RootShell(self.port).run(command, timeout=timeout)

    def interactive(
        self, command: str, pin: str, *, timeout: float = LOGIN_TIMEOUT
    ) -> tuple[int, str, bool]:
        """A command that may ask for the card's PIN (su, sudo): (status, output, asked)."""
        import secrets

        self._need_shell()
        tag = secrets.token_hex(4)
        p = self.port
        p.note(command)
        p.sendline(f"{command}; echo __rc_{tag}_$?__")
        asked = False
        out = ""
        deadline = time.monotonic() + timeout
        while True:
            m = p.expect(
                rf"(?s)(.*?)(PIN for [^\n]*?: $|__rc_{tag}_(\d+)__\n?)",
                max(deadline - time.monotonic(), 1),
            )
            out += m.group(1)
            if m.group(3) is not None:
                return int(m.group(3)), out.strip("\n"), asked
            asked = True
            p.sendline(pin, secret=True)

    def _need_shell(self) -> None:
        if not self.logged_in:
            raise StepFailed("nobody is logged in on the console (an earlier step failed)")

    def logout(self) -> None:
        self._need_shell()
        self.logged_in = False
        self.port.sendline("exit")
        self.port.expect(r"login: $", 90)
        self.at_prompt = True


class Guest:
    """The whole guest: the login console and the root control shell."""

    def __init__(self, console: Console, root: RootShell) -> None:
        self.console = console
        self.root = root

    def audit_lines(self) -> int:
        code, out = self.root.run(f"wc -l < {AUDIT} 2>/dev/null || echo 0")
        return int(out.split()[-1]) if code == 0 and out.split() else 0

    def audit_since(self, start: int) -> list[dict[str, object]]:
        _code, out = self.root.run(f"tail -n +{start + 1} {AUDIT}")
        records = []
        for line in out.splitlines():
            with contextlib.suppress(ValueError):
                r = json.loads(line)
                if r.get("event") != "seal":
                    records.append(r)
        return records

    def reader(self, *cards: str) -> None:
        """Put these soft cards in the reader. SoftHSM2 reads its token folder once per
        process, so svmmd (which answers logins and watches the cards) starts again, as a
        real reader's hot-plug would have told it; a stopped svmmd is left stopped."""
        self.root.check(
            f"{LAB} reader --dir {DEMO} {' '.join(cards)} && systemctl try-restart svmmd.service",
            timeout=120,
        )

    def exists(self, path: str) -> bool:
        return self.root.run(f"test -e {shlex.quote(path)}")[0] == 0

    def mappings(self) -> list[str]:
        _code, out = self.root.run("ls /dev/mapper")
        return sorted(n for n in out.split() if n != "control")


def summary(records: list[dict[str, object]], event: str = "auth") -> str:
    return ", ".join(
        f"{r.get('event')}:{r.get('outcome')}:{r.get('reason')}"
        for r in records
        if r.get("event") == event
    )


def refused(g: Guest, user: str, pin: str | None, *, reason: str) -> Callable[[list[str]], None]:
    def play(notes: list[str]) -> None:
        start = g.audit_lines()
        ok, said = g.console.login(user, pin)
        notes.append(f"console: {said}")
        check(not ok, f"{user} was logged in")
        if ok:
            g.console.logout()
        recs = g.audit_since(start)
        auth = [r for r in recs if r.get("event") == "auth"]
        notes.append(f"audit: {summary(recs) or 'none'}")
        check(auth and all(r.get("outcome") != "success" for r in auth), "no auth refusal audited")
        check(any(reason in str(r.get("reason")) for r in auth), f"no audit reason ~ {reason!r}")
        check(not g.exists(f"/run/svmm/allowlist/{UIDS.get(user, 0)}.json"), "allowlist written")
        check(not g.mappings(), f"a volume opened: {g.mappings()}")

    return play


OPENSC = "/usr/lib/x86_64-linux-gnu/opensc-pkcs11.so"


def reader_stack(g: Guest, vm: guest.Vm, report: Report) -> None:
    """alice's card in QEMU's USB CCID reader (svmm_lab/ccid.py): pcscd, the CCID driver and
    OpenSC's PKCS#11 module in the guest, svmmd configured for them (not SoftHSM2). A wrong
    PIN is refused by the card, the login, sudo, then the card pulled out of the reader by
    QMP (device_del: the guest sees a USB device go) and put back (device_add)."""
    c, root = g.console, g.root
    if not vm.card_device:
        with report.step("PC/SC: QEMU's USB CCID reader holds alice's emulated card"):
            check(False, "no emulated card: the image has no ccid-card files, or no certutil")
        return
    with report.step("PC/SC: pcscd sees QEMU's USB CCID reader, OpenSC reads alice's card") as n:
        out = ""
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            _, out = root.run(f"pkcs11-tool --module {OPENSC} -L 2>&1", timeout=60)
            if "token label" in out:
                break
            time.sleep(2)
        n.append(re.sub(r"\s+", " ", out)[:200])
        check("token label" in out, "OpenSC sees no card in the reader")
        _, certs = root.run(f"pkcs11-tool --module {OPENSC} -O --type cert 2>&1", timeout=60)
        n.append(f"certificates on the card: {certs.count('Certificate Object')}")
        check(certs.count("Certificate Object") == 3, "not the card's three certificates")
    root.check(f"cp {CONFIG} /root/svmm.toml.softhsm")
    root.check(
        f"sed -i '0,/^module = /s|^module = .*|module = \"{OPENSC}\"|' {CONFIG} && "
        "systemctl restart svmmd.service",
        timeout=120,
    )
    # A fresh login prompt: login(1) gives up on its own prompt after LOGIN_TIMEOUT (60 s),
    # and the steps above may have left one that old; a name typed as it quits is lost.
    root.check("systemctl restart serial-getty@ttyS0.service")
    c.at_prompt = False
    c.wait_prompt()
    try:
        with report.step("PC/SC: a wrong PIN is refused by the card, audited") as n:
            # libcacard answers a wrong PIN "conditions of use not satisfied" (6985), not
            # "wrong PIN, N tries left" (63Cx): OpenSC reports CKR_GENERAL_ERROR, so the
            # record says the card refused the login, not how many tries are left.
            start = g.audit_lines()
            refused(g, "alice", WRONG_PIN, reason="")(n)
            auth = [r for r in g.audit_since(start) if r.get("event") == "auth"]
            check(
                any("login failed" in str(r.get("detail")) for r in auth),
                "the card's refusal of the PIN is not in the audit record",
            )
        ok = False
        with report.step("PC/SC: alice logs in with the card in the reader") as n:
            start = g.audit_lines()
            ok, said = c.login("alice", PIN)
            n.append(f"console: {said}")
            check(ok, "alice not logged in with the reader's card")
            auth = [r for r in g.audit_since(start) if r.get("event") == "auth"]
            n.append(f"audit: {summary(auth)}")
            check(auth and auth[-1].get("outcome") == "success", "no auth success audited")
        if ok:
            with report.step("PC/SC: sudo -u bob with the reader's card") as n:
                code, out, asked = c.interactive("sudo -u bob id -un", PIN)
                n.append(f"asked PIN: {asked}; out: {out.strip()[-120:]}")
                check(asked and code == 0 and out.strip().endswith("bob"), f"exit {code}")
            with report.step("PC/SC: the card pulled from the reader locks alice's session") as n:
                start = g.audit_lines()
                t0 = time.monotonic()
                answer = vm.qmp("device_del", {"id": "ccid-card"})
                check("return" in answer, f"device_del: {answer}")
                locked: list[dict[str, object]] = []
                while not locked and time.monotonic() - t0 < 60:
                    locked = [
                        r
                        for r in g.audit_since(start)
                        if r.get("event") == "session_lock" and r.get("outcome") == "success"
                    ]
                    time.sleep(0.5)
                n.append(f"removal -> session locked (audited): {time.monotonic() - t0:.1f} s")
                check(locked, "no session_lock after the card was pulled")
            with report.step("PC/SC: the card put back is read again") as n:
                args = dict(kv.split("=", 1) for kv in vm.card_device.split(",")[1:])
                answer = vm.qmp("device_add", {"driver": "ccid-card-emulated", **args})
                check("return" in answer, f"device_add: {answer}")
                out = ""
                deadline = time.monotonic() + 60
                while "token label" not in out and time.monotonic() < deadline:
                    _, out = root.run(f"pkcs11-tool --module {OPENSC} -L 2>&1", timeout=60)
                    time.sleep(1)
                check("token label" in out, "the card put back is not seen")
                # svmmd's helper started ahead saw the card before it was pulled; the
                # login after it must read the card that is in the reader now.
                code, out, asked = c.interactive("sudo -k -u bob id -un", PIN)  # -k: ask again
                n.append(f"sudo after re-insertion: asked PIN: {asked}; {out.strip()[-60:]}")
                check(asked and code == 0 and out.strip().endswith("bob"), f"sudo exit {code}")
            c.logout()
    finally:
        root.check(
            f"cp /root/svmm.toml.softhsm {CONFIG} && systemctl restart svmmd.service", timeout=120
        )


def display_manager(g: Guest, notes: list[str]) -> None:
    """lightdm's own /etc/pam.d/lightdm stack (pam_nologin, its nopasswdlogin group rule,
    common-auth with pam_svmm, pam_loginuid, common-session): a greeter cannot run here (no
    X server under TCG), so pamtester drives the service the greeter would; a wrong PIN
    first, then the right one."""
    dm = "pamtester -v lightdm alice authenticate"
    start = g.audit_lines()
    code, out = g.root.run(f"printf '%s\\n' {WRONG_PIN} | {dm}", timeout=120)
    notes.append(f"wrong PIN: exit {code}")
    check(code != 0, "lightdm accepted a wrong PIN")
    code, out = g.root.run(
        f"printf '%s\\n' {PIN} | {dm} acct_mgmt open_session close_session", timeout=120
    )
    notes.append(out.strip()[-160:])
    recs = [r for r in g.audit_since(start) if r.get("service") == "lightdm"]
    notes.append(f"audit: {summary(recs)}; {summary(recs, 'session_open')}")
    check(code == 0, f"pamtester lightdm exit {code}")
    auth = [r.get("outcome") for r in recs if r.get("event") == "auth"]
    check(auth[:1] != ["success"] and "success" in auth, f"lightdm auth records {auth}")
    check(any(r.get("event") == "session_open" for r in recs), "no lightdm session audited")


# --- the scenario -------------------------------------------------------------------------


def scenario(g: Guest, report: Report, mode: str, debs: dict[str, str], vm: guest.Vm) -> None:
    c, root = g.console, g.root
    alice = UIDS["alice"]
    allowlist = f"/run/svmm/allowlist/{alice}.json"
    dm = mode == "dm-crypt"

    with report.step("wrong PIN: alice is refused, audited") as n:
        g.reader("alice")
        refused(g, "alice", WRONG_PIN, reason="pin")(n)

    with report.step("alice logs in on the serial console with her card and PIN", fatal=True) as n:
        start = g.audit_lines()
        ok, said = c.login("alice", PIN)
        n.append(f"console: {said}")
        check(ok, "not logged in")
        code, who = c.run("id -un; id -u")
        check(who.split() == ["alice", str(alice)], f"id says {who!r}")
        recs = g.audit_since(start)
        n.append(f"audit: {summary(recs)}")
        check(
            any(r.get("event") == "auth" and r.get("outcome") == "success" for r in recs),
            "no successful auth record",
        )

    with report.step("alice's first login made her home directory (pam_mkhomedir)") as n:
        code, out = c.run("pwd; stat -c '%U %a' \"$HOME\"")
        n.append(out.replace("\n", "; "))
        check(code == 0 and out.split() == ["/home/alice", "alice", "700"], f"home: {out!r}")

    with report.step("the allowlist exists, root-owned, with alice's VMs") as n:
        code, out = root.run(f"stat -c '%U %a' {allowlist} && cat {allowlist}")
        check(code == 0, f"no {allowlist}")
        owner, body = out.split("\n", 1)
        data = json.loads(body)
        n.append(f"{owner}; vms: {', '.join(sorted(data.get('vms', {})))}")
        check(owner.startswith("root "), f"owner/mode {owner}")
        check("vm-web" in data.get("vms", {}), "vm-web not granted")

    if dm:
        with report.step("dm-crypt: the session's volume is under /dev/mapper") as n:
            maps = g.mappings()
            n.append(f"/dev/mapper: {', '.join(maps) or 'nothing'}")
            check("svmm-web-disk" in maps, "no /dev/mapper/svmm-web-disk")
    else:
        report.skip("dm-crypt: the session's volume is under /dev/mapper", f"volumes.mode {mode}")

    with report.step("alice: svmm vm start vm-web boots the granted VM (nested QEMU)") as n:
        code, out = c.run(f"{SVMM} vm --json start vm-web", timeout=180)
        check(code == 0, f"exit {code}: {out[-300:]}")
        reply = json.loads(out[out.index("{") :])
        data = reply.get("data", {})
        n.append(f"pid {data.get('pid')}, volumes {data.get('volumes')}")
        if dm:
            # QEMU holds the session's mapping open (svmmd passes it by fd).
            code, fds = root.run(
                'd=$(readlink -f /dev/mapper/svmm-web-disk) && echo "$d" && '
                f'ls -l /proc/{int(data.get("pid", 0))}/fd | grep -cF "$d"'
            )
            n.append(f"QEMU fds on {fds.split()[0] if fds else '?'}: {fds.split()[-1:]}")
            check(code == 0, "QEMU does not hold the /dev/mapper device")

    with report.step("alice: a VM not granted to her (vm-db) is refused") as n:
        code, out = c.run(f"{SVMM} vm start vm-db", timeout=120)
        n.append(out.replace("\n", " ")[:200])
        check(code == 1, f"exit {code}, not a refusal by the launcher (1)")

    # The upgrade while alice's session is live: her volumes open, vm-web running (prelaunch).
    package_upgrade(g, report, debs, dm)

    with report.step("card removal pauses alice's VM") as n:
        try:
            # svmmd starts a VM stopped (QEMU -S); the user lets it run.
            code, out = c.run(f"{SVMM} vm resume vm-web", timeout=60)
            check(code == 0, f"resume: exit {code}: {out[-200:]}")
            status = c.run(f"{SVMM} vm --json status vm-web")[1]
            check(re.search(r'"status":\s*"running"', status), f"not running: {status[-200:]}")
            root.check(f"{LAB} reader --dir {DEMO} --pull alice")
            try:
                status = ""
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline:
                    code, status = c.run(f"{SVMM} vm --json status vm-web")
                    if re.search(r'"status":\s*"paused"', status):
                        break
                    time.sleep(1)
                flat = re.sub(r"\s+", " ", status)
                n.append(f"status after the pull: {flat[:160]}")
                check(re.search(r'"status":\s*"paused"', status), "vm-web not paused")
                # ... and alice's logind session was locked (loginctl lock-session), after
                # the VMs and the volumes.
                locks = ""
                deadline = time.monotonic() + 30
                while '"outcome":"success"' not in locks and time.monotonic() < deadline:
                    _, locks = root.run(
                        'grep -h \'"event":"session_lock"\' /var/log/svmm/audit.jsonl | tail -n 2'
                    )
                    time.sleep(1)
                n.append("session_lock: " + re.sub(r"\s+", " ", locks)[-200:])
                check('"outcome":"success"' in locks, f"no session locked: {locks[-300:]}")
                if dm:
                    # dm-crypt mode: the pulled card's volumes are suspended (luksSuspend:
                    # the key leaves the kernel); attr is L(ive), I(nactive), s(uspended), rw.
                    _, attr = root.run("dmsetup info -c --noheadings -o attr svmm-web-disk")
                    n.append(f"svmm-web-disk attr {attr.strip()}")
                    check(attr.strip()[2:3] == "s", "svmm-web-disk not suspended")
            finally:
                root.check(f"{LAB} reader --dir {DEMO} --back alice")
        finally:
            code, out = c.run(f"{SVMM} vm stop vm-web", timeout=90)
            n.append(f"stop: {out.strip()[:100]}")

    with report.step("sudo -u bob with alice's card (engineering role)") as n:
        code, out, asked = c.interactive("sudo -u bob id -un", PIN)
        n.append(f"asked PIN: {asked}; out: {out.strip()[-120:]}")
        check(asked, "sudo did not ask for the card's PIN")
        check(code == 0 and out.strip().endswith("bob"), f"exit {code}")

    with report.step("alice logs out: allowlist removed" + (", volume closed" if dm else "")) as n:
        start = g.audit_lines()
        c.logout()
        deadline = time.monotonic() + 20
        while g.exists(allowlist) and time.monotonic() < deadline:
            time.sleep(0.5)
        check(not g.exists(allowlist), "allowlist still there")
        recs = g.audit_since(start)
        n.append(f"audit: {summary(recs, 'session_close')}")
        if dm:
            maps = g.mappings()
            n.append(f"/dev/mapper: {', '.join(maps) or 'nothing'}")
            check(not maps, "a volume is still open")

    with report.step("scl logs in with his card; su - alice with alice's card") as n:
        g.reader("scl", "alice")
        ok, said = c.login("scl", PIN)
        n.append(f"console: {said}")
        check(ok, "scl not logged in")
        code, out, asked = c.interactive("su - alice -c 'id -un'", PIN)
        n.append(f"asked PIN: {asked}; out: {out.strip()[-80:]}")
        check(asked and code == 0 and out.strip().endswith("alice"), f"su exit {code}")
        check("cannot change directory" not in out, "su - alice found no home")
        home = root.run("stat -c '%U %a' /home/scl")[1].strip()
        n.append(f"/home/scl: {home}")
        check(home == "scl 700", "scl's first login made no home directory")

    with report.step("sudo is limited to the engineering role: scl is refused") as n:
        code, out, asked = c.interactive("sudo -u alice id -un", PIN)
        n.append(f"asked PIN: {asked}; out: {out.strip()[-160:]}")
        check(code != 0, "sudo worked for scl")
        check("not in the sudoers" in out or "not allowed" in out, "no sudoers refusal")
        c.logout()

    with report.step("another user's card: alice with bob's card is refused") as n:
        g.reader("bob")
        refused(g, "alice", PIN, reason="")(n)

    with report.step("revoked card: mallory is refused") as n:
        g.reader("mallory")
        refused(g, "mallory", PIN, reason="revoked")(n)

    g.reader("alice")
    reader_stack(g, vm, report)

    with report.step("display manager: lightdm's PAM service with alice's card (pamtester)") as n:
        display_manager(g, n)

    with report.step("svmm audit verify passes") as n:
        code, out = root.run(f"{SVMM} audit verify")
        n.append(out.strip()[-200:])
        check(code == 0, f"exit {code}")

    with report.step("the collector's copy (rsyslog over TLS) verifies; a record missing "
                     "there is detected") as n:  # fmt: skip
        copy = "/var/log/svmm-collector/svmm-guest/audit.jsonl"
        # Every record forwarded: the copy has as many lines as the host's trail.
        code, out = root.run(
            "for i in $(seq 60); do a=$(wc -l < /var/log/svmm/audit.jsonl); "
            f'b=$(wc -l < {copy} 2>/dev/null || echo 0); [ "$a" = "$b" ] && break; '
            'sleep 0.5; done; echo "host $a collector $b"'
        )
        n.append(out.strip()[-80:])
        check(code == 0 and out.split()[-3] == out.split()[-1], "the copy is not complete")
        # The hash chain (a copy has no head file; its end is checked by the count above).
        code, out = root.run(f"{SVMM} audit verify --no-key --path {copy}")
        n.append(out.strip()[-120:])
        check(code == 0, f"verify of the copy: exit {code}")
        # One record dropped on the way (line 5 of a copy of the copy): caught.
        code, out = root.run(
            f"sed 5d {copy} > /root/gap.jsonl && "
            f"{SVMM} audit verify --no-key --path /root/gap.jsonl"
        )
        n.append(out.strip()[-120:])
        check(code != 0 and "broken" in out, "a missing record was not detected")

    if dm:
        dm_tests(g, report)
    package_purge(g, report)


# --- the Debian package -------------------------------------------------------------------


def dpkg_status(g: Guest) -> str:
    """dpkg's "Status Version" of pam-svmm ("" when dpkg does not know it any more)."""
    return g.root.run("dpkg-query -W -f='${Status} ${Version}' pam-svmm 2>/dev/null")[1].strip()


def package_installed(g: Guest, report: Report, debs: dict[str, str]) -> None:
    with report.step(f"pam-svmm {debs['version']} installed from its .deb with apt") as n:
        status = dpkg_status(g)
        n.append(status)
        check(status == f"install ok installed {debs['version']}", f"dpkg says {status!r}")
        out = g.root.check(
            f'readlink -f "$(command -v {SVMM})"; {SVMM} --version; '
            f'dpkg -S "$(command -v {SVMM})" /usr/lib/svmm/pam_svmm.py | cut -d: -f1 | uniq; '
            f'test "$(command -v {LAB})" != "" && echo lab; '
            f'ls {VENV}/lib/python3*/site-packages | grep -c "^svmm_lab" || true; '
            "systemctl is-enabled svmmd.socket; systemctl is-active svmmd.socket; "
            "grep -c pam_svmm.py /etc/pam.d/common-auth"
        )
        lines = out.splitlines()
        n.append(" | ".join(lines))
        check(lines[0] == f"{VENV}/bin/{SVMM}", f"{SVMM} is not the venv's")
        check(lines[2] == "pam-svmm", "svmm or the PAM shim is not the package's")
        check(lines[3] == "lab", f"no {LAB} (provision.sh's demo lab)")
        check(lines[4] == "0", "the package's venv has the demo lab")
        check(lines[5:7] == ["enabled", "active"], "svmmd.socket not enabled and listening")
        check(int(lines[7]) >= 1, "the profile is not enabled (pam-auth-update --enable svmm)")

    with report.step(
        "packaged host: svmm lab demo and --demo-ca say the lab is not installed"
    ) as n:
        for command in (f"{SVMM} lab demo --dir /tmp/lab", f"{SVMM} card revoke --serial 01 "
                        "--demo-ca /tmp/ca"):  # fmt: skip
            code, out = g.root.run(f"cd /tmp && {command} 2>&1")
            n.append(f"exit {code}: {out.strip()[:110]}")
            check(code == 6, f"{command}: exit {code}, not 6 (an SvmmError)")
            check("needs the demo lab (svmm_lab)" in out, f"{command}: no clear message")
            check("Traceback" not in out, f"{command}: a traceback")


def _svmmd_state(g: Guest) -> tuple[str, str]:
    out = g.root.check(
        "systemctl show -p MainPID --value svmmd.service; "
        "systemctl show -p InvocationID --value svmmd.service"
    )
    pid, invocation = [*out.split(), "", ""][:2]
    return pid, invocation


def _held(g: Guest) -> list[str]:
    """What svmmd holds for the console's user (svmm vm list, asked as alice): the volume
    keys it keeps, in dm-crypt mode the session's open volumes (their keys are in the
    kernel, under svmmd's control), and the user's running VMs."""
    code, out = g.console.run(f"{SVMM} vm --json list", timeout=120)
    check(code == 0, f"vm list: exit {code}: {out[-200:]}")
    data = json.loads(out[out.index("{") :]).get("data", {})
    held = [f"key:{k}" for k in data.get("keys_held", [])]
    held += [f"open:{v}" for v in data.get("volumes_open", [])]
    return sorted(held + [f"running:{vm}" for vm in data.get("running", [])])


def _kept(g: Guest) -> dict[str, str]:
    """What upgrade and purge must keep: the configuration (upgrade only), the seal key, the
    audit trail (its records so far: their count and hash) and the volumes."""

    def out(command: str) -> str:
        return g.root.run(command)[1].strip()

    def sha(path: str) -> str:
        return out(f"if [ -e {path} ]; then sha256sum < {path} | cut -c1-16; else echo absent; fi")

    return {
        "config": sha(CONFIG),
        "seal": sha(SEAL_KEY),
        "audit": sha(AUDIT),
        "audit_lines": out(f"wc -l < {AUDIT}"),
        "volumes": out(f"stat -c '%n %s %Y' {VOLUMES}/*"),
    }


def _trail_kept(g: Guest, before: dict[str, str]) -> bool:
    """The audit trail still begins with the records it had (it may have more now)."""
    n = int(before["audit_lines"])
    head = g.root.run(f"head -n {n} {AUDIT} | sha256sum | cut -c1-16")[1].strip()
    return before["audit"] != "absent" and head == before["audit"]


def package_upgrade(g: Guest, report: Report, debs: dict[str, str], dm: bool) -> None:
    """In place, while alice is logged in: the package promises (debian/rules, README.Debian)
    that an upgrade neither stops nor restarts svmmd (it holds the session's keys), and
    keeps the conffile, the seal key and the audit trail."""
    before: dict[str, Any] = {}
    upgrade = f"{guest.GUEST_DEBS}/{debs['upgrade_deb']}"
    with report.step(
        f"upgrade in place to {debs['upgrade_version']} (apt install ./….deb), alice logged in"
    ) as n:
        before.update(svmmd=_svmmd_state(g), held=_held(g), files=_kept(g))
        n.append(f"svmmd pid {before['svmmd'][0]}, keys held {before['held']}")
        check(before["svmmd"][0] not in ("", "0"), "svmmd is not running before the upgrade")
        check(
            any(h.startswith(("key:", "open:")) for h in before["held"]),
            "svmmd holds no key or volume for alice before the upgrade",
        )
        code, out = g.root.run(
            "DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "
            f"{upgrade} > /tmp/upgrade.log 2>&1; rc=$?; "
            "grep -iE 'unpacking|setting up|warn|error' /tmp/upgrade.log | cut -c1-160; (exit $rc)",
            timeout=900,
        )
        n.append(out.replace("\n", " | ")[:300])
        check(code == 0, f"apt-get install exit {code}")
        status = dpkg_status(g)
        check(status == f"install ok installed {debs['upgrade_version']}", f"dpkg: {status!r}")
        before["upgraded"] = True

    with report.step("the upgrade left svmmd running (same pid), holding alice's session") as n:
        check(before.get("upgraded"), "the upgrade did not run")
        after = _svmmd_state(g)
        held = _held(g)
        n.append(f"svmmd pid {before['svmmd'][0]} -> {after[0]}; keys held {held}")
        check(after == before["svmmd"], "svmmd was restarted (another pid or invocation)")
        check(held == before["held"], "svmmd no longer holds alice's keys or volumes")
        if dm:
            check("svmm-web-disk" in g.mappings(), "alice's volume was closed")

    with report.step("the upgrade kept the conffile, the seal key and the audit trail") as n:
        check(before.get("upgraded"), "the upgrade did not run")
        old, new = before["files"], _kept(g)
        n.append(f"audit lines {old['audit_lines']} -> {new['audit_lines']}")
        check(new["config"] == old["config"], f"{CONFIG} changed (not kept as a conffile)")
        check(new["seal"] == old["seal"] != "absent", "the seal key changed")
        check(_trail_kept(g, old), "the audit trail lost or changed records")
        check(new["volumes"] == old["volumes"], "a volume changed")
        code, out = g.root.run(f"{SVMM} audit verify; grep -c pam_svmm.py /etc/pam.d/common-auth")
        n.append(out.strip().replace("\n", " | ")[-160:])
        check(code == 0, "audit verify fails, or the profile left common-auth")


def package_purge(g: Guest, report: Report) -> None:
    """apt-get purge, and what postrm promises: the audit trail, the volumes and the seal key
    stay; /opt/svmm goes; pam-auth-update takes the profile out of /etc/pam.d."""
    kept = _kept(g)
    with report.step("apt-get purge pam-svmm") as n:
        code, out = g.root.run(
            "DEBIAN_FRONTEND=noninteractive apt-get purge -y -q pam-svmm > /tmp/purge.log 2>&1;"
            " rc=$?; grep -iE 'removing|purging|warn|error' /tmp/purge.log | cut -c1-160; "
            "(exit $rc)",
            timeout=600,
        )
        n.append(out.replace("\n", " | ")[:400])
        check(code == 0, f"apt-get purge exit {code}")
        status = dpkg_status(g)
        check(not status or "not-installed" in status, f"dpkg still has it: {status!r}")

    with report.step("purge kept the audit trail, the volumes and the seal key") as n:
        now = _kept(g)
        n.append(f"audit lines {kept['audit_lines']} -> {now['audit_lines']}; volumes:")
        n.append(now["volumes"].replace("\n", ", ").replace(f"{VOLUMES}/", "")[:200])
        check(now["seal"] == kept["seal"] != "absent", "the seal key changed or went")
        check(_trail_kept(g, kept), "the audit trail lost or changed records")
        check(now["volumes"] == kept["volumes"] and "No such" not in now["volumes"], "volumes")
        check(now["config"] == "absent", f"the conffile {CONFIG} was not purged")

    with report.step("purge removed /opt/svmm and the PAM profile (pam-auth-update)") as n:
        out = g.root.run(
            "ls -d /opt/svmm /usr/bin/svmm /usr/lib/svmm/pam_svmm.py "
            "/usr/share/pam-configs/svmm 2>/dev/null; grep -l 'pam_svmm\\|pam_mkhomedir' "
            "/etc/pam.d/* 2>/dev/null; systemctl is-active svmmd.socket svmmd.service"
        )[1]
        n.append(out.replace("\n", " | "))
        left = [ln for ln in out.splitlines() if ln.startswith("/")]
        check(not left, f"still there: {left}")
        check("active" not in out.replace("inactive", ""), "svmmd still runs")


def dm_tests(g: Guest, report: Report) -> None:
    with report.step("the device-mapper tests (pytest) pass here") as n:
        # They skip on a host without device-mapper (the dev machine, CI); here they map
        # real volumes. Only the "dm unavailable" test may skip: it is for such hosts.
        code, out = g.root.run(DM_TESTS, timeout=DM_TESTS_TIMEOUT)
        summary_line = out.strip().splitlines()[-1] if out.strip() else ""
        n.append(summary_line[-200:])
        check(code == 0 and " passed" in summary_line, f"exit {code}: {out[-3000:]}")
        skipped = re.search(r"(\d+) skipped", summary_line)
        check(skipped is None or int(skipped.group(1)) <= 1, "more than one test skipped")


# The tests that need device-mapper, run in the guest by its test venv (provision.sh tests).
DM_TESTS = (
    f"cd {guest.GUEST_SRC} && {guest.GUEST_E2E}/test-venv/bin/python -m pytest -q "
    "-p no:cacheprovider "
    "-rf --tb=short tests/unit/test_dmcrypt_session.py tests/integration/test_dmcrypt.py "
    "> /tmp/dmcrypt-tests.log 2>&1; rc=$?; "
    "grep -E '^(E  |FAILED|ERROR|tests/.*Error)' /tmp/dmcrypt-tests.log | cut -c1-240 "
    "| head -n 40; "
    "tail -n 1 /tmp/dmcrypt-tests.log; (exit $rc)"
)
DM_TESTS_TIMEOUT = 1200.0  # under TCG the lab (cards, a CA, a directory) takes minutes

# Run on the root shell after a failure (the serial port is slow: keep them short).
DIAGNOSTICS = (
    "ls -la /run/svmm /var/log/svmm",
    'grep -v \'"outcome":"success"\' /var/log/svmm/audit.jsonl | tail -n 4 | '
    "sed 's/.*\"detail\"/detail/' | cut -c1-400",
    "systemctl --no-pager --failed",
    "systemctl --no-pager status svmmd.socket svmmd.service svmm-demo-org.service | tail -n 30",
    "journalctl -b --no-pager -o short-monotonic -t svmm -t login -t sudo -t su -n 60",
    "journalctl -b --no-pager -o short-monotonic -u svmmd.service -n 30",
)


def diagnostics(g: Guest, path: Path, commands: list[str]) -> None:
    with path.open("w") as out:
        for command in commands:
            out.write(f"### {command}\n")
            try:
                out.write(g.root.run(command, timeout=120)[1] + "\n")
            except Exception as e:
                out.write(f"(failed: {type(e).__name__}: {e})\n")
                return
    print(f"e2e: diagnostics from the guest in {path}", flush=True)


def run_e2e(args: argparse.Namespace) -> int:
    report = Report()
    logs = args.logs or (args.cache / "logs" / time.strftime("%Y%m%d-%H%M%S"))
    logs.mkdir(parents=True, exist_ok=True)
    mode = args.volumes
    if mode == "auto":
        mode = "dm-crypt" if (REPO / "pam_svmm" / "services" / "dmcrypt.py").exists() else "vmm"
    print(f"e2e: logs and transcripts in {logs}; volumes.mode = {mode}", flush=True)
    t_all = time.monotonic()
    image, timings, kvm = guest.prepare(args)
    with contextlib.ExitStack() as stack:
        vm = stack.enter_context(guest.Vm(image, logs / "vm", kvm=kvm))
        t0 = time.monotonic()
        tr0 = stack.enter_context((logs / "ttyS0.log").open("w"))
        tr1 = stack.enter_context((logs / "ttyS1-root.log").open("w"))
        s0 = SerialConsole.connect(vm.sockets[0], transcript=tr0, name="ttyS0")
        s1 = SerialConsole.connect(vm.sockets[1], transcript=tr1, name="ttyS1")
        stack.callback(s0.close)
        stack.callback(s1.close)
        g = Guest(Console(s0), RootShell(s1))
        try:
            with report.step(f"boot to the login prompt ({'KVM' if kvm else 'TCG'})", fatal=True):
                s0.expect(r"login: $", 600)
                g.console.at_prompt = True
            timings.add("boot to login prompt", time.monotonic() - t0, "(KVM)" if kvm else "(TCG)")
            with report.step("root control shell on ttyS1", fatal=True):
                g.root.setup(120)
            debs = json.loads((image / "debs.json").read_text())
            if not (args.dm_tests_only or args.reader_only):
                package_installed(g, report, debs)
            with report.step("device-mapper: modprobe dm_crypt, /dev/mapper/control") as n:
                code, out = g.root.run(
                    "modprobe dm_crypt; modprobe loop; ls -l /dev/mapper/control"
                )
                n.append(out.strip()[:120])
                check(code == 0, "no /dev/mapper/control")
            with report.step(
                "demo organisation up, directory users visible (NSS)", fatal=True
            ) as n:
                g.root.check(
                    "for i in $(seq 120); do systemctl is-active -q svmm-demo-org && "
                    "getent passwd alice >/dev/null && break; "
                    "systemctl start svmm-nss-sync.service; sleep 1; done; getent passwd alice",
                    timeout=300,
                )
                n.append(g.root.check("getent passwd alice scl | cut -d: -f1,3,6 | tr '\\n' ' '"))
                check(not g.exists("/home/alice"), "/home/alice exists before her first login")
            if mode != "vmm":
                g.root.check(f'sed -i \'s/^mode = "vmm"/mode = "{mode}"/\' {CONFIG}')
            t1 = time.monotonic()
            if args.dm_tests_only:
                dm_tests(g, report)
            elif args.reader_only:
                g.reader("alice")
                reader_stack(g, vm, report)
            else:
                scenario(g, report, mode, debs, vm)
            timings.add("scenario", time.monotonic() - t1)
        except Exception as e:
            print(f"e2e: stopped: {type(e).__name__}: {e}", flush=True)
            if report.failed == 0:
                report._add("e2e driver", False, 0.0, f"{type(e).__name__}: {e}")
        finally:
            if report.failed or args.root_cmd:
                diagnostics(g, logs / "diagnostics.log", [*args.root_cmd, *DIAGNOSTICS])
    timings.add("e2e total", time.monotonic() - t_all)
    print("\nStages:\n" + timings.table())
    print(f"\nScenario (volumes.mode = {mode}):\n" + report.table())
    passed = sum(1 for r in report.rows if r[1] is True)
    skipped = sum(1 for r in report.rows if r[1] is None)
    print(f"\nLogs and transcripts: {logs}")
    tail = f", {skipped} skipped" if skipped else ""
    print(f"e2e: {passed} passed, {report.failed} failed{tail}")
    return 1 if report.failed else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    guest.add_arguments(p)
    p.add_argument(
        "--volumes",
        choices=["auto", "vmm", "dm-crypt"],
        default="auto",
        help="volumes.mode in the guest (auto: dm-crypt when the product has it)",
    )
    p.add_argument("--logs", type=Path, help="folder for transcripts (default: CACHE/logs/TIME)")
    p.add_argument(
        "--dm-tests-only",
        action="store_true",
        help="after boot, run only the device-mapper tests (pytest) in the guest",
    )
    p.add_argument(
        "--reader-only",
        action="store_true",
        help="after boot, run only the PC/SC reader steps (QEMU's emulated CCID card)",
    )
    p.add_argument(
        "--root-cmd",
        action="append",
        default=[],
        help="a command for the guest's root shell at the end (its output goes to "
        "LOGS/diagnostics.log); repeat for more",
    )
    return run_e2e(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
