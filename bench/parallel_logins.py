"""Logins side by side through svmmd: latency and throughput at N at once, and with one
user's OCSP responder or directory request hung.

Run from the repository root, as root:

    .venv/bin/python bench/parallel_logins.py                      # N = 1, 20, 50, 100
    .venv/bin/python bench/parallel_logins.py --sizes 1,20 --others 10
    .venv/bin/python bench/parallel_logins.py --json > parallel.json

Real parts, from the demo lab (svmm_lab): the lab CA with its `openssl ocsp` responder and
CRL server, a slapd with the example organisation (StartTLS), SoftHSM2 cards behind
pinguard (alice's, bob's, carol's and dave's, all in svmmd's reader: the PAM application's
own reader is empty, so only svmmd can log anyone in), a signed VM policy, and svmmd started
as its own process (`python -m pam_svmm.daemon.server`, svmm_lab.svmmd.SvmmdProcess). A
login is one `svmm-pamclient SERVICE USER session` process under pam_wrapper (the PIN on its
stdin; each in a mount namespace with a /tmp of its own: pam_wrapper allows 62 at once per
/tmp): authenticate, acct_mgmt, setcred, open_session (the allowlist written), close_session,
each call a round trip to svmmd (daemon=required); timed from spawn to exit. A burst's
logins take turns among --users people (a card serves one login at a time, so logins of
one card queue behind each other: --users 1 shows that). Every login asks the OCSP
responder (ocsp_reuse = 0) and the directory.

svmmd asks OCSP through svmm_lab.stall.StallingOcspProxy and the directory through
svmm_lab.stall.StallingTcpProxy. The hung variants start bob's login, wait until the proxy
holds its request (OCSP: a request about bob's certificate accepted and never answered;
directory: the next request on its connection held), then run --others logins of the
others (alice, carol, dave) at once, and print their p50 and max over the same burst
without a hang (measured just before): 1.0 means bob's hang cost the others nothing.

Output: per N the logins that succeeded, p50/p99/max latency in seconds and throughput
(logins per second over the burst's wall time); then the two ratios. The issue 14 goals
(every login succeeds at N=100, ratios <= 1.5, throughput at N=100 >= 10x the serial
svmmd's) are printed beside the figures, never asserted: timing is no pass/fail test.
Progress goes to stderr. Keep runs short on a shared machine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script: make `svmm_lab` and `pam_svmm` importable
    sys.path.insert(0, str(REPO))

from svmm_lab.directory import Slapd  # noqa: E402
from svmm_lab.lab import DEMO_CARDS, CardSpec, Lab, free_ports  # noqa: E402
from svmm_lab.pamclient import _report, build_client, pam_env  # noqa: E402
from svmm_lab.stall import StallingOcspProxy, StallingTcpProxy, fronted_variant  # noqa: E402
from svmm_lab.svmmd import SvmmdProcess  # noqa: E402

PIN = "123456"
SIZES = (1, 20, 50, 100)
OTHERS = 20
# Four people with a card each, all in svmmd's reader; a burst's logins take turns among
# them. A card serves one login at a time (C_Login to C_Logout), so logins of ONE card
# queue behind each other however many workers svmmd has: --users 1 shows that.
CARDS = (*(c for c in DEMO_CARDS if c.name in ("alice", "bob", "carol")), CardSpec("dave", "dave"))
USERS = ("alice", "carol", "dave", "bob")
# pam_wrapper (1.1.4) copies the services to /tmp/pam.X, X one of 0-9a-zA-Z: past 62 PAM
# applications at once it fails. So each login has a /tmp of its own (a mount namespace
# with a tmpfs there), and the lab and svmmd's socket live under /var/tmp.
PRIVATE_TMP = (
    "unshare", "--mount", "--", "sh", "-c",
    'mount -t tmpfs none /tmp && export LD_PRELOAD="$BENCH_PRELOAD" PAM_WRAPPER=1 && exec "$@"',
    "-",
)  # fmt: skip
WORK_ROOT = "/var/tmp"


@dataclass(frozen=True)
class Login:
    user: str
    ok: bool
    seconds: float
    detail: str = ""


def _machine_busy() -> float:
    """CPU seconds every core spent not idle since boot (/proc/stat; idle and iowait left out)."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def _process_cpu(pid: int | None) -> float:
    """CPU seconds of ``pid`` and of the children it has waited for."""
    if pid is None:
        return 0.0
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return sum(map(int, fields[11:15])) / os.sysconf("SC_CLK_TCK")


