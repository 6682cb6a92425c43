"""A private OpenLDAP server for the lab, the tests and the benchmarks.

``Slapd`` builds its own cn=config folder (never the system's /etc/ldap/slapd.d), loads the
product schema and data with slapadd, and runs ``slapd -d none`` (foreground; critical
messages go to slapd.log) in its own process group on loopback: StartTLS on ``uri``, TLS on
``ldaps_uri``, with a server certificate for 127.0.0.1/localhost (DNS and IP SANs) issued by
the lab CA. Layout of its folder:

    slapd.d/        cn=config (made by slapadd -n0 from config.ldif)
    db/             the mdb database for the base DN
    tls/            server.pem (leaf + intermediate), server.key, ca.pem (the CA's root)
    admin.secret    the rootdn password (0600, random per folder)
    slapd.log       what slapd prints (startup errors)
    .built          present once the folder is complete: later starts reuse it (~0.05 s)

ACLs: the service account (cn=svmm,ou=services) and the publisher read everything but
userPassword; the publisher may write userCertificate under ou=people; users bind and read
their own entry; anonymous may only bind. The admin (rootdn) is not subject to ACLs.

Data is loaded with ``slapadd -q`` before the first start (fast: no overlays run). The
memberof overlay only runs on LDAP adds, so the loader computes memberOf itself, as the
overlay would: each groupOfNames' member entries get memberOf = that group (direct
membership only; a nested group's entry gets memberOf = its parent group). Entries added
later with ``add_ldif`` go through the overlay.

Replication (``syncprov=True``, ``consumer_of=provider``): the provider runs OpenLDAP's
syncprov overlay; a consumer starts with an empty database and an olcSyncrepl
refreshAndPersist to the provider over StartTLS on 127.0.0.1 (CA checked), bound as the
provider's rootdn (a lab: its password is in the consumer's own 0700 cn=config), taking every
attribute but memberOf (``*,+``; the provider's memberof overlay marks its writes
not-to-replicate, so the consumer runs the overlay too and computes memberOf itself) and
retrying every second while the provider is away. A consumer is read-only (olcUpdateRef
names the provider); ``start`` returns once it holds the provider's contextCSN.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import hashlib
import ipaddress
import os
import re
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from .pki import LabCA, key_pem, new_key

REPO = Path(__file__).resolve().parents[1]
EXAMPLE_LDIF = REPO / "config" / "ldap" / "example-org.ldif"
SCHEMA_LDIF = REPO / "config" / "ldap" / "svmm-schema.ldif"
SYSTEM_SCHEMAS = tuple(
    Path("/etc/ldap/schema") / f"{n}.ldif" for n in ("core", "cosine", "nis", "inetorgperson")
)
SLAPD = "/usr/sbin/slapd"
SLAPADD = "/usr/sbin/slapadd"
LDAPMODIFY = "ldapmodify"
MODULE_DIR = "/usr/lib/ldap"

# The example organisation's demo passwords (config/ldap/example-org.ldif stores hashes).
SERVICE_PASSWORD = "svmm-service-demo"
PUBLISHER_PASSWORD = "svmm-publisher-demo"
USER_PASSWORD = "demo-password"

DEFAULT_BASE_DN = "dc=demo,dc=example"
START_TIMEOUT = 15.0

_running: set[Slapd] = set()  # stopped at interpreter exit if still up


def ssha(password: str) -> str:
    """An RFC 2307 {SSHA} hash, the format slapd verifies simple binds against."""
    salt = secrets.token_bytes(8)
    # SHA-1 is what the {SSHA} scheme is; lab passwords only.
    digest = hashlib.sha1(password.encode() + salt, usedforsecurity=False).digest()
    return "{SSHA}" + base64.b64encode(digest + salt).decode()


class SlapdError(RuntimeError):
    """The lab's slapd could not be built, started or fed (a lab failure, not a product one)."""


