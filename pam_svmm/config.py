"""The only reader of configuration: one TOML file into frozen dataclasses.

Validation happens here, on load, and every error names the dotted key and what is wrong
with it. Nothing else in the product reads the file or the environment for settings.
"""

from __future__ import annotations

import enum
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

DEFAULT_PATH = Path("/etc/svmm/svmm.toml")
ENV_VAR = "SVMM_CONFIG"
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


@dataclass(frozen=True)
class AuditConfig:
    path: Path = Path("/var/log/svmm/audit.jsonl")
    syslog: bool = True


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


# --- reading ------------------------------------------------------------------------------


class _Table:
    """A TOML table with its dotted prefix, that records which keys were read."""

    def __init__(self, data: Any, prefix: str) -> None:
        if not isinstance(data, dict):
            raise ConfigError(prefix, "must be a table")
        self.data = data
        self.prefix = prefix
        self.seen: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def get(self, name: str, default: Any) -> Any:
        self.seen.add(name)
        return self.data.get(name, default)

    def text(self, name: str, default: str) -> str:
        v = self.get(name, default)
        if not isinstance(v, str):
            raise ConfigError(self.key(name), f"must be a string, not {type(v).__name__}")
        return v

    def flag(self, name: str, default: bool) -> bool:
        v = self.get(name, default)
        if not isinstance(v, bool):
            raise ConfigError(self.key(name), "must be true or false")
        return v

    def number(self, name: str, default: float, *, minimum: float = 0.0) -> float:
        v = self.get(name, default)
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise ConfigError(self.key(name), "must be a number")
        if v < minimum:
            raise ConfigError(self.key(name), f"must be at least {minimum}")
        return float(v)

    def integer(self, name: str, default: int, *, minimum: int = 0, maximum: int = 1 << 31) -> int:
        v = self.get(name, default)
        if isinstance(v, bool) or not isinstance(v, int):
            raise ConfigError(self.key(name), "must be an integer")
        if not minimum <= v <= maximum:
            raise ConfigError(self.key(name), f"must be between {minimum} and {maximum}")
        return v

    def strings(self, name: str, default: tuple[str, ...]) -> tuple[str, ...]:
        v = self.get(name, list(default))
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise ConfigError(self.key(name), "must be a list of strings")
        return tuple(v)

    def path(self, name: str, default: Path | None) -> Path | None:
        v = self.get(name, None if default is None else str(default))
        if v is None or v == "":
            return default if v is None else None
        if not isinstance(v, str):
            raise ConfigError(self.key(name), "must be a path string")
        if not v.startswith("/"):
            raise ConfigError(self.key(name), f"must be an absolute path, got {v!r}")
        return Path(v)

    def paths(self, name: str) -> tuple[Path, ...]:
        out = []
        for i, v in enumerate(self.strings(name, ())):
            if not v.startswith("/"):
                raise ConfigError(f"{self.key(name)}[{i}]", f"must be an absolute path, got {v!r}")
            out.append(Path(v))
        return tuple(out)

    def enum(self, name: str, default: enum.Enum) -> Any:
        cls = type(default)
        v = self.get(name, default.value)
        try:
            return cls(v)
        except ValueError:
            allowed = ", ".join(repr(m.value) for m in cls)
            raise ConfigError(self.key(name), f"must be one of {allowed}, got {v!r}") from None

    def sub(self, name: str) -> _Table:
        return _Table(self.get(name, {}), self.key(name))

    def done(self) -> None:
        unknown = sorted(set(self.data) - self.seen)
        if unknown:
            raise ConfigError(self.key(unknown[0]), "unknown key")


def _eku(key: str, value: str) -> str:
    oid = EKU_NAMES.get(value, value)
    if not all(part.isdigit() for part in oid.split(".")) or oid.count(".") < 2:
        known = ", ".join(EKU_NAMES)
        raise ConfigError(key, f"{value!r} is neither a known name ({known}) nor a dotted OID")
    return oid


def _pkcs11(t: _Table) -> Pkcs11Config:
    d = Pkcs11Config()
    uri = t.text("uri", d.uri)
    if not uri.startswith("pkcs11:"):
        raise ConfigError(t.key("uri"), "must be an RFC 7512 URI starting with 'pkcs11:'")
    from .domain.pkcs11_uri import InvalidPkcs11Uri
    from .domain.pkcs11_uri import parse as parse_uri

    try:
        parse_uri(uri)
    except InvalidPkcs11Uri as e:
        raise ConfigError(t.key("uri"), str(e)) from None
    prompt = t.text("pin_prompt", d.pin_prompt)
    try:
        prompt.format(token="x", host="h")  # noqa: S106 - placeholders, not secrets
    except (KeyError, IndexError, ValueError):
        raise ConfigError(
            t.key("pin_prompt"), "may only use the {token} and {host} placeholders"
        ) from None
    cfg = Pkcs11Config(
        module=t.text("module", d.module),
        uri=uri,
        wait_for_card=t.number("wait_for_card", d.wait_for_card),
        pin_prompt=prompt,
        allow_pinpad=t.flag("allow_pinpad", d.allow_pinpad),
    )
    if not cfg.module.startswith("/"):
        raise ConfigError(t.key("module"), "must be an absolute path to a PKCS#11 module")
    t.done()
    return cfg


