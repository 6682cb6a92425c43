"""The only reader of configuration: one TOML file into frozen dataclasses.

Validation happens here, on load, and every error names the dotted key and what is wrong
with it. Nothing else in the product reads the file or the environment for settings.
"""

from __future__ import annotations

import enum
import math
import os
import re
import string
from pathlib import Path
from typing import Any

from .domain.bounded import loads_toml
from .domain.settings import (  # noqa: F401 - re-exported: the vocabulary the file is read into
    DYNAMIC_UID_RANGE,
    EKU_NAMES,
    KEY_USAGE_NAMES,
    OID_ARC,
    P11_KIT_PROXY,
    POLICY_SIGNING_EKU,
    AuditConfig,
    AuthConfig,
    CardRemovalAction,
    CertmapConfig,
    CertmapRule,
    Config,
    DirectoryConfig,
    DiskFullAction,
    IssueConfig,
    LastLogoutAction,
    LauncherConfig,
    MappingConfig,
    MappingKind,
    MappingRule,
    MutualConfig,
    NetworkBackend,
    NetworkKind,
    NssConfig,
    PasswordConfig,
    Pkcs11Config,
    PolicyConfig,
    PolicySource,
    RevocationConfig,
    RevocationMethod,
    RevocationRule,
    SanKind,
    SessionConfig,
    TlsMode,
    TrustConfig,
    VolumeMode,
    VolumesConfig,
)
from .errors import ConfigError, InputMalformed

DEFAULT_PATH = Path("/etc/svmm/svmm.toml")
MAX_FILE_BYTES = 1 << 20
MAX_DEPTH = 8  # the deepest key is certmap.rules[i].match.eku[j]: 5
MAX_SECONDS = 10 * 365 * 86400.0  # any time setting; more overflows a C timeout
PIN_PROMPT_FIELDS = ("token", "host")
ENV_VAR = "SVMM_CONFIG"


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

    def number(
        self, name: str, default: float, *, minimum: float = 0.0, maximum: float = MAX_SECONDS
    ) -> float:
        v = self.get(name, default)
        if isinstance(v, bool) or not isinstance(v, int | float):
            raise ConfigError(self.key(name), "must be a number")
        # nan passes every comparison; inf or 1e300 seconds overflow socket and thread timeouts.
        if isinstance(v, float) and not math.isfinite(v):
            raise ConfigError(self.key(name), f"must be a finite number, not {v}")
        if v < minimum:
            raise ConfigError(self.key(name), f"must be at least {minimum}")
        if v > maximum:
            raise ConfigError(self.key(name), f"must be at most {maximum:g}")
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
            import difflib

            close = difflib.get_close_matches(unknown[0], sorted(self.seen), n=1, cutoff=0.6)
            hint = f" (did you mean {self.key(close[0])!r}?)" if close else ""
            raise ConfigError(self.key(unknown[0]), f"unknown key{hint}")


def _template_problem(template: str, fields: tuple[str, ...]) -> str:
    """ "" when ``template.format(**{f: str})`` cannot raise: only the bare ``{field}`` of
    ``fields`` (no ``{token.x}``, ``{token[0]}``, conversions or format specs such as
    ``{token:>999999999}``, which raise or fill memory at login)."""
    allowed = ", ".join(f"{{{f}}}" for f in fields)
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as e:
        return f"not a valid template ({e}); use {{{{ and }}}} for literal braces"
    for _text, name, spec, conversion in parts:
        if name is None:
            continue
        if name not in fields or spec or conversion:
            shown = "{" + name + (f"!{conversion}" if conversion else "")
            shown += (f":{spec}" if spec else "") + "}"
            return f"{shown[:40]!r}: only the placeholders {allowed} may be used, as they are"
    return ""


def _oid(key: str, value: str) -> str:
    """A dotted OID that cryptography accepts (it bounds the arcs); ConfigError otherwise."""
    from cryptography import x509

    if not re.fullmatch(r"[0-2](\.[0-9]{1,39}){1,63}", value):
        raise ConfigError(key, f"{value[:60]!r} is not a dotted OID")
    try:
        x509.ObjectIdentifier(value)
    except ValueError:
        raise ConfigError(key, f"{value[:60]!r} is not a valid OID") from None
    return value


def _regex(key: str, value: str) -> str:
    # re.compile raises OverflowError for a{99999999999}, RecursionError for deep groups.
    try:
        re.compile(value)
    except (re.error, OverflowError, RecursionError) as e:
        raise ConfigError(key, f"not a regular expression: {e}") from None
    return value


