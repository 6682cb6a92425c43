"""Policy decisions at scale: 10,000 users, 1,000 VMs, 100 roles (by default).

Generates a policy document (grants mostly by role, some by user, conflict classes, typed
networks), then measures parsing and compiling, the latency of ``decide`` over random
requests (boot with running VMs for the Chinese Wall, console, usb, network), ``grants_for``,
``host_login`` and building an allowlist, and the memory the compiled policy holds
(tracemalloc). Prints a table; nothing is written.

    .venv/bin/python bench/policy_decisions.py [--users N] [--vms N] [--roles N] [--decisions N]
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import random
import statistics
import sys
import time
import tomllib
import tracemalloc
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pam_svmm.domain import policy as pdp
from pam_svmm.domain.allowlist import build_allowlist

TYPES = ("public", "internal", "restricted")


def generate(rng: random.Random, users: int, vms: int, roles: int) -> tuple[str, list[list[str]]]:
    """The policy text, and each user's roles (what the directory would say)."""
    out = ["version = 1", 'description = "generated for bench/policy_decisions.py"', ""]
    role_names = [f"role-{i:03d}" for i in range(roles)]
    out += [
        "[hosts.bench-host]",
        "login_roles = [" + ", ".join(f'"{r}"' for r in role_names[: roles // 2]) + "]",
        'services = ["login", "sudo"]',
        "",
    ]
    networks: dict[str, tuple[str, ...]] = {}
    for i in range(20):
        types = tuple(sorted(rng.sample(TYPES, rng.randint(1, 2))))
        networks[f"net-{i:02d}"] = types
        out += [f"[networks.net-{i:02d}]", "types = [" + ", ".join(f'"{t}"' for t in types) + "]"]
    out.append("")
    classes = [f"class-{i:03d}" for i in range(max(2, vms // 5))]
    vm_ids = [f"vm-{i:04d}" for i in range(vms)]
    vm_nets: dict[str, list[str]] = {}
    vm_usb: dict[str, list[str]] = {}
    for vm in vm_ids:
        vtype = rng.choice(TYPES)
        fitting = [n for n, t in networks.items() if vtype in t]
        nets = rng.sample(fitting, min(len(fitting), rng.randint(1, 2)))
        usb = (
            [f"{rng.randrange(1 << 16):04x}:{rng.randrange(1 << 16):04x}"]
            if rng.random() < 0.3
            else []
        )
        vm_nets[vm], vm_usb[vm] = nets, usb
        out += [
            f"[vms.{vm}]",
            f'class = "{rng.choice(classes)}"',
            f'type = "{vtype}"',
            f'volumes = ["{vm}-disk"]',
            "usb = [" + ", ".join(f'"{u}"' for u in usb) + "]",
            "networks = [" + ", ".join(f'"{n}"' for n in nets) + "]",
            "",
        ]
    sets = []
    pool = classes[:]
    rng.shuffle(pool)
    for i in range(0, min(len(pool) - 1, 150), 3):
        sets.append(pool[i : i + rng.choice((2, 3))])
    out += [
        "[conflicts]",
        "classes = [" + ", ".join(str(s).replace("'", '"') for s in sets if len(s) > 1) + "]",
        "",
    ]

    def grant(principal: str, vm: str) -> None:
        perms = ["boot", "console"] if rng.random() < 0.7 else ["console"]
        perms += [f"network:{n}" for n in vm_nets[vm] if rng.random() < 0.8]
        perms += [f"usb:{u}" for u in vm_usb[vm] if rng.random() < 0.5]
        out.extend(
            [
                "[[grants]]",
                principal,
                f'vm = "{vm}"',
                "permissions = [" + ", ".join(f'"{p}"' for p in perms) + "]",
                "",
            ]
        )

    for r in role_names:
        for vm in rng.sample(vm_ids, 30):
            grant(f'role = "{r}"', vm)
    user_names = [f"user{i:05d}" for i in range(users)]
    for u in rng.sample(user_names, users // 5):
        grant(f'user = "{u}"', rng.choice(vm_ids))
    user_roles = [rng.sample(role_names, rng.randint(1, 5)) for _ in range(users)]
    return "\n".join(out) + "\n", user_roles


def percentiles(ns: list[int]) -> tuple[float, float, float, float]:
    q = statistics.quantiles(ns, n=100, method="inclusive")
    return q[49] / 1000, q[89] / 1000, q[98] / 1000, max(ns) / 1000  # microseconds


def timed(calls: list[Callable[[], object]]) -> list[int]:
    out = []
    clock = time.perf_counter_ns
    for call in calls:
        t0 = clock()
        call()
        out.append(clock() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--users", type=int, default=10_000)
    ap.add_argument("--vms", type=int, default=1_000)
    ap.add_argument("--roles", type=int, default=100)
    ap.add_argument("--decisions", type=int, default=100_000)
    ap.add_argument("--seed", type=int, default=7)
    a = ap.parse_args()
    rng = random.Random(a.seed)  # noqa: S311 - reproducible test data, not secrets

    text, user_roles = generate(rng, a.users, a.vms, a.roles)
    data = text.encode()
    t0 = time.perf_counter()
    tomllib.loads(text)
    toml_s = time.perf_counter() - t0

    # Timing first (tracemalloc slows allocation-heavy code several times), then memory.
    parse_s, compile_s = [], []
    for _ in range(3):
        t0 = time.perf_counter()
        parsed = pdp.parse_policy(data)
        t1 = time.perf_counter()
        compiled = pdp.compile_policy(parsed)
        parse_s.append(t1 - t0)
        compile_s.append(time.perf_counter() - t1)
    del parsed, compiled, text
    gc.collect()
    tracemalloc.start()
    compiled = pdp.load_policy(data)
    gc.collect()
    held, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()

    users = [f"user{i:05d}" for i in range(a.users)]
    vm_ids = list(compiled.policy.vms)
    subjects = [pdp.Subject(u, r) for u, r in zip(users, user_roles, strict=True)]

    def request() -> Callable[[], object]:
        i = rng.randrange(len(subjects))
        s = subjects[i]
        mine = list(pdp.grants_for(compiled, s))
        vm = rng.choice(mine) if mine and rng.random() < 0.7 else rng.choice(vm_ids)
        kind = rng.random()
        v = compiled.policy.vms[vm]
        if kind < 0.55:
            action = "boot"
        elif kind < 0.75:
            action = "console"
        elif kind < 0.9:
            action = f"network:{rng.choice(v.networks)}" if v.networks else "network:net-00"
        else:
            action = f"usb:{v.usb[0]}" if v.usb else "usb:dead:beef"
        running = rng.sample(mine, min(len(mine), rng.randint(0, 3)))
        return lambda: pdp.decide(compiled, s, vm, action, running)

    calls = [request() for _ in range(a.decisions)]
    allowed = sum(1 for c in calls[:10_000] if c().allowed)  # type: ignore[attr-defined]
    walls = sum(1 for c in calls[:10_000] if c().reason == "conflict_of_interest")  # type: ignore[attr-defined]
    dec = timed(calls)

    def grants_call(s: pdp.Subject) -> Callable[[], object]:
        return lambda: pdp.grants_for(compiled, s)

    def login_call(r: list[str]) -> Callable[[], object]:
        return lambda: pdp.host_login(compiled, "bench-host", "login", r)

    g_calls = [grants_call(rng.choice(subjects)) for _ in range(10_000)]
    gf = timed(g_calls)
    h_calls = [login_call(rng.choice(user_roles)) for _ in range(10_000)]
    hl = timed(h_calls)
    now = dt.datetime.now(dt.UTC)
    al_calls: list[Callable[[], object]] = []
    for _ in range(2_000):
        i = rng.randrange(len(subjects))
        al_calls.append(
            lambda i=i: build_allowlist(
                compiled,
                user=users[i],
                uid=10000 + i,
                roles=user_roles[i],
                card=None,
                method="password",
                sessions=["s1"],
                host="bench-host",
                now=now,
                ttl=3600,
            )
        )
    al = timed(al_calls)

    p = compiled.policy
    n_user_grants = sum(1 for g in p.grants if g.user)
    print(
        f"policy: {len(users)} users ({n_user_grants} user grants), {len(p.vms)} VMs, "
        f"{a.roles} roles, {len(p.grants)} grants, {len(p.networks)} networks, "
        f"{len(p.conflicts)} conflict sets; {len(data) / 1e6:.2f} MB of TOML"
    )
    print(
        f"parse + validate {min(parse_s):.3f} s (of which TOML {toml_s:.3f} s), compile "
        f"{min(compile_s):.3f} s (best of 3); memory held by the "
        f"compiled policy {held / 1e6:.1f} MB (peak {peak / 1e6:.1f} MB)"
    )
    print(f"sample of 10,000 decisions: {allowed} allowed, {walls} refused by the Chinese Wall")
    print()
    print(f"{'operation':<28}{'calls':>9}{'p50 us':>10}{'p90 us':>10}{'p99 us':>10}{'max us':>10}")
    for name, ns in (
        ("decide", dec),
        ("grants_for", gf),
        ("host_login", hl),
        ("build_allowlist", al),
    ):
        p50, p90, p99, mx = percentiles(ns)
        print(f"{name:<28}{len(ns):>9}{p50:>10.1f}{p90:>10.1f}{p99:>10.1f}{mx:>10.1f}")


if __name__ == "__main__":
    main()
