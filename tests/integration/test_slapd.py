"""The lab's slapd: TLS, schema, example data, memberOf, ACLs, pause and stop."""

from __future__ import annotations

import os
import socket
import ssl
import time
from pathlib import Path

import ldap3
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from ldap3.core.exceptions import (
    LDAPException,
    LDAPNoSuchObjectResult,
    LDAPSocketReceiveError,
    LDAPStartTLSError,
)
from ldap3.utils.conv import escape_bytes, escape_filter_chars

from svmm_lab.directory import EXAMPLE_LDIF, USER_PASSWORD, Slapd, generate_people, write_ldif
from svmm_lab.lab import Lab
from tests.integration import ldap_fixtures

pytestmark = pytest.mark.integration
slapd, fresh_slapd, slapd_factory = (
    ldap_fixtures.slapd,
    ldap_fixtures.fresh_slapd,
    ldap_fixtures.slapd_factory,
)

ROLES = "ou=roles,ou=groups,dc=demo,dc=example"


def connect(
    server: Slapd,
    *,
    user: str | None = None,
    password: str | None = None,
    ldaps: bool = False,
    ca_file: Path | None = None,
    receive_timeout: float = 5,
) -> ldap3.Connection:
    tls = ldap3.Tls(validate=ssl.CERT_REQUIRED, ca_certs_file=str(ca_file or server.ca_file))
    srv = ldap3.Server(
        server.ldaps_uri if ldaps else server.uri, tls=tls, get_info=ldap3.NONE, connect_timeout=2
    )
    conn = ldap3.Connection(
        srv, user=user, password=password, receive_timeout=receive_timeout, raise_exceptions=True
    )
    conn.open()
    if not ldaps:
        conn.start_tls()
    if user:
        conn.bind()
    return conn


def as_service(server: Slapd, **kw: object) -> ldap3.Connection:
    return connect(server, user=server.service_dn, password=server.service_password, **kw)  # type: ignore[arg-type]


def entry(conn: ldap3.Connection, dn: str, attrs: list[str]) -> dict[str, list[object]]:
    conn.search(dn, "(objectClass=*)", ldap3.BASE, attributes=attrs)
    assert len(conn.response) == 1
    return {k.lower(): v for k, v in conn.response[0]["raw_attributes"].items() if v}


# --- TLS ------------------------------------------------------------------------------------


@pytest.mark.parametrize("ldaps", [False, True], ids=["starttls", "ldaps"])
def test_tls_with_the_lab_ca(slapd: Slapd, lab: Lab, ldaps: bool) -> None:
    assert slapd.ca_file.read_bytes() == (lab.ca_dir / "root.pem").read_bytes()
    with as_service(slapd, ldaps=ldaps) as conn:
        assert conn.tls_started or ldaps
        peer = conn.socket.getpeercert(binary_form=True)
        cert = x509.load_der_x509_certificate(peer)
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert "localhost" in sans.get_values_for_type(x509.DNSName)
        assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
        assert conn.search(slapd.base_dn, "(uid=alice)", attributes=["uid"])


@pytest.mark.parametrize("ldaps", [False, True], ids=["starttls", "ldaps"])
def test_tls_with_a_wrong_ca_fails(slapd: Slapd, lab: Lab, tmp_path: Path, ldaps: bool) -> None:
    # Another organisation's CA with the very same names: only the keys differ.
    rogue_root = tmp_path / "rogue-root.pem"
    rogue_root.write_bytes(lab.rogue_ca.root.cert.public_bytes(serialization.Encoding.PEM))
    assert lab.rogue_ca.root.cert.subject == lab.ca.root.cert.subject
    with pytest.raises(LDAPException) as err:
        connect(slapd, ldaps=ldaps, ca_file=rogue_root)
    if not ldaps:
        assert isinstance(err.value, LDAPStartTLSError)
    assert "CERTIFICATE_VERIFY_FAILED" in str(err.value) or "certificate verify" in str(err.value)


def test_plain_ldap_without_starttls_gets_nothing_for_anonymous(slapd: Slapd) -> None:
    conn = ldap3.Connection(ldap3.Server(slapd.uri, get_info=ldap3.NONE), receive_timeout=5)
    conn.open()
    conn.search(slapd.base_dn, "(objectClass=*)", attributes=["*"])
    assert conn.entries == []
    conn.unbind()


# --- schema and data --------------------------------------------------------------------------


