"""Directory mapping and role-resolution latency against a real slapd, by directory size.

Run from the repository root:

    /tmp/v/bin/python bench/directory_latency.py                      # 10k and 100k users
    /tmp/v/bin/python bench/directory_latency.py --sizes 10000 --no-login --warm 200
    /tmp/v/bin/python bench/directory_latency.py --json > directory.json

What is measured, per directory size (svmm_lab.directory.Slapd, StartTLS with the lab
CA, the service account bound through a 0600 password file, the example organisation plus
N generated users from generate_people: teams of 100, each user holding a role through one
level of group nesting, every user with a published certificate):

* cold: a fresh `python -c` process parses the configuration, imports ldap3 and the product,
  builds DirectoryClient + IdentityCache + DirectoryMapper and maps one certificate (TCP,
  StartTLS handshake, service bind, the rule's search, the identity with its roles, the
  offline-cache refresh). Median over --runs processes: spawn-to-exit wall time, and inside
  the child the time from before the imports to the mapping's end, and the map() call.
* warm: one process with the client connected, --warm mappings of random sampled users per
  rule kind: p50/p90/p99 of DirectoryMapper.map (all of it), of DirectoryClient.search_users
  with the rule's rendered filter (the indexed lookup alone), of DirectoryClient.identity(dn)
  (role resolution: direct groups, memberOf, nested groups; POSIX groups), and of
  IdentityCache.by_fingerprint (the offline answer) and IdentityCache.store with 10 users
  cached and with every sampled user cached (both read every file of the cache folder).
  map() includes a store(); each kind maps into its own, initially empty, cache.
  Rule kinds: upn (svmmPrincipalName={upn}), cert (userCertificate={cert_exact}, the
  published certificate, which the mapper also compares byte for byte) and email
  (mail={email}); each runs alone in its own mapper.
* indexes: the olcDbIndex list of the lab slapd, and p50 of a one-attribute equality search
  for every attribute the product's filters use (raw ldap3, same connection settings):
  a lookup that grows with the directory points at a missing index.
* login: whole PAM logins through the lab (svmm_lab.lab.Lab, pamclient under
  pam_wrapper, alice's soft card, OCSP + CRL on loopback), the lab's service without a
  directory vs the same with Lab.directory_overrides(slapd) (certmap: UPN then e-mail),
  --logins each, interleaved; medians and the difference.

Every mapping is checked (the user it returns is the certificate's), so an error cannot pass
for a fast answer. The directories are built once and kept under --cache-dir, in a folder
keyed by VERSION and the size (the first run reports certificate generation and slapadd
load times; later runs reuse the databases and report the stored figures). The lab (its CA,
which also signs slapd's TLS certificate and the generated users' certificates, and its soft
cards) lives beside them. Progress goes to stderr; --json prints everything, samples
summarised, instead of the table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import random
import shutil
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import ldap3  # noqa: E402

from pam_svmm import config as svmm_config  # noqa: E402
from pam_svmm.adapters.directory import DirectoryClient, esc  # noqa: E402
from pam_svmm.adapters.identity_cache import IdentityCache  # noqa: E402
from pam_svmm.config import CertmapRule  # noqa: E402
from pam_svmm.domain import certmap  # noqa: E402
from pam_svmm.domain.certpolicy import fingerprint  # noqa: E402
from pam_svmm.domain.identity import Identity  # noqa: E402
from pam_svmm.services.identity import DirectoryMapper  # noqa: E402
from svmm_lab.directory import (  # noqa: E402
    EXAMPLE_LDIF,
    SLAPD,
    Slapd,
    generate_people,
    write_ldif,
)
from svmm_lab.lab import DEMO_CARDS, LOGIN_SERVICE, Lab, free_ports  # noqa: E402
from svmm_lab.pki import SMARTCARD_LOGON, LabCA, new_key, upn_other_name  # noqa: E402

# Bump when the generated data, the lab or the layout changes: old folders are not reused.
VERSION = "dirbench-v2"
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "pam_svmm-bench"
DOMAIN = "demo.example"
LOGIN_CARD = "alice"
BENCH_CARDS = tuple(c for c in DEMO_CARDS if c.name in ("alice", "bob"))

# The rule kinds that matter, one mapper each (the template is the map part).
RULES: dict[str, str] = {
    "upn": "(svmmPrincipalName={upn})",
    "cert": "(userCertificate={cert_exact})",
    "email": "(mail={email})",
}

Log = Callable[[str], None]


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --- statistics ---------------------------------------------------------------------------


def summary(samples_s: Sequence[float]) -> dict[str, float]:
    """p50/p90/p99/min in milliseconds."""
    ms = sorted(s * 1000 for s in samples_s)
    if len(ms) == 1:
        return {"n": 1, "p50": ms[0], "p90": ms[0], "p99": ms[0], "min": ms[0]}
    q = statistics.quantiles(ms, n=100, method="inclusive")
    return {"n": len(ms), "p50": statistics.median(ms), "p90": q[89], "p99": q[98], "min": ms[0]}


def rng(seed: object) -> random.Random:
    """Reproducible choices of benchmark data (not for secrets)."""
    return random.Random(str(seed))  # noqa: S311 (benchmark data)


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    result = fn()
    return time.perf_counter() - t0, result


# --- the cached lab and directories ---------------------------------------------------------


def open_lab(root: Path, log: Log) -> Lab:
    """The lab in ``root``: its CA (made once) and the soft cards; rebuilt steps are cheap."""
    lab = Lab(root / "lab")
    fresh = not (lab.ca_dir / "config.json").exists()
    if fresh:
        cards = ", ".join(c.name for c in BENCH_CARDS)
        log(f"building the lab (CA, cards {cards}) in {lab.folder}")
    crl_port, ocsp_port = free_ports(2)  # only used when the CA is created
    lab.build(crl_port=crl_port, ocsp_port=ocsp_port, cards=BENCH_CARDS, venv=Path(sys.prefix))
    lab.audit_path.unlink(missing_ok=True)  # the cached lab's audit trail does not grow
    return lab


def _user_certificate(ca: LabCA, public_key: Any, uid: str, now: dt.datetime) -> x509.Certificate:
    """A card certificate for a generated user, as LabCA.issue_user makes them (same
    subject, SAN UPN + e-mail, EKUs, issuer), without writing a file per certificate."""
    issuer = ca.intermediate
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COUNTRY_NAME, "EU"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, ca.org),
            x509.NameAttribute(NameOID.COMMON_NAME, uid),
        ]
    )
    san = [upn_other_name(f"{uid}@{DOMAIN}"), x509.RFC822Name(f"{uid}@{DOMAIN}")]
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH, SMARTCARD_LOGON]),
            critical=False,
        )
        .add_extension(x509.SubjectAlternativeName(san), critical=False)
        .sign(issuer.key, hashes.SHA256())
    )


class Directory:
    """One cached directory size: the Slapd folder, the sampled users' certificates, and
    what building it cost."""

    def __init__(self, root: Path, size: int, lab: Lab, sample: int) -> None:
        self.size = size
        self.folder = root / f"slapd-{size}"
        self.lab = lab
        self.sample = sample
        self.meta_path = self.folder / "bench.json"
        self.sample_pem = self.folder / "sample.pem"
        self.slapd = Slapd(self.folder / "slapd", ca=lab.ca, data=())
        self.meta: dict[str, Any] = {}
        self.certs: list[x509.Certificate] = []

    def ensure(self, log: Log) -> None:
        meta = self._meta()
        if meta is None or meta.get("sample", 0) < self.sample:
            self._build(log)
            meta = self._meta()
            assert meta is not None
            meta["cached"] = False
        else:
            meta["cached"] = True
        self.meta = meta
        pem = self.sample_pem.read_bytes()
        self.certs = x509.load_pem_x509_certificates(pem)[: self.sample]

    def _meta(self) -> dict[str, Any] | None:
        try:
            meta = json.loads(self.meta_path.read_text())
        except (OSError, ValueError):
            return None
        ok = (
            meta.get("version") == VERSION
            and meta.get("size") == self.size
            and meta.get("ca") == self._ca_id()  # slapd's TLS certificate and the users'
        )
        return meta if ok and self.slapd.built and self.sample_pem.exists() else None

    def _ca_id(self) -> str:
        return fingerprint(self.lab.ca.root.cert)

    def _build(self, log: Log) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
        self.folder.mkdir(parents=True)
        log(f"building the {self.size:,}-user directory in {self.folder} ...")
        ca = self.lab.ca
        # One key for every generated user: only the certificates must differ.
        public_key = new_key("p256").public_key()
        now = dt.datetime.now(dt.UTC)
        chosen = set(rng(self.size).sample(range(self.size), self.sample))
        kept: list[x509.Certificate] = []

        def certificate(uid: str) -> bytes:
            cert = _user_certificate(ca, public_key, uid, now)
            if int(uid.removeprefix("user")) in chosen:
                kept.append(cert)
            return cert.public_bytes(serialization.Encoding.DER)

        people = self.folder / "people.ldif"
        t0 = time.perf_counter()
        write_ldif(people, generate_people(self.size, certificate=certificate))
        generate_s = time.perf_counter() - t0
        ldif_bytes = people.stat().st_size
        log(f"  LDIF with {self.size:,} users and certificates: {ldif_bytes / 1e6:.0f} MB "
            f"in {generate_s:.1f} s; loading with slapadd ...")  # fmt: skip
        self.slapd.data = (EXAMPLE_LDIF, people)
        t0 = time.perf_counter()
        self.slapd.build()
        build_s = time.perf_counter() - t0
        people.unlink()  # the database holds it now
        log(f"  slapadd: {self.slapd.load_seconds:.1f} s (whole build {build_s:.1f} s)")
        rng(f"order-{self.size}").shuffle(kept)  # a shorter --sample takes a random subset
        self.sample_pem.write_bytes(
            b"".join(c.public_bytes(serialization.Encoding.PEM) for c in kept)
        )
        meta = {
            "version": VERSION,
            "size": self.size,
            "ca": self._ca_id(),
            "sample": len(kept),
            "entries": self.size + len(_dns_in(EXAMPLE_LDIF)) + _group_entries(self.size),
            "ldif_mb": round(ldif_bytes / 1e6, 1),
            "generate_s": round(generate_s, 2),
            "load_s": round(self.slapd.load_seconds, 2),
            "build_s": round(build_s, 2),
            "db_mb": round(_du(self.slapd.db_dir) / 1e6, 1),
            "built_at": now.isoformat(),
        }
        self.meta_path.write_text(json.dumps(meta, indent=1))

    # --- configurations ---------------------------------------------------------------------

    def config_data(self, rules: Sequence[dict[str, Any]], cache_dir: Path) -> dict[str, Any]:
        """The lab's [directory] for this server (Lab.directory_overrides) with ``rules``."""
        data = tomllib.loads(self.lab.directory_overrides(self.slapd))
        data["certmap"] = {"rules": list(rules)}
        data["directory"]["cache_dir"] = str(cache_dir)
        data.pop("password", None)
        return data