def _rusage(who: int) -> float:
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


@dataclass(frozen=True)
class Cpu:
    """CPU seconds: the whole machine, the PAM applications (this process's waited
    children), svmmd, slapd, and this process (the proxies are its threads)."""

    machine: float
    clients: float
    svmmd: float
    slapd: float
    bench: float

    @staticmethod
    def sample(svmmd: int | None, slapd: int | None) -> Cpu:
        return Cpu(
            _machine_busy(),
            _rusage(resource.RUSAGE_CHILDREN),
            _process_cpu(svmmd),
            _process_cpu(slapd),
            _rusage(resource.RUSAGE_SELF),
        )

    def __sub__(self, o: Cpu) -> Cpu:
        return Cpu(
            self.machine - o.machine,
            self.clients - o.clients,
            self.svmmd - o.svmmd,
            self.slapd - o.slapd,
            self.bench - o.bench,
        )

    @property
    def rest(self) -> float:
        """The card helpers (forked by svmmd's forker, reaped by the kernel: nobody's
        children to account them), the OCSP responder, the kernel."""
        return self.machine - self.clients - self.svmmd - self.slapd - self.bench


@dataclass(frozen=True)
class Burst:
    logins: tuple[Login, ...]
    wall: float
    cpu: Cpu | None = None

    @property
    def ok(self) -> int:
        return sum(1 for x in self.logins if x.ok)

    def seconds(self) -> list[float]:
        return sorted(x.seconds for x in self.logins)

    def p(self, q: float) -> float:
        s = self.seconds()
        return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]

    @property
    def p50(self) -> float:
        return statistics.median(self.seconds())

    @property
    def throughput(self) -> float:
        return len(self.logins) / self.wall if self.wall > 0 else 0.0

    def summary(self) -> dict[str, object]:
        failed = [x.detail for x in self.logins if not x.ok]
        return {
            "n": len(self.logins),
            "ok": self.ok,
            "p50": self.p50,
            "p99": self.p(0.99),
            "max": max(self.seconds()),
            "wall": self.wall,
            "throughput": self.throughput,
            "failures": sorted(set(failed))[:5],
            **({} if self.cpu is None else self._cpu_doc(self.cpu)),
        }

    def _cpu_doc(self, cpu: Cpu) -> dict[str, float]:
        n = len(self.logins)
        per = cpu.machine / n
        return {
            "cpu_ms_per_login": 1000 * per,
            "clients_cpu_ms_per_login": 1000 * cpu.clients / n,
            "svmmd_cpu_ms_per_login": 1000 * cpu.svmmd / n,
            "slapd_cpu_ms_per_login": 1000 * cpu.slapd / n,
            "bench_cpu_ms_per_login": 1000 * cpu.bench / n,
            "rest_cpu_ms_per_login": 1000 * cpu.rest / n,
            # what this machine could do at best if logins cost what they cost here
            "cpu_ceiling_per_s": (os.cpu_count() or 1) / per if per > 0 else 0.0,
        }


