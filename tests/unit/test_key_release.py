"""Key release at session open: only for VMs the user may boot, only with a card login, all or
nothing, every release audited, buffers wiped (the launcher and the LUKS volumes are stand-ins
here; tests/integration/test_volume_session.py runs the real ones)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from pam_svmm import config
from pam_svmm.domain.allowlist import VmAllowance
from pam_svmm.domain.audit_record import Outcome
from pam_svmm.errors import VolumeError
from pam_svmm.services.key_release import KeyRelease, volumes_to_release
from tests.unit.key_release_fixtures import (  # the login and the card: stand-ins
    Login,
    Volumes,
    allowlist,
)


@dataclass
class Launcher:
    ok: bool = True
    requests: list[dict[str, Any]] = field(default_factory=list)

    def __call__(self, request: dict[str, Any]) -> dict[str, Any]:
        self.requests.append(request)
        return {"ok": self.ok, "reason": "ok" if self.ok else "not_permitted"}


@pytest.fixture
def cfg(tmp_path: Path) -> config.Config:
    for name in ("web-disk", "db-disk", "db-logs"):
        (tmp_path / f"{name}.img").write_bytes(b"LUKS")
    return config.parse(
        {
            "policy": {"enabled": True},
            "volumes": {"enabled": True, "dir": str(tmp_path)},
        }
    )


VMS = {
    "vm-web": VmAllowance(("boot", "console"), ("web-disk",)),
    "vm-db": VmAllowance(("boot",), ("db-disk", "db-logs")),
    "vm-view": VmAllowance(("console",), ("secret-disk",)),  # no boot: never released
}


def run(cfg: config.Config, login: Any, volumes: Volumes, launcher: Launcher) -> Any:
    records: list[tuple[str, Outcome, str, str, str]] = []
    kr = KeyRelease(cfg, send=launcher, volumes=volumes)
    try:
        out = kr.release(allowlist(VMS), login, "s1", lambda *r: records.append(r))
    except VolumeError as e:
        return e, records
    return out, records


def test_only_volumes_of_vms_the_user_may_boot() -> None:
    assert volumes_to_release(allowlist(VMS)) == {
        "db-disk": ("vm-db",),
        "db-logs": ("vm-db",),
        "web-disk": ("vm-web",),
    }


def test_release_hands_every_key_over_in_one_request_and_wipes(cfg: config.Config) -> None:
    volumes, launcher = Volumes(), Launcher()
    out, records = run(cfg, Login(), volumes, launcher)
    assert sorted(r.volume for r in out) == ["db-disk", "db-logs", "web-disk"]
    (req,) = launcher.requests
    assert req["op"] == "hold_keys" and req["uid"] == 10001 and req["session"] == "s1"
    assert sorted(v["name"] for v in req["volumes"]) == ["db-disk", "db-logs", "web-disk"]
    assert req["card_fingerprint"] == "ab" * 32
    assert all(set(b) == {0} for b in volumes.given)  # wiped after the hand-over
    assert [(r[0], r[1], r[3]) for r in records] == [
        ("key_release", Outcome.SUCCESS, "vm-db"),
        ("key_release", Outcome.SUCCESS, "vm-db"),
        ("key_release", Outcome.SUCCESS, "vm-web"),
    ]
    assert not any("pass-" in r[4] for r in records)  # no secret in the audit detail


def test_the_third_of_three_failing_rolls_back_the_first_two(cfg: config.Config) -> None:
    volumes, launcher = Volumes(fail_on="web-disk"), Launcher()
    err, records = run(cfg, Login(), volumes, launcher)
    assert isinstance(err, VolumeError) and err.reason == "volume_key_refused"
    assert [r["op"] for r in launcher.requests] == ["drop_keys"]  # nothing held stays held
    assert all(set(b) == {0} for b in volumes.given)
    assert {r[1] for r in records} == {Outcome.FAILURE}


def test_a_launcher_refusal_fails_the_session_and_drops(cfg: config.Config) -> None:
    err, _ = run(cfg, Login(), Volumes(), Launcher(ok=False))
    assert isinstance(err, VolumeError) and err.reason == "key_handover_refused"


def test_a_password_login_releases_nothing(cfg: config.Config) -> None:
    launcher = Launcher()
    out, records = run(cfg, Login(method="password", card_session=None), Volumes(), launcher)
    assert out == [] and launcher.requests == []
    assert {r[2] for r in records} == {"no_card"}


def test_a_missing_or_foreign_volume_image_is_refused(cfg: config.Config) -> None:
    (cfg.volumes.dir / "db-logs.img").unlink()
    (cfg.volumes.dir / "db-logs.img").symlink_to(cfg.volumes.dir / "web-disk.img")
    err, _ = run(cfg, Login(), Volumes(), Launcher())
    assert isinstance(err, VolumeError) and "db-logs" in err.message


def test_a_volume_the_card_holds_no_key_for_is_skipped_not_a_failed_session(
    cfg: config.Config,
) -> None:
    """vm-db is granted by role, but its disks are enrolled for other cards: the session opens
    with web-disk's key only, and the skip is audited (the launcher refuses vm-db later)."""
    volumes, launcher = Volumes(not_enrolled=("db-disk", "db-logs")), Launcher()
    out, records = run(cfg, Login(), volumes, launcher)
    assert [r.volume for r in out] == ["web-disk"]
    (req,) = launcher.requests
    assert [v["name"] for v in req["volumes"]] == ["web-disk"]
    skipped = [r for r in records if r[2] == "card_not_enrolled"]
    assert [(r[1], r[3]) for r in skipped] == [(Outcome.FAILURE, "vm-db")] * 2
    assert all("skipped" in r[4] for r in skipped)
    assert [r[3] for r in records if r[1] is Outcome.SUCCESS] == ["vm-web"]


