"""The directory adapter and the certificate mapper against a real slapd."""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from pam_svmm import config as config_mod
from pam_svmm.adapters.directory import DirectoryClient, read_secret_file
from pam_svmm.adapters.identity_cache import IdentityCache
from pam_svmm.domain.identity import AccountStatus
from pam_svmm.errors import (
    AccountDisabled,
    AccountExpired,
    AmbiguousUser,
    ConfigError,
    DirectoryUnavailable,
    PasswordIncorrect,
    UnknownUser,
)
from pam_svmm.services.identity import DirectoryMapper, require_active
from svmm_lab.directory import Slapd
from svmm_lab.lab import Lab
from svmm_lab.pki import LabCA, new_key
from tests.integration.ldap_fixtures import (  # noqa: F401 - pytest fixtures
    fresh_slapd,
    slapd,
    slapd_factory,
)

pytestmark = pytest.mark.integration

UID = NameOID.USER_ID
ROLES = "ou=roles,ou=groups,dc=demo,dc=example"
RULES: list[dict[str, Any]] = [
    {
        "name": "whole-cert",
        "priority": 1,
        "map": "(userCertificate;binary={cert_exact})",
        "match": {"subject": "OU=by-cert"},
    },
    {
        "name": "cert-mapping",
        "priority": 2,
        "map": "(svmmCertMapping=X509:<I>{issuer}<S>{subject})",
        "match": {"subject": "OU=by-subject"},
    },
    {
        "name": "issuer-serial",
        "priority": 3,
        "map": "(svmmCertMapping=X509:<I>{issuer}<SR>{serial})",
        "match": {"subject": "OU=by-serial"},
    },
    {
        "name": "subject-uid",
        "priority": 4,
        "map": "(uid={subject_attr:0.9.2342.19200300.100.1.1})",
        "match": {"subject": "UID="},
    },
    {"name": "by-cn", "priority": 5, "map": "(cn={cn})", "match": {"subject": "OU=by-cn"}},
    {"name": "upn", "priority": 10, "map": "(svmmPrincipalName={upn})", "match": {"san": ["upn"]}},
    {"name": "email", "priority": 20, "map": "(mail={email})", "match": {"san": ["email"]}},
]


def make_config(server_uris: list[str], ca_file: Path, tmp: Path, **directory: Any):
    d: dict[str, Any] = {
        "enabled": True,
        "uris": server_uris,
        "base_dn": "dc=demo,dc=example",
        "users_base": "ou=people,dc=demo,dc=example",
        "groups_base": "ou=groups,dc=demo,dc=example",
        "role_groups_base": ROLES,
        "bind_dn": "cn=svmm,ou=services,dc=demo,dc=example",
        "bind_password_file": str(tmp / "unused"),
        "ca_file": str(ca_file),
        "connect_timeout": 1.0,
        "search_timeout": 2.0,
        "cache_dir": str(tmp / "cache"),
        "cache_max_age": 3600,
    }
    d.update(directory)
    return config_mod.parse({"directory": d, "certmap": {"rules": RULES}})


class Clock:
    def __init__(self) -> None:
        self.t = dt.datetime.now(dt.UTC)

    def __call__(self) -> dt.datetime:
        return self.t


def build(server: Slapd | list[Slapd], tmp: Path, *, uris: list[str] | None = None, **kw: Any):
    servers = server if isinstance(server, list) else [server]
    cfg = make_config(uris or [s.uri for s in servers], servers[0].ca_file, tmp, **kw)
    client = DirectoryClient(cfg.directory, bind_password=servers[0].service_password)
    cache = IdentityCache(cfg.directory.cache_dir, cfg.directory.cache_max_age)
    clock = Clock()
    return DirectoryMapper(cfg, client, cache, now=clock), client, clock


@pytest.fixture
def mapper(slapd: Slapd, tmp_path: Path) -> DirectoryMapper:  # noqa: F811
    m, client, _ = build(slapd, tmp_path)
    yield m
    client.close()


@pytest.fixture
def issue(lab: Lab) -> Callable[..., x509.Certificate]:
    key = new_key("p256")

    def make(cn: str, *, ou: str | None = None, uid: str | None = None, **kw: Any):
        extra = [x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, ou)] if ou else []
        if uid is not None:
            extra.append(x509.NameAttribute(UID, uid))
        return lab.ca.issue_user(cn, key.public_key(), extra_subject=extra, **kw)

    return make


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(Encoding.DER)


