"""Hostile bytes get a clear refusal, never a crash or a hang.

What an attacker (or a fault) sends each parser that takes outside bytes: nesting deep enough
for RecursionError, numbers that are not finite or too big for a C type, certificates
cryptography refuses with an exception that is not a ValueError, records of the wrong shape,
a server that drips one byte at a time, a peer that hangs up. Each must end in the product's
typed error (or a skipped record, logged), within its time budget, and the PAM application
must survive.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.serialization import Encoding

from pam_svmm import config
from pam_svmm.adapters.allowlist_store import SessionRecords, UserSessions
from pam_svmm.adapters.audit_log import AuditLog
from pam_svmm.adapters.crl_store import parse_crl
from pam_svmm.adapters.fetch import HttpFetcher
from pam_svmm.adapters.processes import start_time
from pam_svmm.adapters.token import CardCertificate
from pam_svmm.adapters.vm_registry import VmRecord
from pam_svmm.cli.main import main
from pam_svmm.config import CertmapRule, Config, SessionConfig
from pam_svmm.domain import audit_chain, certmap, custody
from pam_svmm.domain.allowlist import parse_allowlist
from pam_svmm.domain.audit_record import AuditRecord, Outcome
from pam_svmm.domain.certpolicy import parse_certificate
from pam_svmm.domain.pkcs11_uri import InvalidPkcs11Uri
from pam_svmm.domain.pkcs11_uri import parse as parse_uri
from pam_svmm.domain.policy import load_policy
from pam_svmm.domain.policy_bundle import make_bundle, parse_bundle
from pam_svmm.errors import (
    AllowlistInvalid,
    CertificateInvalid,
    ConfigError,
    FetchError,
    KeyTokenInvalid,
    LauncherRefused,
    PolicyBundleInvalid,
    PolicyError,
    RevocationUnknown,
    SessionFailed,
)
from pam_svmm.services.auth import load_pem_bundle
from pam_svmm.services.dmcrypt import DmcryptVolumes
from pam_svmm.services.launcher import live_sessions, parse_request
from pam_svmm.services.session import SessionManager
from tests.unit.certfactory import make_ca
from tests.unit.launcher_fixtures import make_launcher

REPO = Path(__file__).resolve().parents[2]
DEEP_JSON = [b"[" * 100_000, b'{"a":' * 50_000 + b"1" + b"}" * 50_000]
DEEP_TOML = ["x = " + "[" * 100_000, "x = " + "{a = " * 5_000 + "1" + "}" * 5_000]


# --- 1. nesting: every parser of outside JSON and TOML ---------------------------------------


def _session_record(tmp_path: Path, data: bytes) -> Callable[[], object]:
    records = SessionRecords(tmp_path / "sessions")
    with records.locked(1000) as held:
        held.save(UserSessions(1000, {"s": {"pid": 1}}, "alice"))
    (tmp_path / "sessions" / "1000.json").write_bytes(data)

    def load() -> object:
        with records.locked(1000) as held:
            return held.load()

    return load


JSON_PARSERS: list[tuple[str, Callable[[Path, bytes], Callable[[], object]], type]] = [
    ("launcher request", lambda _t, d: lambda: parse_request(d[:65536], 1000), LauncherRefused),
    ("allowlist", lambda _t, d: lambda: parse_allowlist(d), AllowlistInvalid),
    ("policy bundle", lambda _t, d: lambda: parse_bundle(d), PolicyBundleInvalid),
    ("key token", lambda _t, d: lambda: custody.parse_token(d), KeyTokenInvalid),
    ("VM record", lambda _t, d: lambda: VmRecord.from_json(d), ValueError),
    ("session record", _session_record, SessionFailed),
]


@pytest.mark.parametrize("deep", DEEP_JSON, ids=["arrays", "objects"])
@pytest.mark.parametrize(("what", "make", "error"), JSON_PARSERS, ids=[p[0] for p in JSON_PARSERS])
def test_deeply_nested_json_is_a_typed_refusal(
    tmp_path: Path, what: str, make: Any, error: type, deep: bytes
) -> None:
    with pytest.raises(error):
        make(tmp_path, deep)()


@pytest.mark.parametrize("deep", DEEP_JSON, ids=["arrays", "objects"])
def test_deeply_nested_audit_lines_and_heads_are_no_records(deep: bytes) -> None:
    assert audit_chain.parse_line(deep + b"\n") is None
    assert audit_chain.parse_head(deep[:4096]) is None
    assert audit_chain.chain_fields(deep + b"\n") is None


def test_the_launcher_service_answers_deep_json_with_bad_request(tmp_path: Path) -> None:
    reply = make_launcher(tmp_path).handle(1000, b"[" * 60_000)
    assert (reply.ok, reply.reason) == (False, "bad_request")


@pytest.mark.parametrize("deep", DEEP_TOML, ids=["arrays", "inline-tables"])
def test_deeply_nested_toml_config_and_policy_are_typed_refusals(tmp_path: Path, deep: str) -> None:
    path = tmp_path / "svmm.toml"
    path.write_text(deep)
    with pytest.raises(ConfigError):
        config.load(path)
    with pytest.raises(PolicyError):
        load_policy(deep)


def _rec(i: int) -> AuditRecord:
    t = dt.datetime(2026, 1, 1, tzinfo=dt.UTC) + dt.timedelta(minutes=i)
    return AuditRecord(event="auth", outcome=Outcome.SUCCESS, reason="ok", time=t, host="h",
                       service="login", user=f"u{i}")  # fmt: skip


def test_a_deep_line_at_the_audit_tail_stops_no_login_and_verify_names_its_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "log" / "audit.jsonl"
    log = AuditLog(path, syslog_mirror=False)
    log.write(_rec(1))
    with open(path, "ab") as f:
        f.write(b"[" * 100_000 + b"\n")
    log.write(_rec(2))  # the writer reads the tail: it must carry on
    assert path.read_bytes().count(b"\n") == 3
    code = main(["audit", "verify", "--path", str(path), "--no-key"])
    err = capsys.readouterr().err
    assert code != 0 and "internal error" not in err
    assert "line 2" in err, err


# --- 2. config numbers and the PIN prompt ----------------------------------------------------

NUMBER_KEYS = [("auth", "login_timeout"), ("revocation", "fetch_timeout"),
               ("pkcs11", "wait_for_card"), ("launcher", "quit_timeout"),
               ("session", "allowlist_ttl"), ("directory", "connect_timeout")]  # fmt: skip


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "+nan", "1e300"])
@pytest.mark.parametrize(("table", "key"), NUMBER_KEYS)
def test_numbers_that_are_not_finite_or_absurd_are_refused_naming_the_key(
    table: str, key: str, value: str
) -> None:
    doc = tomllib.loads(f"[{table}]\n{key} = {value}\n")
    with pytest.raises(ConfigError) as e:
        config.parse(doc)
    assert e.value.key == f"{table}.{key}"


def test_a_nan_timeout_in_the_file_is_refused_naming_the_key(tmp_path: Path) -> None:
    path = tmp_path / "svmm.toml"
    path.write_text("[auth]\nlogin_timeout = nan\n")
    with pytest.raises(ConfigError) as e:
        config.load(path)
    assert e.value.key == "auth.login_timeout"


BAD_PROMPTS = ["{token.x}", "{token[0]}", "{host.__class__}", "{token:>999999999}", "{token!r}",
               "{token:{host}}", "{0}", "{}", "{user}", "PIN {token", "PIN }"]  # fmt: skip


@pytest.mark.parametrize("prompt", BAD_PROMPTS)
def test_a_pin_prompt_that_could_raise_at_login_is_refused_at_load(prompt: str) -> None:
    with pytest.raises(ConfigError) as e:
        config.parse({"pkcs11": {"pin_prompt": prompt}})
    assert e.value.key == "pkcs11.pin_prompt"


@pytest.mark.parametrize("prompt", ["PIN for {token} on {host}: ", "{{PIN}} {token}: ", "PIN: "])
def test_plain_pin_prompts_are_accepted(prompt: str) -> None:
    cfg = config.parse({"pkcs11": {"pin_prompt": prompt}})
    cfg.pkcs11.pin_prompt.format(token="card", host="h")


# --- 3. certmap numbers ----------------------------------------------------------------------


def _certmap(rule: dict[str, Any]) -> dict[str, Any]:
    return {"certmap": {"rules": [{"map": "(uid={cn})", **rule}]}}


@pytest.mark.parametrize(
    ("rule", "key"),
    [
        ({"match": {"issuer": "a{99999999999}"}}, "certmap.rules[0].match.issuer"),
        ({"match": {"subject": "(x){1,4294967296}"}}, "certmap.rules[0].match.subject"),
        ({"match": {"eku": ["1.2." + "9" * 50]}}, "certmap.rules[0].match.eku[0]"),
        ({"map": "(uid={subject_attr:1.2." + "9" * 45 + "})"},
         "certmap.rules[0].map"),
        ({"map": "(uid={subject_attr:1.2." + "9" * 5000 + "})"}, "certmap.rules[0].map"),
        ({"priority": 10**30}, "certmap.rules[0].priority"),
    ],
)  # fmt: skip
def test_certmap_numbers_too_big_are_config_errors_naming_the_key(
    rule: dict[str, Any], key: str
) -> None:
    with pytest.raises(ConfigError) as e:
        config.parse(_certmap(rule))
    assert e.value.key == key


def test_a_rule_made_elsewhere_with_an_overflowing_regex_is_a_config_error() -> None:
    rule = CertmapRule(name="r", map="(uid={cn})", match_subject="a{99999999999}")
    with pytest.raises(ConfigError):
        certmap.evaluate(rule, make_ca().cert)


# --- 4. certificates cryptography refuses with something other than ValueError --------------


def _bad_version(der: bytes, marker: bytes) -> bytes:
    i = der.index(marker)  # the version INTEGER: v3 (2) becomes 5, which X.509 does not have
    return der[: i + len(marker) - 1] + b"\x05" + der[i + len(marker) :]


def _pem(der: bytes, label: str = "CERTIFICATE") -> bytes:
    body = base64.encodebytes(der).decode()
    return f"-----BEGIN {label}-----\n{body}-----END {label}-----\n".encode()


@pytest.fixture(scope="module")
def bad_cert() -> tuple[Any, bytes]:
    ca = make_ca("Policy signer", key_kind="p256", slot=7)
    der = ca.cert.public_bytes(Encoding.DER)
    return ca, _bad_version(der, bytes.fromhex("a003020102"))


def test_a_policy_bundle_signer_with_an_invalid_version_is_bundle_malformed(
    bad_cert: tuple[Any, bytes],
) -> None:
    ca, bad = bad_cert
    doc = json.loads(make_bundle(b"version = 1\n", ca.key, [ca.cert]))
    doc["certificates"] = [_pem(bad).decode()]
    with pytest.raises(PolicyBundleInvalid) as e:
        parse_bundle(json.dumps(doc).encode())
    assert e.value.reason == "bundle_malformed"


def test_every_parser_of_certificate_bytes_gives_a_typed_error(
    bad_cert: tuple[Any, bytes], tmp_path: Path
) -> None:
    _, bad = bad_cert
    with pytest.raises(CertificateInvalid):
        parse_certificate(bad)
    with pytest.raises(CertificateInvalid):
        CardCertificate("card", b"\x01", bad).load()
    (tmp_path / "anchor.pem").write_bytes(_pem(bad))
    with pytest.raises(ValueError, match=r"anchor\.pem"):  # the callers' ConfigError
        load_pem_bundle([tmp_path / "anchor.pem"])


def test_a_crl_with_an_invalid_version_is_revocation_unknown() -> None:
    ca = make_ca("CRL issuer", key_kind="p256", slot=8)
    t = dt.datetime(2025, 1, 1)
    builder = x509.CertificateRevocationListBuilder().issuer_name(ca.cert.subject)
    builder = builder.last_update(t).next_update(t + dt.timedelta(days=1))
    crl = builder.sign(ca.key, hashes.SHA256())
    bad = _bad_version(crl.public_bytes(Encoding.DER), bytes.fromhex("020101"))
    for data in (bad, _pem(bad, "X509 CRL")):
        with pytest.raises(RevocationUnknown):
            parse_crl(data, "test")


# --- 5. session and VM records of the wrong shape ----------------------------------------------

UID = 1000


def _write_sessions(state_dir: Path, sessions: dict[str, Any], uid: int = UID) -> None:
    with SessionRecords(state_dir).locked(uid) as held:
        held.save(UserSessions(uid, sessions, "alice"))  # save() writes whatever it is given


def _mine() -> dict[str, Any]:
    return {"pid": os.getpid(), "pid_start": start_time(os.getpid())}


BROKEN = {"list": [1, 2], "huge-pid": {"pid": 10**30}, "int-volumes": {"volumes": 5},
          "text-uid": {"uid": "0"}, "number": 7}  # fmt: skip


def test_malformed_session_entries_are_skipped_with_a_logged_reason(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state = tmp_path / "sessions"
    _write_sessions(state, {**BROKEN, "live": _mine()})
    with caplog.at_level(logging.WARNING), SessionRecords(state).locked(UID) as held:
        loaded = held.load()
    assert set(loaded.sessions) == {"live"}
    assert all(name in caplog.text for name in BROKEN)
    assert live_sessions(state, UID) == 1


def test_closing_a_session_whose_entry_is_a_list_is_no_crash(tmp_path: Path) -> None:
    cfg = replace(Config(), session=SessionConfig(allowlist_dir=tmp_path / "allow",
                                                  state_dir=tmp_path / "sessions"))  # fmt: skip
    _write_sessions(cfg.session.state_dir, {"tty1:1": ["not", "a", "dict"], "live": _mine()})
    manager = SessionManager(cfg, policy=object())  # type: ignore[arg-type]
    assert manager.close("alice", "tty1:1", pid=os.getpid()) is None


def test_finding_a_session_in_a_record_that_is_a_list_is_no_crash(tmp_path: Path) -> None:
    state = tmp_path / "sessions"
    _write_sessions(state, {"live": _mine()})
    (state / f"{UID}.json").write_bytes(b"[1, 2, 3]")
    assert SessionRecords(state).find("alice", "live") is None


class _Cryptsetup:
    def mapping_active(self, name: str) -> bool:
        return True


def test_dmcrypt_records_with_a_pid_past_pid_t_are_no_overflow(tmp_path: Path) -> None:
    records = SessionRecords(tmp_path / "dm")
    entry = {"uid": UID, "user": "alice", "volumes": ["v1"], "token_serial": "s1"}
    _write_sessions(tmp_path / "dm", {"a": {**entry, "pid": 2**40}, "b": {**entry, "pid": 2**70}},
                    uid=0)  # fmt: skip
    dm = DmcryptVolumes(Config(), cryptsetup=_Cryptsetup(), volumes=object(), records=records)
    assert dm.open_volumes(UID) == {}
    assert dm.card_serials() == set()


@pytest.mark.parametrize(
    "change",
    [{"pid": 2**70}, {"uid": 2**64}, {"start_time": -1}, {"vm": 5}, {"user": ["x"]},
     {"extra": 1}, {"run_dir": {"a": 1}}],
)  # fmt: skip
def test_vm_records_of_the_wrong_shape_are_value_errors(change: dict[str, Any]) -> None:
    good = VmRecord("vm-a", 1000, "alice", 4242, 1, "/run/q", "/run/d")
    assert VmRecord.from_json(good.to_json()) == good
    doc = {**json.loads(good.to_json()), **change}
    with pytest.raises(ValueError):
        VmRecord.from_json(json.dumps(doc).encode())


# --- 6. PKCS#11 URIs with a slot id ----------------------------------------------------------


@dataclass(frozen=True)
class CkTokenInfo:
    """What PyKCS11's getTokenInfo gives: no slot id."""

    label: str = "Alice card"
    manufacturer: str = "SoftHSM project"
    model: str = "SoftHSM v2"
    serial: str = "1"