class Bench:
    """The lab, slapd, the stalling proxies and svmmd; torn down by ``close``."""

    def __init__(self, workdir: Path, log: Callable[[str], None], crl_entries: int = 0) -> None:
        self.workdir = workdir
        self.log = log
        self._stack = contextlib.ExitStack()
        self.lab = Lab(workdir / "lab")
        crl_port, ocsp_port = free_ports(2)
        log(f"building the lab (CA, cards of {', '.join(c.name for c in CARDS)})")
        self.lab.build(crl_port=crl_port, ocsp_port=ocsp_port, cards=CARDS, venv=Path(sys.prefix))
        if crl_entries:
            log(f"padding the intermediate CA's CRL with {crl_entries} revoked serials")
            self.lab.ca.publish(extra_revoked=crl_entries)
        self._stack.enter_context(self.lab.responders())
        self.slapd = Slapd(workdir / "slapd", ca=self.lab.ca)
        self.slapd.start()
        self._stack.callback(self.slapd.stop)
        bob = self.lab.card_cert("bob").serial_number
        self.ocsp = self._stack.enter_context(StallingOcspProxy(self.lab.ca.ocsp_url, bob))
        self.ldap = self._stack.enter_context(StallingTcpProxy("127.0.0.1", self.slapd.port))
        sock_dir = Path(tempfile.mkdtemp(prefix="svmm-par-", dir=WORK_ROOT))
        os.chmod(sock_dir, 0o755)  # noqa: S103 - root's folder; every user reaches the socket
        self._stack.callback(shutil.rmtree, sock_dir, True)
        # With a padded CRL, svmmd checks revocation by that CRL alone (fetched, verified and
        # indexed at the first login), so the CRL is what it holds.
        methods = ("crl",) if crl_entries else ("ocsp", "crl")
        self.service, toml = fronted_variant(
            self.lab, self.slapd, self.ocsp, self.ldap, sock_dir, methods=methods
        )
        env = {"PYTHONPATH": str(REPO), **self.lab.insert(*(c.name for c in CARDS)).env}
        self.svmmd = SvmmdProcess(toml, sock_dir / "launcher.sock", env, workdir / "svmmd.log")
        self.svmmd.start()
        self._stack.callback(self.svmmd.stop)
        self.client = build_client(self.lab.folder / "bin")
        self.reader = self.lab.insert()  # empty: only svmmd sees cards

    def login(self, user: str) -> Login:
        start = time.monotonic()
        proc = subprocess.run(
            [*PRIVATE_TMP, str(self.client), self.service, user, "session"],
            input=PIN + "\n",
            capture_output=True,
            text=True,
            env=self._env(),
            timeout=180,
            check=False,
        )
        seconds = time.monotonic() - start
        try:
            r = _report(proc.stdout, proc.returncode, proc.stderr)
        except RuntimeError as e:
            return Login(user, False, seconds, str(e)[:120])
        ok = r.code == 0 and r.session_open == 0 and r.session_close == 0
        what = f"{r.step} {r.code} open={r.session_open} close={r.session_close}"
        return Login(user, ok, seconds, "" if ok else what)

    def _env(self) -> dict[str, str]:
        """pam_wrapper's environment, for the PAM application alone (not unshare, sh)."""
        env = pam_env(self.lab.pam_dir, self.reader.env)
        env["BENCH_PRELOAD"] = env.pop("LD_PRELOAD")
        del env["PAM_WRAPPER"]
        return env

    def burst(self, n: int, users: tuple[str, ...]) -> Burst:
        pids = (self.svmmd.proc.pid if self.svmmd.proc else None, self.slapd.pid)
        before = Cpu.sample(*pids)
        start = time.monotonic()
        with ThreadPoolExecutor(max_workers=n) as pool:
            logins = tuple(pool.map(lambda i: self.login(users[i % len(users)]), range(n)))
        return Burst(logins, time.monotonic() - start, Cpu.sample(*pids) - before)

    def hung(
        self, kind: str, others: int, users: tuple[str, ...], baseline: Burst
    ) -> dict[str, object]:
        """bob's request hung (``kind``: ocsp or directory) while ``others`` log in."""
        proxy = self.ocsp if kind == "ocsp" else self.ldap
        proxy.arm()
        box: list[Login] = []
        bob = threading.Thread(target=lambda: box.append(self.login("bob")))
        bob.start()
        if not proxy.stalled.wait(30):
            raise RuntimeError(f"bob's {kind} request never reached the proxy")
        during = self.burst(others, users)
        proxy.release()
        bob.join(180)
        return {
            "others": during.summary(),
            "hung_login": box[0].__dict__ if box else None,
            "ratio_p50": during.p50 / baseline.p50,
            "ratio_max": max(during.seconds()) / max(baseline.seconds()),
        }

    def svmmd_memory(self) -> dict[str, int]:
        """svmmd's VmRSS and VmHWM (KiB), and its card helpers' summed VmRSS."""
        assert self.svmmd.proc is not None
        pid = self.svmmd.proc.pid
        out = {k: _status_kib(pid, k) for k in ("VmRSS", "VmHWM")}
        helpers = 0
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and entry.name != str(pid):
                with contextlib.suppress(OSError):
                    if b"card_child" in (entry / "cmdline").read_bytes() or _ppid(entry) == pid:
                        helpers += _status_kib(int(entry.name), "VmRSS")
        out["helpers_VmRSS"] = helpers
        return out

    def hold(self, n: int, users: tuple[str, ...]) -> dict[str, object]:
        """``n`` logins whose sessions stay open at once (svm-pamclient session mode waits
        for a line before closing), svmmd's memory with them all open, then all closed."""
        procs = []
        for i in range(n):
            p = subprocess.Popen(
                [*PRIVATE_TMP, str(self.client), self.service, users[i % len(users)], "session"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
                env=self._env(),
            )
            assert p.stdin is not None
            p.stdin.write(PIN + "\n")
            p.stdin.flush()
            procs.append(p)
        opened = 0
        for p in procs:
            assert p.stdout is not None
            line = p.stdout.readline()
            with contextlib.suppress(ValueError):
                opened += json.loads(line).get("session_open") == 0
        memory = self.svmmd_memory()
        closed = 0
        for p in procs:
            out, _ = p.communicate("\n", timeout=180)
            with contextlib.suppress(RuntimeError):
                r = _report(out, p.returncode, "")
                closed += r.session_close == 0
        return {"held": n, "opened": opened, "closed": closed, "memory_kib": memory}

    def close(self) -> None:
        self._stack.close()


def _status_kib(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1])
    return 0