# --- mapping by each rule kind ------------------------------------------------------------------


def test_whole_certificate_in_user_certificate(
    mapper: DirectoryMapper,
    slapd: Slapd,  # noqa: F811
    issue: Callable[..., x509.Certificate],
) -> None:
    cert = issue("eve", ou="by-cert")
    with pytest.raises(UnknownUser):  # not published yet
        mapper.map(cert)
    DirectoryClient.publish_certificate(
        mapper.client,  # type: ignore[arg-type]
        slapd.user_dn("eve"),
        der(cert),
        bind_dn=slapd.publisher_dn,
        password=slapd.publisher_password,
    )
    got = mapper.map(cert)
    assert (got.username, got.rule) == ("eve", "whole-cert")
    assert got.identity is not None and der(cert) in got.identity.certificates
    assert got.source_value.startswith("(userCertificate;binary={ serialNumber ")


def test_whole_certificate_rule_checks_the_der_not_only_issuer_and_serial(
    mapper: DirectoryMapper,
    slapd: Slapd,  # noqa: F811
    lab: Lab,
    issue: Callable[..., x509.Certificate],
) -> None:
    import datetime as _dt

    from cryptography.hazmat.primitives import hashes

    published = issue("eve", ou="by-cert")
    mapper.client.publish_certificate(  # type: ignore[attr-defined]
        slapd.user_dn("eve"),
        der(published),
        bind_dn=slapd.publisher_dn,
        password=slapd.publisher_password,
    )
    # Another certificate with the same issuer and serial (a CA mis-issuing): the server's
    # certificateExactMatch finds eve, the DER comparison refuses.
    now = _dt.datetime.now(_dt.UTC)
    twin = (
        x509.CertificateBuilder()
        .subject_name(published.subject)
        .issuer_name(published.issuer)
        .public_key(new_key("p256").public_key())
        .serial_number(published.serial_number)
        .not_valid_before(now - _dt.timedelta(minutes=1))
        .not_valid_after(now + _dt.timedelta(days=1))
        .sign(lab.ca.intermediate.key, hashes.SHA256())
    )
    with pytest.raises(UnknownUser) as e:
        mapper.map(twin)
    assert e.value.reason == "certificate_not_in_entry"
    assert mapper.map(published).username == "eve"


def test_subject_via_svmm_cert_mapping(
    mapper: DirectoryMapper,
    slapd: Slapd,  # noqa: F811
    issue: Callable[..., x509.Certificate],
) -> None:
    cert = issue("mallory", ou="by-subject")
    value = f"X509:<I>{cert.issuer.rfc4514_string()}<S>{cert.subject.rfc4514_string()}"
    slapd.add_ldif(
        f"dn: {slapd.user_dn('mallory')}\nchangetype: modify\nadd: svmmCertMapping\n"
        f"svmmCertMapping: {value}\n-\n"
    )
    got = mapper.map(cert)
    assert (got.username, got.rule) == ("mallory", "cert-mapping")


def test_carol_example_mapping_matches_a_lab_certificate(
    slapd: Slapd,  # noqa: F811
    tmp_path: Path,
    issue: Callable[..., x509.Certificate],
) -> None:
    # The example LDIF's svmmCertMapping for carol is what a lab certificate renders to.
    cert = issue("carol")
    m, client, _ = build(slapd, tmp_path)
    rule = next(r for r in m.rules if r.name == "cert-mapping")
    from pam_svmm.domain.certmap import render_filter

    assert client.search_users(render_filter(rule, cert)) == [slapd.user_dn("carol")]


def test_issuer_and_serial(
    mapper: DirectoryMapper,
    slapd: Slapd,  # noqa: F811
    issue: Callable[..., x509.Certificate],
) -> None:
    cert = issue("someone", ou="by-serial")
    from pam_svmm.domain.certmap import _serial_hex

    slapd.add_ldif(
        f"dn: {slapd.user_dn('scl')}\nchangetype: modify\nadd: svmmCertMapping\n"
        f"svmmCertMapping: X509:<I>{cert.issuer.rfc4514_string()}<SR>{_serial_hex(cert)}\n-\n"
    )
    got = mapper.map(cert)
    assert (got.username, got.rule) == ("scl", "issuer-serial")
    other = issue("someone", ou="by-serial")  # same names, another serial
    with pytest.raises(UnknownUser):
        mapper.map(other)