def _dns_in(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines() if line.startswith("dn:")]


def _group_entries(n: int, team_size: int = 100, roles: int = 10) -> int:
    teams = max(1, -(-n // team_size))
    return 2 * teams + min(roles, teams)


def _du(path: Path) -> int:
    """Bytes on disk (the mdb file is sparse: its size is olcDbMaxSize)."""
    return sum(p.stat().st_blocks * 512 for p in path.rglob("*") if p.is_file())


def rule(kind: str) -> dict[str, Any]:
    return {"name": kind, "priority": 10, "map": RULES[kind]}


def uid_of(cert: x509.Certificate) -> str:
    return str(cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


# --- cold: a fresh process per mapping ------------------------------------------------------

_COLD_CHILD = """
import time; t0 = time.perf_counter()
import json, sys
from cryptography import x509
from pam_svmm import config
ta = time.perf_counter()
import ldap3
tb = time.perf_counter()
from pam_svmm.adapters.directory import DirectoryClient
from pam_svmm.adapters.identity_cache import IdentityCache
from pam_svmm.services.identity import DirectoryMapper
t1 = time.perf_counter()
req = json.loads(sys.stdin.read())
cfg = config.parse(req["config"])
cert = x509.load_pem_x509_certificate(req["cert"].encode())
d = cfg.directory
client = DirectoryClient.from_config(d)
mapper = DirectoryMapper(cfg, client, IdentityCache(d.cache_dir, d.cache_max_age))
t2 = time.perf_counter()
m = mapper.map(cert)
t3 = time.perf_counter()
print(json.dumps({"user": m.username, "roles": list(m.identity.roles) if m.identity else [],
                  "imports": t1 - t0, "ldap3": tb - ta, "total": t3 - t0, "map": t3 - t2}))
"""


def cold(directory: Directory, kind: str, runs: int, work: Path, log: Log) -> dict[str, Any]:
    wall, inproc, mapping, imports, ldap3_import = [], [], [], [], []
    pick = rng(f"cold-{kind}")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for i in range(runs):
        cert = pick.choice(directory.certs)
        cache_dir = work / f"cold-{directory.size}-{kind}-{i}"  # empty: a first login
        request = {
            "config": directory.config_data([rule(kind)], cache_dir),
            "cert": cert.public_bytes(serialization.Encoding.PEM).decode(),
        }
        t0 = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-c", _COLD_CHILD],
            input=json.dumps(request),
            capture_output=True,
            text=True,
            env=env,
            cwd=REPO,
            timeout=60,
            check=False,
        )
        elapsed = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"cold {kind} mapping failed: {proc.stderr.strip()[-800:]}")
        out = json.loads(proc.stdout)
        if out["user"] != uid_of(cert):
            raise SystemExit(f"cold {kind}: {uid_of(cert)}'s certificate mapped to {out['user']}")
        wall.append(elapsed)
        inproc.append(out["total"])
        mapping.append(out["map"])
        imports.append(out["imports"])
        ldap3_import.append(out["ldap3"])
    log(f"  cold {kind}: median {statistics.median(wall) * 1000:.0f} ms per process")
    return {
        "process": summary(wall),
        "in_process": summary(inproc),
        "map": summary(mapping),
        "imports": summary(imports),
        "ldap3_import": summary(ldap3_import),
    }


# --- warm: one connected process --------------------------------------------------------------


def warm(directory: Directory, mappings: int, work: Path, log: Log) -> dict[str, Any]:
    """Warm rows; each rule kind maps into its own (initially empty) offline cache, so the
    kinds and the sizes pay the same store() cost (which grows with the cache's files)."""
    base = svmm_config.parse(directory.config_data([rule("upn")], work / "unused"))
    out: dict[str, Any] = {}
    client = DirectoryClient.from_config(base.directory)
    certs = directory.certs
    pick = rng(f"warm-{directory.size}")
    identities: dict[str, Identity] = {}
    with client:
        for kind in RULES:
            cache_dir = work / f"warm-{directory.size}-{kind}"
            cfg = svmm_config.parse(directory.config_data([rule(kind)], cache_dir))
            cache = IdentityCache(cache_dir, cfg.directory.cache_max_age)
            mapper = DirectoryMapper(cfg, client, cache)
            mapper.map(certs[0])  # connects, binds: not timed
            picks = [pick.choice(certs) for _ in range(mappings)]
            samples = []
            for cert in picks:
                elapsed, m = timed(lambda c=cert, mp=mapper: mp.map(c))  # type: ignore[misc]
                if m.username != uid_of(cert) or m.identity is None:
                    raise SystemExit(f"warm {kind}: {uid_of(cert)} mapped to {m.username}")
                identities[m.username] = m.identity
                samples.append(elapsed)
            out[f"map {kind}"] = summary(samples)
            crule = CertmapRule(name=kind, map=RULES[kind])
            filters = [certmap.render_filter(crule, c) for c in picks]
            samples = []
            for f, cert in zip(filters, picks, strict=True):
                elapsed, found = timed(lambda f=f: client.search_users(f))  # type: ignore[misc]
                if len(found) != 1:
                    raise SystemExit(f"search {kind} for {uid_of(cert)}: {found}")
                samples.append(elapsed)
            out[f"search {kind}"] = summary(samples)
            log(f"  warm {kind}: map p50 {out[f'map {kind}']['p50']:.2f} ms, "
                f"search p50 {out[f'search {kind}']['p50']:.2f} ms")  # fmt: skip
        # Role resolution alone: identity(dn) of users whose role comes through a nested group.
        for cert in certs:
            uid = uid_of(cert)
            if uid not in identities:
                identities[uid] = client.identity(directory.slapd.user_dn(uid))
        samples = []
        roles_seen: tuple[str, ...] = ()
        names = sorted(identities)
        for _ in range(mappings):
            name = pick.choice(names)
            dn = identities[name].dn
            elapsed, identity = timed(lambda dn=dn: client.identity(dn))  # type: ignore[misc]
            team = int(name.removeprefix("user")) // 100
            if f"role-{team % 10}" not in identity.roles or f"squad-{team}" not in identity.roles:
                raise SystemExit(f"{name}: nested role missing in {identity.roles}")
            roles_seen = identity.roles
            samples.append(elapsed)
        out["identity (roles)"] = summary(samples)
        log(f"  warm identity(dn): p50 {out['identity (roles)']['p50']:.2f} ms; "
            f"e.g. roles {', '.join(roles_seen)}")  # fmt: skip
    fps = {uid_of(c): fingerprint(c) for c in certs}
    for users in (CACHE_FEW, len(names)):
        folder = work / f"cache-{directory.size}-{users}"
        rows = cache_rows(folder, names[:users], identities, fps, mappings, pick)
        out[f"cache by_fingerprint, {users} users"] = rows["by_fingerprint"]
        out[f"cache store, {users} users"] = rows["store"]
    return out


CACHE_FEW = 10  # users in the small offline cache (a console host)


def cache_rows(
    folder: Path,
    names: Sequence[str],
    identities: dict[str, Identity],
    fps: dict[str, str],
    lookups: int,
    pick: random.Random,
) -> dict[str, dict[str, float]]:
    """IdentityCache.by_fingerprint and .store with ``names`` cached (two files each)."""
    cache = IdentityCache(folder, 3600)
    now = dt.datetime.now(dt.UTC)
    for name in names:
        cache.store(identities[name], fingerprints=[fps[name]], now=now)
    found, stored = [], []
    for _ in range(lookups):
        name = pick.choice(names)
        elapsed, ident = timed(lambda fp=fps[name]: cache.by_fingerprint(fp, now=now))  # type: ignore[misc]
        if ident is None or ident.name != name:
            raise SystemExit(f"offline cache: no entry for {name}")
        found.append(elapsed)
        elapsed, _ = timed(
            lambda n=name: cache.store(identities[n], fingerprints=[fps[n]], now=now)  # type: ignore[misc]
        )
        stored.append(elapsed)
    return {"by_fingerprint": summary(found), "store": summary(stored)}


# --- indexes ------------------------------------------------------------------------------------

# Equality lookups the product's filters make: (name, base: users|groups|roles, template).
PROBES: tuple[tuple[str, str, str], ...] = (
    ("uid", "users", "(uid={uid})"),
    ("mail", "users", "(mail={mail})"),
    ("svmmPrincipalName", "users", "(svmmPrincipalName={mail})"),
    ("userCertificate", "users", "(userCertificate={cert_exact})"),
    ("svmmCertMapping", "users", "(svmmCertMapping={mapping})"),
    ("memberOf", "users", "(memberOf={squad})"),
    ("member", "groups", "(member={dn})"),
    ("uniqueMember", "groups", "(uniqueMember={dn})"),
    ("memberUid", "groups", "(memberUid={uid})"),
    ("gidNumber", "groups", "(&(objectClass=posixGroup)(gidNumber={gid}))"),
    # What DirectoryClient._roles sends for a user's direct groups, then one nesting level.
    ("roles: direct", "groups", "(|(member={dn})(uniqueMember={dn})(memberUid={uid}))"),
    ("roles: nested", "groups", "(|(member={squad})(uniqueMember={squad}))"),
)


def configured_indexes(slapd: Slapd) -> list[str]:
    """olcDbIndex of the mdb database in the slapd's cn=config folder."""
    out = []
    for path in (slapd.config_dir / "cn=config").glob("olcDatabase={*}mdb.ldif"):
        out += [line.split(":", 1)[1].strip() for line in path.read_text().splitlines()
                if line.startswith("olcDbIndex:")]  # fmt: skip
    return out


def _probe_values(slapd: Slapd, cert: x509.Certificate) -> dict[str, str]:
    uid = uid_of(cert)
    n = int(uid.removeprefix("user"))
    base = slapd.base_dn
    exact = certmap.render_filter(CertmapRule(name="x", map="{cert_exact}"), cert)
    issuer = "CN=Demo Org Issuing CA 1,O=Demo Org,C=EU"  # generate_people's default
    return {
        "uid": esc(uid),
        "mail": esc(f"{uid}@{DOMAIN}"),
        "cert_exact": exact,
        "mapping": esc(f"X509:<I>{issuer}<S>CN={uid},O=Demo Org,C=EU"),
        "squad": esc(f"cn=squad-{n // 100},ou=roles,ou=groups,{base}"),
        "dn": esc(slapd.user_dn(uid)),
        "gid": str(100000 + n // 100),
    }


def probes(directory: Directory, lookups: int) -> dict[str, Any]:
    slapd = directory.slapd
    tls = ldap3.Tls(validate=ssl.CERT_REQUIRED, ca_certs_file=str(slapd.ca_file))
    server = ldap3.Server(slapd.uri, tls=tls, get_info=ldap3.NONE)
    conn = ldap3.Connection(server, user=slapd.service_dn, password=slapd.service_password)
    conn.open()
    conn.start_tls()
    if not conn.bind():
        raise SystemExit(f"probe bind failed: {conn.result}")
    bases = {
        "users": f"ou=people,{slapd.base_dn}",
        "groups": f"ou=groups,{slapd.base_dn}",
    }
    pick = rng("probes")
    out: dict[str, Any] = {}
    try:
        for name, where, template in PROBES:
            samples = []
            hits = 0
            for _ in range(lookups):
                f = template.format(**_probe_values(slapd, pick.choice(directory.certs)))
                elapsed, _ = timed(
                    lambda f=f, b=bases[where]: conn.search(  # type: ignore[misc]
                        b, f, attributes=["1.1"], time_limit=30
                    )
                )
                if conn.result["result"] != 0:
                    raise SystemExit(f"probe {name}: {conn.result}")
                hits = len([e for e in conn.response if e.get("type") == "searchResEntry"])
                samples.append(elapsed)
            out[name] = summary(samples) | {"entries": hits}
    finally:
        conn.unbind()
    return out


# --- the whole login ------------------------------------------------------------------------------


def logins(
    lab: Lab, directories: Sequence[Directory], runs: int, pin: str, log: Log
) -> dict[str, Any]:
    services = {"no directory": LOGIN_SERVICE}
    for d in directories:
        services[f"directory {d.size:,}"] = lab.variant(
            f"bench-dir{d.size}", lab.directory_overrides(d.slapd)
        )
    reader = lab.insert(LOGIN_CARD)
    samples: dict[str, list[float]] = {name: [] for name in services}
    try:
        for i in range(runs + 1):  # the first round warms up (page cache, pyc), untimed
            for name, service in services.items():
                elapsed, report = timed(
                    lambda s=service: lab.login(reader, pin=pin, service=s)  # type: ignore[misc]
                )
                if not report.ok:
                    raise SystemExit(f"login ({name}) failed: {report}")
                if i:
                    samples[name].append(elapsed)
        records = [r for r in lab.audit_records() if r.get("event") == "auth"]
        log(f"  {len(records)} auth records in the lab's audit trail")
    finally:
        shutil.rmtree(reader.folder, ignore_errors=True)
    out = {name: summary(s) for name, s in samples.items()}
    base = out["no directory"]["p50"]
    for name in services:
        out[name]["delta_p50"] = out[name]["p50"] - base
    return out


# --- the machine ------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    slapd = subprocess.run([SLAPD, "-VV"], capture_output=True, text=True, check=False)
    text = (slapd.stderr or slapd.stdout).strip()
    slapd_version = text.split("slapd", 1)[1].split("(")[0].strip() if "slapd" in text else "?"
    import cryptography

    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu": cpu,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "ldap3": ldap3.__version__,
        "cryptography": cryptography.__version__,
        "slapd": slapd_version,
        "loadavg_start": os.getloadavg()[0],
    }


# --- the table ------------------------------------------------------------------------------


def _ratio(a: float, b: float) -> str:
    return f"{b / a:.2f}x" if a > 0 else "-"


def table(result: dict[str, Any]) -> str:
    m = result["machine"]
    sizes = [int(s) for s in result["sizes"]]
    lines = [
        f"machine: {m['nproc']} CPUs ({m['cpu']}), Linux {m['kernel']}, load average "
        f"{m['loadavg_start']:.1f} at the start, {m['loadavg_end']:.1f} at the end",
        f"versions: python {m['python']}, ldap3 {m['ldap3']}, cryptography "
        f"{m['cryptography']}, slapd {m['slapd']}",
        f"command: {result['command']}",
        "",
    ]
    hdr = "".join(f"{s:>16,}" for s in sizes)
    lines.append(f"{'directory (users)':34}{hdr}")
    for key, label, fmt in (
        ("entries", "entries", "{:,}"),
        ("ldif_mb", "LDIF size (MB)", "{}"),
        ("generate_s", "LDIF + certificates made (s)", "{}"),
        ("load_s", "slapadd load (s)", "{}"),
        ("db_mb", "mdb size (MB)", "{}"),
        ("cached", "reused from the cache", "{}"),
        ("start_s", "slapd start (s)", "{}"),
    ):
        row = "".join(f"{fmt.format(result['directories'][str(s)][key]):>16}" for s in sizes)
        lines.append(f"  {label:32}{row}")
    lines.append(f"indexes (olcDbIndex): {', '.join(result['indexes'])}")

    def grid(title: str, rows: dict[str, dict[str, dict[str, float]]], cols: Sequence[str]) -> None:
        lines.append("")
        lines.append(title)
        head = "".join(f"{f'{c} {s // 1000}k':>11}" for s in sizes for c in cols)
        ratio_head = f"{'p50 ' + str(sizes[-1] // 1000) + 'k/' + str(sizes[0] // 1000) + 'k':>14}"
        lines.append(f"  {'(ms)':30}{head}" + (ratio_head if len(sizes) > 1 else ""))
        for name, per_size in rows.items():
            cells = "".join(f"{per_size[str(s)][c]:>11.2f}" for s in sizes for c in cols)
            ratio = ""
            if len(sizes) > 1:
                ratio = (
                    f"{_ratio(per_size[str(sizes[0])]['p50'], per_size[str(sizes[-1])]['p50']):>14}"
                )
            lines.append(f"  {name:30}{cells}{ratio}")

    runs = result["params"]["runs"]
    cold_rows = {}
    for kind in RULES:
        for part, label in (("process", "process wall"), ("in_process", "imports..map"),
                            ("map", "first map()")):  # fmt: skip
            cold_rows[f"{kind}: {label}"] = {
                str(s): result["cold"][str(s)][kind][part] for s in sizes
            }
    grid(f"cold: a fresh process maps one certificate (median of {runs})", cold_rows, ["p50"])
    imp = statistics.median(
        result["cold"][str(s)][k]["imports"]["p50"] for s in sizes for k in RULES
    )
    lap = statistics.median(
        result["cold"][str(s)][k]["ldap3_import"]["p50"] for s in sizes for k in RULES
    )
    lines.append(
        f"  (imports..map includes the imports of cryptography, ldap3 and pam_svmm: ~{imp:.0f} ms,"
        f" of which ldap3 ~{lap:.0f} ms;\n   first map() = TCP + StartTLS + bind + search +"
        " identity + offline-cache store)"
    )
    warm_rows = {
        name: {str(s): result["warm"][str(s)][name] for s in sizes}
        for name in result["warm"][str(sizes[0])]
    }
    grid(
        f"warm: one connected process, {result['params']['warm']} lookups each",
        warm_rows,
        ["p50", "p90", "p99"],
    )
    lines.append(
        "  (map = search + identity + offline-cache store; each kind starts with an empty cache;"
        "\n   store and by_fingerprint read every file of the cache: see the rows by users cached)"
    )
    if result.get("probes"):
        probe_rows = {
            f"{name} ({result['probes'][str(sizes[0])][name]['entries']} hit)": {
                str(s): result["probes"][str(s)][name] for s in sizes
            }
            for name in result["probes"][str(sizes[0])]
        }
        grid(
            f"index probes: one equality search, raw ldap3 ({result['params']['probes']} each)",
            probe_rows,
            ["p50", "p99"],
        )
    if result.get("verdict"):
        lines.append("")
        lines.extend(result["verdict"])
    if result.get("login"):
        lines.append("")
        lines.append(
            f"whole login through PAM (pamclient, card {LOGIN_CARD}, OCSP+CRL), "
            f"{result['params']['logins']} each, interleaved (ms)"
        )
        lines.append(f"  {'service':30}{'p50':>10}{'p90':>10}{'min':>10}{'p50 - no dir':>14}")
        for name, s in result["login"].items():
            lines.append(
                f"  {name:30}{s['p50']:>10.1f}{s['p90']:>10.1f}{s['min']:>10.1f}"
                f"{s['delta_p50']:>+14.1f}"
            )
    elif result.get("login_error"):
        lines.append(f"\nwhole login: not measured ({result['login_error']})")
    lines.append("")
    lines.append(f"run took {result['seconds']:.0f} s")
    return "\n".join(lines)


def verdict(result: dict[str, Any], threshold: float) -> list[str]:
    """Lookups whose p50 grows more than ``threshold`` times from the smallest to the
    largest directory, with whether their attribute is indexed."""
    sizes = [str(s) for s in result["sizes"]]
    if len(sizes) < 2:
        return []
    small, big = sizes[0], sizes[-1]
    indexed = {a.lower() for i in result["indexes"] for a in i.split()[0].split(",")}
    missing = [p for p, _, _ in PROBES if ":" not in p and p.lower() not in indexed]
    templates = {name: template for name, _, template in PROBES}
    out = []
    for section in ("warm", "probes"):
        for name, s in result.get(section, {}).get(small, {}).items():
            a, b = s["p50"], result[section][big][name]["p50"]
            if a <= 0 or b / a <= threshold:
                continue
            line = f"  GROWS: {section} {name}: p50 {a:.2f} -> {b:.2f} ms ({b / a:.1f}x)"
            unindexed = [m for m in missing if f"({m}=" in templates.get(name, "")]
            if unindexed:
                line += f"; its filter tests unindexed {', '.join(unindexed)}"
            elif name.startswith("identity"):
                line += "; it sends the 'roles:' filters (see the probes)"
            out.append(line)
    head = [f"index check (growth over {threshold}x from {int(small):,} to {int(big):,} users):"]
    if missing:
        head.append(
            f"  not indexed (olcDbIndex): {', '.join(missing)} -- an OR filter with an "
            "unindexed term makes slapd test every entry in the search scope"
        )
    return head + (out or ["  nothing grows: the lookups are index-bound"])


# --- main -----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument(
        "--sizes", default="10000,100000", help="users per directory (default 10000,100000)"
    )
    p.add_argument("--runs", type=int, default=7, help="cold processes per rule kind (default 7)")
    p.add_argument("--warm", type=int, default=500, help="warm lookups per row (default 500)")
    p.add_argument("--probes", type=int, default=200, help="lookups per index probe (default 200)")
    p.add_argument("--logins", type=int, default=15, help="PAM logins per service (default 15)")
    p.add_argument("--no-login", action="store_true", help="skip the whole-login comparison")
    p.add_argument("--sample", type=int, default=300, help="users with a kept certificate")
    p.add_argument("--grow", type=float, default=2.0, help="ratio reported as growth (default 2)")
    p.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help=f"default {DEFAULT_CACHE}")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")
    return p.parse_args(argv)


