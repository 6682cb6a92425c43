"""The settings the product's rules read: enums, names and frozen values, owned by the domain.

pam_svmm/config.py is their only reader (TOML in, these values out, every error naming its
key); the domain's rules take them as plain values and never read a file.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path

P11_KIT_PROXY = "/usr/lib/x86_64-linux-gnu/p11-kit-proxy.so"


class RevocationRule(enum.Enum):
    """How hard a revocation check is (pyhanko-certvalidator's vocabulary, simplified)."""

    REQUIRE = "require"  # revoked -> fail; unknown -> undecided
    SOFT_FAIL = "soft-fail"  # revoked -> fail; unknown -> accept (audited)
    OFF = "off"  # not checked


class RevocationMethod(enum.Enum):
    OCSP = "ocsp"
    CRL = "crl"


class MappingKind(enum.Enum):
    SUBJECT_CN = "subject_cn"
    SUBJECT_ATTR = "subject_attr"
    UPN = "upn"
    EMAIL = "email"


# OIDs for EKU names accepted in the file (a dotted OID is accepted too).
EKU_NAMES = {
    "clientAuth": "1.3.6.1.5.5.7.3.2",
    "smartcardLogon": "1.3.6.1.4.1.311.20.2.2",
    "emailProtection": "1.3.6.1.5.5.7.3.4",
    "anyExtendedKeyUsage": "2.5.29.37.0",
}
KEY_USAGE_NAMES = (
    "digital_signature",
    "content_commitment",
    "key_encipherment",
    "data_encipherment",
    "key_agreement",
)


@dataclass(frozen=True)
class Pkcs11Config:
    module: str = P11_KIT_PROXY
    # RFC 7512 URI restricting which tokens and objects are considered.
    uri: str = "pkcs11:"
    # Seconds to wait for a card when none is present (0: do not wait).
    wait_for_card: float = 0.0
    pin_prompt: str = "PIN for {token}: "
    allow_pinpad: bool = True
    # The card helper (adapters/card_helper.py) runs the module with the product's
    # environment plus only these variables of the process that starts it (in the PAM
    # module: the caller's). Empty by default; never name one a user must not choose.
    pass_environment: tuple[str, ...] = ()
    # The user the card helper runs as (None: root, with no capabilities).
    helper_user: str | None = None


@dataclass(frozen=True)
class TrustConfig:
    anchors: tuple[Path, ...] = ()
    intermediates_dir: Path | None = None
    extended_key_usages: tuple[str, ...] = (EKU_NAMES["clientAuth"], EKU_NAMES["smartcardLogon"])
    key_usages: tuple[str, ...] = ("digital_signature",)
    max_chain_depth: int = 5


@dataclass(frozen=True)
class RevocationConfig:
    end_entity: RevocationRule = RevocationRule.REQUIRE
    ca: RevocationRule = RevocationRule.SOFT_FAIL
    methods: tuple[RevocationMethod, ...] = (RevocationMethod.OCSP, RevocationMethod.CRL)
    crl_files: tuple[Path, ...] = ()
    crl_fetch: bool = True
    cache_dir: Path = Path("/var/cache/svmm/revocation")
    # Seconds a CRL may be used after its nextUpdate before it counts as stale (unknown).
    crl_grace: float = 0.0
    ocsp_responder: str = ""
    ocsp_nonce: bool = True
    # Accept an OCSP response whose thisUpdate is at most this old when it has no nextUpdate.
    ocsp_max_age: float = 3600.0
    # Seconds a process that stays up (svmmd) may reuse an OCSP answer, within the validity
    # the response states; 0: ask the responder at every login.
    ocsp_reuse: float = 300.0
    clock_skew: float = 300.0
    fetch_timeout: float = 3.0


@dataclass(frozen=True)
class MappingRule:
    kind: MappingKind
    oid: str = ""  # for subject_attr
    strip_domain: bool = False  # for upn / email: keep the local part only
    domains: tuple[str, ...] = ()  # for upn / email: accepted domains (empty: any)


@dataclass(frozen=True)
class MappingConfig:
    rules: tuple[MappingRule, ...] = (MappingRule(MappingKind.SUBJECT_CN),)


@dataclass(frozen=True)
class AuthConfig:
    challenge_bytes: int = 32
    # Upper bound for one whole login attempt, seconds.
    login_timeout: float = 60.0
    host_name: str = ""  # empty: this machine's node name


@dataclass(frozen=True)
class MutualConfig:
    enabled: bool = False
    host_cert: Path | None = None
    host_key: Path | None = None
    # Label of the public certificate object on the card that holds the organisation's anchor.
    card_anchor_label: str = "svmm-trust-anchor"


class DiskFullAction(enum.Enum):
    REFUSE = "refuse"  # local accounts: "could not decide" (pam/shim.py's table)
    ALLOW = "allow"


@dataclass(frozen=True)
class AuditConfig:
    path: Path = Path("/var/log/svmm/audit.jsonl")
    syslog: bool = True
    # Root-only key that seals the hash chain (created on first use if missing).
    seal_key: Path = Path("/etc/svmm/audit-seal.key")
    seal_every: int = 100  # records between seals
    # A decision whose record cannot be written (disk full, I/O error): refused, or let
    # stand with an alert to syslog (auditd's disk_full_action).
    disk_full_action: DiskFullAction = DiskFullAction.REFUSE


class TlsMode(enum.Enum):
    STARTTLS = "starttls"  # ldap:// upgraded with StartTLS (ldaps:// URIs are TLS anyway)
    NONE = "none"  # plain ldap:// (test labs only; password logins are then refused)


@dataclass(frozen=True)
class DirectoryConfig:
    """The organisation's LDAP directory: who a card holder is, their account and roles."""

    enabled: bool = False
    uris: tuple[str, ...] = ()  # tried in order (failover)
    base_dn: str = ""
    users_base: str = ""  # default: base_dn
    groups_base: str = ""  # default: base_dn
    user_filter: str = "(objectClass=posixAccount)"
    bind_dn: str = ""  # empty: anonymous
    bind_password_file: Path | None = None  # root-only file
    tls: TlsMode = TlsMode.STARTTLS
    ca_file: Path | None = None
    # Setting up a connection (TCP, TLS, StartTLS, the service bind): a server that has not
    # finished it in this time is passed over for the next one.
    connect_timeout: float = 3.0
    search_timeout: float = 5.0  # one request on an open connection
    # A server that failed is left aside this long (tried again later; when every server
    # is aside, a lookup fails at once).
    retry_interval: float = 10.0
    # The most one lookup may take over every server it tries (at most auth.login_timeout).
    total_timeout: float = 15.0
    # Roles: names of groups the user is in (under role_groups_base, default groups_base),
    # found through member / memberUid / memberOf, plus values of role_attribute.
    role_groups_base: str = ""
    role_attribute: str = "svmmRole"
    nested_depth: int = 3
    require_certificate_in_entry: bool = False
    # An attribute whose value TRUE marks a disabled account (besides shadowExpire and
    # pwdAccountLockedTime, which are always honoured).
    disabled_attribute: str = "svmmDisabled"
    # Offline: the last good identity per user, root-only, at most this old (0: no offline).
    cache_dir: Path = Path("/var/cache/svmm/identity")
    cache_max_age: float = 86400.0


class SanKind(enum.Enum):
    UPN = "upn"
    EMAIL = "email"
    DNS = "dns"


@dataclass(frozen=True)
class CertmapRule:
    """SSSD-style: a match part (which certificates) and a map part (an LDAP filter template).

    Templates take {cert} (the DER, escaped for userCertificate;binary), {cert_exact} (a
    certificateExactMatch assertion, serial + issuer: what OpenLDAP matches), {subject},
    {issuer} (RFC 4514), {serial} (hex), {upn}, {upn_local}, {email}, {email_local}, {cn},
    {subject_attr:OID}; every value is escaped before it is put in the filter."""

    name: str
    map: str
    priority: int = 100  # lower runs first (SSSD's order)
    match_issuer: str = ""  # regular expression on the issuer, RFC 4514 (empty: any)
    match_subject: str = ""
    match_ekus: tuple[str, ...] = ()  # all of these EKU OIDs must be present
    match_san: tuple[SanKind, ...] = ()  # all of these SAN kinds must be present


@dataclass(frozen=True)
class CertmapConfig:
    rules: tuple[CertmapRule, ...] = ()


@dataclass(frozen=True)
class PasswordConfig:
    """ID/password login against the directory, where policy allows it."""

    enabled: bool = False
    services: tuple[str, ...] = ()  # PAM services that may use it (empty: none)
    card_required_roles: tuple[str, ...] = ()  # holders of these roles must use a card


@dataclass(frozen=True)
class NssConfig:
    """The identity bridge's passwd/group files (libnss-extrausers reads this folder)."""

    dir: Path = Path("/var/lib/extrausers")
    uid_min: int = 10000
    uid_max: int = 59999
    gid_min: int = 10000
    gid_max: int = 59999


@dataclass(frozen=True)
class IssueConfig:
    """`svmm card issue`: how certificates get signed and published."""

    # argv of a CA command: a CSR (PEM) on stdin, the certificate (PEM) on stdout.
    ca_command: tuple[str, ...] = ()
    # Directory account allowed to publish certificates to user entries.
    publish_bind_dn: str = ""
    publish_password_file: Path | None = None


# The product's OID arc (2.25.<UUID>, ITU-T X.667); the policy-signing EKU lives under it.
OID_ARC = "2.25.74009480635607549551734685832537171584"
POLICY_SIGNING_EKU = f"{OID_ARC}.3.1"


class PolicySource(enum.Enum):
    FILE = "file"
    DIRECTORY = "directory"


@dataclass(frozen=True)
class PolicyConfig:
    """Where the signed VM policy comes from and where the accepted one is kept."""

    # Off: no host-login rule beyond authentication, and no VM grants (no allowlist).
    enabled: bool = False
    source: PolicySource = PolicySource.FILE
    file: Path = Path("/etc/svmm/policy.bundle")
    directory_dn: str = ""  # entry whose svmmPolicyBundle holds the bundle
    signer_eku: str = POLICY_SIGNING_EKU
    state_dir: Path = Path("/var/lib/svmm/policy")
    host: str = ""  # this host's name in the policy (default: auth.host_name or node name)


@dataclass(frozen=True)
class SessionConfig:
    allowlist_dir: Path = Path("/run/svmm/allowlist")
    state_dir: Path = Path("/run/svmm/sessions")
    allowlist_ttl: float = 43200.0


class CardRemovalAction(enum.Enum):
    """What happens to a user's VMs when the card that opened their session is pulled."""

    PAUSE = "pause"  # pause the VMs and close their volumes
    STOP = "stop"
    LOCK = "lock"  # lock the session only


class LastLogoutAction(enum.Enum):
    """What happens to a user's running VMs when their last session closes."""

    STOP = "stop"  # stopped gracefully: volumes closed, keys gone from QEMU
    PAUSE = "pause"  # paused (QMP stop); resumable after a new login
    KEEP = "keep"  # left running


class NetworkKind(enum.Enum):
    USER = "user"  # QEMU's user-mode stack (slirp), restrict=on by default: no host, no outside
    BRIDGE = "bridge"  # a tap device svmmd creates per VM and attaches to a host bridge


@dataclass(frozen=True)
class NetworkBackend:
    """[launcher.networks.NAME]: how a policy network NAME reaches QEMU on this host."""

    name: str
    kind: NetworkKind
    restrict: bool = True  # user: isolate the guest (QEMU's restrict=on)
    bridge: str = ""  # bridge: the host bridge's interface name


# systemd hands these uids to DynamicUser= services while they run (systemd.io/UIDS-GIDS): a
# VM's uid there could be given to a service that would then read the VM's memory.
DYNAMIC_UID_RANGE = (61184, 65519)


@dataclass(frozen=True)
class LauncherConfig:
    """The VM launcher service (svmmd)."""

    socket: Path = Path("/run/svmm/launcher.sock")  # in a root-owned 0755 folder; mode 0666
    # Every running VM's QEMU gets a uid of its own from this range (invariant 13), never a
    # shared account: one escaped guest must not read another VM's memory. Reserve it for
    # svmm (no account may have these uids; they are skipped if one does). The default lies
    # where nothing else hands out ids: above 16-bit uids, below the subordinate ids useradd
    # gives (SUB_UID_MIN 100000) and systemd's container ranges (524288), outside systemd's
    # DynamicUser range and Debian's 60000-64999.
    vm_uid_min: int = 70000
    vm_uid_max: int = 70255
    run_dir: Path = Path("/run/svmm/vms")  # per-VM private folders (QMP socket, QEMU log)
    registry_dir: Path = Path("/run/svmm/registry")  # running VMs, root-only
    start_timeout: float = 10.0  # seconds until QEMU answers on QMP
    # stop: first the ACPI power button (a running guest shuts down cleanly) for this long
    # (0: skip it), then QMP quit, then SIGTERM, then SIGKILL, each for its own timeout.
    powerdown_timeout: float = 30.0
    quit_timeout: float = 5.0
    term_timeout: float = 3.0
    kill_timeout: float = 3.0
    card_removal: CardRemovalAction = CardRemovalAction.PAUSE
    card_poll_interval: float = 1.0  # seconds between slot polls
    # A pulled card also locks the logind sessions it opened (loginctl lock-session), as
    # pam_pkcs11's card event manager and SSSD do: the screen locker takes over.
    card_removal_locks_sessions: bool = True
    on_last_logout: LastLogoutAction = LastLogoutAction.KEEP
    # A VM whose owner's last session died without closing (its PAM application crashed or
    # was killed, svmmd restarted): its grant is gone, so by default it is paused.
    on_session_lost: LastLogoutAction = LastLogoutAction.PAUSE
    # A running VM that a newly accepted policy no longer lets its owner boot: stopped by
    # default (the grant was taken away), or paused, or kept.
    on_grant_revoked: LastLogoutAction = LastLogoutAction.STOP
    # Only networks defined here can be given to a VM (by name; the policy grants them).
    networks: tuple[NetworkBackend, ...] = ()

    def network(self, name: str) -> NetworkBackend | None:
        return next((n for n in self.networks if n.name == name), None)


class VolumeMode(enum.Enum):
    VMM = "vmm"  # QEMU's LUKS driver decrypts; the key goes to svmmd at session open
    DMCRYPT = "dm-crypt"  # cryptsetup open at session open (needs device-mapper)


@dataclass(frozen=True)
class VolumesConfig:
    """Encrypted VM volumes whose keys the card releases at session open."""

    enabled: bool = False
    # A policy volume NAME is the LUKS image <dir>/NAME.img (tokens in NAME.img.svmm.json).
    dir: Path = Path("/var/lib/svmm/volumes")
    mode: VolumeMode = VolumeMode.VMM


@dataclass(frozen=True)
class Config:
    source: Path | None = None
    pkcs11: Pkcs11Config = field(default_factory=Pkcs11Config)
    trust: TrustConfig = field(default_factory=TrustConfig)
    revocation: RevocationConfig = field(default_factory=RevocationConfig)
    mapping: MappingConfig = field(default_factory=MappingConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    mutual: MutualConfig = field(default_factory=MutualConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)
    directory: DirectoryConfig = field(default_factory=DirectoryConfig)
    certmap: CertmapConfig = field(default_factory=CertmapConfig)
    password: PasswordConfig = field(default_factory=PasswordConfig)
    nss: NssConfig = field(default_factory=NssConfig)
    issue: IssueConfig = field(default_factory=IssueConfig)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    volumes: VolumesConfig = field(default_factory=VolumesConfig)
    session: SessionConfig = field(default_factory=SessionConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)


# --- reading ------------------------------------------------------------------------------