def test_product_schema_is_loaded(slapd: Slapd) -> None:
    with as_service(slapd) as conn:
        # svmmPrincipalName is caseIgnoreMatch
        conn.search(slapd.base_dn, "(svmmPrincipalName=ALICE@Demo.Example)", attributes=["uid"])
        assert [e["attributes"]["uid"] for e in conn.response] == [["alice"]]
        carol = entry(conn, slapd.user_dn("carol"), ["svmmCertMapping", "objectClass"])
        assert carol["svmmcertmapping"] == [
            b"X509:<I>CN=Demo Org Issuing CA 1,O=Demo Org,C=EU<S>CN=carol,O=Demo Org,C=EU"
        ]
        assert b"svmmUser" in carol["objectclass"]
        assert entry(conn, slapd.user_dn("dora"), ["svmmDisabled"])["svmmdisabled"] == [b"TRUE"]
        conn.search(slapd.base_dn, "(svmmDisabled=TRUE)", attributes=["uid"])
        assert [e["attributes"]["uid"] for e in conn.response] == [["dora"]]
        admins = entry(conn, f"cn=vm-admins,{ROLES}", ["svmmVmGrant", "objectClass"])
        assert b"svmmRoleGroup" in admins["objectclass"]
        assert b"vm-db:console,start,stop,config" in admins["svmmvmgrant"]
        conn.search(slapd.base_dn, "(objectClass=svmmPolicy)", attributes=["cn"])
        assert len(conn.response) == 1


def test_subschema_names_the_product_oids(slapd: Slapd) -> None:
    srv = ldap3.Server(slapd.uri, get_info=ldap3.SCHEMA)
    with ldap3.Connection(srv, auto_bind=True, receive_timeout=5) as conn:
        schema = conn.server.schema
        assert schema is not None
        arc = "2.25.74009480635607549551734685832537171584"
        for name in (
            "svmmRole",
            "svmmDisabled",
            "svmmVmGrant",
            "svmmPrincipalName",
            "svmmCertMapping",
            "svmmPolicyBundle",
        ):
            assert schema.attribute_types[name].oid.startswith(arc + ".1.")
        for name in ("svmmUser", "svmmRoleGroup", "svmmPolicy"):
            assert schema.object_classes[name].oid.startswith(arc + ".2.")


def test_example_people_and_special_cases(slapd: Slapd) -> None:
    with as_service(slapd) as conn:
        conn.search(f"ou=people,{slapd.base_dn}", "(objectClass=posixAccount)", attributes=["uid"])
        uids = {e["attributes"]["uid"][0] for e in conn.response}
        holders = {"alice", "bob", "carol", "dave", "eve", "mallory", "scl", "nyv", "noeku"}
        assert holders | {"renewed", "pad", "tries", "dora", "ezra", "lena", "paul"} <= uids
        alice = entry(conn, slapd.user_dn("alice"), ["uidNumber", "homeDirectory", "mail"])
        assert alice["uidnumber"] == [b"10001"]
        assert alice["homedirectory"] == [b"/home/alice"]
        conn.search(slapd.base_dn, "(mail=twin@demo.example)", attributes=["uid"])
        assert len(conn.response) == 2  # an ambiguous mapping
        assert entry(conn, slapd.user_dn("ezra"), ["shadowExpire"])["shadowexpire"] == [b"1"]
        lena = entry(conn, slapd.user_dn("lena"), ["pwdAccountLockedTime"])
        assert lena["pwdaccountlockedtime"] == [b"000001010000Z"]
        odd = entry(conn, slapd.user_dn("odd"), ["cn"])["cn"][0]
        assert isinstance(odd, bytes)
        assert set("*()\\") <= set(odd.decode())
        conn.search(
            f"ou=groups,{slapd.base_dn}",
            "(&(objectClass=posixGroup)(memberUid=dave))",
            attributes=["cn"],
        )
        assert {e["attributes"]["cn"][0] for e in conn.response} == {"svmm-users", "engineering"}


def test_memberof_and_nested_roles(slapd: Slapd) -> None:
    with as_service(slapd) as conn:

        def member_of(dn: str) -> set[str]:
            values = entry(conn, dn, ["memberOf"]).get("memberof", [])
            return {v.decode() for v in values}  # type: ignore[union-attr]

        assert member_of(slapd.user_dn("alice")) == {f"cn=vm-users,{ROLES}"}
        assert member_of(slapd.user_dn("carol")) == {
            f"cn=vm-users,{ROLES}",
            f"cn=vm-admins,{ROLES}",
        }
        assert f"cn=engineering-leads,{ROLES}" in member_of(slapd.user_dn("paul"))
        # the nested group is itself a member of vm-admins
        assert member_of(f"cn=engineering-leads,{ROLES}") == {f"cn=vm-admins,{ROLES}"}
        conn.search(slapd.base_dn, f"(memberOf=cn=vm-admins,{ROLES})", attributes=["cn"])
        assert {e["dn"] for e in conn.response} == {
            slapd.user_dn("carol"),
            f"cn=engineering-leads,{ROLES}",
        }


