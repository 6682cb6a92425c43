"""`svmm policy check|sign|explain|grants|show|load`: the VM policy and its signed bundles.

explain/grants use the host's accepted policy (or ``--policy FILE``, a TOML document, to try
one out) and the user's roles from the directory when it is configured and ``--roles`` is
not given. `explain` exits 0 when the action is allowed, 1 when it is denied.
"""

from __future__ import annotations

import argparse
import datetime as dt
import getpass
import hashlib
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from .. import config as config_mod
from ..config import POLICY_SIGNING_EKU, Config
from ..domain import policy as pdp
from ..errors import (
    CertificateInvalid,
    ConfigError,
    PolicyBundleInvalid,
    PolicyError,
    PolicyUnavailable,
    SvmmError,
    UnknownUser,
)
from .common import add_json, print_json

if TYPE_CHECKING:
    from ..services.policy import PolicyService

EXIT_DENIED = 1


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("policy", help="the VM policy: check, sign, explain decisions")
    s = p.add_subparsers(dest="cmd", required=True, metavar="SUBCOMMAND")

    c = s.add_parser("check", help="validate a policy document (TOML) and list warnings")
    c.add_argument("file", type=Path)
    c.add_argument("--strict", action="store_true", help="warnings fail the check too")
    add_json(c)
    c.set_defaults(func=check)

    g = s.add_parser("sign", help="sign a policy document into a bundle")
    g.add_argument("file", type=Path, help="policy document (TOML)")
    g.add_argument("--key", type=Path, required=True, help="signing key (PEM; asks a passphrase)")
    g.add_argument("--cert", type=Path, required=True, help="the key's certificate (PEM)")
    g.add_argument(
        "--chain", type=Path, action="append", default=[], help="intermediate CA certificates"
    )
    g.add_argument("--anchor", type=Path, action="append", default=[], help="verify against")
    g.add_argument("--eku", default=POLICY_SIGNING_EKU, help="the policy-signing EKU (OID)")
    g.add_argument("-o", "--output", type=Path, required=True, help="bundle file to write")
    g.set_defaults(func=sign)

    e = s.add_parser("explain", help="the decision for USER on VM and the rule that made it")
    e.add_argument("user")
    e.add_argument("vm")
    e.add_argument("--action", default="boot", help="boot, console, usb:VID:PID, network:NAME")
    e.add_argument("--running", default="", help="VMs the user runs now, comma-separated")
    _subject_args(e)
    add_json(e)
    e.set_defaults(func=explain)

    r = s.add_parser("grants", help="the VMs and permissions a user's grants give")
    r.add_argument("user")
    _subject_args(r)
    add_json(r)
    r.set_defaults(func=grants)

    sh = s.add_parser("show", help="the accepted policy bundle: version, signer, when")
    add_json(sh)
    sh.set_defaults(func=show)

    ld = s.add_parser("load", help="fetch, verify and accept the bundle from the source now")
    add_json(ld)
    ld.set_defaults(func=load)

    rl = s.add_parser(
        "reload", help="have svmmd load the bundle now and apply it to running VMs (root)"
    )
    rl.add_argument("--socket", type=Path, help="svmmd's socket (default: launcher.socket)")
    rl.set_defaults(func=reload)


def _subject_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--roles", help="comma-separated roles (default: from the directory)")
    p.add_argument("--policy", type=Path, help="a policy document (TOML) instead of the host's")


def _csv(text: str | None) -> list[str]:
    return [x.strip() for x in (text or "").split(",") if x.strip()]


# --- check / sign --------------------------------------------------------------------------


def check(args: argparse.Namespace) -> int:
    data = _read(args.file)
    policy: pdp.Policy | None = None
    error: PolicyError | None = None
    try:
        policy = pdp.parse_policy(data)
        pdp.compile_policy(policy)
    except PolicyError as e:
        error = e
    doc = check_json(args.file, policy, error, strict=args.strict)
    if args.json:
        print_json(doc)
    elif error is not None:
        print(f"{args.file}: {error.message}", file=sys.stderr)
    else:
        assert policy is not None
        print(f"{args.file}: {pdp.summary(policy)}")
        for w in doc["warnings"]:
            print(f"warning: {w}")
        print(f"{len(doc['warnings'])} warning(s)")
    if error is not None:
        return 1
    return 1 if doc["warnings"] and args.strict else 0


def check_json(
    path: Path, policy: pdp.Policy | None, error: PolicyError | None, *, strict: bool
) -> dict[str, Any]:
    """`svmm policy check --json`: valid or the error, the counts and the warnings."""
    valid = error is None and policy is not None
    return {
        "file": str(path),
        "valid": valid,
        "error": error.message if error is not None else None,
        "version": policy.version if valid and policy else None,
        "counts": {
            "hosts": len(policy.hosts),
            "vms": len(policy.vms),
            "networks": len(policy.networks),
            "grants": len(policy.grants),
            "conflicts": len(policy.conflicts),
        }
        if valid and policy
        else None,
        "warnings": pdp.lint(policy) if valid and policy else [],
        "strict": strict,
    }


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise ConfigError(str(path), f"cannot read: {e.strerror}") from None