def _eku(key: str, value: str) -> str:
    oid = EKU_NAMES.get(value, value)
    if not re.fullmatch(r"[0-2](\.[0-9]{1,39}){2,63}", oid):
        known = ", ".join(EKU_NAMES)
        raise ConfigError(key, f"{value[:60]!r} is neither a known name ({known}) nor a dotted OID")
    return _oid(key, oid)


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
    problem = _template_problem(prompt, PIN_PROMPT_FIELDS)
    if problem:
        raise ConfigError(t.key("pin_prompt"), problem)
    cfg = Pkcs11Config(
        module=t.text("module", d.module),
        uri=uri,
        wait_for_card=t.number("wait_for_card", d.wait_for_card),
        pin_prompt=prompt,
        allow_pinpad=t.flag("allow_pinpad", d.allow_pinpad),
        pass_environment=_variable_names(t, "pass_environment"),
        helper_user=t.text("helper_user", "") or None,
    )
    if cfg.helper_user is not None and not _USER_NAME.fullmatch(cfg.helper_user):
        raise ConfigError(t.key("helper_user"), f"{cfg.helper_user!r} is not a user name")
    if not cfg.module.startswith("/"):
        raise ConfigError(t.key("module"), "must be an absolute path to a PKCS#11 module")
    t.done()
    return cfg


_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
_USER_NAME = re.compile(r"[a-z_][a-z0-9_-]{0,31}")


def _variable_names(t: _Table, name: str) -> tuple[str, ...]:
    names = t.strings(name, ())
    for i, v in enumerate(names):
        if not _ENV_NAME.fullmatch(v):
            raise ConfigError(f"{t.key(name)}[{i}]", f"{v!r} is not an environment variable name")
    return names


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
        ocsp_reuse=t.number("ocsp_reuse", d.ocsp_reuse),
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
    cfg = AuditConfig(
        path=t.path("path", d.path) or d.path,
        syslog=t.flag("syslog", d.syslog),
        seal_key=t.path("seal_key", d.seal_key) or d.seal_key,
        seal_every=t.integer("seal_every", d.seal_every, minimum=1, maximum=1_000_000),
        disk_full_action=t.enum("disk_full_action", d.disk_full_action),
    )
    t.done()
    return cfg


def _policy(t: _Table) -> PolicyConfig:
    d = PolicyConfig()
    cfg = PolicyConfig(
        enabled=t.flag("enabled", d.enabled),
        source=t.enum("source", d.source),
        file=t.path("file", d.file) or d.file,
        directory_dn=t.text("directory_dn", d.directory_dn),
        signer_eku=_eku(t.key("signer_eku"), t.text("signer_eku", d.signer_eku)),
        state_dir=t.path("state_dir", d.state_dir) or d.state_dir,
        host=t.text("host", d.host),
    )
    if cfg.source is PolicySource.DIRECTORY and not cfg.directory_dn:
        raise ConfigError(t.key("directory_dn"), "is required when source is 'directory'")
    t.done()
    return cfg


def _session(t: _Table) -> SessionConfig:
    d = SessionConfig()
    cfg = SessionConfig(
        allowlist_dir=t.path("allowlist_dir", d.allowlist_dir) or d.allowlist_dir,
        state_dir=t.path("state_dir", d.state_dir) or d.state_dir,
        allowlist_ttl=t.number("allowlist_ttl", d.allowlist_ttl, minimum=60),
    )
    t.done()
    return cfg