def test_a_uri_with_a_slot_id_matches_a_token_info_that_carries_none() -> None:
    uri = parse_uri("pkcs11:slot-id=3;token=Alice%20card")
    assert not uri.matches_token(CkTokenInfo())  # unknown slot: never a match
    assert uri.matches_token(CkTokenInfo(), slot_id=3)
    assert not uri.matches_token(CkTokenInfo(), slot_id=4)
    assert parse_uri("pkcs11:token=Alice%20card").matches_token(CkTokenInfo())


@pytest.mark.parametrize(
    "uri",
    ["pkcs11:slot-id=" + "9" * 5000, "pkcs11:slot-id=18446744073709551616",
     "pkcs11:library-version=" + "9" * 5000, "pkcs11:library-version=1.256"],
)  # fmt: skip
def test_slot_ids_and_versions_past_their_c_types_are_invalid_uris(uri: str) -> None:
    with pytest.raises(InvalidPkcs11Uri):
        parse_uri(uri)
    with pytest.raises(ConfigError) as e:
        config.parse({"pkcs11": {"uri": uri}})
    assert e.value.key == "pkcs11.uri"


# --- 7. a responder that drips ---------------------------------------------------------------

DRIP = 0.3


class _Dripper(BaseHTTPRequestHandler):
    """Headers (or, with a path of /body, a body) one byte every DRIP seconds, for at most
    20 s, so that a fetch that does not keep its budget fails the test instead of hanging."""

    def do_GET(self) -> None:
        if self.path == "/body":
            self.wfile.write(b"HTTP/1.0 200 OK\r\nContent-Length: 1000\r\n\r\n")
            self.wfile.flush()
            payload = b"x" * 1000
        else:
            payload = b"HTTP/1.0 200 OK\r\nX-Slow: " + b"y" * 1000 + b"\r\n\r\n"
        end = time.monotonic() + 20
        for byte in payload:
            if time.monotonic() > end:
                return
            try:
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
            except OSError:
                return
            time.sleep(DRIP)

    do_POST = do_GET

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def dripper() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Dripper)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("path", ["/headers", "/body"])
def test_a_dripping_responder_is_cut_off_at_the_fetch_budget(dripper: str, path: str) -> None:
    started = time.monotonic()
    with pytest.raises(FetchError, match="timed out"):
        HttpFetcher().get(dripper + path, max_bytes=1 << 20, timeout=1.0)
    assert time.monotonic() - started < 3.0