def _load_key(path: Path) -> rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey:
    data = _read(path)
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        # Encrypted: the passphrase from the terminal, never from argv or the environment.
        passphrase = getpass.getpass(f"passphrase for {path}: ").encode()
        try:
            key = serialization.load_pem_private_key(data, password=passphrase)
        except ValueError:
            raise ConfigError(str(path), "wrong passphrase or not a PEM private key") from None
    except ValueError:
        raise ConfigError(str(path), "not a PEM private key") from None
    if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        raise ConfigError(str(path), "policy signing keys are RSA or EC")
    return key


def _load_certs(path: Path) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(_read(path))
    except ValueError:
        raise ConfigError(str(path), "not a PEM certificate file") from None
    return certs


def sign(args: argparse.Namespace) -> int:
    from ..domain.certpolicy import CertPolicy, check_leaf
    from ..domain.policy_bundle import make_bundle, verify_bundle

    data = _read(args.file)
    policy = pdp.parse_policy(data)  # never sign an invalid policy
    pdp.compile_policy(policy)
    key = _load_key(args.key)
    leaf = _load_certs(args.cert)[0]
    chain = [leaf] + [c for p in args.chain for c in _load_certs(p)]
    now = dt.datetime.now(dt.UTC)
    # The checks a host makes on the signer, before anything is written.
    check_leaf(leaf, at=now, policy=CertPolicy(extended_key_usages=(args.eku,)))
    try:
        bundle = make_bundle(data, key, chain)
    except PolicyBundleInvalid as e:  # the key is not the certificate's
        raise CertificateInvalid(
            f"{args.key} does not match {args.cert}: {e}", reason="key_mismatch"
        ) from None
    if args.anchor:
        anchors = [c for p in args.anchor for c in _load_certs(p)]
        verify_bundle(bundle, anchors, at=now, eku=args.eku)
    _write_atomic(args.output, bundle)
    print(
        f"signed policy version {policy.version} by {leaf.subject.rfc4514_string()} -> "
        f"{args.output} (sha256 {hashlib.sha256(bundle).hexdigest()})"
    )
    return 0


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# --- explain / grants ----------------------------------------------------------------------


def _config(args: argparse.Namespace) -> Config:
    return config_mod.load(args.config)


def _service(cfg: Config) -> PolicyService:
    from ..services.policy import PolicyService

    return PolicyService(cfg)


def _compiled(args: argparse.Namespace, cfg: Config | None) -> tuple[pdp.CompiledPolicy, str]:
    if args.policy is not None:
        return pdp.load_policy(_read(args.policy)), f"{args.policy} (not signed)"
    assert cfg is not None
    accepted = _service(cfg).accepted()
    if accepted is None:
        raise PolicyUnavailable(
            f"no accepted policy in {cfg.policy.state_dir} (run `svmm policy load`)"
        )
    return accepted.compiled, f"accepted, signed by {accepted.signer_subject}"


def _roles(args: argparse.Namespace, cfg: Config | None) -> tuple[list[str], str]:
    if args.roles is not None:
        return _csv(args.roles), "--roles"
    if cfg is None or not cfg.directory.enabled:
        return [], "no directory configured and no --roles"
    from .nss import _closing, identity_source

    with _closing(identity_source(cfg)) as source:
        ident = source.user_by_name(args.user)
    if ident is None:
        raise UnknownUser(f"{args.user}: no such user in the directory")
    return list(ident.roles), "directory"


def _maybe_config(args: argparse.Namespace) -> Config | None:
    # --policy with --roles needs no configuration at all (trying a policy out).
    if args.policy is not None and args.roles is not None:
        return None
    if args.policy is not None:
        try:
            return _config(args)
        except ConfigError:
            return None
    return _config(args)


def explain(args: argparse.Namespace) -> int:
    cfg = _maybe_config(args)
    compiled, origin = _compiled(args, cfg)
    roles, roles_from = _roles(args, cfg)
    running = _csv(args.running)
    d = pdp.decide(compiled, pdp.Subject(args.user, roles), args.vm, args.action, running)
    doc = explain_json(args, d, roles, roles_from, running, compiled.version, origin)
    if args.json:
        print_json(doc)
    else:
        print(f"{args.user}: {args.action} {args.vm}: {'ALLOWED' if d.allowed else 'DENIED'}")
        print(f"  rule:    {d.rule}")
        print(f"  reason:  {d.reason}")
        print(f"  roles:   {', '.join(roles) or '-'} ({roles_from})")
        print(f"  running: {', '.join(running) or '-'}")
        print(f"  policy:  version {compiled.version}, {origin}")
    return 0 if d.allowed else EXIT_DENIED


def explain_json(
    args: argparse.Namespace,
    d: pdp.Decision,
    roles: list[str],
    roles_from: str,
    running: list[str],
    version: int,
    origin: str,
) -> dict[str, Any]:
    """`svmm policy explain --json`: the decision, the rule that made it, and its inputs."""
    return {
        "user": args.user,
        "vm": args.vm,
        "action": args.action,
        "allowed": d.allowed,
        "rule": d.rule,
        "reason": d.reason,
        "roles": roles,
        "roles_from": roles_from,
        "running": running,
        "policy": {"version": version, "origin": origin},
    }