def test_memberof_overlay_runs_on_ldap_adds(fresh_slapd: Slapd) -> None:
    fresh_slapd.add_ldif(
        f"dn: cn=auditors,{ROLES}\nobjectClass: groupOfNames\ncn: auditors\n"
        f"member: {fresh_slapd.user_dn('bob')}\n"
    )
    with as_service(fresh_slapd) as conn:
        values = entry(conn, fresh_slapd.user_dn("bob"), ["memberOf"])["memberof"]
        assert f"cn=auditors,{ROLES}".encode() in values


def test_example_ldif_loads_with_ldapadd_like_slapadd(
    slapd_factory: ldap_fixtures.SlapdFactory, slapd: Slapd
) -> None:
    """The documented way (ldapadd through the overlays) gives what the lab's slapadd with
    precomputed memberOf gives."""
    empty = slapd_factory(data=())
    empty.add_ldif(EXAMPLE_LDIF.read_text())

    def snapshot(server: Slapd) -> dict[str, dict[str, set[bytes]]]:
        with as_service(server) as conn:
            conn.search(
                server.base_dn,
                "(objectClass=*)",
                attributes=["memberOf", "pwdAccountLockedTime", "svmmDisabled", "member"],
            )
            return {
                e["dn"]: {k.lower(): set(v) for k, v in e["raw_attributes"].items() if v}
                for e in conn.response
            }

    loaded = snapshot(empty)
    assert len(loaded) > 20
    assert loaded == snapshot(slapd)


def test_session_server_has_published_card_certificates(slapd: Slapd, lab: Lab) -> None:
    with as_service(slapd) as conn:
        alice = entry(conn, slapd.user_dn("alice"), ["userCertificate;binary"])
        der = lab.card_cert("alice").public_bytes(serialization.Encoding.DER)
        assert der in alice["usercertificate;binary"]
        assert "usercertificate;binary" not in entry(
            conn, slapd.user_dn("carol"), ["userCertificate;binary"]
        )


def test_certificate_exact_match_takes_serial_and_issuer_not_der(slapd: Slapd, lab: Lab) -> None:
    """OpenLDAP's certificateExactMatch asserts a GSER {serialNumber, issuer}: a filter with
    the whole DER matches nothing (unlike AD), the serial and issuer form finds the entry."""
    cert = lab.card_cert("alice")
    der = cert.public_bytes(serialization.Encoding.DER)
    gser = (
        f"{{ serialNumber {cert.serial_number}, "
        f'issuer rdnSequence:"{cert.issuer.rfc4514_string()}" }}'
    )
    with as_service(slapd) as conn:
        conn.search(slapd.base_dn, f"(userCertificate;binary={escape_bytes(der)})")
        assert conn.response == []
        conn.search(slapd.base_dn, f"(userCertificate;binary={escape_filter_chars(gser)})")
        assert [e["dn"] for e in conn.response] == [slapd.user_dn("alice")]


# --- access control ---------------------------------------------------------------------------


def test_service_account_reads_but_never_passwords_and_cannot_write(slapd: Slapd, lab: Lab) -> None:
    der = lab.card_cert("carol").public_bytes(serialization.Encoding.DER)
    with as_service(slapd) as conn:
        alice = entry(conn, slapd.user_dn("alice"), ["*"])
        assert "uid" in alice
        assert "userpassword" not in alice
        conn.search(slapd.base_dn, "(userPassword=*)", attributes=["uid"])
        assert conn.response == []
        for change in (
            {"mail": [(ldap3.MODIFY_REPLACE, ["x@demo.example"])]},
            {"userCertificate;binary": [(ldap3.MODIFY_ADD, [der])]},
        ):
            with pytest.raises(LDAPException, match="insufficientAccessRights"):
                conn.modify(slapd.user_dn("alice"), change)