def test_upn_via_svmm_principal_name(
    mapper: DirectoryMapper, issue: Callable[..., x509.Certificate]
) -> None:
    got = mapper.map(issue("Dave D.", upn="dave@demo.example"))
    assert (got.username, got.rule) == ("dave", "upn")
    assert got.identity is not None and got.identity.source == "directory"
    assert got.source_value == "(svmmPrincipalName=dave@demo.example)"


def test_email_via_mail(mapper: DirectoryMapper, issue: Callable[..., x509.Certificate]) -> None:
    got = mapper.map(issue("x", email="nyv@demo.example"))
    assert (got.username, got.rule) == ("nyv", "email")


def test_subject_attribute(mapper: DirectoryMapper, issue: Callable[..., x509.Certificate]) -> None:
    got = mapper.map(issue("Robert", uid="bob"))
    assert (got.username, got.rule) == ("bob", "subject-uid")


def test_first_matching_rule_decides_even_when_a_later_one_would_find_someone(
    mapper: DirectoryMapper, issue: Callable[..., x509.Certificate]
) -> None:
    # The UPN rule matches and finds nobody; the e-mail rule would find alice: not asked.
    with pytest.raises(UnknownUser):
        mapper.map(issue("x", upn="ghost@demo.example", email="alice@demo.example"))


# --- refusals ---------------------------------------------------------------------------------


def test_ambiguous_mapping_is_refused(
    mapper: DirectoryMapper, issue: Callable[..., x509.Certificate]
) -> None:
    with pytest.raises(AmbiguousUser) as e:
        mapper.map(issue("twin", email="twin@demo.example"))
    assert e.value.reason == "mapping_ambiguous"
    assert "twin-a" in e.value.message and "twin-b" in e.value.message


def test_unknown_certificate(
    mapper: DirectoryMapper, issue: Callable[..., x509.Certificate]
) -> None:
    with pytest.raises(UnknownUser) as e:
        mapper.map(issue("nobody", upn="nobody@demo.example"))
    assert e.value.reason == "unknown_user"
    with pytest.raises(UnknownUser) as e:
        mapper.map(issue("no rule matches me"))
    assert e.value.reason == "no_matching_rule"


@pytest.mark.parametrize(
    "cn", ["*", "odd *()\\ nam*", "x)(uid=alice", "*)(|(cn=*", "al\\2aice", "a\x00*"]
)
def test_injection_characters_find_nobody(
    mapper: DirectoryMapper, issue: Callable[..., x509.Certificate], cn: str
) -> None:
    # Unescaped, "*" would match every person (ambiguous) and "x)(uid=alice" would be alice.
    with pytest.raises(UnknownUser) as e:
        mapper.map(issue(cn, ou="by-cn"))
    assert e.value.reason == "unknown_user"


def test_injection_characters_match_exactly_the_entry_holding_them(
    mapper: DirectoryMapper, issue: Callable[..., x509.Certificate]
) -> None:
    got = mapper.map(issue("odd *()\\ name", ou="by-cn"))
    assert got.username == "odd"


# --- roles and account state ------------------------------------------------------------------


def test_roles_through_nested_groups(mapper: DirectoryMapper, slapd: Slapd) -> None:  # noqa: F811
    client: DirectoryClient = mapper.client  # type: ignore[assignment]
    paul = client.identity(slapd.user_dn("paul"))
    assert {"vm-users", "engineering-leads", "vm-admins"} <= set(paul.roles)
    carol = client.identity(slapd.user_dn("carol"))
    assert "vm-admins" in carol.roles and "engineering-leads" not in carol.roles
    alice = client.identity(slapd.user_dn("alice"))
    assert set(alice.roles) == {"vm-users", "auditor"}  # auditor: svmmRole on the entry
    assert [g.name for g in alice.groups] == ["svmm-users", "engineering"]
    assert alice.account.uid == 10001 and alice.account.home == "/home/alice"


