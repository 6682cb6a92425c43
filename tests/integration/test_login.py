"""Card logins through the real PAM stack: pam_wrapper, pam_python, SoftHSM2 behind pinguard,
a real `openssl ocsp` responder and CRL server. Each login is a fresh PAM process."""

from __future__ import annotations

import datetime as dt
import json
import sys
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from pam_svmm.domain.certpolicy import fingerprint
from svmm_lab.lab import SO_PIN, Lab
from svmm_lab.responders import CrlServer, free_port
from tests.integration.logins import PIN, card_list, login, refused

pytestmark = pytest.mark.integration


# --- good cards -----------------------------------------------------------------------------


@pytest.mark.parametrize(("card", "key"), [("alice", "RSA"), ("bob", "P-256"), ("carol", "P-384")])
def test_good_card_logs_in_and_is_audited(lab: Lab, card: str, key: str) -> None:
    a = login(lab, card, user=card)
    assert a.report.ok, a.report
    assert a.report.user == card
    assert a.report.prompts == (f"PIN for {card} ID card: ",)
    rec = a.record
    assert rec["outcome"] == "success" and rec["user"] == card
    assert rec["card"]["fingerprint"] == fingerprint(lab.card_cert(card))
    assert rec["card"]["serial"] == f"{lab.card_cert(card).serial_number:x}"
    assert rec["card"]["issuer"].startswith("CN=Demo Org Issuing CA 1")
    assert rec["card"]["token"] == f"{card} ID card"
    assert rec["host"] == "lab-host" and rec["service"] == "svmm-login"
    assert rec["method"] == "card"
    assert "not revoked per ocsp" in rec["detail"]
    assert a.events == ["auth", "account"]  # each PAM phase leaves its record
    assert a.audit[1]["card"] == rec["card"] and a.audit[1]["outcome"] == "success"


def test_pam_user_is_set_from_the_card_when_unset(lab: Lab) -> None:
    a = login(lab, "bob")
    assert a.report.ok and a.report.user == "bob"
    assert a.record["requested_user"] == ""


def test_smartcard_logon_eku_alone_is_accepted(lab: Lab) -> None:
    assert login(lab, "scl", user="scl").report.ok


def test_pamtester_as_a_separate_application(lab: Lab) -> None:
    proc = lab.pamtester(lab.insert("alice"), pin=PIN, user="alice")
    assert proc.returncode == 0, proc.stderr
    assert "successfully authenticated" in proc.stdout + proc.stderr


# --- PIN ------------------------------------------------------------------------------------


def test_wrong_pin_is_refused_and_the_pin_is_nowhere(lab: Lab) -> None:
    a = login(lab, "alice", pin="771942", user="alice")
    refused(a, "PAM_AUTH_ERR", "pin_incorrect")
    assert any("wrong PIN" in m for m in a.report.messages)
    assert "771942" not in lab.audit_path.read_text()
    assert not any("771942" in m for m in a.report.messages)


def test_pin_counter_final_try_then_locked(lab: Lab) -> None:
    # tries: 3 tries; the card reports COUNT_LOW, then FINAL_TRY, then LOCKED.
    first = login(lab, "tries", pin="000001", user="tries")
    refused(first, "PAM_AUTH_ERR", "pin_incorrect")
    assert any("few tries" in m for m in first.report.messages), first.report.messages
    second = login(lab, "tries", pin="000002", user="tries")
    refused(second, "PAM_AUTH_ERR", "pin_incorrect")
    assert any("final PIN try" in m or "one try left" in m for m in second.report.messages)
    third = login(lab, "tries", pin="000003", user="tries")
    refused(third, "PAM_MAXTRIES", "pin_locked")
    # Locked: the right PIN is not even asked for.
    fourth = login(lab, "tries", pin="914273", user="tries")
    refused(fourth, "PAM_MAXTRIES", "pin_locked")
    assert fourth.report.prompts == ()
    assert "914273" not in lab.audit_path.read_text()


def test_pinpad_reader_takes_the_pin_on_the_reader(lab: Lab) -> None:
    a = login(lab, "pad", pin="", user="pad")
    assert a.report.ok, a.report
    assert a.report.prompts == ()  # nothing asked through PAM
    assert any("keypad" in m for m in a.report.messages)