def _launcher(t: _Table) -> LauncherConfig:
    d = LauncherConfig()
    if "vm_user" in t.data:
        raise ConfigError(
            t.key("vm_user"),
            "is replaced by vm_uid_min and vm_uid_max: every VM runs as a uid of its own",
        )
    uid_min = t.integer("vm_uid_min", d.vm_uid_min, minimum=1000, maximum=(1 << 32) - 3)
    uid_max = t.integer("vm_uid_max", d.vm_uid_max, minimum=1000, maximum=(1 << 32) - 3)
    if uid_min > uid_max:
        raise ConfigError(t.key("vm_uid_min"), f"{uid_min} is above vm_uid_max {uid_max}")
    if uid_min <= 65534 <= uid_max:
        raise ConfigError(t.key("vm_uid_max"), "the range must not contain nobody (65534)")
    low, high = DYNAMIC_UID_RANGE
    if uid_min <= high and low <= uid_max:
        raise ConfigError(
            t.key("vm_uid_min"),
            f"{uid_min}-{uid_max} overlaps systemd's DynamicUser range {low}-{high}: a service "
            f"could be given a running VM's uid and read its memory (default "
            f"{d.vm_uid_min}-{d.vm_uid_max})",
        )
    sock = t.path("socket", d.socket) or d.socket
    if len(os.fsencode(sock)) >= 108:
        raise ConfigError(t.key("socket"), "is too long for a unix socket (107 bytes at most)")
    cfg = LauncherConfig(
        socket=sock,
        vm_uid_min=uid_min,
        vm_uid_max=uid_max,
        run_dir=t.path("run_dir", d.run_dir) or d.run_dir,
        registry_dir=t.path("registry_dir", d.registry_dir) or d.registry_dir,
        start_timeout=t.number("start_timeout", d.start_timeout, minimum=0.5),
        powerdown_timeout=t.number("powerdown_timeout", d.powerdown_timeout, minimum=0),
        quit_timeout=t.number("quit_timeout", d.quit_timeout, minimum=0.1),
        term_timeout=t.number("term_timeout", d.term_timeout, minimum=0.1),
        kill_timeout=t.number("kill_timeout", d.kill_timeout, minimum=0.1),
        card_removal=t.enum("card_removal", d.card_removal),
        card_poll_interval=t.number("card_poll_interval", d.card_poll_interval, minimum=0.05),
        card_removal_locks_sessions=t.flag(
            "card_removal_locks_sessions", d.card_removal_locks_sessions
        ),
        on_last_logout=t.enum("on_last_logout", d.on_last_logout),
        on_session_lost=t.enum("on_session_lost", d.on_session_lost),
        on_grant_revoked=t.enum("on_grant_revoked", d.on_grant_revoked),
        networks=_networks(t.sub("networks")),
    )
    t.done()
    return cfg


_NET_NAME = re.compile(r"[a-z][a-z0-9_-]{0,30}")  # becomes part of QEMU ids (adapters/qemu.py)
_IFNAME = re.compile(r"[A-Za-z0-9_.-]{1,15}")  # a Linux interface name (IFNAMSIZ - 1)


def _networks(t: _Table) -> tuple[NetworkBackend, ...]:
    out = []
    for name in sorted(t.data):
        sub = t.sub(name)
        if not _NET_NAME.fullmatch(name):
            raise ConfigError(
                sub.prefix,
                "a network name is a lower-case letter, then up to 30 lower-case "
                "letters, digits, '-' or '_'",
            )
        kind = sub.enum("kind", NetworkKind.USER)
        if "kind" not in sub.data:
            raise ConfigError(sub.key("kind"), "is required ('user' or 'bridge')")
        restrict = sub.flag("restrict", True)
        bridge = sub.text("bridge", "")
        if kind is NetworkKind.BRIDGE:
            if not _IFNAME.fullmatch(bridge) or bridge in (".", ".."):
                raise ConfigError(sub.key("bridge"), f"{bridge!r} is not an interface name")
            if "restrict" in sub.data:
                raise ConfigError(sub.key("restrict"), "applies to kind 'user' only")
        elif bridge:
            raise ConfigError(sub.key("bridge"), "applies to kind 'bridge' only")
        sub.done()
        out.append(NetworkBackend(name, kind, restrict, bridge))
    return tuple(out)


def _ldap_uri(key: str, uri: str) -> str:
    if not uri.startswith(("ldap://", "ldaps://")):
        raise ConfigError(key, f"must be an ldap:// or ldaps:// URI, got {uri!r}")
    return uri


def _directory(t: _Table) -> DirectoryConfig:
    d = DirectoryConfig()
    uris = tuple(_ldap_uri(f"{t.key('uris')}[{i}]", u) for i, u in enumerate(t.strings("uris", ())))
    cfg = DirectoryConfig(
        enabled=t.flag("enabled", d.enabled),
        uris=uris,
        base_dn=t.text("base_dn", d.base_dn),
        users_base=t.text("users_base", d.users_base),
        groups_base=t.text("groups_base", d.groups_base),
        user_filter=t.text("user_filter", d.user_filter),
        bind_dn=t.text("bind_dn", d.bind_dn),
        bind_password_file=t.path("bind_password_file", None),
        tls=t.enum("tls", d.tls),
        ca_file=t.path("ca_file", None),
        connect_timeout=t.number("connect_timeout", d.connect_timeout, minimum=0.1),
        search_timeout=t.number("search_timeout", d.search_timeout, minimum=0.1),
        retry_interval=t.number("retry_interval", d.retry_interval),
        total_timeout=t.number("total_timeout", d.total_timeout, minimum=0.1),
        role_groups_base=t.text("role_groups_base", d.role_groups_base),
        role_attribute=t.text("role_attribute", d.role_attribute),
        nested_depth=t.integer("nested_depth", d.nested_depth, minimum=0, maximum=10),
        require_certificate_in_entry=t.flag(
            "require_certificate_in_entry", d.require_certificate_in_entry
        ),
        disabled_attribute=t.text("disabled_attribute", d.disabled_attribute),
        cache_dir=t.path("cache_dir", d.cache_dir) or d.cache_dir,
        cache_max_age=t.number("cache_max_age", d.cache_max_age),
    )
    if cfg.enabled:
        if not cfg.uris:
            raise ConfigError(t.key("uris"), "at least one URI is required when enabled")
        if not cfg.base_dn:
            raise ConfigError(t.key("base_dn"), "is required when enabled")
        if cfg.bind_dn and cfg.bind_password_file is None:
            raise ConfigError(t.key("bind_password_file"), "is required with bind_dn")
    if not (cfg.user_filter.startswith("(") and cfg.user_filter.endswith(")")):
        raise ConfigError(t.key("user_filter"), "must be an LDAP filter in parentheses")
    t.done()
    return cfg


