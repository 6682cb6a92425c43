"""CRL lookup cost against CRL size: cold (parse + verify + index) vs warm (on-disk index).

    PYTHONPATH=. python bench/crl_scaling.py [--sizes 1000,100000,1000000] [--runs 5]

Every login is a new process, so the figure that matters is "warm, fresh process": a new
interpreter whose CrlStore answers from the index file a previous login wrote (stat of the
CRL file, read a stamp, mmap the index, binary search). It should not grow with the CRL.

The CRLs are built once with cryptography (the builder's constructor, which is linear; its
add_revoked_certificate() copies the list each time, so LabCA.publish(extra_revoked=N) is
quadratic) and kept under /tmp/svmm-bench-crl for later runs.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pam_svmm.adapters.crl_store import CrlStore

DATA = Path("/tmp/svmm-bench-crl")
UTC = dt.UTC


def _ca() -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey, x509.Certificate]:
    """The bench CA and a leaf it issued (created once)."""
    DATA.mkdir(mode=0o700, exist_ok=True)
    ca_pem, key_pem, leaf_pem = DATA / "ca.pem", DATA / "ca.key", DATA / "leaf.pem"
    if not ca_pem.exists():
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Bench CA")])
        now = dt.datetime.now(UTC)
        ca = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(1)
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256())
        )
        leaf = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "leaf")]))
            .issuer_name(name)
            .public_key(ec.generate_private_key(ec.SECP256R1()).public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=365))
            .sign(key, hashes.SHA256())
        )
        key_pem.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        key_pem.chmod(0o600)
        leaf_pem.write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
        ca_pem.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    key = serialization.load_pem_private_key(key_pem.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return (
        x509.load_pem_x509_certificate(ca_pem.read_bytes()),
        key,
        x509.load_pem_x509_certificate(leaf_pem.read_bytes()),
    )


def crl_file(n: int) -> tuple[Path, float | None]:
    """The CRL with ``n`` entries, and its build time when it had to be built now."""
    path = DATA / f"crl-{n}.der"
    if path.exists():
        return path, None
    ca, key, _ = _ca()
    now = dt.datetime.now(UTC)
    start = time.perf_counter()
    when = now - dt.timedelta(days=1)
    entries = [
        x509.RevokedCertificateBuilder()
        .serial_number(x509.random_serial_number())
        .revocation_date(when)
        .build()
        for _ in range(n)
    ]
    crl = x509.CertificateRevocationListBuilder(
        issuer_name=ca.subject,
        last_update=now - dt.timedelta(minutes=1),
        next_update=now + dt.timedelta(days=30),
        revoked_certificates=entries,
        extensions=[x509.Extension(x509.CRLNumber.oid, False, x509.CRLNumber(1))],
    ).sign(key, hashes.SHA256())
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(crl.public_bytes(serialization.Encoding.DER))
    os.replace(tmp, path)
    return path, time.perf_counter() - start


def cold(n: int, crl: Path, runs: int) -> list[float]:
    ca, _, leaf = _ca()
    times = []
    for i in range(runs):
        cache = DATA / f"cold-{n}-{i}"
        shutil.rmtree(cache, ignore_errors=True)
        store = CrlStore(cache)
        start = time.perf_counter()
        r = store.check(leaf, ca, files=[crl], at=dt.datetime.now(UTC))
        times.append(time.perf_counter() - start)
        assert r.status.value == "good", r
        store.close()
        shutil.rmtree(cache)
    return times


def warm_in_process(n: int, crl: Path, lookups: int) -> tuple[float, float]:
    """(seconds per check() with the index open in memory, per raw index lookup)."""
    ca, _, leaf = _ca()
    cache = DATA / f"warm-{n}"
    store = CrlStore(cache)
    at = dt.datetime.now(UTC)
    store.check(leaf, ca, files=[crl], at=at)  # make sure the index exists and is open
    checks = []
    for _ in range(lookups):
        start = time.perf_counter()
        store.check(leaf, ca, files=[crl], at=at)
        checks.append(time.perf_counter() - start)
    idx = next(iter(store._mem.values()))
    rng = random.Random(n)  # noqa: S311 (benchmark data)
    serials = [rng.getrandbits(159) for _ in range(lookups)]
    start = time.perf_counter()
    for s in serials:
        idx.lookup(s)
    raw = (time.perf_counter() - start) / lookups
    store.close()
    return statistics.median(checks), raw


CHILD = r"""
import datetime as dt, json, sys, time
t0 = time.perf_counter()
from cryptography import x509
from pam_svmm.adapters.crl_store import CrlStore
data, crl, cache = sys.argv[1:4]
ca = x509.load_pem_x509_certificate(open(data + "/ca.pem", "rb").read())
leaf = x509.load_pem_x509_certificate(open(data + "/leaf.pem", "rb").read())
t1 = time.perf_counter()
r = CrlStore(__import__("pathlib").Path(cache)).check(
    leaf, ca, files=[__import__("pathlib").Path(crl)], at=dt.datetime.now(dt.UTC))