def grants(args: argparse.Namespace) -> int:
    cfg = _maybe_config(args)
    compiled, origin = _compiled(args, cfg)
    roles, roles_from = _roles(args, cfg)
    found = pdp.grants_for(compiled, pdp.Subject(args.user, roles))
    doc = grants_json(args.user, compiled, found, roles, roles_from, origin)
    if args.json:
        print_json(doc)
        return 0
    print(f"{args.user}: roles {', '.join(roles) or '-'} ({roles_from})")
    print(f"policy: version {compiled.version}, {origin}")
    if not doc["vms"]:
        print("no VM (default deny)")
    for vm in doc["vms"]:
        perms = ", ".join(vm["permissions"])
        print(f"  {vm['vm']:<16} {perms}   (class {vm['class'] or '-'}, type {vm['type'] or '-'})")
    return 0


def grants_json(
    user: str,
    compiled: pdp.CompiledPolicy,
    found: dict[str, frozenset[str]],
    roles: list[str],
    roles_from: str,
    origin: str,
) -> dict[str, Any]:
    """`svmm policy grants --json`: the VMs the user's grants give, with their permissions."""
    vms = []
    for vm_id in sorted(found):
        vm = compiled.policy.vms[vm_id]
        vms.append({"vm": vm_id, "permissions": sorted(found[vm_id]),
                    "class": vm.vm_class or None, "type": vm.type or None})  # fmt: skip
    return {
        "user": user,
        "roles": roles,
        "roles_from": roles_from,
        "policy": {"version": compiled.version, "origin": origin},
        "vms": vms,
    }


# --- show / load ---------------------------------------------------------------------------


def show(args: argparse.Namespace) -> int:
    cfg = _config(args)
    accepted, floor, problem = _service(cfg).store.accepted_state()
    doc = show_json(cfg, accepted, floor, problem)
    if args.json:
        print_json(doc)
        return 0 if accepted is not None else 3
    if problem is not None:
        print(f"state problem: {problem.message}")
    p = doc["policy"]
    if p is None:
        print(
            f"no accepted policy in {cfg.policy.state_dir}" + (f" (floor {floor})" if floor else "")
        )
        return 3
    print(f"version:      {p['version']}")
    print(f"sha256:       {p['sha256']}")
    print(f"signer:       {p['signer']}")
    print(f"signer sha256 {p['signer_sha256']}")
    print(f"accepted at:  {p['accepted_at']}")
    print(f"summary:      {p['summary']}")
    return 0


def show_json(
    cfg: Config, accepted: Any, floor: int | None, problem: SvmmError | None
) -> dict[str, Any]:
    """`svmm policy show --json`: the accepted bundle (null when none), the state's floor
    (the lowest version the host still accepts) and any problem with the state."""
    return {
        "state_dir": str(cfg.policy.state_dir),
        "floor": floor or None,
        "state_problem": problem.message if problem is not None else None,
        "policy": None
        if accepted is None
        else {
            "version": accepted.version,
            "sha256": accepted.sha256,
            "signer": accepted.signer_subject,
            "signer_sha256": accepted.signer_fingerprint,
            "accepted_at": accepted.accepted_at.isoformat(),
            "summary": pdp.summary(accepted.compiled.policy),
        },
    }


def load(args: argparse.Namespace) -> int:
    from ..adapters.audit_log import AuditLog
    from ..adapters.policy_store import LoadEvent

    cfg = _config(args)
    service = _service(cfg)
    result = service.load()
    log = AuditLog(
        cfg.audit.path,
        syslog_mirror=cfg.audit.syslog,
        seal_key=cfg.audit.seal_key,
        seal_every=cfg.audit.seal_every,
    )
    log.write(service.audit_record(result))
    if args.json:
        print_json(load_json(result))
    else:
        print(result.describe())
    if result.event is LoadEvent.NONE:
        return 3
    return 1 if result.refused else 0


def reload(args: argparse.Namespace) -> int:
    """svmmd loads the bundle now (it also notices a changed file by itself within seconds):
    a grant taken away applies [launcher] on_grant_revoked to the VMs it no longer allows."""
    from ..adapters.launcher_client import call
    from ..errors import LauncherRefused

    sock = args.socket or _config(args).launcher.socket
    reply = call(sock, {"op": "policy_reload"})
    if not reply.get("ok"):
        raise LauncherRefused(
            f"reload: {reply.get('message') or reply.get('reason')}",
            reason=str(reply.get("reason") or "launcher_refused"),
        )
    print(reply.get("message", "policy reloaded"))
    return 0


def load_json(result: Any) -> dict[str, Any]:
    """`svmm policy load --json`: what the load found and what is in force after it."""
    return {
        "source": result.source,
        "event": result.event.value,
        "reason": result.reason,
        "version": result.policy.version if result.policy is not None else None,
        "previous_version": result.previous_version,
        "refused": result.problem.message if result.problem is not None else None,
    }