# --- no card, wrong card --------------------------------------------------------------------


def test_no_card_is_authinfo_unavailable(lab: Lab) -> None:
    a = login(lab, user="alice")
    refused(a, "PAM_AUTHINFO_UNAVAIL", "no_card")
    assert a.report.prompts == ()


def test_card_of_bob_used_as_alice_is_refused_before_the_pin(lab: Lab) -> None:
    a = login(lab, "bob", user="alice")
    refused(a, "PAM_AUTH_ERR", "user_mismatch")
    assert a.report.prompts == ()  # no PIN try spent on someone else's card
    assert a.record["card"]["fingerprint"] == fingerprint(lab.card_cert("bob"))
    assert a.report.user == "alice"  # PAM_USER untouched


def test_two_tokens_the_users_own_card_is_used(lab: Lab) -> None:
    for user in ("alice", "bob"):
        a = login(lab, "bob", "alice", user=user)
        assert a.report.ok, a.report
        assert a.record["card"]["fingerprint"] == fingerprint(lab.card_cert(user))


def test_a_card_with_an_old_and_a_renewed_certificate_uses_the_valid_one(lab: Lab) -> None:
    a = login(lab, "renewed", user="renewed")
    assert a.report.ok, a.report
    assert a.record["card"]["fingerprint"] == fingerprint(lab.card_cert("renewed"))


# --- certificate problems -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("card", "user", "reason"),
    [
        ("forged", "alice", "proof_of_possession_failed"),
        ("rogue", "alice", "certificate_untrusted"),
        ("eve", "eve", "certificate_expired"),
        ("nyv", "nyv", "certificate_not_yet_valid"),
        ("noeku", "noeku", "eku_missing"),
        ("broken", "broken", "certificate_malformed"),
        ("mallory", "mallory", "certificate_revoked"),
    ],
)
def test_bad_certificates_are_refused(lab: Lab, card: str, user: str, reason: str) -> None:
    a = login(lab, card, user=user)
    refused(a, "PAM_AUTH_ERR", reason)
    if reason != "proof_of_possession_failed":
        # Every check that needs no PIN, revocation included, comes before it: no PIN try is
        # spent on a card that cannot log in. Possession needs the card to sign.
        assert a.report.prompts == ()