t2 = time.perf_counter()
print(json.dumps({"imports": t1 - t0, "check": t2 - t1, "status": r.status.value}))
"""


def warm_fresh_process(n: int, crl: Path, runs: int) -> tuple[float, float, float]:
    """Medians of (check() in a new process, imports there, whole process wall time)."""
    cache = DATA / f"warm-{n}"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    checks, imports, walls = [], [], []
    for _ in range(runs):
        start = time.perf_counter()
        out = subprocess.run(
            [sys.executable, "-c", CHILD, str(DATA), str(crl), str(cache)],
            capture_output=True,
            text=True,
            check=True,
            env=env,
        )
        walls.append(time.perf_counter() - start)
        res = json.loads(out.stdout)
        assert res["status"] == "good", res
        checks.append(res["check"])
        imports.append(res["imports"])
    return statistics.median(checks), statistics.median(imports), statistics.median(walls)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="1000,100000,1000000")
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--cold-runs", type=int, default=3)
    p.add_argument("--lookups", type=int, default=2000)
    args = p.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    rows = []
    for n in sizes:
        crl, built = crl_file(n)
        if built is not None:
            print(
                f"built a {n}-entry CRL in {built:.1f}s ({crl.stat().st_size / 1e6:.1f} MB)",
                flush=True,
            )
        c = statistics.median(cold(n, crl, args.cold_runs))
        w_mem, raw = warm_in_process(n, crl, args.lookups)
        w_proc, imp, wall = warm_fresh_process(n, crl, args.runs)
        rows.append((n, crl.stat().st_size, c, raw, w_mem, w_proc, imp, wall))
        print(f"  measured {n}", flush=True)
    print()
    print(
        f"{'entries':>9} {'CRL MB':>7} {'cold s':>8} {'lookup us':>10} "
        f"{'check(mem) us':>14} {'check(new proc) ms':>19} {'imports ms':>11} "
        f"{'process ms':>11}"
    )
    for n, size, c, raw, w_mem, w_proc, imp, wall in rows:
        print(
            f"{n:>9} {size / 1e6:>7.1f} {c:>8.3f} {raw * 1e6:>10.1f} {w_mem * 1e6:>14.1f} "
            f"{w_proc * 1e3:>19.3f} {imp * 1e3:>11.1f} {wall * 1e3:>11.1f}"
        )
    first, last = rows[0], rows[-1]
    print()
    print(
        f"warm ratio {last[0]}/{first[0]} entries: lookup x{last[3] / first[3]:.2f}, "
        f"check(mem) x{last[4] / first[4]:.2f}, check(new process) x{last[5] / first[5]:.2f}, "
        f"whole process x{last[7] / first[7]:.2f}; cold x{last[2] / first[2]:.0f}"
    )
    print(
        f"(medians; cold over {args.cold_runs} runs, fresh process over {args.runs}, "
        f"in-process over {args.lookups} lookups; {sys.version.split()[0]})"
    )


if __name__ == "__main__":
    main()