def test_one_search_finds_and_reads_the_entry(mapper: DirectoryMapper, slapd: Slapd) -> None:  # noqa: F811
    """identity_for (what a login uses): the same identity as search + read, in one search;
    several entries or none give no identity."""
    client: DirectoryClient = mapper.client  # type: ignore[assignment]
    now = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    dns, alice = client.identity_for("(uid=alice)", now=now)
    assert dns == [slapd.user_dn("alice")]
    assert alice == client.identity(slapd.user_dn("alice"), now=now)
    dns, nobody = client.identity_for("(|(uid=alice)(uid=bob))", now=now)
    assert dns == sorted([slapd.user_dn("alice"), slapd.user_dn("bob")]) and nobody is None
    assert client.identity_for("(uid=no-such-user)", now=now) == ([], None)


def test_nested_depth_bounds_the_walk(slapd: Slapd, tmp_path: Path) -> None:  # noqa: F811
    _, client, _ = build(slapd, tmp_path, nested_depth=0)
    assert "vm-admins" not in client.identity(slapd.user_dn("paul")).roles


def test_nested_cycle_terminates(slapd_factory: Callable[..., Slapd], tmp_path: Path) -> None:  # noqa: F811
    data = tmp_path / "cycle.ldif"
    data.write_text(
        f"dn: cn=loop-a,{ROLES}\nobjectClass: groupOfNames\ncn: loop-a\n"
        f"member: uid=bob,ou=people,dc=demo,dc=example\nmember: cn=loop-b,{ROLES}\n\n"
        f"dn: cn=loop-b,{ROLES}\nobjectClass: groupOfNames\ncn: loop-b\nmember: cn=loop-a,{ROLES}\n"
    )
    from svmm_lab.directory import EXAMPLE_LDIF

    server = slapd_factory(data=[EXAMPLE_LDIF, data])
    _, client, _ = build(server, tmp_path, nested_depth=10)
    roles = client.identity(server.user_dn("bob")).roles
    assert {"loop-a", "loop-b", "vm-users"} <= set(roles)


def test_roles_by_member_uid_and_member_of(
    slapd_factory: Callable[..., Slapd],  # noqa: F811
    tmp_path: Path,
) -> None:
    from svmm_lab.directory import EXAMPLE_LDIF

    data = tmp_path / "extra.ldif"
    data.write_text(
        # A posixGroup role (memberUid) and a role only the entry's memberOf names.
        f"dn: cn=operators,{ROLES}\nobjectClass: posixGroup\ncn: operators\ngidNumber: 20001\n"
        f"memberUid: eve\n\n"
        f"dn: cn=via-memberof,{ROLES}\nobjectClass: groupOfNames\ncn: via-memberof\n"
        f"member: cn=placeholder\n\n"
        f"dn: uid=mo,ou=people,dc=demo,dc=example\nobjectClass: inetOrgPerson\n"
        f"objectClass: posixAccount\nuid: mo\ncn: mo\nsn: mo\nuidNumber: 10100\n"
        f"gidNumber: 10000\nhomeDirectory: /home/mo\nmemberOf: cn=via-memberof,{ROLES}\n"
    )
    server = slapd_factory(data=[EXAMPLE_LDIF, data])
    _, client, _ = build(server, tmp_path)
    assert "operators" in client.identity(server.user_dn("eve")).roles
    assert client.identity(server.user_dn("mo")).roles == ("via-memberof",)


@pytest.mark.parametrize(
    ("uid", "status", "error"),
    [
        ("dora", AccountStatus.DISABLED, AccountDisabled),
        ("lena", AccountStatus.DISABLED, AccountDisabled),
        ("ezra", AccountStatus.EXPIRED, AccountExpired),
    ],
)
def test_disabled_expired_locked_accounts(
    mapper: DirectoryMapper,
    issue: Callable[..., x509.Certificate],
    uid: str,
    status: AccountStatus,
    error: type[Exception],
) -> None:
    got = mapper.map(issue(uid, upn=f"{uid}@demo.example"))  # mapping still names them
    assert got.identity is not None and got.identity.state.status is status
    with pytest.raises(error) as e:
        require_active(got.identity)
    assert got.identity.state.reason in str(e.value)
    bob = mapper.map(issue("bob", upn="bob@demo.example")).identity
    assert bob is not None
    require_active(bob)


def test_shadow_expire_in_the_future_is_active(mapper: DirectoryMapper, slapd: Slapd) -> None:  # noqa: F811
    client: DirectoryClient = mapper.client  # type: ignore[assignment]
    ezra = client.identity(slapd.user_dn("ezra"), now=dt.datetime(1970, 1, 1, 12, tzinfo=dt.UTC))
    assert ezra.state.active


# --- certificates in the entry ------------------------------------------------------------------


