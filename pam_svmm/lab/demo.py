"""The demo: build the lab, then log in with each card through the real PAM stack and say
what happened and why.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from .lab import Lab, free_ports


@dataclass(frozen=True)
class Scene:
    title: str
    cards: tuple[str, ...]
    pin: str
    user: str = ""
    expect: str = "PAM_SUCCESS"
    before: str = ""  # an action on the lab before the login


SCENES: tuple[Scene, ...] = (
    Scene("alice logs in with her card (RSA 2048)", ("alice",), "123456", "alice"),
    Scene("bob logs in; PAM_USER is taken from his card (EC P-256)", ("bob",), "123456"),
    Scene("carol logs in (EC P-384)", ("carol",), "123456", "carol"),
    Scene("alice types a wrong PIN", ("alice",), "000000", "alice", "PAM_AUTH_ERR"),
    Scene("alice's card is used to log in as bob", ("alice",), "123456", "bob", "PAM_AUTH_ERR"),
    Scene("mallory's card was revoked", ("mallory",), "123456", "mallory", "PAM_AUTH_ERR"),
    Scene("eve's certificate has expired", ("eve",), "123456", "eve", "PAM_AUTH_ERR"),
    Scene(
        "a forged card: alice's certificate, another key",
        ("forged",),
        "123456",
        "alice",
        "PAM_AUTH_ERR",
    ),
    Scene(
        "dave has one PIN try left and mistypes it: the PIN locks",
        ("dave",),
        "999999",
        "dave",
        "PAM_MAXTRIES",
    ),
    Scene(
        "dave's PIN is locked: the right PIN no longer helps",
        ("dave",),
        "123456",
        "dave",
        "PAM_MAXTRIES",
    ),
    Scene(
        "no card in the reader: the stack may fall through to a password",
        (),
        "",
        "alice",
        "PAM_AUTHINFO_UNAVAIL",
    ),
    Scene(
        "two cards inserted (bob's and alice's): alice's is picked for alice",
        ("bob", "alice"),
        "123456",
        "alice",
    ),
    Scene(
        "the OCSP responder is down: the CRL answers instead",
        ("alice",),
        "123456",
        "alice",
        before="stop-ocsp",
    ),
)


def run_demo(folder: Path, *, fresh: bool = False, out: TextIO = sys.stdout) -> int:
    def say(text: str = "") -> None:
        print(text, file=out, flush=True)

    if fresh and folder.exists():
        shutil.rmtree(folder)
    lab = Lab(folder)
    crl_port, ocsp_port = _ports(lab)
    t0 = time.monotonic()
    say(f"Building the demo lab in {folder} ...")
    lab.build(crl_port=crl_port, ocsp_port=ocsp_port, venv=Path(sys.prefix))
    say(f"  CA: {lab.ca.root.cert.subject.rfc4514_string()}")
    say(f"      -> {lab.ca.intermediate.cert.subject.rfc4514_string()}")
    say(f"  OCSP responder {lab.ca.ocsp_url}   CRLs {lab.ca.crl_base}/intermediate.crl")
    say(f"  PAM service {lab.pam_dir / 'svmm-login'}, configuration {lab.config_path}")
    say(f"  ready in {time.monotonic() - t0:.1f} s")
    say()
    failures = 0
    with lab.responders() as (ocsp, _crl):
        for i, scene in enumerate(SCENES, 1):
            if scene.before == "stop-ocsp":
                ocsp.stop()  # type: ignore[attr-defined]
            reader = lab.insert(*scene.cards)
            inserted = ", ".join(f"{c}'s card" for c in scene.cards) or "nothing"
            say(f"{i:2}. {scene.title}")
            say(f"    reader: {inserted}; PAM_USER: {scene.user or '(unset)'}")
            before = len(lab.audit_records())
            t = time.monotonic()
            outcome = lab.login(reader, pin=scene.pin, user=scene.user)
            ms = (time.monotonic() - t) * 1000
            for m in outcome.messages:
                if not m.startswith("PIN for"):
                    say(f"    the module said: {m}")
            records = lab.audit_records()[before:]
            rec = records[-1] if records else {}
            verdict = "as expected" if outcome.name == scene.expect else f"EXPECTED {scene.expect}"
            who = f" as {outcome.user}" if outcome.ok else ""
            say(f"    result: {outcome.name}{who} ({ms:.0f} ms) -- {verdict}")
            if rec:
                card = rec.get("card", {})
                fp = str(card.get("fingerprint", ""))[:16] if isinstance(card, dict) else ""
                say(
                    f"    audit:  outcome={rec['outcome']} reason={rec['reason']}"
                    f" user={rec['user'] or '-'} card={fp or '-'}"
                )
                if rec.get("detail"):
                    say(f"            {rec['detail']}")
            if outcome.name != scene.expect:
                failures += 1
            say()
        reader = lab.insert("alice")
        proc = lab.pamtester(reader, pin="123456", user="alice")
        say("pamtester, a separate PAM application, logs alice in:")
        for line in (proc.stdout + proc.stderr).splitlines():
            if line.startswith("pamtester:"):
                say(f"    {line}")
        if proc.returncode != 0:
            failures += 1
    say()
    say(f"Audit trail: {lab.audit_path} ({len(lab.audit_records())} records). Try:")
    say(f"  export SVMM_CONFIG={lab.config_path}")
    say(f"  {sys.prefix}/bin/svmm cert verify {lab.cards_dir / 'mallory' / 'cert.pem'}")
    say(
        f"  {sys.prefix}/bin/svmm lab shell --dir {folder} alice -- {sys.prefix}/bin/svmm card list"
    )
    say()
    say(
        "Demo finished: every scene as expected."
        if not failures
        else f"Demo finished: {failures} scene(s) NOT as expected."
    )
    return 0 if not failures else 1


def _ports(lab: Lab) -> tuple[int, int]:
    """Reuse the ports an existing lab's certificates name; else pick free ones."""
    meta = lab.ca_dir / "config.json"
    if meta.exists():
        from urllib.parse import urlsplit

        m = json.loads(meta.read_text())
        return urlsplit(m["crl_base"]).port or 0, urlsplit(m["ocsp_url"]).port or 0
    a, b = free_ports(2)
    return a, b