def card_with(lab: Lab, name: str, *, constrained: bool = False) -> str:
    """A card (made once) with two valid certificates of ``name`` (UPN {name}@demo.example),
    labelled "auth" and "second" (their PEMs beside the card); with ``constrained``, only
    "auth", issued by a CA on the card that may issue for rfc822Name corp.example only."""
    from svmm_lab.cards import provision_card
    from svmm_lab.pki import Issued, new_key

    folder = lab.cards_dir / name
    if (folder / "tokens").exists():
        return name
    der = serialization.Encoding.DER
    keys = [new_key("p256"), new_key("p256")]
    ca_certs = [lab.ca.intermediate.cert]
    issuer = None
    if constrained:
        ca_key = new_key("p256")
        now = dt.datetime.now(dt.UTC)
        ca_cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "Corp CA")]))
            .issuer_name(lab.ca.root.cert.subject)
            .public_key(ca_key.public_key())  # type: ignore[arg-type]
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(True, False, False, False, False, True, True, False, False),
                critical=True,
            )
            .add_extension(
                x509.NameConstraints([x509.RFC822Name("corp.example")], None), critical=True
            )
            .sign(lab.ca.root.key, hashes.SHA256())  # type: ignore[arg-type]
        )
        issuer, ca_certs = Issued(ca_cert, ca_key), [ca_cert]
    certs = [
        lab.ca.issue_user(name, k.public_key(), upn=f"{name}@demo.example", issuer=issuer)
        for k in keys
    ]
    extra = [] if constrained else [(keys[1], certs[1].public_bytes(der), b"\x02", "second")]
    provision_card(
        folder / "tokens",
        label=f"{name} ID card",
        pin=PIN,
        so_pin=SO_PIN,
        key=keys[0],
        cert_der=certs[0].public_bytes(der),
        ca_certs=ca_certs,
        anchors=[lab.ca.root.cert],
        extra=extra,
    )
    for label, cert in zip(("auth", "second"), certs, strict=True):
        (folder / f"{label}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return name


def revoke_the_first(lab: Lab, card: str) -> tuple[x509.Certificate, x509.Certificate]:
    """Revoke the certificate a login sees first: SoftHSM2's object order is random per card
    (and may differ between processes), so a login without revocation checks shows it (the
    first that passes). Returns (revoked, the other)."""
    certs = {
        lb: x509.load_pem_x509_certificate((lab.cards_dir / card / f"{lb}.pem").read_bytes())
        for lb in ("auth", "second")
    }
    svc = lab.variant("no-revocation", '[revocation]\nend_entity = "off"\nca = "off"\n')
    a = login(lab, card, user=card, service=svc)
    assert a.report.ok, a.report
    (first,) = [c for c in certs.values() if fingerprint(c) == a.record["card"]["fingerprint"]]
    (other,) = [c for c in certs.values() if c is not first]
    lab.ca.revoke(first)
    lab.ca.publish()
    return first, other


def crl_only(lab: Lab, cache: Path) -> str:
    """A service that asks only CRLs (a fresh cache: the CRL just published is fetched)."""
    return lab.variant(
        f"crl-{cache.name}",
        f'[revocation]\nmethods = ["crl"]\nend_entity = "require"\ncache_dir = "{cache}"\n',
    )


def test_a_revoked_first_certificate_does_not_hide_a_valid_second_one(
    lab: Lab, tmp_path: Path
) -> None:
    card = card_with(lab, "twocert")
    revoked, good = revoke_the_first(lab, card)
    a = login(lab, card, user=card, service=crl_only(lab, tmp_path))
    assert a.report.ok, a.report  # before: the first was taken, the PIN asked, then refused
    assert a.report.prompts == ("PIN for twocert ID card: ",)  # one PIN, for the good one
    assert a.record["card"]["fingerprint"] == fingerprint(good)
    # The refused certificate is audited with its reason.
    note = f"(sha256 {fingerprint(revoked)[:16]}) refused: certificate_revoked"
    assert note in a.record["detail"], a.record


def test_a_certificate_outside_its_cas_name_constraints_does_not_log_in(lab: Lab) -> None:
    # Corp CA may issue for corp.example only; the UPN says demo.example, which maps.
    card = card_with(lab, "ncuser", constrained=True)
    # Revocation off (Corp CA publishes nothing): before, this logged in as ncuser.
    svc = lab.variant("no-revocation", '[revocation]\nend_entity = "off"\nca = "off"\n')
    a = login(lab, card, user=card, service=svc)
    refused(a, "PAM_AUTH_ERR", "name_constraints")
    assert "ncuser@demo.example" in a.record["detail"] and a.report.prompts == ()


# --- revocation -----------------------------------------------------------------------------


def test_revoked_by_crl(lab: Lab) -> None:
    svc = lab.variant(
        "crl-only",
        f'[revocation]\nmethods = ["crl"]\nend_entity = "require"\ncache_dir = "{lab.cache_dir}"\n',
    )
    a = login(lab, "mallory", user="mallory", service=svc)
    refused(a, "PAM_AUTH_ERR", "certificate_revoked")
    assert "crl" in a.record["detail"]
    ok = login(lab, "alice", user="alice", service=svc)
    assert ok.report.ok and "not revoked per crl" in ok.record["detail"]


def test_revoked_by_ocsp(lab: Lab) -> None:
    svc = lab.variant(
        "ocsp-only", f'[revocation]\nmethods = ["ocsp"]\ncache_dir = "{lab.cache_dir}"\n'
    )
    a = login(lab, "mallory", user="mallory", service=svc)
    refused(a, "PAM_AUTH_ERR", "certificate_revoked")
    assert "ocsp" in a.record["detail"]


def _dead_ocsp(rule: str, cache: Path) -> str:
    return (
        f'[revocation]\nmethods = ["ocsp"]\nend_entity = "{rule}"\nca = "off"\n'
        f'ocsp_responder = "http://127.0.0.1:{free_port()}/"\ncache_dir = "{cache}"\n'
    )


def test_ocsp_down_under_require_is_undecided(lab: Lab) -> None:
    svc = lab.variant("ocsp-down-require", _dead_ocsp("require", lab.cache_dir))
    a = login(lab, "alice", user="alice", service=svc)
    refused(a, "PAM_AUTHINFO_UNAVAIL", "revocation_unknown")


def test_ocsp_down_under_soft_fail_logs_in_and_says_so(lab: Lab) -> None:
    svc = lab.variant("ocsp-down-soft", _dead_ocsp("soft-fail", lab.cache_dir))
    a = login(lab, "alice", user="alice", service=svc)
    assert a.report.ok, a.report
    assert "soft-fail" in a.record["detail"]
    # Soft-fail never hides a revocation that is known.
    svc2 = lab.variant(
        "soft-crl",
        '[revocation]\nmethods = ["crl"]\nend_entity = "soft-fail"\n'
        f'cache_dir = "{lab.cache_dir}"\n',
    )
    refused(
        login(lab, "mallory", user="mallory", service=svc2), "PAM_AUTH_ERR", "certificate_revoked"
    )


def test_stale_crl_is_undecided(lab: Lab, tmp_path: Path) -> None:
    now = dt.datetime.now(dt.UTC)
    inter = lab.ca.intermediate
    stale = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(inter.cert.subject)
        .last_update(now - dt.timedelta(days=2))
        .next_update(now - dt.timedelta(days=1))
        .add_extension(x509.CRLNumber(1), critical=False)  # else refused before staleness
        .sign(inter.key, hashes.SHA256())
    )
    path = tmp_path / "stale.crl"
    path.write_bytes(stale.public_bytes(serialization.Encoding.DER))
    cache = tmp_path / "cache"
    svc = lab.variant(
        "stale",
        f'[revocation]\nmethods = ["crl"]\ncrl_fetch = false\nca = "off"\n'
        f'crl_files = ["{path}"]\ncache_dir = "{cache}"\n',
    )
    a = login(lab, "alice", user="alice", service=svc)
    refused(a, "PAM_AUTHINFO_UNAVAIL", "revocation_unknown")
    assert "stale" in a.record["detail"].lower()


