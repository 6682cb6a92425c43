"""The JSON shape of each `svmm ... --json` command, and a checker (no jsonschema here).

A schema is a dict of key -> what its value must be: a type, a nested schema dict, ``[item]``
for a list of such items, or a tuple of alternatives (``OPT_STR`` is a string or null). The keys
must be exactly those of the schema (a key ending in "?" may be absent), so a renamed or
dropped key fails a test (keys may be added: add them here too).
"""

from __future__ import annotations

import json
from typing import Any

NONE = type(None)
OPT_STR = (str, NONE)
OPT_INT = (int, NONE)

Schema = dict[str, Any]


def check(value: Any, schema: Any, where: str = "$") -> None:
    """Raise AssertionError naming the first place ``value`` does not fit ``schema``."""
    if isinstance(schema, dict):
        assert isinstance(value, dict), f"{where}: {value!r} is not an object"
        keys = {k.rstrip("?") for k in schema}
        required = {k for k in schema if not k.endswith("?")}
        extra, missing = sorted(set(value) - keys), sorted(required - set(value))
        assert not extra and not missing, f"{where}: extra keys {extra}, missing {missing}"
        for k, sub in schema.items():
            if k.rstrip("?") in value:
                check(value[k.rstrip("?")], sub, f"{where}.{k.rstrip('?')}")
    elif isinstance(schema, list):
        assert isinstance(value, list), f"{where}: {value!r} is not a list"
        for i, item in enumerate(value):
            check(item, schema[0], f"{where}[{i}]")
    elif isinstance(schema, tuple):  # one of these
        problems = []
        for alternative in schema:
            try:
                check(value, alternative, where)
                return
            except AssertionError as e:
                problems.append(str(e))
        raise AssertionError(" / ".join(problems))
    else:
        # bool is an int to Python; not to a JSON reader
        ok = isinstance(value, schema) and (schema is bool or not isinstance(value, bool))
        assert ok, f"{where}: {value!r} is not {schema.__name__}"


def parse(out: str, schema: Schema) -> dict[str, Any]:
    """The one JSON document a command printed, checked against its schema."""
    doc = json.loads(out)
    check(doc, schema)
    return doc


# `svmm crl refresh --json` (pam_svmm/cli/crl.py, refresh_json): one entry per CRL source.
CRL_REFRESH: Schema = {
    "cache_dir": str,
    "ok": bool,  # every source indexed, fresh or skipped (exit 0); else exit 3
    "sources": [
        {
            "source": str,  # file:/path or the URL
            "origin": str,  # crl_files, ca_certificate, cache, command_line
            "issuer": OPT_STR,
            "action": str,  # fetched, indexed, unchanged, fresh, skipped, failed
            "detail": str,
            "this_update": OPT_STR,
            "next_update": OPT_STR,
            "entries": OPT_INT,
        }
    ],
}

AUDIT_VERIFY: Schema = {
    "path": str,
    "intact": bool,
    "records": int,
    "seals": int,
    "last_seq": int,
    "sealed": bool,
    "legacy": int,
    "gaps": [{"line": int, "lines": int, "bytes": int, "seq": int}],
    "problem": ({"seq": int, "line": int, "kind": str, "detail": str}, NONE),
}

ID: Schema = {
    "user": str,
    "uid": int,
    "gid": int,
    "home": str,
    "shell": str,
    "gecos": str,
    "groups": [{"name": str, "gid": int}],
    "roles": [str],
    "dn": str,
    "source": str,
    "state": {"status": str, "reason": OPT_STR},
    "nss": {"eligible": bool, "synced": bool, "problem": OPT_STR, "detail": OPT_STR},
}

NSS_SYNC: Schema = {
    "dir": str,
    "dry_run": bool,
    "written": bool,
    "passwd": {"entries": int, "skipped": int},
    "group": {"entries": int, "skipped": int, "members_dropped": int},
    "conflicts": int,
    "skipped": [{"kind": str, "name": str, "reason": str, "detail": str}],
    "gecos_sanitised": [str],
    "text": ({"passwd": str, "group": str}, NONE),  # --dry-run --show
}

NSS_STATUS: Schema = {
    "dir": str,
    "files": [{"name": str, "exists": bool, "entries": int, "age": (float, int, NONE)}],
    "conflicts": [{"file": str, "name": OPT_STR, "id": OPT_INT}],
}

# `svmm vm --json`: svmmd's reply (the svmm-launcher/1 protocol, services/launcher.py), with
# what the client learned added to ``data`` (QMP's state: ``status``, list's ``states``).
VM_REPLY: Schema = {"version": str, "ok": bool, "reason": str, "message": str, "data": dict}
VM_LIST_DATA: Schema = {
    "allowed": [{"vm": str, "permissions": [str], "running": bool}],
    "running": [str],
    "allowlist": str,
    "keys_held": [str],
    "volumes_open?": [str],  # dm-crypt mode only
    "states": dict,  # vm -> QMP run state (query-status), of the VMs in "running"
}