_TEMPLATE_FIELDS = frozenset(
    {
        "cert",
        "cert_exact",
        "subject",
        "issuer",
        "serial",
        "upn",
        "upn_local",
        "email",
        "email_local",
        "cn",
    }
)


def _certmap(t: _Table) -> CertmapConfig:
    raw = t.get("rules", [])
    if not isinstance(raw, list):
        raise ConfigError(t.key("rules"), "must be an array of tables")
    import re

    rules = []
    names: set[str] = set()
    for i, r in enumerate(raw):
        rt = _Table(r, f"{t.key('rules')}[{i}]")
        name = rt.text("name", f"rule{i}")
        if name in names:
            raise ConfigError(rt.key("name"), f"duplicate rule name {name!r}")
        names.add(name)
        template = rt.text("map", "")
        if not (template.startswith("(") and template.endswith(")")):
            raise ConfigError(rt.key("map"), "must be an LDAP filter template in parentheses")
        for fld in re.findall(r"\{([^}]*)\}", template):
            base, _, arg = fld.partition(":")
            if base not in _TEMPLATE_FIELDS and base != "subject_attr":
                known = ", ".join(sorted(_TEMPLATE_FIELDS | {"subject_attr:OID"}))
                raise ConfigError(rt.key("map"), f"unknown field {{{fld}}}; known: {known}")
            if base == "subject_attr":
                _oid(rt.key("map"), arg)
        match = _Table(rt.get("match", {}), rt.key("match"))
        for rx_key in ("issuer", "subject"):
            _regex(match.key(rx_key), match.text(rx_key, ""))
        sans = []
        for j, kind in enumerate(match.strings("san", ())):
            try:
                sans.append(SanKind(kind))
            except ValueError:
                raise ConfigError(
                    f"{match.key('san')}[{j}]", f"{kind!r} is not upn, email or dns"
                ) from None
        rules.append(
            CertmapRule(
                name=name,
                map=template,
                priority=rt.integer("priority", 100, minimum=0, maximum=1_000_000),
                match_issuer=match.text("issuer", ""),
                match_subject=match.text("subject", ""),
                match_ekus=tuple(
                    _eku(f"{match.key('eku')}[{j}]", v)
                    for j, v in enumerate(match.strings("eku", ()))
                ),
                match_san=tuple(sans),
            )
        )
        match.done()
        rt.done()
    t.done()
    return CertmapConfig(rules=tuple(sorted(rules, key=lambda r: r.priority)))


def _password(t: _Table) -> PasswordConfig:
    d = PasswordConfig()
    cfg = PasswordConfig(
        enabled=t.flag("enabled", d.enabled),
        services=t.strings("services", d.services),
        card_required_roles=t.strings("card_required_roles", d.card_required_roles),
    )
    t.done()
    return cfg


def _nss(t: _Table) -> NssConfig:
    d = NssConfig()
    cfg = NssConfig(
        dir=t.path("dir", d.dir) or d.dir,
        uid_min=t.integer("uid_min", d.uid_min, minimum=1000, maximum=(1 << 31) - 2),
        uid_max=t.integer("uid_max", d.uid_max, minimum=1000, maximum=(1 << 31) - 2),
        gid_min=t.integer("gid_min", d.gid_min, minimum=1000, maximum=(1 << 31) - 2),
        gid_max=t.integer("gid_max", d.gid_max, minimum=1000, maximum=(1 << 31) - 2),
    )
    if cfg.uid_min > cfg.uid_max:
        raise ConfigError(t.key("uid_max"), "must not be below uid_min")
    if cfg.gid_min > cfg.gid_max:
        raise ConfigError(t.key("gid_max"), "must not be below gid_min")
    t.done()
    return cfg


