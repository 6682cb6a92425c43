"""Signed policy bundles (domain) and the host's store of the accepted one (no rollback, a bad
bundle never replaces a good one), with the lab CA's real certificates and keys."""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import stat
from pathlib import Path

import pytest
from cryptography import x509

from pam_svmm.adapters.policy_store import (
    STATE_FILE,
    FileSource,
    LoadEvent,
    PolicyStore,
)
from pam_svmm.config import POLICY_SIGNING_EKU, PolicyConfig
from pam_svmm.domain.audit_record import Outcome
from pam_svmm.domain.policy_bundle import make_bundle, parse_bundle, verify_bundle
from pam_svmm.errors import (
    ConfigError,
    DirectoryUnavailable,
    PolicyBundleInvalid,
    PolicyRollback,
    PolicyUnavailable,
)
from svmm_lab.pki import Issued, LabCA, new_key

NOW = dt.datetime.now(dt.UTC)  # at collection: the certificates below are valid from before it
SINCE = NOW - dt.timedelta(hours=1)


def policy_text(version: int, extra: str = "") -> bytes:
    return (
        f'version = {version}\n[vms.vm-web]\ntype = "public"\n'
        f'[[grants]]\nrole = "vm-users"\nvm = "vm-web"\npermissions = ["boot"]\n{extra}'
    ).encode()


class Pki:
    def __init__(self, root: Path) -> None:
        self.ca = LabCA.create(
            root / "ca", crl_base="http://127.0.0.1:9/", ocsp_url="http://127.0.0.1:9/o"
        )
        self.other = LabCA.create(
            root / "other",
            crl_base="http://127.0.0.1:9/",
            ocsp_url="http://127.0.0.1:9/o",
            org="Evil",
        )
        self.signers: dict[str, Issued] = {}
        for kind in ("p256", "p384", "rsa"):
            key = new_key(kind)
            self.signers[kind] = Issued(
                self.ca.issue_policy_signer(f"Policy {kind}", key.public_key(), not_before=SINCE),
                key,
            )
        key = new_key("p256")
        self.no_eku = Issued(
            self.ca.issue_user("not a signer", key.public_key(), not_before=SINCE), key
        )
        key = new_key("p256")
        self.foreign = Issued(
            self.other.issue_policy_signer("Policy Evil", key.public_key(), not_before=SINCE), key
        )
        key = new_key("p256")
        self.expired = Issued(
            self.ca.issue_policy_signer(
                "Policy old",
                key.public_key(),
                not_before=NOW - dt.timedelta(minutes=30),
                not_after=NOW - dt.timedelta(minutes=1),
            ),
            key,
        )

    @property
    def anchors(self) -> list[x509.Certificate]:
        return [self.ca.root.cert]

    def bundle(self, policy: bytes, signer: Issued | None = None, *, chain: bool = True) -> bytes:
        s = signer or self.signers["p256"]
        issuer = (
            self.ca.intermediate.cert if s is not self.foreign else self.other.intermediate.cert
        )
        return make_bundle(policy, s.key, [s.cert, issuer] if chain else [s.cert])


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


def verify(pki: Pki, data: bytes, **kw: object) -> bytes:
    return verify_bundle(data, pki.anchors, at=kw.pop("at", NOW), eku=POLICY_SIGNING_EKU).policy  # type: ignore[arg-type]


# --- the bundle ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["p256", "p384", "rsa"])
def test_good_bundle_gives_the_exact_bytes_and_the_signer(pki: Pki, kind: str) -> None:
    policy = policy_text(1, "# trailing bytes matter \n\n")
    v = verify_bundle(
        pki.bundle(policy, pki.signers[kind]), pki.anchors, at=NOW, eku=POLICY_SIGNING_EKU
    )
    assert v.policy == policy
    assert v.signer == pki.signers[kind].cert
    policy_bytes, signer = v  # unpacks as (policy bytes, signer certificate)
    assert policy_bytes == policy and signer == v.signer


def test_intermediates_may_come_from_the_host_instead_of_the_bundle(pki: Pki) -> None:
    data = pki.bundle(policy_text(1), chain=False)
    with pytest.raises(PolicyBundleInvalid) as e:
        verify(pki, data)
    assert e.value.reason == "bundle_signer_untrusted"
    v = verify_bundle(data, pki.anchors, [pki.ca.intermediate.cert], at=NOW, eku=POLICY_SIGNING_EKU)
    assert v.policy == policy_text(1)