def test_slow_responder_is_bounded_by_the_fetch_timeout(lab: Lab, tmp_path: Path) -> None:
    with CrlServer(tmp_path, delay=10.0) as slow:
        svc = lab.variant(
            "slow",
            f'[revocation]\nmethods = ["ocsp"]\nfetch_timeout = 1\nca = "off"\n'
            f'ocsp_responder = "{slow.url}"\ncache_dir = "{lab.cache_dir}"\n',
        )
        t = time.monotonic()
        a = login(lab, "alice", user="alice", service=svc)
        elapsed = time.monotonic() - t
    refused(a, "PAM_AUTHINFO_UNAVAIL", "revocation_unknown")
    assert elapsed < 6, f"login took {elapsed:.1f}s with a 1s fetch timeout"


# --- failing closed -------------------------------------------------------------------------


def test_broken_configuration_refuses_a_directory_user(lab: Lab) -> None:
    bad = lab.folder / "broken.toml"
    bad.write_text("[pkcs11\n")
    lab.write_pam_service(name="svmm-broken", config=bad)
    a = login(lab, "alice", user="alice", service="svmm-broken")
    assert a.report.name == "PAM_AUTH_ERR"  # alice is no local account: refused, not ignored
    assert a.audit == []  # no configuration: no audit path to write to


def test_a_writable_trust_anchor_is_a_broken_configuration(lab: Lab) -> None:
    """StrictModes on the real login: an anchor a group may rewrite decides nothing."""
    import shutil

    anchor = lab.folder / "writable-root.pem"
    shutil.copy(lab.ca_dir / "root.pem", anchor)
    anchor.chmod(0o664)
    svc = lab.variant("writable-anchor", f'[trust]\nanchors = ["{anchor}"]\n'
                      f'intermediates_dir = "{lab.folder / "intermediates"}"\n')  # fmt: skip
    a = login(lab, "alice", user="alice", service=svc)
    assert a.report.name == "PAM_AUTH_ERR" and a.audit == [], a.report
    anchor.chmod(0o644)
    assert login(lab, "alice", user="alice", service=svc).report.ok


def test_missing_card_module_is_not_a_success(lab: Lab) -> None:
    svc = lab.variant("nomodule", '[pkcs11]\nmodule = "/nonexistent/libpkcs11.so"\n')
    a = login(lab, "alice", user="alice", service=svc)
    refused(a, "PAM_AUTHINFO_UNAVAIL", "token_error")