VOLUME_STATUS: Schema = {
    "path": str,
    "luks_version": int,
    "uuid": str,
    "owner": ({"kind": str, "name": str}, NONE),
    "custody": OPT_STR,
    "slots": [
        {
            "slot": int,
            "kind": str,  # card, escrow, other (not svmm's)
            "custody": OPT_STR,
            "recipient": OPT_STR,  # sha256 of the key the slot's secret is wrapped to
            "card": (dict, NONE),  # subject, cert-sha256, token-label, token-serial
        }
    ],
}

POLICY_CHECK: Schema = {
    "file": str,
    "valid": bool,
    "error": OPT_STR,
    "version": OPT_INT,
    "counts": ({"hosts": int, "vms": int, "networks": int, "grants": int, "conflicts": int}, NONE),
    "warnings": [str],
    "strict": bool,
}
POLICY_SOURCE: Schema = {"version": int, "origin": str}  # origin: signed by whom, or a file
POLICY_EXPLAIN: Schema = {
    "user": str,
    "vm": str,
    "action": str,
    "allowed": bool,
    "rule": str,
    "reason": str,
    "roles": [str],
    "roles_from": str,
    "running": [str],
    "policy": POLICY_SOURCE,
}
POLICY_GRANTS: Schema = {
    "user": str,
    "roles": [str],
    "roles_from": str,
    "policy": POLICY_SOURCE,
    "vms": [{"vm": str, "permissions": [str], "class": OPT_STR, "type": OPT_STR}],
}
POLICY_SHOW: Schema = {
    "state_dir": str,
    "floor": OPT_INT,
    "state_problem": OPT_STR,
    "policy": (
        {
            "version": int,
            "sha256": str,
            "signer": str,
            "signer_sha256": str,
            "accepted_at": str,
            "summary": str,
        },
        NONE,
    ),
}

CERTIFICATE: Schema = {"subject": str, "issuer": str, "serial": str, "sha256": str}
CERT_VERIFY: Schema = {
    "certificate": (CERTIFICATE, NONE),  # null: the file is no certificate
    "ok": bool,
    "steps": [{"check": str, "detail": str}],  # the checks that passed, in order
    "user": OPT_STR,  # whom a login with it would be
    "rule": OPT_STR,
    "reason": OPT_STR,  # why not (the error's reason token), with its message
    "message": OPT_STR,
}
CERT_MAP: Schema = {
    "certificate": CERTIFICATE,
    "rules": [{"name": str, "priority": int, "matched": bool, "detail": str, "filter": OPT_STR}],
    "directory": [{"rule": str, "search": str, "entries": [str], "decides": bool}],
    "identity": (
        {
            "dn": str,
            "user": str,
            "uid": int,
            "gid": int,
            "home": str,
            "shell": str,
            "groups": [{"name": str, "gid": int}],
            "roles": [str],
            "state": {"status": str, "reason": OPT_STR},
        },
        NONE,
    ),
    "ok": bool,
    "reason": OPT_STR,
    "message": OPT_STR,
}

DOCTOR: Schema = {
    "configuration": str,
    "checks": [{"status": str, "name": str, "detail": str}],  # status: ok, WARN, FAIL
    "failed": int,
    "warnings": int,
    "exit": int,  # 0 nothing failed, 1 a check failed, 2 could not run
}
POLICY_LOAD: Schema = {
    "source": str,
    "event": str,  # accepted, unchanged, kept, none
    "reason": str,
    "version": OPT_INT,  # in force after the load
    "previous_version": OPT_INT,
    "refused": OPT_STR,  # why the candidate was not accepted
}

# `svmm card list --json` (pam_svmm/cli/card.py, card_list_json): each token with the verdict a
# login would give each certificate on it, and the one a login would use.
CARD_CERTIFICATE: Schema = {
    "label": str,
    "id": str,  # CKA_ID in hex ("" when the object has none)
    "readable": bool,  # false: the DER does not parse (subject ... not_after are null)
    "ca": bool,  # a CA certificate on the card: never a login candidate
    "subject": OPT_STR,
    "key": OPT_STR,  # RSA-2048, EC P-256, ...
    "not_before": OPT_STR,  # ISO 8601, UTC
    "not_after": OPT_STR,
    "sha256": str,
    "stage": str,  # how far it got: parse, chain, mapping, user, revocation, passed
    "usable": bool,  # a login would accept it
    "user": OPT_STR,  # whom it maps to
    "rule": OPT_STR,
    "reason": OPT_STR,  # why not: the error's reason token, and its message
    "message": OPT_STR,
}
CARD_LIST: Schema = {
    "module": str,
    "user": OPT_STR,  # --user
    "tokens": [
        {
            "label": str,
            "serial": str,
            "slot": int,
            "manufacturer": str,
            "model": str,
            "login_required": bool,
            "pin_tries": str,  # unknown, count_low, final_try, locked
            "pin_pad": bool,
            "skipped": OPT_STR,  # why the listing passed the token over
            "problem": ({"reason": str, "message": str}, NONE),  # the token could not be read
            "certificates": [CARD_CERTIFICATE],
        }
    ],
    "chosen": (
        {"token": str, "token_serial": str, "certificate": str, "sha256": str, "user": str},
        NONE,
    ),
    "ok": bool,  # a login would find a certificate (exit 0)
    "reason": OPT_STR,  # why not (exit 1; no_card with no token at all: exit 3)
    "message": OPT_STR,
}