def _issue(t: _Table) -> IssueConfig:
    cmd = t.strings("ca_command", ())
    if cmd and not cmd[0].startswith("/"):
        raise ConfigError(t.key("ca_command"), "the first element must be an absolute path")
    cfg = IssueConfig(
        ca_command=cmd,
        publish_bind_dn=t.text("publish_bind_dn", ""),
        publish_password_file=t.path("publish_password_file", None),
    )
    t.done()
    return cfg


def _volumes(t: _Table) -> VolumesConfig:
    d = VolumesConfig()
    cfg = VolumesConfig(
        enabled=t.flag("enabled", d.enabled),
        dir=t.path("dir", d.dir) or d.dir,
        mode=t.enum("mode", d.mode),
    )
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
        directory=_directory(top.sub("directory")),
        certmap=_certmap(top.sub("certmap")),
        password=_password(top.sub("password")),
        nss=_nss(top.sub("nss")),
        issue=_issue(top.sub("issue")),
        policy=_policy(top.sub("policy")),
        volumes=_volumes(top.sub("volumes")),
        session=_session(top.sub("session")),
        launcher=_launcher(top.sub("launcher")),
    )
    if cfg.volumes.enabled and not cfg.policy.enabled:
        raise ConfigError("volumes.enabled", "needs [policy] enabled (grants name the volumes)")
    if cfg.policy.source is PolicySource.DIRECTORY and not cfg.directory.enabled:
        raise ConfigError("policy.source", "'directory' needs [directory] enabled")
    if cfg.directory.enabled and not cfg.certmap.rules:
        raise ConfigError("certmap.rules", "at least one rule is required with a directory")
    if cfg.directory.enabled and cfg.directory.total_timeout > cfg.auth.login_timeout:
        raise ConfigError(
            "directory.total_timeout",
            f"must not exceed auth.login_timeout ({cfg.auth.login_timeout:g} s)",
        )
    top.done()
    return cfg


def resolve_path(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The file to read: the explicit path, else the default. Never the environment: the PAM
    module runs as root inside su and sudo with the caller's environment (invariant 9).
    Only the `svmm` command, which runs with its own caller's rights, reads $SVMM_CONFIG
    (cli/main.py)."""
    return Path(explicit) if explicit else DEFAULT_PATH


def load(path: str | os.PathLike[str] | None = None) -> Config:
    p = resolve_path(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise ConfigError(str(p), "file not found") from None
    except OSError as e:
        raise ConfigError(str(p), f"cannot read: {e.strerror}") from None
    try:
        # nan and inf get through here: _Table.number refuses them naming the key
        data = loads_toml(raw, max_bytes=MAX_FILE_BYTES, max_depth=MAX_DEPTH, finite=False)
    except InputMalformed as e:
        raise ConfigError(str(p), e.message) from None
    cfg = parse(data, source=p)
    if os.geteuid() == 0:
        _refuse_untrusted(cfg, p)
    return cfg


def trusted_files(cfg: Config, source: Path) -> list[tuple[str, Path]]:
    """The files a root login believes, by the key that names them (invariant 10)."""
    files: list[tuple[str, Path]] = [("configuration", source)]
    files += [("trust.anchors", a) for a in cfg.trust.anchors]
    if cfg.trust.intermediates_dir is not None:
        files.append(("trust.intermediates_dir", cfg.trust.intermediates_dir))
    if os.path.isabs(cfg.pkcs11.module):
        files.append(("pkcs11.module", Path(cfg.pkcs11.module)))  # dlopen()ed as root
    optional = (
        ("directory.bind_password_file", cfg.directory.bind_password_file),
        ("directory.ca_file", cfg.directory.ca_file),
        ("mutual.host_cert", cfg.mutual.host_cert),
        ("mutual.host_key", cfg.mutual.host_key),
        ("issue.publish_password_file", cfg.issue.publish_password_file),
    )
    files += [(key, path) for key, path in optional if path is not None]
    files.append(("audit.seal_key", cfg.audit.seal_key))
    return files


def _refuse_untrusted(cfg: Config, source: Path) -> None:
    from .trusted_path import first_problem

    found = first_problem(trusted_files(cfg, source))
    if found is not None:
        key, why = found
        raise ConfigError(key, f"{why}: root trusts only files and folders no one else can change")