def _ppid(proc: Path) -> int:
    return int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])


def run(args: argparse.Namespace, log: Callable[[str], None]) -> dict[str, object]:
    workdir = Path(tempfile.mkdtemp(prefix="svmm-parallel-", dir=WORK_ROOT))
    bench = Bench(workdir, log, args.crl_entries)
    memory: dict[str, object] = {}
    try:
        users = USERS[: args.users]
        others = tuple(u for u in users if u != "bob") or ("alice",)
        memory["started"] = bench.svmmd_memory()
        for user in (*USERS, "alice"):  # warm-up, and the bench works at all
            first = bench.login(user)
            if not first.ok:
                raise RuntimeError(f"{user} cannot log in: {first.detail}; {bench.svmmd.tail()}")
        memory["warm"] = bench.svmmd_memory()
        if args.held:
            log(f"{args.held} sessions held open at once")
            memory["held"] = bench.hold(args.held, users)
        sizes: dict[str, object] = {}
        for n in args.sizes:
            log(f"N = {n} ({', '.join(users)} in turn)")
            sizes[str(n)] = bench.burst(n, users).summary()
        hung: dict[str, object] = {}
        for kind in args.hung:
            log(f"{kind} hung for bob, {args.others} others ({', '.join(others)})")
            baseline = bench.burst(args.others, others)
            during = bench.hung(kind, args.others, others, baseline)
            hung[kind] = {"baseline": baseline.summary(), **during}
        return {
            "sizes": sizes,
            "hung": hung,
            "users": list(users),
            "workdir": str(workdir),
            "crl_entries": args.crl_entries,
            "memory": memory,
        }
    finally:
        bench.close()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)