def test_a_dripping_ocsp_responder_is_cut_off_too(dripper: str) -> None:
    started = time.monotonic()
    with pytest.raises(FetchError):
        HttpFetcher().post(dripper + "/body", b"req", max_bytes=1 << 16, timeout=1.0)
    assert time.monotonic() - started < 3.0


# --- 8. svmmd hanging up mid-conversation ----------------------------------------------------

CLIENT = """
import _socket, signal, sys, time
signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # as a C PAM application has it
sys.path.insert(0, sys.argv[2])
from pam_svmm.pam import shim

def connect(path):  # the shim's, less its check that root serves the socket
    s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    s.connect(path)
    return s

shim._connect = connect

class Resp:
    resp = "123456"

class Pamh:
    PAM_SYSTEM_ERR, PAM_SESSION_ERR, PAM_SUCCESS = 4, 14, 0
    exception = RuntimeError
    service = "login"
    user = "alice"
    tty = rhost = xdisplay = None
    env = {}
    def Message(self, style, text):
        return (style, text)
    def conversation(self, msg):
        time.sleep(0.3)  # the user types the PIN; svmmd is gone meanwhile
        return Resp()

opts = shim.ModuleOptions(["shim", "socket=" + sys.argv[1]])
print("code", shim.call("authenticate", Pamh(), 0, opts), flush=True)
"""


def _fake_svmmd(path: Path, ready: threading.Event) -> None:
    """Reads the request, asks for the PIN, and hangs up before the answer comes."""
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(path))
    srv.listen(1)
    ready.set()
    srv.settimeout(20)
    conn, _ = srv.accept()
    with conn:
        conn.settimeout(20)
        conn.recv(65536)  # MAGIC and the first frame
        body = b"conv.style=1\0conv.text=PIN: "
        conn.sendall(len(body).to_bytes(4, "big") + body)
        conn.shutdown(socket.SHUT_RDWR)
    srv.close()


def test_svmmd_gone_mid_conversation_is_an_error_code_not_sigpipe(tmp_path: Path) -> None:
    path = tmp_path / "svmmd.sock"
    ready = threading.Event()
    t = threading.Thread(target=_fake_svmmd, args=(path, ready), daemon=True)
    t.start()
    assert ready.wait(5)
    proc = subprocess.run(
        [sys.executable, "-c", CLIENT, str(path), str(REPO)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    t.join(5)
    assert proc.returncode != -13, "the PAM application died of SIGPIPE"
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "code 4"  # PAM_SYSTEM_ERR: never a success, never a fallback