# --- mutual authentication ------------------------------------------------------------------


def _mutual(lab: Lab, *, rogue: bool) -> str:
    cert, key = lab.host_credentials(rogue=rogue)
    return lab.variant(
        "mutual-rogue" if rogue else "mutual",
        f'[mutual]\nenabled = true\nhost_cert = "{cert}"\nhost_key = "{key}"\n',
    )


def test_mutual_authentication_shows_the_vouched_host_in_the_prompt(lab: Lab) -> None:
    a = login(lab, "alice", user="alice", service=_mutual(lab, rogue=False))
    assert a.report.ok, a.report
    assert a.report.prompts == (
        "[host lab-host, vouched for by your card] PIN for alice ID card: ",
    )
    assert "vouched for by card anchor CN=Demo Org Root CA" in a.record["detail"]


def test_mutual_authentication_refuses_to_ask_the_pin_on_an_unvouched_host(lab: Lab) -> None:
    a = login(lab, "alice", user="alice", service=_mutual(lab, rogue=True))
    refused(a, "PAM_AUTH_ERR", "host_not_vouched")
    assert a.report.prompts == ()


def test_the_default_p11_kit_proxy_finds_the_card_module(lab: Lab) -> None:
    # The shipped default: p11-kit's proxy loads every registered module (SoftHSM2's among
    # them), so the configuration need not name a card driver.
    from svmm_lab.lab import READER_ENV

    svc = lab.variant(
        "p11kit",
        '[pkcs11]\nmodule = "/usr/lib/x86_64-linux-gnu/p11-kit-proxy.so"\n'
        f"pass_environment = {json.dumps(list(READER_ENV))}\n",
    )
    a = login(lab, "bob", user="bob", service=svc)
    assert a.report.ok, a.report
    assert a.record["card"]["token"] == "bob ID card"


def test_the_callers_environment_never_chooses_the_configuration(lab: Lab) -> None:
    """su and sudo run the module as root with the caller's environment. A rule without
    config= reads the built-in default (/etc/svmm/svmm.toml), never $SVMM_CONFIG: a user's
    own TOML (their PKCS#11 module, their anchors) must not decide a root login. Here the
    default file is absent, so the login is refused, whatever the caller set."""
    from svmm_lab.lab import PAM_PYTHON, SHIM
    from svmm_lab.pamclient import build_client, run_client

    line = f"{PAM_PYTHON} {SHIM} venv={Path(sys.prefix)} daemon=off"
    (lab.pam_dir / "svmm-noconfig").write_text(
        f"auth required {line}\naccount required {line}\nsession required {line}\n"
    )
    if Path("/etc/svmm/svmm.toml").exists():
        pytest.skip("this machine has a real /etc/svmm/svmm.toml")
    hostile = dict(lab.insert("alice").env, SVMM_CONFIG=str(lab.config_path))
    report = run_client(build_client(lab.folder / "bin"), lab.pam_dir, "svmm-noconfig", "",
                        PIN, env=hostile)  # fmt: skip
    assert report.code != 0, report
    assert report.name == "PAM_AUTHINFO_UNAVAIL", report  # no user yet: could not decide


def _profile_controls() -> dict[str, str]:
    """The control field of each phase in the shipped pam-auth-update profile."""
    text = (Path(__file__).resolve().parents[2] / "config/pam-configs/svmm").read_text()
    controls: dict[str, str] = {}
    current = ""
    for line in text.splitlines():
        if line and not line.startswith(("\t", " ")):
            current = line.split(":", 1)[0]
        elif current in ("Auth", "Account", "Session") and line.strip():
            controls[current.lower()] = line.split("]", 1)[0].strip() + "]"
    return controls