class Slapd:
    """A private slapd on loopback with its own cn=config folder; a context manager."""

    def __init__(
        self,
        folder: Path,
        *,
        ca: LabCA,
        base_dn: str = DEFAULT_BASE_DN,
        port: int | None = None,
        ldaps_port: int | None = None,
        data: Iterable[Path] = (EXAMPLE_LDIF,),
        syncprov: bool = False,
        consumer_of: Slapd | None = None,
    ) -> None:
        self.folder = folder.resolve()
        self.ca = ca
        self.syncprov = syncprov
        self.provider = consumer_of
        if consumer_of is not None:
            if not consumer_of.syncprov:
                raise SlapdError("a consumer needs a provider started with syncprov=True")
            base_dn, data = consumer_of.base_dn, ()  # everything comes from the provider
        self.base_dn: str = base_dn
        self._auto_ports = port is None or ldaps_port is None
        if port is None or ldaps_port is None:
            from .lab import free_ports

            port, ldaps_port = free_ports(2)
        self.port = port
        self.ldaps_port = ldaps_port
        self.data = tuple(data)
        self.config_dir = self.folder / "slapd.d"
        self.db_dir = self.folder / "db"
        self.tls_dir = self.folder / "tls"
        self.log_path = self.folder / "slapd.log"
        self._admin_secret = self.folder / "admin.secret"
        self._proc: subprocess.Popen[bytes] | None = None
        self._paused = False
        self.start_seconds = 0.0  # how long the last start() took (build included)
        self.load_seconds = 0.0  # how long slapadd took to load the data

    # --- names ----------------------------------------------------------------------------

    @property
    def uri(self) -> str:
        return f"ldap://127.0.0.1:{self.port}"

    @property
    def ldaps_uri(self) -> str:
        return f"ldaps://127.0.0.1:{self.ldaps_port}"

    @property
    def ca_file(self) -> Path:
        """The trust anchor clients need (the lab CA's root; slapd sends the intermediate)."""
        return self.tls_dir / "ca.pem"

    @property
    def admin_dn(self) -> str:
        return f"cn=admin,{self.base_dn}"

    @property
    def admin_password(self) -> str:
        return self._admin_secret.read_text()

    @property
    def service_dn(self) -> str:
        return f"cn=svmm,ou=services,{self.base_dn}"

    @property
    def service_password(self) -> str:
        return SERVICE_PASSWORD

    @property
    def publisher_dn(self) -> str:
        return f"cn=svmm-publisher,ou=services,{self.base_dn}"

    @property
    def publisher_password(self) -> str:
        return PUBLISHER_PASSWORD

    def user_dn(self, uid: str) -> str:
        return f"uid={uid},ou=people,{self.base_dn}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # --- lifecycle ------------------------------------------------------------------------

    def __enter__(self) -> Slapd:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def built(self) -> bool:
        return (self.folder / ".built").exists()

    def build(self) -> None:
        """Make the config folder, the TLS files and the loaded database, once per folder
        (a half-built folder, from a failed build, is built again from scratch)."""
        if self.built:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        self.folder.chmod(0o700)
        for d in (self.config_dir, self.db_dir, self.tls_dir):
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir()
        self._write_secret(self._admin_secret, secrets.token_urlsafe(18))
        self._make_tls()
        config_ldif = self.folder / "config.ldif"
        config_ldif.write_text(self._config_ldif())
        config_ldif.chmod(0o600)
        self._run([SLAPADD, "-n0", "-F", str(self.config_dir), "-l", str(config_ldif)])
        if not self.data:
            (self.folder / ".built").touch()
            return
        t0 = time.monotonic()
        data_ldif = self.folder / "data.ldif"
        try:
            with data_ldif.open("w") as out:
                for record in with_memberof(self.data):
                    out.write(record)
            self._run(
                [
                    SLAPADD,
                    "-q",
                    "-b",
                    self.base_dn,
                    "-F",
                    str(self.config_dir),
                    "-l",
                    str(data_ldif),
                ]
            )
        finally:
            data_ldif.unlink(missing_ok=True)
        self.load_seconds = time.monotonic() - t0
        (self.folder / ".built").touch()

    def start(self) -> None:
        """Build if needed, start slapd and wait until it answers a search."""
        if self.running:
            return
        t0 = time.monotonic()
        self.build()
        for attempt in range(3):
            try:
                self._spawn()
                break
            except SlapdError:
                # A free port taken by someone else between choosing and binding: retry.
                if not self._auto_ports or attempt == 2:
                    raise
                from .lab import free_ports

                self.port, self.ldaps_port = free_ports(2)
        _running.add(self)
        if self.provider is not None and self.provider.running and not self.provider._paused:
            self.wait_in_sync()
        self.start_seconds = time.monotonic() - t0

    def stop(self) -> None:
        """Stop slapd (SIGTERM, then SIGKILL) and reap it; nothing of it stays running."""
        proc, self._proc = self._proc, None
        _running.discard(self)
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGCONT)  # a paused slapd cannot handle SIGTERM
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        self._paused = False

    def kill(self) -> None:
        """SIGKILL: the server dies at once, as in a crash (no clean shutdown), and is reaped;
        its folder stays, so ``start`` brings it back with its data."""
        if self._proc is None:
            raise SlapdError("slapd is not running")
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._proc.pid, signal.SIGKILL)
        self._proc.wait(timeout=10)
        self._proc = None
        self._paused = False
        _running.discard(self)

    def pause(self) -> None:
        """SIGSTOP: the server keeps its sockets but answers nothing (a hung directory)."""
        if not self.running:
            raise SlapdError("slapd is not running")
        assert self._proc is not None
        os.killpg(self._proc.pid, signal.SIGSTOP)
        self._paused = True
        # The signal is asynchronous: a thread running on the other core could still answer
        # a request sent right now. Wait until every thread is stopped.
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline and not _all_threads_stopped(self._proc.pid):
            time.sleep(0.005)

    def resume(self) -> None:
        if self._proc is not None and self._paused:
            os.killpg(self._proc.pid, signal.SIGCONT)
            self._paused = False

    # --- feeding it -----------------------------------------------------------------------

    def add_ldif(self, text: str) -> None:
        """Apply LDIF as the admin over StartTLS: plain records are added, records with a
        changetype (modify, delete, ...) are applied. The password goes through a file."""
        if not self.running:
            raise SlapdError("slapd is not running")
        env = {k: v for k, v in os.environ.items() if not k.startswith("LDAP")}
        env |= {
            "HOME": str(self.folder),  # no ~/.ldaprc of the caller
            "LDAPTLS_CACERT": str(self.ca_file),
            "LDAPTLS_REQCERT": "demand",
        }
        argv = [
            LDAPMODIFY, "-a", "-x", "-ZZ", "-H", self.uri,
            "-D", self.admin_dn, "-y", str(self._admin_secret),
        ]  # fmt: skip
        result = subprocess.run(
            argv,
            input=text.encode(),
            capture_output=True,
            env=env,
            cwd=self.folder,
            timeout=60,
            check=False,
        )
        if result.returncode != 0:
            raise SlapdError(
                f"ldapmodify failed ({result.returncode}): {result.stderr.decode(errors='replace')}"
            )

    def read_entry(
        self, dn: str, attributes: Iterable[str] = ("*", "+")
    ) -> dict[str, list[bytes]] | None:
        """The entry at ``dn`` as the admin sees it (lower-case names, raw values); None when
        it does not exist. For polling a consumer; bounded by a 2 s timeout."""
        import ssl

        import ldap3

        tls = ldap3.Tls(ca_certs_file=str(self.ca_file), validate=ssl.CERT_REQUIRED)
        server = ldap3.Server(self.uri, get_info=ldap3.NONE, connect_timeout=2, tls=tls)
        with ldap3.Connection(
            server, self.admin_dn, self.admin_password, receive_timeout=2, raise_exceptions=False
        ) as conn:
            if not conn.start_tls(read_server_info=False) or not conn.bind():
                raise SlapdError(f"cannot bind as the admin: {conn.result.get('description')}")
            conn.search(dn, "(objectClass=*)", ldap3.BASE, attributes=list(attributes))
            for item in conn.response or ():
                if item.get("type") == "searchResEntry":
                    return {k.lower(): list(v) for k, v in item["raw_attributes"].items()}
        return None

    def context_csn(self) -> frozenset[bytes]:
        """The suffix entry's contextCSN values: equal on provider and consumer once the
        consumer has everything the provider has."""
        entry = self.read_entry(self.base_dn, ["contextCSN"])
        return frozenset(entry.get("contextcsn", [])) if entry else frozenset()

    def wait_until(
        self, check: Callable[[Slapd], bool], *, timeout: float = 15.0, what: str = "condition"
    ) -> float:
        """Poll ``check(self)`` until it holds; the seconds it took (SlapdError after
        ``timeout``)."""
        t0 = time.monotonic()
        while not check(self):
            if time.monotonic() - t0 > timeout:
                raise SlapdError(f"{what} not reached within {timeout}s: {self._log_tail()}")
            time.sleep(0.05)
        return time.monotonic() - t0

    def wait_in_sync(self, timeout: float = 15.0) -> float:
        """A consumer: wait until it holds the provider's contextCSN (everything written to
        the provider so far); the seconds it took."""
        provider = self.provider
        if provider is None:
            raise SlapdError("not a consumer")
        target = provider.context_csn()
        if not target:
            raise SlapdError("the provider has no contextCSN (is syncprov running?)")
        return self.wait_until(
            lambda s: target <= s.context_csn(), timeout=timeout, what="replication"
        )

    def write_password_file(self, path: Path, which: str = "service") -> Path:
        """A 0600 file holding the password of ``which`` (service, publisher, admin), with
        no trailing newline (ldap tools' -y and the product read the whole file)."""
        passwords = {
            "service": self.service_password,
            "publisher": self.publisher_password,
            "admin": self.admin_password,
        }
        if which not in passwords:
            raise ValueError(f"unknown account {which!r} (service, publisher, admin)")
        self._write_secret(path, passwords[which])
        return path

    # --- internals ------------------------------------------------------------------------

    @staticmethod
    def _write_secret(path: Path, value: str) -> None:
        path.unlink(missing_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(value)

    def _make_tls(self) -> None:
        key = new_key("p256")
        cert = self.ca.issue_host(
            "localhost",
            key.public_key(),
            sans=[
                x509.DNSName("localhost"),
                x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            ],
        )
        pem = serialization.Encoding.PEM
        # The leaf and the intermediate: clients trust only the root.
        (self.tls_dir / "server.pem").write_bytes(
            cert.public_bytes(pem) + self.ca.intermediate.cert.public_bytes(pem)
        )
        self._write_secret(self.tls_dir / "server.key", key_pem(key).decode())
        (self.tls_dir / "ca.pem").write_bytes(self.ca.root.cert.public_bytes(pem))

    def _config_ldif(self) -> str:
        b = self.base_dn
        service, publisher = self.service_dn, self.publisher_dn
        schemas = [p.read_text() for p in (*SYSTEM_SCHEMAS, SCHEMA_LDIF)]
        tls = self.tls_dir
        indexes = (
            "objectClass eq",
            "uid eq",
            "cn eq",
            "mail eq",
            "member eq",
            "uniqueMember eq",
            "memberUid eq",
            "memberOf eq",
            "uidNumber eq",
            "gidNumber eq",
            "svmmPrincipalName eq",
            "svmmCertMapping eq",
            "userCertificate eq",
            *(("entryCSN eq", "entryUUID eq") if self.syncprov or self.provider else ()),
        )
        access = (
            # self: change it, never read the hash back
            "to attrs=userPassword by self =xw by anonymous auth by * none",
            f'to dn.subtree="ou=people,{b}" attrs=userCertificate'
            f' by dn.exact="{publisher}" write by dn.exact="{service}" read'
            " by self read by * none",
            f'to dn.subtree="{b}" by dn.exact="{service}" read by dn.exact="{publisher}" read'
            " by self read by * none",
        )
        lines = [
            "dn: cn=config",
            "objectClass: olcGlobal",
            "cn: config",
            f"olcPidFile: {self.folder / 'slapd.pid'}",
            f"olcArgsFile: {self.folder / 'slapd.args'}",
            "olcLogLevel: none",
            f"olcTLSCACertificateFile: {tls / 'ca.pem'}",
            f"olcTLSCertificateFile: {tls / 'server.pem'}",
            f"olcTLSCertificateKeyFile: {tls / 'server.key'}",
            "olcTLSVerifyClient: never",
            "",
            "dn: cn=module{0},cn=config",
            "objectClass: olcModuleList",
            "cn: module{0}",
            f"olcModulePath: {MODULE_DIR}",
            "olcModuleLoad: back_mdb",
            "olcModuleLoad: memberof",
            "olcModuleLoad: ppolicy",
            *(["olcModuleLoad: syncprov"] if self.syncprov else []),
            "",
            "dn: cn=schema,cn=config",
            "objectClass: olcSchemaConfig",
            "cn: schema",
            "",
            *[_strip_comments(s) for s in schemas],
            "dn: olcDatabase={-1}frontend,cn=config",
            "objectClass: olcDatabaseConfig",
            "objectClass: olcFrontendConfig",
            "olcDatabase: {-1}frontend",
            'olcAccess: {0}to dn.base="" by * read',
            'olcAccess: {1}to dn.base="cn=Subschema" by * read',
            # Like a real directory: plain searches are capped, paged ones are not.
            "olcSizeLimit: size.soft=1000 size.hard=unlimited size.pr=unlimited"
            " size.prtotal=unlimited",
            "",
            "dn: olcDatabase={0}config,cn=config",
            "objectClass: olcDatabaseConfig",
            "olcDatabase: {0}config",
            "olcAccess: {0}to * by * none",
            "",
            "dn: olcDatabase={1}mdb,cn=config",
            "objectClass: olcDatabaseConfig",
            "objectClass: olcMdbConfig",
            "olcDatabase: {1}mdb",
            f"olcDbDirectory: {self.db_dir}",
            f"olcSuffix: {b}",
            f"olcRootDN: {self.admin_dn}",
            f"olcRootPW: {ssha(self._admin_secret.read_text())}",
            "olcDbMaxSize: 8589934592",
            "olcDbNoSync: TRUE",  # a lab: speed over durability
            *[f"olcDbIndex: {i}" for i in indexes],
            *[f"olcAccess: {{{n}}}{a}" for n, a in enumerate(access)],
            *self._consumer_lines(),
            "",
            *self._overlay_ldif(),
        ]
        return "\n".join(lines)

    def _consumer_lines(self) -> list[str]:
        """olcSyncrepl and olcUpdateRef of a consumer's database (none for others)."""
        p = self.provider
        if p is None:
            return []
        tls = self.tls_dir
        syncrepl = (
            f'rid=001 provider={p.uri} bindmethod=simple binddn="{p.admin_dn}"'
            f' credentials="{p.admin_password}" searchbase="{p.base_dn}"'
            ' type=refreshAndPersist retry="1 +" timeout=3 network-timeout=2'
            f' keepalive=5:2:1 attrs="*,+" exattrs="memberOf" starttls=critical tls_reqcert=demand'
            f" tls_cacert={tls / 'ca.pem'}"
        )
        return [f"olcSyncrepl: {{0}}{syncrepl}", f"olcUpdateRef: {p.uri}"]

    def _overlay_ldif(self) -> list[str]:
        db = "olcDatabase={1}mdb,cn=config"
        # (name, objectClass, settings). The consumer runs memberof too: the provider's
        # overlay writes memberOf with o_dont_replicate, so syncrepl never carries it.
        overlays: list[tuple[str, str, list[str]]] = [(
            "memberof", "olcMemberOf",
            ["olcMemberOfRefInt: TRUE", "olcMemberOfGroupOC: groupOfNames",
             "olcMemberOfMemberAD: member", "olcMemberOfMemberOfAD: memberOf"],
        )]  # fmt: skip
        overlays.append(
            (
                "ppolicy",
                "olcPPolicyConfig",
                [f"olcPPolicyDefault: cn=default,ou=policies,{self.base_dn}"],
            )
        )
        if self.syncprov:
            overlays.append(
                (
                    "syncprov",
                    "olcSyncProvConfig",
                    ["olcSpCheckpoint: 100 1", "olcSpSessionLog: 1000"],
                )
            )
        out: list[str] = []
        for n, (name, object_class, settings) in enumerate(overlays):
            out += [
                f"dn: olcOverlay={{{n}}}{name},{db}",
                "objectClass: olcOverlayConfig",
                f"objectClass: {object_class}",
                f"olcOverlay: {{{n}}}{name}",
                *settings,
                "",
            ]
        return out

    def _spawn(self) -> None:
        urls = f"ldap://127.0.0.1:{self.port}/ ldaps://127.0.0.1:{self.ldaps_port}/"
        with self.log_path.open("ab") as log:
            proc = subprocess.Popen(
                [SLAPD, "-F", str(self.config_dir), "-h", urls, "-d", "none"],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: stop() kills the group
            )
        self._proc = proc
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if proc.poll() is not None:
                self._proc = None
                raise SlapdError(f"slapd exited ({proc.returncode}): {self._log_tail()}")
            if self._answers():
                return
            if time.monotonic() > deadline:
                self.stop()
                raise SlapdError(
                    f"slapd did not answer within {START_TIMEOUT}s: {self._log_tail()}"
                )
            time.sleep(0.01)

    def _answers(self) -> bool:
        """A real search (the root DSE names our base DN), not just an open port."""
        import ldap3
        from ldap3.core.exceptions import LDAPException

        server = ldap3.Server(self.uri, get_info=ldap3.NONE, connect_timeout=0.5)
        try:
            with ldap3.Connection(server, receive_timeout=1, auto_bind=False) as conn:
                conn.search("", "(objectClass=*)", ldap3.BASE, attributes=["namingContexts"])
                contexts = [str(v).lower() for e in conn.entries for v in e.namingContexts]
                return self.base_dn.lower() in contexts
        except (LDAPException, OSError):
            return False

    def _run(self, argv: list[str]) -> None:
        result = subprocess.run(argv, capture_output=True, timeout=3600, check=False)
        if result.returncode != 0:
            raise SlapdError(
                f"{Path(argv[0]).name} failed ({result.returncode}): "
                f"{result.stderr.decode(errors='replace')[-2000:]}"
            )

    def _log_tail(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-2000:]
        except OSError:
            return ""


def _all_threads_stopped(pid: int) -> bool:
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return True
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, IndexError):
            continue
        if state not in ("T", "t"):
            return False
    return True