def test_no_volume_enrolled_for_the_card_hands_nothing_over(cfg: config.Config) -> None:
    volumes = Volumes(not_enrolled=("db-disk", "db-logs", "web-disk"))
    launcher = Launcher()
    out, records = run(cfg, Login(), volumes, launcher)
    assert out == [] and launcher.requests == []
    assert {r[2] for r in records} == {"card_not_enrolled"}


def test_inside_svmmd_the_keys_reach_the_launcher_as_bytearrays_not_over_a_socket(
    cfg: config.Config, tmp_path: Path
) -> None:
    """svmmd's own PAM responder hands keys to its Launcher directly (hold=), never as JSON
    text to its own socket; the store keeps its copies and the released buffers are wiped."""
    from tests.unit.launcher_fixtures import make_launcher

    launcher = make_launcher(tmp_path / "svmmd")

    def hold(**kw: Any) -> Any:
        assert all(type(b) is bytearray for b in kw["keys"].values())
        return launcher.hold_keys(**kw)

    socket_requests = Launcher()
    volumes = Volumes()
    kr = KeyRelease(cfg, send=socket_requests, volumes=volumes, hold=hold)
    out = kr.release(allowlist(VMS), Login(), "s1", lambda *r: None)
    assert sorted(r.volume for r in out) == ["db-disk", "db-logs", "web-disk"]
    assert socket_requests.requests == []  # nothing went over the socket
    assert launcher.keys.held(10001) == {"db-disk", "db-logs", "web-disk"}
    assert all(set(b) == {0} for b in volumes.given)
    copies = launcher.keys.borrow(10001, ["web-disk"])
    assert copies == {"web-disk": bytearray(b"pass-web-disk")}


@pytest.mark.parametrize(
    ("field", "value"),
    [("session", "bad session id!"), ("user", ""), ("card_fingerprint", "zz"), ("uid", -1)],
)
def test_the_direct_hold_is_checked_as_the_sockets_is(
    tmp_path: Path, field: str, value: Any
) -> None:
    from tests.unit.launcher_fixtures import make_launcher

    launcher = make_launcher(tmp_path / "svmmd")
    kw: dict[str, Any] = {"uid": 10001, "user": "alice", "session": "s1",
                          "card_fingerprint": "ab" * 32, "card_serial": "tok-alice",
                          "keys": {"web-disk": bytearray(b"pass")}}  # fmt: skip
    kw[field] = value
    reply = launcher.hold_keys(**kw)
    assert not reply.ok and reply.reason == "bad_request"
    assert launcher.keys.held(10001) == set()