def test_require_certificate_in_entry(
    slapd: Slapd,  # noqa: F811
    lab: Lab,
    tmp_path: Path,
    issue: Callable[..., x509.Certificate],
) -> None:
    m, _, _ = build(slapd, tmp_path, require_certificate_in_entry=True)
    alice_card = lab.card_cert("alice")  # published to alice's entry by the fixture
    assert alice_card.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "alice"
    got = m.map(alice_card)
    assert got.username == "alice"
    with pytest.raises(UnknownUser) as e:
        m.map(issue("alice", upn="alice@demo.example"))  # right name, not her certificate
    assert e.value.reason == "certificate_not_in_entry"


# --- binds --------------------------------------------------------------------------------------


def test_bind_as_right_and_wrong_password(mapper: DirectoryMapper, slapd: Slapd) -> None:  # noqa: F811
    client: DirectoryClient = mapper.client  # type: ignore[assignment]
    client.bind_as(slapd.user_dn("alice"), "demo-password")
    with pytest.raises(PasswordIncorrect):
        client.bind_as(slapd.user_dn("alice"), "wrong")
    with pytest.raises(PasswordIncorrect):
        client.bind_as(slapd.user_dn("alice"), "")  # never an unauthenticated bind
    with pytest.raises(PasswordIncorrect):
        client.bind_as(slapd.user_dn("lena"), "demo-password")  # locked by ppolicy


def test_enumeration_is_paged(mapper: DirectoryMapper) -> None:
    client: DirectoryClient = mapper.client  # type: ignore[assignment]
    names = {a.name for a in client.accounts()}
    assert {"alice", "paul", "twin-a", "odd"} <= names
    groups = {g.name: g for g in client.groups()}
    assert "alice" in groups["engineering"].members
    import pam_svmm.adapters.directory as d

    old, d.PAGE_SIZE = d.PAGE_SIZE, 3  # several pages for the same answer
    try:
        assert {a.name for a in client.accounts()} == names
    finally:
        d.PAGE_SIZE = old


def test_user_by_name(mapper: DirectoryMapper) -> None:
    client: DirectoryClient = mapper.client  # type: ignore[assignment]
    bob = client.user_by_name("bob")
    assert bob is not None and bob.account.uid == 10002
    assert client.user_by_name("nobody") is None
    assert client.user_by_name("*") is None


# --- reliability --------------------------------------------------------------------------------