@atexit.register
def _stop_all() -> None:
    for server in list(_running):
        with contextlib.suppress(Exception):
            server.stop()


# --- LDIF for slapadd ------------------------------------------------------------------------


def _strip_comments(text: str) -> str:
    kept = [line for line in text.splitlines() if not line.startswith("#")]
    return "\n".join(kept).strip() + "\n\n"


def _records(path: Path) -> list[str]:
    """The records of an LDIF file, unfolded, comments and version line dropped (the lab's
    own files: no folded comment lines)."""
    lines = [line for line in path.read_text().split("\n") if not line.startswith("#")]
    text = "\n".join(lines).replace("\n ", "")
    records = [r.strip("\n") for r in _BLANK_LINE.split(text)]
    return [r for r in records if r and not r.startswith("version:")]


_BLANK_LINE = re.compile(r"\n[ \t]*\n")


def _value(line: str) -> tuple[str, str]:
    name, _, rest = line.partition(":")
    if rest.startswith(":"):
        return name.lower(), base64.b64decode(rest[1:].strip()).decode()
    return name.lower(), rest.strip()


def _norm_dn(dn: str) -> str:
    # Enough for the lab's own LDIF (no escaped commas in DNs).
    return ",".join(part.strip() for part in dn.lower().split(","))


def with_memberof(paths: Iterable[Path]) -> Iterator[str]:
    """The records of ``paths`` as LDIF text, with the memberOf values the memberof overlay
    would have written (slapadd runs no overlays)."""
    files = [_records(path) for path in paths]
    member_of: dict[str, list[str]] = {}
    for records in files:
        for record in records:
            if "groupofnames" not in record.lower():  # cheap pre-filter
                continue
            values = [_value(line) for line in record.split("\n")]
            if ("objectclass", "groupofnames") not in {(n, v.lower()) for n, v in values}:
                continue
            group = values[0][1]
            for name, value in values:
                if name == "member":
                    member_of.setdefault(_norm_dn(value), []).append(group)
    for records in files:
        for record in records:
            groups = member_of.get(_norm_dn(_value(record.split("\n", 1)[0])[1]))
            if groups:
                record += "".join(f"\nmemberOf: {g}" for g in groups)
            yield record + "\n\n"