def test_publisher_writes_certificates_only(fresh_slapd: Slapd, lab: Lab) -> None:
    s = fresh_slapd
    blob = lab.card_cert("carol").public_bytes(serialization.Encoding.DER)
    with connect(s, user=s.publisher_dn, password=s.publisher_password) as conn:
        conn.modify(s.user_dn("carol"), {"userCertificate;binary": [(ldap3.MODIFY_ADD, [blob])]})
        assert entry(conn, s.user_dn("carol"), ["userCertificate;binary"])[
            "usercertificate;binary"
        ] == [blob]
        with pytest.raises(LDAPException, match="insufficientAccessRights"):
            conn.modify(s.user_dn("carol"), {"mail": [(ldap3.MODIFY_REPLACE, ["x@x"])]})
        with pytest.raises(LDAPException, match="insufficientAccessRights"):
            conn.modify(s.service_dn, {"userCertificate;binary": [(ldap3.MODIFY_ADD, [blob])]})


def test_user_binds_and_ppolicy_lock(slapd: Slapd) -> None:
    with connect(slapd, user=slapd.user_dn("alice"), password=USER_PASSWORD) as conn:
        assert conn.bound
        # a user reads their own entry, not other people's
        assert "uid" in entry(conn, slapd.user_dn("alice"), ["uid"])
        with pytest.raises(LDAPNoSuchObjectResult):
            conn.search(slapd.user_dn("bob"), "(objectClass=*)", ldap3.BASE)
    for user, password in (("alice", "wrong"), ("lena", USER_PASSWORD), ("bob", USER_PASSWORD)):
        with pytest.raises(LDAPException, match="invalidCredentials"):
            connect(slapd, user=slapd.user_dn(user), password=password)


def test_password_files_are_private(slapd: Slapd, tmp_path: Path) -> None:
    path = slapd.write_password_file(tmp_path / "svc.secret")
    assert path.read_text() == slapd.service_password
    assert path.stat().st_mode & 0o777 == 0o600
    assert slapd.write_password_file(tmp_path / "adm", "admin").read_text() == (
        slapd.admin_password
    )
    with connect(slapd, user=slapd.admin_dn, password=slapd.admin_password) as conn:
        assert "userpassword" in entry(conn, slapd.user_dn("alice"), ["userPassword"])


# --- failures ---------------------------------------------------------------------------------


def test_paused_server_times_out_then_resumes(fresh_slapd: Slapd) -> None:
    conn = as_service(fresh_slapd, receive_timeout=1)
    fresh_slapd.pause()
    t0 = time.monotonic()
    with pytest.raises(LDAPSocketReceiveError):
        conn.search(fresh_slapd.base_dn, "(uid=alice)")
    assert 0.9 < time.monotonic() - t0 < 3
    fresh_slapd.resume()
    with as_service(fresh_slapd) as conn2:
        assert conn2.search(fresh_slapd.base_dn, "(uid=alice)")


def test_stop_leaves_no_process_and_restart_keeps_data(fresh_slapd: Slapd) -> None:
    s = fresh_slapd
    pid = s.pid
    assert pid is not None and s.running
    s.add_ldif(
        f"dn: {s.user_dn('bob')}\nchangetype: modify\nreplace: loginShell\nloginShell: /bin/sh\n"
    )
    s.pause()  # a paused server still stops
    s.stop()
    assert not s.running
    assert not Path(f"/proc/{pid}").exists()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", s.port), timeout=1).close()
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)
    s.start()
    with as_service(s) as conn:
        assert entry(conn, s.user_dn("bob"), ["loginShell"])["loginshell"] == [b"/bin/sh"]


def test_bulk_people_load(slapd_factory: ldap_fixtures.SlapdFactory, tmp_path: Path) -> None:
    bulk = write_ldif(tmp_path / "bulk.ldif", generate_people(250, team_size=50, roles=3))
    s = slapd_factory(data=[EXAMPLE_LDIF, bulk])
    with as_service(s) as conn:
        conn.search(s.base_dn, "(uid=user*)", attributes=["uid"], paged_size=100)
        assert len(conn.response) == 100
        found = conn.extend.standard.paged_search(
            s.base_dn, "(uid=user*)", attributes=["uid"], paged_size=100, generator=False
        )
        assert len(found) == 250
        u = entry(conn, s.user_dn("user000123"), ["memberOf", "gidNumber"])
        assert u["memberof"] == [f"cn=squad-2,{ROLES}".encode()]
        assert entry(conn, f"cn=squad-2,{ROLES}", ["memberOf"])["memberof"] == [
            f"cn=role-2,{ROLES}".encode()
        ]
        conn.search(s.base_dn, "(memberUid=user000123)", attributes=["gidNumber"])
        assert conn.response[0]["raw_attributes"]["gidNumber"] == u["gidnumber"]