def _edit(data: bytes, **fields: object) -> bytes:
    doc = json.loads(data)
    doc.update(fields)
    return json.dumps(doc).encode()


def test_signature_over_other_bytes_is_refused(pki: Pki) -> None:
    good = pki.bundle(policy_text(1))
    other = base64.b64encode(policy_text(1, "# one more line\n")).decode()
    with pytest.raises(PolicyBundleInvalid) as e:
        verify(pki, _edit(good, policy=other))
    assert e.value.reason == "bundle_signature_invalid"


def test_signature_by_another_key_under_the_same_certificate_is_refused(pki: Pki) -> None:
    a = json.loads(pki.bundle(policy_text(1), pki.signers["p256"]))
    b = json.loads(pki.bundle(policy_text(1), pki.signers["p384"]))
    with pytest.raises(PolicyBundleInvalid) as e:
        verify(pki, _edit(json.dumps(a).encode(), certificates=b["certificates"]))
    assert e.value.reason == "bundle_signature_invalid"


def test_signer_without_the_policy_signing_eku_is_refused(pki: Pki) -> None:
    with pytest.raises(PolicyBundleInvalid) as e:
        verify(pki, pki.bundle(policy_text(1), pki.no_eku))
    assert e.value.reason == "bundle_signer_invalid"
    assert "eku_missing" in e.value.message


def test_signer_not_under_the_anchor_is_refused(pki: Pki) -> None:
    with pytest.raises(PolicyBundleInvalid) as e:
        verify(pki, pki.bundle(policy_text(1), pki.foreign))
    assert e.value.reason == "bundle_signer_untrusted"


def test_expired_signer_is_refused_at_now_but_not_while_it_was_valid(pki: Pki) -> None:
    data = pki.bundle(policy_text(1), pki.expired)
    with pytest.raises(PolicyBundleInvalid) as e:
        verify(pki, data)
    assert e.value.reason == "bundle_signer_invalid"
    assert "certificate_expired" in e.value.message
    assert verify(pki, data, at=NOW - dt.timedelta(minutes=10)) == policy_text(1)


def test_a_key_that_is_not_the_certificates_cannot_make_a_bundle(pki: Pki) -> None:
    with pytest.raises(PolicyBundleInvalid):
        make_bundle(policy_text(1), pki.signers["p256"].key, [pki.signers["p384"].cert])


def _good(pki: Pki) -> bytes:
    return pki.bundle(policy_text(1))


MALFORMED = [
    ("not json", lambda g: b"{not json"),
    ("not utf-8", lambda g: b"\xff\xfe"),
    ("array", lambda g: b"[]"),
    (
        "missing key",
        lambda g: json.dumps({k: v for k, v in json.loads(g).items() if k != "signature"}).encode(),
    ),
    ("extra key", lambda g: _edit(g, version=9)),
    ("format", lambda g: _edit(g, format="svmm-policy-bundle/2")),
    ("bad base64", lambda g: _edit(g, policy="!!!not base64")),
    ("base64 with junk", lambda g: _edit(g, signature=json.loads(g)["signature"] + "\n*")),
    ("empty policy", lambda g: _edit(g, policy="")),
    ("policy not a string", lambda g: _edit(g, policy=5)),
    ("no certificates", lambda g: _edit(g, certificates=[])),
    ("certificate not PEM", lambda g: _edit(g, certificates=["hello"])),
    ("certificate not a string", lambda g: _edit(g, certificates=[1])),
    ("two in one", lambda g: _edit(g, certificates=["".join(json.loads(g)["certificates"])])),
]