# --- bulk data for the benchmarks ------------------------------------------------------------


def generate_people(
    n: int,
    base_dn: str = DEFAULT_BASE_DN,
    *,
    team_size: int = 100,
    roles: int = 10,
    first_uid: int = 100000,
    with_base: bool = False,
    issuer: str = "CN=Demo Org Issuing CA 1,O=Demo Org,C=EU",
    org: str = "Demo Org",
    certificate: Callable[[str], bytes] | None = None,
) -> Iterator[str]:
    """LDIF records for ``n`` users ``userNNNNNN`` (uidNumber from ``first_uid``) in teams:

    - posixGroup cn=team-K,ou=groups (memberUid; the team's gidNumber is the primary group),
    - groupOfNames cn=squad-K,ou=roles,ou=groups (member: the team's users),
    - groupOfNames cn=role-J,ou=roles,ou=groups (member: squads K with K % roles == J):
      every user holds role-J through one level of nesting.

    Users carry mail and svmmPrincipalName ``userNNNNNN@demo.example`` and svmmCertMapping
    for a certificate ``CN=userNNNNNN,O=<org>,C=EU`` from ``issuer``; ``certificate(uid)``
    may return a DER certificate for userCertificate;binary. ``with_base``: also the base
    and OU entries (for a database without the example organisation).
    """
    people, groups = f"ou=people,{base_dn}", f"ou=groups,{base_dn}"
    role_base = f"ou=roles,{groups}"
    if with_base:
        dc = base_dn.split(",")[0].split("=", 1)[1]
        yield (
            f"dn: {base_dn}\nobjectClass: dcObject\nobjectClass: organization\n"
            f"dc: {dc}\no: {org}\n\n"
        )
        for ou in ("people", "groups", "services", "policies"):
            yield f"dn: ou={ou},{base_dn}\nobjectClass: organizationalUnit\nou: {ou}\n\n"
        yield f"dn: {role_base}\nobjectClass: organizationalUnit\nou: roles\n\n"
    teams = max(1, -(-n // team_size))
    for i in range(n):
        uid = f"user{i:06d}"
        team = i // team_size
        record = (
            f"dn: uid={uid},{people}\n"
            "objectClass: inetOrgPerson\nobjectClass: posixAccount\n"
            "objectClass: shadowAccount\nobjectClass: svmmUser\n"
            f"uid: {uid}\ncn: {uid}\nsn: {uid}\n"
            f"uidNumber: {first_uid + i}\ngidNumber: {first_uid + team}\n"
            f"homeDirectory: /home/{uid}\nloginShell: /bin/bash\n"
            f"mail: {uid}@demo.example\nsvmmPrincipalName: {uid}@demo.example\n"
            f"svmmCertMapping: X509:<I>{issuer}<S>CN={uid},O={org},C=EU\n"
        )
        if certificate is not None:
            record += f"userCertificate;binary:: {base64.b64encode(certificate(uid)).decode()}\n"
        yield record + "\n"
    for team in range(teams):
        members = range(team * team_size, min(n, (team + 1) * team_size))
        yield (
            f"dn: cn=team-{team},{groups}\nobjectClass: posixGroup\ncn: team-{team}\n"
            f"gidNumber: {first_uid + team}\n"
            + "".join(f"memberUid: user{i:06d}\n" for i in members)
            + "\n"
        )
        yield (
            f"dn: cn=squad-{team},{role_base}\nobjectClass: groupOfNames\ncn: squad-{team}\n"
            + "".join(f"member: uid=user{i:06d},{people}\n" for i in members)
            + "\n"
        )
    for role in range(min(roles, teams)):
        yield (
            f"dn: cn=role-{role},{role_base}\nobjectClass: groupOfNames\n"
            f"objectClass: svmmRoleGroup\ncn: role-{role}\nsvmmVmGrant: vm-{role}:console\n"
            + "".join(f"member: cn=squad-{t},{role_base}\n" for t in range(role, teams, roles))
            + "\n"
        )


def write_ldif(path: Path, records: Iterable[str]) -> Path:
    with path.open("w") as out:
        for record in records:
            out.write(record)
    return path
