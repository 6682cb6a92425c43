"""What the login-latency benchmark logs in against: the lab PKI, a SoftHSM2 token, the
pam_pkcs11 configuration and an OCSP responder. Nothing here is timed.

The lab (CA, user certificate and key, a CRL padded with many revoked serials) is slow to
build (the padded CRL takes cryptography tens of seconds), so it is cached under a folder
keyed by LAB_VERSION and the padding size; bump LAB_VERSION when the layout changes.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from svmm_lab.pki import LabCA, key_pem, load_key, new_key

LAB_VERSION = "lab-v2"  # v2: the user certificate carries alice's UPN and e-mail
SOFTHSM_MODULE = "/usr/lib/softhsm/libsofthsm2.so"
USER = "alice"
# What the directory rows map by (svmmPrincipalName / mail of alice in example-org.ldif).
USER_UPN = "alice@demo.example"
TOKEN_LABEL = "bench"
CERT_ID = b"\x01"
# A CRL this close to its nextUpdate is rebuilt, so a cached lab never goes stale mid-run.
CRL_LIFETIME = dt.timedelta(days=30)
CRL_MIN_REMAINING = dt.timedelta(days=1)
# Where the lab's certificates say their responder is; the bench passes the real URL.
LAB_OCSP_URL = "http://127.0.0.1:8888/"

Log = Callable[[str], None]


class FixtureError(Exception):
    """A fixture could not be made; the message says which and why."""


@dataclass(frozen=True)
class Lab:
    folder: Path  # the LabCA folder (root/intermediate/ocsp pairs, CRLs, index.txt)
    user_cert: Path  # PEM
    user_key: Path  # PEM, PKCS#8
    extra_revoked: int
    build_seconds: float  # time cryptography took to make the padded CRL (when it was built)
    cached: bool

    @property
    def root_pem(self) -> Path:
        return self.folder / "root.pem"

    @property
    def intermediate_pem(self) -> Path:
        return self.folder / "intermediate.pem"

    @property
    def crl_der(self) -> Path:
        """The intermediate's CRL, padded with ``extra_revoked`` serials."""
        return self.folder / "intermediate.crl"

    @property
    def root_crl_der(self) -> Path:
        return self.folder / "root.crl"


def _lab_is_fresh(folder: Path, extra_revoked: int) -> dict[str, object] | None:
    try:
        meta = json.loads((folder / "lab.json").read_text())
    except (OSError, ValueError):
        return None
    if meta.get("version") != LAB_VERSION or meta.get("extra_revoked") != extra_revoked:
        return None
    next_update = dt.datetime.fromisoformat(str(meta["crl_next_update"]))
    if next_update - dt.datetime.now(dt.UTC) < CRL_MIN_REMAINING:
        return None
    return meta


def lab(cache_root: Path, extra_revoked: int, log: Log) -> Lab:
    """The cached lab, built first if missing or close to its CRL's nextUpdate."""
    folder = cache_root / f"{LAB_VERSION}-crl{extra_revoked}"
    meta = _lab_is_fresh(folder, extra_revoked)
    cached = meta is not None
    if meta is None:
        log(f"building the lab PKI in {folder} ({extra_revoked} extra revoked serials)...")
        meta = _build_lab(folder, extra_revoked)
        log(
            f"  CRL with {extra_revoked} entries built by cryptography in "
            f"{meta['build_seconds']:.1f} s"
        )
    return Lab(
        folder=folder / "ca",
        user_cert=folder / "user.pem",
        user_key=folder / "user.key",
        extra_revoked=extra_revoked,
        build_seconds=float(meta["build_seconds"]),  # type: ignore[arg-type]
        cached=cached,
    )