def table(result: dict[str, object], serial: float | None) -> str:
    cols = ("clients", "svmmd", "slapd", "bench", "rest")
    lines = [
        f"{'N':>4} {'ok':>5} {'p50 s':>7} {'p99 s':>7} {'max s':>7} {'logins/s':>9}"
        f" {'cpu ms':>7}" + "".join(f" {c:>7}" for c in cols) + f" {'ceiling/s':>9}"
    ]
    sizes = result["sizes"]
    assert isinstance(sizes, dict)
    for n, s in sizes.items():
        cpu = ""
        if "cpu_ms_per_login" in s:
            cpu = (
                f" {s['cpu_ms_per_login']:7.0f}"
                + "".join(f" {s[f'{c}_cpu_ms_per_login']:7.0f}" for c in cols)
                + f" {s['cpu_ceiling_per_s']:9.2f}"
            )
        lines.append(
            f"{n:>4} {s['ok']:>5} {s['p50']:7.2f} {s['p99']:7.2f} {s['max']:7.2f} "
            f"{s['throughput']:9.2f}{cpu}"
            + (f"  failures: {s['failures']}" if s["failures"] else "")
        )
    lines.append(
        "cpu ms: CPU time per login over the burst, the whole machine; of it: clients, the"
        " PAM applications; svmmd; slapd; bench, this process (the stalling proxies);"
        " rest, svmmd's card helpers (forked, reaped by the kernel), the OCSP responder and"
        " the kernel. ceiling/s: CPUs / cpu ms, the most this machine can do at that cost"
    )
    hung = result["hung"]
    assert isinstance(hung, dict)
    for kind, h in hung.items():
        o, b = h["others"], h["baseline"]
        lines.append(
            f"hung {kind}: {o['ok']}/{o['n']} others ok, p50 {o['p50']:.2f} s over "
            f"{b['p50']:.2f} s unhung: ratio {h['ratio_p50']:.2f} (max {h['ratio_max']:.2f}; "
            f"goal <= 1.5); bob's own login {h['hung_login']['seconds']:.1f} s"
        )
    memory = result.get("memory")
    if isinstance(memory, dict) and memory:
        crl = result.get("crl_entries") or 0
        what = f"CRL of {crl} extra entries" if crl else "OCSP, no CRL"
        for phase in ("started", "warm"):
            m = memory.get(phase)
            if isinstance(m, dict):
                lines.append(
                    f"svmmd memory, {phase} ({what}): VmRSS {m['VmRSS']} KiB, VmHWM"
                    f" {m['VmHWM']} KiB; card helpers {m['helpers_VmRSS']} KiB"
                )
        held = memory.get("held")
        if isinstance(held, dict):
            m = held["memory_kib"]
            lines.append(
                f"svmmd memory with {held['opened']}/{held['held']} sessions open ({what}):"
                f" VmRSS {m['VmRSS']} KiB, VmHWM {m['VmHWM']} KiB; card helpers"
                f" {m['helpers_VmRSS']} KiB; closed after: {held['closed']}"
            )
    big = sizes.get("100")
    if isinstance(big, dict):
        goal = "every login succeeds" if big["ok"] == big["n"] else "NOT every login succeeded"
        lines.append(f"N=100: {goal}")
        if serial:
            lines.append(
                f"N=100 throughput {big['throughput']:.2f}/s over the serial svmmd's "
                f"{serial:.2f}/s: {big['throughput'] / serial:.1f}x (goal >= 10x)"
            )
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sizes", default=",".join(map(str, SIZES)), help="N at once (commas)")
    p.add_argument("--others", type=int, default=OTHERS, help="logins during a hang")
    p.add_argument("--users", type=int, default=len(USERS), help="people (cards) taking turns")
    p.add_argument("--hung", default="ocsp,directory", help="hung variants (commas; none: '')")
    p.add_argument("--serial", type=float, help="the old svmmd's logins/s at N=100, to compare")
    p.add_argument("--held", type=int, default=0, help="sessions held open at once (memory)")
    p.add_argument(
        "--crl-entries", type=int, default=0, help="revocation by the CA's CRL, padded to this"
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    p.add_argument("--keep", action="store_true", help="keep the work folder")
    args = p.parse_args(argv)
    args.sizes = [int(x) for x in args.sizes.split(",") if x]
    args.hung = [x for x in args.hung.split(",") if x]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("parallel_logins: run as root (svmmd, pam_wrapper, slapd)", file=sys.stderr)
        return 2

    def log(msg: str) -> None:
        print(f"parallel_logins: {msg}", file=sys.stderr, flush=True)

    result = run(args, log)
    print(json.dumps(result, indent=1) if args.json else table(result, args.serial))
    return 0


if __name__ == "__main__":
    sys.exit(main())