@pytest.mark.parametrize(("name", "damage"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_bundles_are_refused(pki: Pki, name: str, damage: object) -> None:
    data = damage(_good(pki))  # type: ignore[operator]
    with pytest.raises(PolicyBundleInvalid) as e:
        verify(pki, data)
    assert e.value.reason == "bundle_malformed", e.value.message


def test_parse_bundle_reads_the_parts(pki: Pki) -> None:
    p = parse_bundle(_good(pki))
    assert p.policy == policy_text(1)
    assert p.certificates[0] == pki.signers["p256"].cert
    assert len(p.certificates) == 2


# --- the store ----------------------------------------------------------------------------


class Env:
    def __init__(self, pki: Pki, tmp: Path) -> None:
        self.pki = pki
        self.file = tmp / "policy.bundle"
        self.config = PolicyConfig(file=self.file, state_dir=tmp / "state")
        self.now = NOW

    def store(self, source: object | None = None) -> PolicyStore:
        return PolicyStore(
            self.config,
            source or FileSource(self.file),  # type: ignore[arg-type]
            anchors=self.pki.anchors,
            now=lambda: self.now,
        )

    def publish(self, data: bytes) -> None:
        self.file.write_bytes(data)

    def state(self) -> bytes:
        return (self.config.state_dir / STATE_FILE).read_bytes()


@pytest.fixture
def env(pki: Pki, tmp_path: Path) -> Env:
    return Env(pki, tmp_path)


def test_first_load_accepts_and_keeps_a_root_only_copy(env: Env) -> None:
    env.publish(env.pki.bundle(policy_text(3)))
    r = env.store().load()
    assert r.event is LoadEvent.ACCEPTED and not r.refused
    assert r.policy is not None and r.policy.version == 3 and r.previous_version is None
    assert r.policy.signer_subject.startswith("CN=Policy p256")
    st = env.config.state_dir / STATE_FILE
    assert stat.S_IMODE(st.stat().st_mode) == 0o600
    assert stat.S_IMODE(env.config.state_dir.stat().st_mode) == 0o700
    again = env.store().load()
    assert again.event is LoadEvent.UNCHANGED and again.policy is not None
    assert again.policy.version == 3 and again.reason == "policy_unchanged"


def test_newer_version_replaces_older_is_refused(env: Env) -> None:
    env.publish(env.pki.bundle(policy_text(3)))
    env.store().load()
    env.publish(env.pki.bundle(policy_text(4)))
    r = env.store().load()
    assert r.event is LoadEvent.ACCEPTED and r.previous_version == 3
    assert r.policy is not None and r.policy.version == 4
    before = env.state()
    env.publish(env.pki.bundle(policy_text(3)))  # a validly signed, older policy
    r = env.store().load()
    assert r.event is LoadEvent.KEPT
    assert isinstance(r.problem, PolicyRollback) and r.reason == "policy_rollback"
    assert r.policy is not None and r.policy.version == 4
    assert env.state() == before


def test_same_version_with_other_content_is_refused(env: Env) -> None:
    env.publish(env.pki.bundle(policy_text(5)))
    env.store().load()
    env.publish(env.pki.bundle(policy_text(5, "# changed\n")))
    r = env.store().load()
    assert r.event is LoadEvent.KEPT and r.reason == "policy_version_reused"
    # the same policy signed again (another signer, e.g. a renewed certificate) is no change
    # of policy: accepted as that version
    env.publish(env.pki.bundle(policy_text(5), env.pki.signers["rsa"]))
    r = env.store().load()
    assert r.event is LoadEvent.ACCEPTED and r.policy is not None and r.policy.version == 5


BAD = [
    (
        "bad signature",
        lambda p: _edit(
            p.bundle(policy_text(9)), policy=base64.b64encode(policy_text(10)).decode()
        ),
        "bundle_signature_invalid",
    ),
    ("malformed", lambda p: b"garbage", "bundle_malformed"),
    ("no eku", lambda p: p.bundle(policy_text(9), p.no_eku), "bundle_signer_invalid"),
    ("foreign", lambda p: p.bundle(policy_text(9), p.foreign), "bundle_signer_untrusted"),
    ("expired", lambda p: p.bundle(policy_text(9), p.expired), "bundle_signer_invalid"),
    (
        "invalid policy",
        lambda p: p.bundle(b"version = 9\n[[grants]]\nvm = 'x'\n"),
        "policy_invalid",
    ),
]


@pytest.mark.parametrize(("name", "make", "reason"), BAD, ids=[b[0] for b in BAD])
def test_a_bad_bundle_never_replaces_a_good_one(
    env: Env, name: str, make: object, reason: str
) -> None:
    env.publish(env.pki.bundle(policy_text(2)))
    env.store().load()
    before = env.state()
    env.publish(make(env.pki))  # type: ignore[operator]
    r = env.store().load()
    assert r.event is LoadEvent.KEPT and r.reason == reason, r.describe()
    assert r.policy is not None and r.policy.version == 2
    assert env.state() == before
    assert env.store().accepted().version == 2  # type: ignore[union-attr]


@pytest.mark.parametrize(("name", "make", "reason"), BAD, ids=[b[0] for b in BAD])
def test_a_bad_bundle_is_not_accepted_on_a_fresh_host(
    env: Env, name: str, make: object, reason: str
) -> None:
    env.publish(make(env.pki))  # type: ignore[operator]
    r = env.store().load()
    assert r.event is LoadEvent.NONE and r.policy is None and r.reason == reason
    assert not (env.config.state_dir / STATE_FILE).exists()


def test_missing_or_unreachable_source_keeps_the_accepted_policy(env: Env) -> None:
    env.publish(env.pki.bundle(policy_text(2)))
    env.store().load()
    env.file.unlink()
    r = env.store().load()
    assert r.event is LoadEvent.KEPT and r.reason == "policy_missing" and r.policy is not None

    class Down:
        description = "directory cn=vm-policy"

        def read(self) -> bytes | None:
            raise DirectoryUnavailable("no directory server answered")

    r = env.store(Down()).load()
    assert r.event is LoadEvent.KEPT and r.reason == "directory_unavailable"
    assert r.policy is not None and r.policy.version == 2


def test_nothing_at_all(env: Env) -> None:
    r = env.store().load()
    assert r.event is LoadEvent.NONE and r.reason == "policy_missing" and r.policy is None


def test_damaged_state_keeps_its_version_floor(env: Env) -> None:
    env.publish(env.pki.bundle(policy_text(6)))
    env.store().load()
    state = env.config.state_dir / STATE_FILE
    doc = json.loads(state.read_bytes())
    doc["bundle"] = base64.b64encode(b"garbage").decode()
    state.write_text(json.dumps(doc))
    accepted, floor, problem = env.store().accepted_state()
    assert accepted is None and floor == 6 and problem is not None
    env.publish(env.pki.bundle(policy_text(5)))
    assert env.store().load().reason == "policy_rollback"
    env.publish(env.pki.bundle(policy_text(6)))  # the same version heals the copy
    r = env.store().load()
    assert r.event is LoadEvent.ACCEPTED and r.policy is not None and r.policy.version == 6


def test_the_state_folder_must_not_be_redirected(env: Env, tmp_path: Path) -> None:
    real = tmp_path / "elsewhere"
    real.mkdir(mode=0o700)
    env.config.state_dir.symlink_to(real)
    env.publish(env.pki.bundle(policy_text(1)))
    with pytest.raises(ConfigError) as e:
        env.store().load()
    assert e.value.key == "policy.state_dir"


def test_the_state_folder_must_be_private(env: Env) -> None:
    env.config.state_dir.mkdir(mode=0o755)
    os.chmod(env.config.state_dir, 0o755)  # noqa: S103 - the unsafe case under test
    with pytest.raises(ConfigError):
        env.store().load()


# --- the service --------------------------------------------------------------------------


def _service(env: Env):  # type: ignore[no-untyped-def]
    from pam_svmm.config import AuthConfig, Config
    from pam_svmm.services.policy import PolicyService

    cfg = Config(policy=env.config, auth=AuthConfig(host_name="lab-host"))
    return PolicyService(cfg, anchors=env.pki.anchors, intermediates=[], now=lambda: env.now)


def test_service_current_and_audit_records(env: Env) -> None:
    svc = _service(env)
    with pytest.raises(PolicyUnavailable):
        svc.current()
    env.publish(env.pki.bundle(policy_text(2)))
    assert svc.current(refresh=True).version == 2
    assert svc.decide("bob", ["vm-users"], "vm-web", "boot", []).allowed
    assert svc.grants_for("bob", ["vm-users"]) == {"vm-web": frozenset({"boot"})}
    env.publish(b"garbage")
    assert svc.current(refresh=True).version == 2
    loads = svc.take_loads()
    assert [x.event for x in loads] == [LoadEvent.NONE, LoadEvent.ACCEPTED, LoadEvent.KEPT]
    recs = [svc.audit_record(x) for x in loads]
    assert [r.outcome for r in recs] == [Outcome.UNDECIDED, Outcome.SUCCESS, Outcome.FAILURE]
    assert all(r.event == "policy_load" and r.host == "lab-host" for r in recs)
    assert recs[1].reason == "policy_accepted" and "version=2" in recs[1].detail
    assert recs[2].reason == "bundle_malformed" and "version=2" in recs[2].detail
    assert svc.loads == []