def _trust(t: _Table) -> TrustConfig:
    d = TrustConfig()
    ekus = tuple(
        _eku(f"{t.key('extended_key_usages')}[{i}]", v)
        for i, v in enumerate(t.strings("extended_key_usages", ("clientAuth", "smartcardLogon")))
    )
    kus = t.strings("key_usages", d.key_usages)
    for i, ku in enumerate(kus):
        if ku not in KEY_USAGE_NAMES:
            raise ConfigError(
                f"{t.key('key_usages')}[{i}]", f"{ku!r} is not one of {', '.join(KEY_USAGE_NAMES)}"
            )
    cfg = TrustConfig(
        anchors=t.paths("anchors"),
        intermediates_dir=t.path("intermediates_dir", None),
        extended_key_usages=ekus,
        key_usages=kus,
        max_chain_depth=t.integer("max_chain_depth", d.max_chain_depth, minimum=1, maximum=16),
    )
    t.done()
    return cfg


def _revocation(t: _Table) -> RevocationConfig:
    d = RevocationConfig()
    methods = []
    for i, m in enumerate(t.strings("methods", tuple(x.value for x in d.methods))):
        try:
            methods.append(RevocationMethod(m))
        except ValueError:
            raise ConfigError(f"{t.key('methods')}[{i}]", f"{m!r} is not 'ocsp' or 'crl'") from None
    responder = t.text("ocsp_responder", d.ocsp_responder)
    if responder and not responder.startswith(("http://", "https://")):
        raise ConfigError(t.key("ocsp_responder"), "must be an http:// or https:// URL")
    cfg = RevocationConfig(
        end_entity=t.enum("end_entity", d.end_entity),
        ca=t.enum("ca", d.ca),
        methods=tuple(methods),
        crl_files=t.paths("crl_files"),
        crl_fetch=t.flag("crl_fetch", d.crl_fetch),
        cache_dir=t.path("cache_dir", d.cache_dir) or d.cache_dir,
        crl_grace=t.number("crl_grace", d.crl_grace),
        ocsp_responder=responder,
        ocsp_nonce=t.flag("ocsp_nonce", d.ocsp_nonce),
        ocsp_max_age=t.number("ocsp_max_age", d.ocsp_max_age, minimum=1),
        clock_skew=t.number("clock_skew", d.clock_skew),
        fetch_timeout=t.number("fetch_timeout", d.fetch_timeout, minimum=0.1),
    )
    if cfg.end_entity is not RevocationRule.OFF and not cfg.methods:
        raise ConfigError(t.key("methods"), "is empty but end_entity revocation is not 'off'")
    t.done()
    return cfg


def _mapping(t: _Table) -> MappingConfig:
    raw = t.get("rules", None)
    if raw is None:
        t.done()
        return MappingConfig()
    if not isinstance(raw, list) or not raw:
        raise ConfigError(t.key("rules"), "must be a non-empty array of tables")
    rules = []
    for i, r in enumerate(raw):
        rt = _Table(r, f"{t.key('rules')}[{i}]")
        kind = rt.enum("kind", MappingKind.SUBJECT_CN)
        oid = rt.text("oid", "")
        if kind is MappingKind.SUBJECT_ATTR and not oid:
            raise ConfigError(rt.key("oid"), "is required for kind 'subject_attr'")
        rules.append(
            MappingRule(
                kind=kind,
                oid=oid,
                strip_domain=rt.flag("strip_domain", False),
                domains=tuple(x.lower() for x in rt.strings("domains", ())),
            )
        )
        rt.done()
    t.done()
    return MappingConfig(rules=tuple(rules))


def _auth(t: _Table) -> AuthConfig:
    d = AuthConfig()
    cfg = AuthConfig(
        challenge_bytes=t.integer("challenge_bytes", d.challenge_bytes, minimum=16, maximum=1024),
        login_timeout=t.number("login_timeout", d.login_timeout, minimum=1),
        host_name=t.text("host_name", d.host_name),
    )
    t.done()
    return cfg


def _mutual(t: _Table) -> MutualConfig:
    d = MutualConfig()
    cfg = MutualConfig(
        enabled=t.flag("enabled", d.enabled),
        host_cert=t.path("host_cert", None),
        host_key=t.path("host_key", None),
        card_anchor_label=t.text("card_anchor_label", d.card_anchor_label),
    )
    if cfg.enabled and (cfg.host_cert is None or cfg.host_key is None):
        raise ConfigError(t.key("host_cert"), "host_cert and host_key are required when enabled")
    t.done()
    return cfg


def _audit(t: _Table) -> AuditConfig:
    d = AuditConfig()
    cfg = AuditConfig(path=t.path("path", d.path) or d.path, syslog=t.flag("syslog", d.syslog))
    t.done()
    return cfg


def parse(data: dict[str, Any], source: Path | None = None) -> Config:
    """Build a validated Config from a parsed TOML document."""
    top = _Table(data, "")
    cfg = Config(
        source=source,
        pkcs11=_pkcs11(top.sub("pkcs11")),
        trust=_trust(top.sub("trust")),
        revocation=_revocation(top.sub("revocation")),
        mapping=_mapping(top.sub("mapping")),
        auth=_auth(top.sub("auth")),
        mutual=_mutual(top.sub("mutual")),
        audit=_audit(top.sub("audit")),
    )
    top.done()
    return cfg


def resolve_path(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The file to read: explicit argument, else $SVMM_CONFIG, else the default."""
    if explicit:
        return Path(explicit)
    env = os.environ.get(ENV_VAR)
    return Path(env) if env else DEFAULT_PATH


def load(path: str | os.PathLike[str] | None = None) -> Config:
    p = resolve_path(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise ConfigError(str(p), "file not found") from None
    except OSError as e:
        raise ConfigError(str(p), f"cannot read: {e.strerror}") from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(str(p), f"not valid TOML: {e}") from None
    return parse(data, source=p)