@pytest.mark.parametrize(("user", "code"), [("root", "PAM_SUCCESS"), ("alice", "PAM_AUTH_ERR")])
def test_an_unedited_host_still_lets_root_in_and_no_directory_user(
    lab: Lab, user: str, code: str
) -> None:
    """The shipped profile's rules with the module's default configuration missing (a fresh
    install before the administrator edits it): root's password (pam_permit stands in for
    pam_unix after us) still works; a directory user is refused, never waved through."""
    from svmm_lab.lab import PAM_PYTHON, SHIM
    from svmm_lab.pamclient import build_client, run_client

    if Path("/etc/svmm/svmm.toml").exists():
        pytest.skip("this machine has a real /etc/svmm/svmm.toml")
    ctl = _profile_controls()
    module = f"{PAM_PYTHON} {SHIM} venv={Path(sys.prefix)} daemon=off"
    # As pam-auth-update writes common-auth: "end" becomes the jump past pam_unix's line
    # (pam_permit stands in for pam_unix accepting root's password), then deny and permit.
    auth = ctl["auth"].replace("success=end", "success=2")
    (lab.pam_dir / "svmm-unedited").write_text(
        f"auth {auth} {module}\nauth [success=1 default=ignore] pam_permit.so\n"
        "auth requisite pam_deny.so\nauth required pam_permit.so\n"
        f"account {ctl['account']} {module}\naccount required pam_permit.so\n"
    )
    report = run_client(build_client(lab.folder / "bin"), lab.pam_dir, "svmm-unedited", user,
                        "", env=lab.insert().env)  # fmt: skip
    assert report.name == code, report
    assert any("configuration is broken" in m for m in report.messages), report


def test_the_embedded_interpreter_ignores_the_callers_python_variables(
    lab: Lab, tmp_path: Path
) -> None:
    """pam_python runs Python inside su and sudo as root: PYTHONPATH, PYTHONSTARTUP or
    PYTHONHOME from the caller would run the caller's code as root. pam_python sets
    Py_IgnoreEnvironmentFlag; this holds it to that (invariant 9)."""
    evil = tmp_path / "evil"
    evil.mkdir()
    marker = evil / "ran-as-root"
    code = f"open({str(marker)!r}, 'w').write('x')\n"
    for name in ("sitecustomize.py", "usercustomize.py", "startup.py"):
        (evil / name).write_text(code)
    hostile = {"PYTHONPATH": str(evil), "PYTHONSTARTUP": str(evil / "startup.py"),
               "PYTHONUSERBASE": str(evil), "PYTHONINSPECT": "1"}  # fmt: skip
    import subprocess

    # The probe works: a plain /usr/bin/python3 with that environment runs the caller's code.
    subprocess.run(["/usr/bin/python3", "-c", "pass"], env=hostile, check=True, timeout=30)
    assert marker.exists()
    marker.unlink()
    reader = lab.insert("alice")
    reader = type(reader)(reader.folder, {**reader.env, **hostile})
    report = lab.login(reader, pin=PIN, user="alice")
    assert report.ok, report
    assert not marker.exists()


# --- `svmm card list` gives every certificate the verdict a login would ---------------------


def test_card_list_never_offers_a_revoked_card(lab: Lab) -> None:
    # Before, the listing asked no revocation and said a login "would use" mallory's card.
    p = card_list(lab, "mallory", "--user", "mallory")
    assert p.returncode == 1, p.stdout + p.stderr
    assert "not usable: certificate_revoked" in p.stdout
    assert "would use" not in p.stdout
    assert "a login would fail: certificate_revoked" in p.stdout


def test_card_list_shows_each_certificates_verdict(lab: Lab, tmp_path: Path) -> None:
    card = card_with(lab, "listcard")
    revoked, good = revoke_the_first(lab, card)
    crl_only(lab, tmp_path)  # a configuration asking fresh CRLs only (the one just published)
    p = card_list(lab, card, config=lab.folder / f"svmm-crl-{tmp_path.name}.toml")
    assert p.returncode == 0, p.stdout + p.stderr
    verdicts, shown = {}, ""  # sha256 prefix -> the verdict line under it
    for line in p.stdout.splitlines():
        if "sha256 " in line:
            shown = line.rsplit("sha256 ", 1)[1]
        elif line.startswith("    login: "):
            verdicts[shown] = line
    assert "not usable: certificate_revoked" in verdicts[fingerprint(revoked)[:16]], p.stdout
    assert "passes policy and revocation, maps to listcard" in verdicts[fingerprint(good)[:16]]
    auth_pem = (lab.cards_dir / card / "auth.pem").read_bytes()
    label = "auth" if auth_pem == good.public_bytes(serialization.Encoding.PEM) else "second"
    assert f"would use {label!r} on 'listcard ID card' for listcard" in p.stdout