def _build_lab(folder: Path, extra_revoked: int) -> dict[str, object]:
    # Built beside the final folder and swapped in, so an interrupted build is never used.
    tmp = folder.with_name(folder.name + ".building")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    ca = LabCA.create(tmp / "ca", crl_base="http://127.0.0.1:8889/crl", ocsp_url=LAB_OCSP_URL)
    key = new_key("rsa")  # RSA: what pam_pkcs11's signature check handles everywhere
    cert = ca.issue_user(USER, key.public_key(), upn=USER_UPN, email=USER_UPN)
    (tmp / "user.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp / "user.key").write_bytes(key_pem(key))
    (tmp / "user.key").chmod(0o600)
    now = dt.datetime.now(dt.UTC)
    t0 = time.perf_counter()
    ca.publish(now=now, next_update=CRL_LIFETIME, extra_revoked=extra_revoked)
    build_seconds = time.perf_counter() - t0
    meta: dict[str, object] = {
        "version": LAB_VERSION,
        "extra_revoked": extra_revoked,
        "build_seconds": build_seconds,
        "built_at": now.isoformat(),
        "crl_next_update": (now + CRL_LIFETIME).isoformat(),
    }
    (tmp / "lab.json").write_text(json.dumps(meta, indent=1))
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return meta


# --- the token --------------------------------------------------------------------------


@dataclass(frozen=True)
class Token:
    conf: Path  # the SOFTHSM2_CONF every login must see
    label: str
    module: str = SOFTHSM_MODULE
    provisioned_by: str = ""


def provision_token(workdir: Path, lab: Lab, pin: str, so_pin: str) -> Token:
    """A fresh SoftHSM2 token in ``workdir`` holding the lab user's certificate and key.

    Done in a child process (so the bench never loads the PKCS#11 module itself) with
    pam_svmm.adapters.token.provision_card when it imports, else with PyKCS11 directly.
    Not with softhsm2-util / pkcs11-tool: they take PINs only on argv or a terminal, and
    PINs stay out of argv. The PINs travel on the child's stdin.
    """
    tokens = workdir / "tokens"
    tokens.mkdir(parents=True, exist_ok=True)
    conf = workdir / "softhsm2.conf"
    conf.write_text(
        f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\n"
        "slots.removable = false\n"
    )
    env = {**os.environ, "SOFTHSM2_CONF": str(conf)}
    request = {
        "pin": pin,
        "so_pin": so_pin,
        "label": TOKEN_LABEL,
        "module": SOFTHSM_MODULE,
        "cert": str(lab.user_cert),
        "key": str(lab.user_key),
    }
    note = ""
    for way in ("adapter", "pykcs11"):
        shutil.rmtree(tokens, ignore_errors=True)  # a failed attempt may leave a token behind
        tokens.mkdir(parents=True)
        proc = subprocess.run(
            [_python(), "-c", "import bench._fixtures as f; f._provision_child()"],
            input=json.dumps({**request, "way": way}),
            capture_output=True,
            text=True,
            env=env,
            cwd=_repo_root(),
            timeout=60,
            check=False,
        )
        if proc.returncode == 0:
            return Token(conf=conf, label=TOKEN_LABEL, provisioned_by=proc.stdout.strip() + note)
        err = proc.stderr.strip().splitlines()
        note = f" (pam_svmm.adapters.token failed: {err[-1] if err else proc.returncode})"
    raise FixtureError(f"token provisioning failed: {err[-1] if err else proc.returncode}")


def _provision_child() -> None:
    import sys

    req = json.loads(sys.stdin.read())
    cert = x509.load_pem_x509_certificate(Path(req["cert"]).read_bytes())
    key = load_key(Path(req["key"]))
    if req["way"] == "pykcs11":
        _provision_pykcs11(req, cert, key)
        print("PyKCS11 in bench/_fixtures.py")
        return
    from pam_svmm.adapters.token import Pkcs11Module, provision_card

    with Pkcs11Module(req["module"]) as module:
        provision_card(
            module,
            label=req["label"],
            so_pin=req["so_pin"],
            user_pin=req["pin"],
            key=key,
            certificate=cert.public_bytes(serialization.Encoding.DER),
            key_id=CERT_ID,
            key_label=USER,
        )
    print("pam_svmm.adapters.token.provision_card")


def _provision_pykcs11(req: dict[str, str], cert: x509.Certificate, key: object) -> None:
    import PyKCS11

    lib = PyKCS11.PyKCS11Lib()
    lib.load(req["module"])
    free = [
        s
        for s in lib.getSlotList(tokenPresent=True)
        if not lib.getTokenInfo(s).flags & PyKCS11.CKF_TOKEN_INITIALIZED
    ]
    if not free:
        raise SystemExit("no free SoftHSM2 slot")
    lib.initToken(free[0], req["so_pin"], req["label"])
    # SoftHSM2 gives an initialised token a new slot id: find it again by label.
    slot = next(
        s
        for s in lib.getSlotList(tokenPresent=True)
        if lib.getTokenInfo(s).label.strip(" \0") == req["label"]
    )
    rw = PyKCS11.CKF_SERIAL_SESSION | PyKCS11.CKF_RW_SESSION
    s = lib.openSession(slot, rw)
    s.login(req["so_pin"], PyKCS11.CKU_SO)
    s.initPin(req["pin"])
    s.logout()
    s.login(req["pin"])
    if not isinstance(key, rsa.RSAPrivateKey):
        raise SystemExit("the bench token takes an RSA key")
    s.createObject(_cert_template(cert))
    s.createObject(_rsa_key_template(key))
    s.createObject(_rsa_pub_template(key.public_key()))
    s.logout()
    s.closeSession()


def _b(n: int) -> bytes:
    return n.to_bytes((n.bit_length() + 7) // 8 or 1, "big")


def _cert_template(cert: x509.Certificate) -> list[tuple[int, object]]:
    import PyKCS11 as P

    return [
        (P.CKA_CLASS, P.CKO_CERTIFICATE),
        (P.CKA_CERTIFICATE_TYPE, P.CKC_X_509),
        (P.CKA_TOKEN, True),
        (P.CKA_PRIVATE, False),
        (P.CKA_LABEL, USER),
        (P.CKA_ID, CERT_ID),
        (P.CKA_SUBJECT, cert.subject.public_bytes()),
        (P.CKA_ISSUER, cert.issuer.public_bytes()),
        (P.CKA_VALUE, cert.public_bytes(serialization.Encoding.DER)),
    ]


def _rsa_key_template(key: rsa.RSAPrivateKey) -> list[tuple[int, object]]:
    import PyKCS11 as P

    n = key.private_numbers()
    return [
        (P.CKA_CLASS, P.CKO_PRIVATE_KEY),
        (P.CKA_KEY_TYPE, P.CKK_RSA),
        (P.CKA_TOKEN, True),
        (P.CKA_PRIVATE, True),
        (P.CKA_SENSITIVE, True),
        (P.CKA_SIGN, True),
        (P.CKA_DECRYPT, True),
        (P.CKA_LABEL, USER),
        (P.CKA_ID, CERT_ID),
        (P.CKA_MODULUS, _b(n.public_numbers.n)),
        (P.CKA_PUBLIC_EXPONENT, _b(n.public_numbers.e)),
        (P.CKA_PRIVATE_EXPONENT, _b(n.d)),
        (P.CKA_PRIME_1, _b(n.p)),
        (P.CKA_PRIME_2, _b(n.q)),
        (P.CKA_EXPONENT_1, _b(n.dmp1)),
        (P.CKA_EXPONENT_2, _b(n.dmq1)),
        (P.CKA_COEFFICIENT, _b(n.iqmp)),
    ]


def _rsa_pub_template(pub: rsa.RSAPublicKey) -> list[tuple[int, object]]:
    import PyKCS11 as P

    n = pub.public_numbers()
    return [
        (P.CKA_CLASS, P.CKO_PUBLIC_KEY),
        (P.CKA_KEY_TYPE, P.CKK_RSA),
        (P.CKA_TOKEN, True),
        (P.CKA_VERIFY, True),
        (P.CKA_LABEL, USER),
        (P.CKA_ID, CERT_ID),
        (P.CKA_MODULUS, _b(n.n)),
        (P.CKA_PUBLIC_EXPONENT, _b(n.e)),
    ]


def _python() -> str:
    import sys

    return sys.executable


def _repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


# --- pam_pkcs11 ---------------------------------------------------------------------------


def pam_pkcs11_conf(
    workdir: Path, name: str, lab: Lab, token: Token, cert_policy: str, *, with_crl: bool = True
) -> Path:
    """A pam_pkcs11.conf (plus its hashed ca_dir/crl_dir) for ``cert_policy``.

    The cn mapper maps the certificate's CN straight to the login name (mapfile "none").
    The CRL is stored as PEM: pam_pkcs11 adds crl_dir to OpenSSL's hash-dir lookup once as
    PEM and once as DER, but OpenSSL keeps only the first entry for a directory, so a DER
    CRL is never found ("no dedicated crl available"). ``with_crl=False`` leaves crl_dir
    empty: with crl_offline that must refuse every login, which shows the CRL is read.
    """
    base = workdir / f"pkcs11-{name}"
    ca_dir, crl_dir = base / "cacerts", base / "crls"
    ca_dir.mkdir(parents=True, exist_ok=True)
    crl_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(lab.root_pem, ca_dir / "root.pem")
    shutil.copy(lab.intermediate_pem, ca_dir / "intermediate.pem")
    if with_crl:
        # pam_pkcs11 looks up only the CRL of the end entity's issuer.
        crl = x509.load_der_x509_crl(lab.crl_der.read_bytes())
        (crl_dir / "intermediate.crl.pem").write_bytes(crl.public_bytes(serialization.Encoding.PEM))
    for d in (ca_dir, crl_dir):
        _openssl("rehash", str(d))  # the <hash>.0 / <hash>.r0 links OpenSSL looks up
    conf = base / "pam_pkcs11.conf"
    conf.write_text(f"""pam_pkcs11 {{
  nullok = false;
  debug = false;
  use_first_pass = false;
  try_first_pass = false;
  use_authtok = false;
  card_only = false;
  wait_for_card = false;
  use_pkcs11_module = softhsm;
  pkcs11_module softhsm {{
    module = {token.module};
    description = "SoftHSM2";
    slot_description = "none";
    ca_dir = {ca_dir};
    crl_dir = {crl_dir};
    support_threads = false;
    cert_policy = {cert_policy};
    token_type = "Smart card";
  }}
  use_mappers = cn;
  mapper_search_path = /lib/x86_64-linux-gnu/pam_pkcs11;
  mapper cn {{
    debug = false;
    module = internal;
    ignorecase = false;
    mapfile = "none";
  }}
}}
""")
    return conf


def _openssl(*args: str) -> str:
    proc = subprocess.run(
        ["openssl", *args], capture_output=True, text=True, timeout=60, check=False
    )
    if proc.returncode != 0:
        raise FixtureError(f"openssl {args[0]}: {proc.stderr.strip()}")
    return proc.stdout


# --- OCSP responder -----------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class OcspResponder:
    """`openssl ocsp` answering for the lab's intermediate on a loopback port."""

    def __init__(self, lab: Lab, workdir: Path) -> None:
        self.lab = lab
        self.log = workdir / "ocsp.log"
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def start(self) -> OcspResponder:
        f = self.lab.folder
        self.port = free_port()
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                # openssl 3.0 takes a bare port number (it listens on all
                # addresses); the bench only ever connects to 127.0.0.1.
                [
                    "openssl",
                    "ocsp",
                    "-index",
                    str(f / "index.txt"),
                    "-port",
                    str(self.port),
                    "-CA",
                    str(f / "intermediate.pem"),
                    "-rsigner",
                    str(f / "ocsp.pem"),
                    "-rkey",
                    str(f / "ocsp.key"),
                    "-nmin",
                    "60",
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        # Ready when it says so. Not by connecting: openssl 3.0's responder hangs for good on
        # a connection that closes without sending a request.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise FixtureError(f"openssl ocsp exited: {self.log.read_text()[-300:]}")
            if "waiting for OCSP client connections" in self.log.read_text():
                return self
            time.sleep(0.05)
        self.stop()
        raise FixtureError("openssl ocsp did not start listening within 10 s")

    def requests(self) -> int:
        """How many requests the responder has received so far."""
        try:
            return self.log.read_text().count("Received request")
        except OSError:
            return 0

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