def _directories(
    root: Path, lab: Lab, sizes: Sequence[int], sample: int, log: Log
) -> Iterator[Directory]:
    for size in sizes:
        d = Directory(root, size, lab, sample)
        d.ensure(log)
        yield d


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s]
    if any(s < args.sample for s in sizes):
        raise SystemExit(f"every size must be at least --sample ({args.sample})")
    t_start = time.perf_counter()
    root = args.cache_dir / VERSION
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o700)
    log = _log
    lab = open_lab(root, log)
    result: dict[str, Any] = {
        "command": " ".join([Path(sys.executable).as_posix(), *sys.argv]),
        "machine": machine(),
        "sizes": sizes,
        "params": {k: getattr(args, k) for k in ("runs", "warm", "probes", "logins", "sample")},
        "cache_dir": str(root),
        "directories": {},
        "cold": {},
        "warm": {},
        "probes": {},
    }
    directories = list(_directories(root, lab, sizes, args.sample, log))
    with ExitStack() as stack, tempfile.TemporaryDirectory(prefix="svmm-dirbench-") as tmp:
        work = Path(tmp)
        work.chmod(0o700)
        for d in directories:
            stack.callback(d.slapd.stop)
            d.slapd.start()
            log(f"{d.size:,} users: slapd up on {d.slapd.uri} in {d.slapd.start_seconds:.2f} s")
            result["directories"][str(d.size)] = d.meta | {
                "start_s": round(d.slapd.start_seconds, 2)
            }
        result["indexes"] = configured_indexes(directories[0].slapd)
        for d in directories:
            log(f"{d.size:,} users:")
            result["cold"][str(d.size)] = {k: cold(d, k, args.runs, work, log) for k in RULES}
            result["warm"][str(d.size)] = warm(d, args.warm, work, log)
            result["probes"][str(d.size)] = probes(d, args.probes)
        if not args.no_login:
            log(f"whole logins ({args.logins} per service) ...")
            pin = next(c.pin for c in BENCH_CARDS if c.name == LOGIN_CARD)
            try:
                with lab.responders():
                    result["login"] = logins(lab, directories, args.logins, pin, log)
            except OSError as e:
                # The responders bind the ports the cached CA's certificates name.
                result["login_error"] = (
                    f"lab responders: {e}; remove {lab.folder} to make a lab on free ports"
                )
    result["machine"]["loadavg_end"] = os.getloadavg()[0]  # other work skews the figures
    result["verdict"] = verdict(result, args.grow)
    result["seconds"] = time.perf_counter() - t_start
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