def test_calls_on_other_threads_reuse_one_service_connection(
    slapd: Slapd,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """svmmd hands each login to any of its workers: a connection per thread cost most
    logins a TLS handshake and a bind. One call at a time, on eight threads: one connection;
    two calls at once: two, both kept for the next calls."""
    import threading

    _, client, _ = build(slapd, tmp_path)
    opened: list[int] = []
    real_open = DirectoryClient._open

    def counting_open(self: DirectoryClient, *args: Any, **kw: Any) -> Any:
        opened.append(threading.get_ident())
        return real_open(self, *args, **kw)

    monkeypatch.setattr(DirectoryClient, "_open", counting_open)
    try:
        for _ in range(8):
            t = threading.Thread(target=client.search_users, args=("(uid=alice)",))
            t.start()
            t.join(10)
        assert len(opened) == 1 and client.server_in_use == slapd.uri

        gate = threading.Barrier(2)
        real_search = DirectoryClient._search

        def meeting_search(self: DirectoryClient, *args: Any, **kw: Any) -> Any:
            gate.wait(5)  # both calls hold a connection at once
            return real_search(self, *args, **kw)

        monkeypatch.setattr(DirectoryClient, "_search", meeting_search)
        both = [threading.Thread(target=client.search_users, args=("(uid=bob)",)) for _ in "ab"]
        for t in both:
            t.start()
        for t in both:
            t.join(10)
        assert len(opened) == 2
        monkeypatch.setattr(DirectoryClient, "_search", real_search)
        assert client.search_users("(uid=bob)") == [slapd.user_dn("bob")] and len(opened) == 2
    finally:
        client.close()
    assert client.server_in_use is None


def test_failover_first_uri_dead(fresh_slapd: Slapd, tmp_path: Path) -> None:  # noqa: F811
    from svmm_lab.lab import free_ports

    (dead,) = free_ports(1)
    _, client, _ = build(fresh_slapd, tmp_path, uris=[f"ldap://127.0.0.1:{dead}", fresh_slapd.uri])
    assert client.search_users("(uid=alice)") == [fresh_slapd.user_dn("alice")]


def test_ldaps_uri(fresh_slapd: Slapd, tmp_path: Path) -> None:  # noqa: F811
    _, client, _ = build(fresh_slapd, tmp_path, uris=[fresh_slapd.ldaps_uri])
    assert client.search_users("(uid=bob)") == [fresh_slapd.user_dn("bob")]
    client.bind_as(fresh_slapd.user_dn("alice"), "demo-password")


def test_stopped_mid_run_failover_then_offline_cache_then_expiry(
    slapd_factory: Callable[..., Slapd],  # noqa: F811
    tmp_path: Path,
    issue: Callable[..., x509.Certificate],
) -> None:
    a, b = slapd_factory(), slapd_factory()
    m, client, clock = build([a, b], tmp_path, cache_max_age=600)
    cert = issue("dave", upn="dave@demo.example")
    assert m.map(cert).identity.source == "directory"  # type: ignore[union-attr]
    a.stop()  # the connection in use dies: the next server answers
    got = m.map(cert)
    assert got.identity is not None and got.identity.source == "directory"
    b.stop()
    clock.t += dt.timedelta(seconds=300)
    offline = m.map(cert)
    assert offline.username == "dave" and offline.rule == "offline-cache"
    assert offline.identity is not None and offline.identity.source == "offline-cache"
    assert "vm-admins" in offline.identity.roles
    # A certificate never mapped while the directory was up has no offline entry.
    with pytest.raises(DirectoryUnavailable):
        m.map(issue("paul", upn="paul@demo.example"))
    clock.t += dt.timedelta(seconds=301)  # the cache entry is now older than max_age
    with pytest.raises(DirectoryUnavailable) as e:
        m.map(cert)
    assert a.uri in e.value.message and b.uri in e.value.message
    # the stale entries were deleted (the sweep marker is housekeeping)
    assert [p.name for p in (tmp_path / "cache").iterdir()] in ([], [".swept"])
    client.close()


def test_slow_directory_times_out(
    fresh_slapd: Slapd,  # noqa: F811
    tmp_path: Path,
    issue: Callable[..., x509.Certificate],
) -> None:
    m, client, _ = build(fresh_slapd, tmp_path, search_timeout=1.0, cache_max_age=0)
    cert = issue("bob", upn="bob@demo.example")
    m.map(cert)
    fresh_slapd.pause()
    try:
        t0 = time.monotonic()
        with pytest.raises(DirectoryUnavailable) as e:
            m.map(cert)
        assert time.monotonic() - t0 < 4.0
        assert "timed out" in e.value.message and fresh_slapd.uri in e.value.message
        # A fresh client (no open connection) is bounded too: StartTLS gets no answer.
        _, fresh, _ = build(fresh_slapd, tmp_path, search_timeout=1.0)
        t0 = time.monotonic()
        with pytest.raises(DirectoryUnavailable):
            fresh.search_users("(uid=bob)")
        assert time.monotonic() - t0 < 4.0
    finally:
        fresh_slapd.resume()
    client.close()


def test_hung_first_server_fails_over_to_the_second(
    slapd_factory: Callable[..., Slapd],  # noqa: F811
    tmp_path: Path,
) -> None:
    a, b = slapd_factory(), slapd_factory()
    _, client, _ = build([a, b], tmp_path, search_timeout=1.0)
    a.pause()
    try:
        assert client.search_users("(uid=eve)") == [b.user_dn("eve")]
    finally:
        a.resume()


@pytest.mark.parametrize("scheme", ["starttls", "ldaps"])
def test_tls_with_a_wrong_ca(fresh_slapd: Slapd, tmp_path: Path, scheme: str) -> None:  # noqa: F811
    other = LabCA.create(
        tmp_path / "other-ca", crl_base="http://127.0.0.1:9/", ocsp_url="http://127.0.0.1:9/"
    )
    uri = fresh_slapd.uri if scheme == "starttls" else fresh_slapd.ldaps_uri
    cfg = make_config([uri], other.folder / "root.pem", tmp_path)
    client = DirectoryClient(cfg.directory, bind_password=fresh_slapd.service_password)
    with pytest.raises(DirectoryUnavailable) as e:
        client.search_users("(uid=alice)")
    assert uri in e.value.message
    with pytest.raises(DirectoryUnavailable):
        client.bind_as(fresh_slapd.user_dn("alice"), "demo-password")


def test_wrong_service_password_is_reported(fresh_slapd: Slapd, tmp_path: Path) -> None:  # noqa: F811
    cfg = make_config([fresh_slapd.uri], fresh_slapd.ca_file, tmp_path)
    client = DirectoryClient(cfg.directory, bind_password="not-it")
    with pytest.raises(DirectoryUnavailable) as e:
        client.search_users("(uid=alice)")
    assert e.value.reason == "directory_bind_failed" and "cn=svmm" in e.value.message


def test_service_password_from_a_root_only_file(fresh_slapd: Slapd, tmp_path: Path) -> None:  # noqa: F811
    pw = fresh_slapd.write_password_file(tmp_path / "svc.pw")
    assert read_secret_file(pw) == fresh_slapd.service_password
    cfg = make_config([fresh_slapd.uri], fresh_slapd.ca_file, tmp_path, bind_password_file=str(pw))
    client = DirectoryClient.from_config(cfg.directory)
    assert client.search_users("(uid=alice)") == [fresh_slapd.user_dn("alice")]
    pw.chmod(0o640)
    with pytest.raises(ConfigError, match=str(pw)):
        DirectoryClient.from_config(cfg.directory)


# --- explain (svmm cert map) --------------------------------------------------------------------


def test_explain_lists_every_rule(
    mapper: DirectoryMapper, issue: Callable[..., x509.Certificate]
) -> None:
    traces, identity = mapper.explain(
        issue("x", upn="paul@demo.example", email="twin@demo.example")
    )
    by_rule = {t.rule: t for t in traces}
    assert [t.rule for t in traces] == [r["name"] for r in RULES]
    assert by_rule["whole-cert"].ldap_filter == ""
    assert by_rule["upn"].entries == ("uid=paul,ou=people,dc=demo,dc=example",)
    assert len(by_rule["email"].entries) == 2
    assert identity is not None and identity.name == "paul"


def test_svmm_cert_map_command(
    slapd: Slapd,  # noqa: F811
    tmp_path: Path,
    issue: Callable[..., x509.Certificate],
) -> None:
    import json
    import subprocess
    import sys

    pw = slapd.write_password_file(tmp_path / "svc.pw")
    rules = "\n".join(
        "[[certmap.rules]]\n"
        + "\n".join(f"{k} = {json.dumps(v)}" for k, v in r.items() if k != "match")
        + (
            "\n[certmap.rules.match]\n"
            + "\n".join(f"{k} = {json.dumps(v)}" for k, v in r["match"].items())
        )
        for r in RULES
    )
    cfg = tmp_path / "svmm.toml"
    cfg.write_text(
        f"""[directory]
enabled = true
uris = ["{slapd.uri}"]
base_dn = "dc=demo,dc=example"
users_base = "ou=people,dc=demo,dc=example"
role_groups_base = "{ROLES}"
bind_dn = "{slapd.service_dn}"
bind_password_file = "{pw}"
ca_file = "{slapd.ca_file}"
cache_dir = "{tmp_path / "cache"}"

{rules}
"""
    )

    def run(cert: x509.Certificate) -> subprocess.CompletedProcess[str]:
        path = tmp_path / "c.pem"
        path.write_bytes(cert.public_bytes(Encoding.PEM))
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "pam_svmm.cli.main",
                "--config",
                str(cfg),
                "cert",
                "map",
                str(path),
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    p = run(issue("x", upn="paul@demo.example", email="twin@demo.example"))
    assert p.returncode == 0, p.stdout + p.stderr
    assert "rule whole-cert (priority 1): no match: subject does not match" in p.stdout
    assert "rule upn (priority 10): matches" in p.stdout
    assert "filter:  (svmmPrincipalName=paul@demo.example)" in p.stdout
    assert "rule upn: 1 entries  (decides)" in p.stdout
    assert "rule email: 2 entries" in p.stdout
    assert "user:    paul uid=10019" in p.stdout and "vm-admins" in p.stdout
    assert not (tmp_path / "cache").exists()  # read-only: no cache written

    p = run(issue("twin", email="twin@demo.example"))
    assert p.returncode == 1 and "none is picked" in p.stderr
    p = run(issue("nobody"))
    assert p.returncode == 1 and "no rule matches" in p.stderr
