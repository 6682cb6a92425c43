"""cryptsetup on image files: format, keyslots, svmm tokens, passphrase tests, rollback,
dm-crypt detection, and no key in any child's argv or environment."""

from __future__ import annotations

import os
import secrets
import shutil
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from pam_svmm.adapters import luks
from pam_svmm.adapters.luks import Cryptsetup, Pbkdf, SidecarTokens
from pam_svmm.errors import VolumeError
from tests.integration.cryptsetup_spy import cryptsetup_spy

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(shutil.which("cryptsetup") is None, reason="cryptsetup not installed"),
]

FAST = Pbkdf.fast()


def _key() -> bytearray:
    # Binary, with a newline and NUL inside: key files are read byte for byte.
    return bytearray(b"\n\x00" + secrets.token_bytes(30))


@pytest.fixture
def cs() -> Cryptsetup:
    return Cryptsetup(timeout=30)


@pytest.fixture
def image(tmp_path: Path) -> Path:
    path = tmp_path / "vol.img"
    luks.create_image(path, 16 << 20)
    return path


def test_format_add_test_kill(cs: Cryptsetup, image: Path) -> None:
    k0, k1 = _key(), _key()
    cs.format(image, k0, pbkdf=FAST)
    assert cs.is_luks(image)
    assert stat.S_IMODE(image.stat().st_mode) == 0o600
    head = cs.header(image)
    assert head.version == 2 and list(head.keyslots) == [0] and head.uuid
    slot = cs.add_key(image, k0, k1, pbkdf=FAST)
    assert slot == 1
    assert cs.add_key(image, k1, _key(), pbkdf=FAST, slot=7) == 7
    assert sorted(cs.header(image).keyslots) == [0, 1, 7]
    assert cs.test_passphrase(image, k0)
    assert cs.test_passphrase(image, k1, slot=1)
    assert not cs.test_passphrase(image, k1, slot=0)  # right key, other slot
    assert not cs.test_passphrase(image, k1[:-1])  # a byte short
    assert not cs.test_passphrase(image, b"wrong")
    # killing a slot needs a key of another slot; its own key is refused
    with pytest.raises(VolumeError) as e:
        cs.kill_slot(image, 1, k1)
    assert e.value.reason == "volume_key_refused"
    cs.kill_slot(image, 1, k0)
    assert sorted(cs.header(image).keyslots) == [0, 7]
    assert not cs.test_passphrase(image, k1)


def test_add_key_with_wrong_existing_key_is_refused(cs: Cryptsetup, image: Path) -> None:
    k0 = _key()
    cs.format(image, k0, pbkdf=FAST)
    with pytest.raises(VolumeError) as e:
        cs.add_key(image, b"not the key", _key(), pbkdf=FAST)
    assert e.value.reason == "volume_key_refused"
    assert list(cs.header(image).keyslots) == [0]


def test_token_import_export_roundtrip(cs: Cryptsetup, image: Path) -> None:
    k0, k1 = _key(), _key()
    cs.format(image, k0, pbkdf=FAST)
    slot = cs.add_key(image, k0, k1, pbkdf=FAST)
    token = {"type": "svmm-card", "v": 1, "wrapped": "QUJD", "nested": {"alg": "RSA-OAEP"}}
    tid = cs.import_token(image, token, slot=slot)
    meta = cs.import_token(image, {"type": "svmm-volume", "owner": "alice"}, slot=None)
    assert (tid, meta) == (0, 1)
    assert cs.export_token(image, tid) == {**token, "keyslots": [str(slot)]}
    head = cs.header(image)
    assert head.keyslots[slot].tokens == (tid,)
    assert head.svmm_tokens()[meta] == {"type": "svmm-volume", "owner": "alice", "keyslots": []}
    cs.remove_token(image, tid)
    assert set(cs.header(image).tokens) == {meta}
    with pytest.raises(VolumeError, match="token export failed"):
        cs.export_token(image, tid)


def test_token_type_must_be_ours(cs: Cryptsetup, image: Path) -> None:
    cs.format(image, _key(), pbkdf=FAST)
    for bad in ({"type": "systemd-tpm2"}, {"wrapped": "x"}):
        with pytest.raises(VolumeError, match="type must start with 'svmm-'"):
            cs.import_token(image, bad, slot=0)
    assert cs.header(image).tokens == {}


def test_luks1_and_sidecar_tokens(cs: Cryptsetup, image: Path, tmp_path: Path) -> None:
    k0 = _key()
    cs.format(image, k0, pbkdf=FAST, luks_type="luks1")
    head = cs.header(image)
    assert head.version == 1 and list(head.keyslots) == [0]
    assert cs.add_key(image, k0, _key(), pbkdf=FAST, luks_type="luks1") == 1
    with pytest.raises(VolumeError, match="only pbkdf2"):
        cs.add_key(image, k0, _key(), pbkdf=Pbkdf("argon2id"), luks_type="luks1")
    side = SidecarTokens(image, head.uuid)
    tid = side.add({"type": "svmm-card", "w": "x"}, slot=1)
    assert side.read() == {tid: {"type": "svmm-card", "w": "x", "keyslots": ["1"]}}
    assert stat.S_IMODE(side.path.stat().st_mode) == 0o600
    with pytest.raises(VolumeError, match="another LUKS header"):
        SidecarTokens(image, "00000000-0000-0000-0000-000000000000").read()
    side.remove(tid)
    assert side.read() == {}


def test_rollback_removes_half_made_image(cs: Cryptsetup, tmp_path: Path) -> None:
    path = tmp_path / "half.img"
    with pytest.raises(VolumeError), luks.removed_on_failure(path):
        luks.create_image(path, 16 << 20)
        cs.format(path, _key(), pbkdf=FAST)
        cs.add_key(path, b"wrong", _key(), pbkdf=FAST)  # fails after the format
    assert not path.exists()
    assert list(tmp_path.iterdir()) == []


def test_rollback_restores_existing_volume(cs: Cryptsetup, image: Path) -> None:
    old = _key()
    cs.format(image, old, pbkdf=FAST)
    with pytest.raises(VolumeError), luks.prefix_restored_on_failure(image):
        cs.format(image, _key(), pbkdf=FAST)
        raise VolumeError("a later step failed")
    assert cs.test_passphrase(image, old)  # the old header is back


def test_create_image_refuses_existing_and_parses_sizes(image: Path) -> None:
    with pytest.raises(VolumeError, match="exists"):
        luks.create_image(image, 16 << 20)
    assert luks.parse_size("64M") == 64 << 20
    assert luks.parse_size("1G") == 1 << 30
    for bad in ("1M", "abc", "17000001"):
        with pytest.raises(VolumeError):
            luks.parse_size(bad)


def test_pbkdf_options() -> None:
    assert Pbkdf().argv() == ["--pbkdf", "argon2id"]  # production: cryptsetup's benchmark
    assert Pbkdf("argon2id", iter_time_ms=1, memory_kib=32, parallel=1).argv() == [
        "--pbkdf", "argon2id", "--iter-time", "1", "--pbkdf-memory", "32",
        "--pbkdf-parallel", "1",
    ]  # fmt: skip
    with pytest.raises(VolumeError):
        Pbkdf("pbkdf2", memory_kib=32)
    with pytest.raises(VolumeError):
        Pbkdf("scrypt")


def test_argon2id_small_memory_works(cs: Cryptsetup, image: Path) -> None:
    k = _key()
    cs.format(image, k, pbkdf=Pbkdf("argon2id", memory_kib=32, force_iterations=4, parallel=1))
    assert cs.header(image).keyslots[0].kdf == "argon2id"
    assert cs.test_passphrase(image, k)


def test_dmcrypt_detection(cs: Cryptsetup, image: Path, tmp_path: Path) -> None:
    # A host without /dev/mapper/control: a clear refusal before cryptsetup runs.
    missing = tmp_path / "no-control"
    assert not luks.device_mapper_available(missing)
    with pytest.raises(VolumeError) as e:
        luks.require_device_mapper(missing)
    assert e.value.reason == "dm_unavailable"
    assert "use the QEMU LUKS driver" in e.value.message
    # A control path that is not a character device does not count either.
    fake = tmp_path / "control"
    fake.write_text("")
    assert not luks.device_mapper_available(fake)
    if not luks.device_mapper_available():
        cs.format(image, k := _key(), pbkdf=FAST)
        with pytest.raises(VolumeError) as e:
            cs.open_dmcrypt(image, "svmm-test", k)
        assert e.value.reason == "dm_unavailable"
        assert "no /dev/mapper/control" in e.value.message


def test_dmcrypt_name_validated(cs: Cryptsetup, image: Path) -> None:
    if not luks.device_mapper_available():
        pytest.skip("device-mapper is not available here (checked in test_dmcrypt_detection)")
    with pytest.raises(VolumeError, match="device-mapper name"):
        cs.open_dmcrypt(image, "../x", b"k")


# --- no key in argv or environment --------------------------------------------------------


class _ProcPoller:
    """Reads every process's cmdline and environ in a loop while the test runs."""

    def __init__(self, needles: list[bytes]) -> None:
        self.needles = needles
        self.hits: list[str] = []
        self.seen = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        me = str(os.getpid())
        while not self._stop.is_set():
            for pid in os.listdir("/proc"):
                if not pid.isdigit() or pid == me:
                    continue
                for part in ("cmdline", "environ"):
                    try:
                        data = Path(f"/proc/{pid}/{part}").read_bytes()
                    except OSError:
                        continue
                    if b"cryptsetup" in data:
                        self.seen += 1
                    if any(n in data for n in self.needles):
                        self.hits.append(f"{pid}/{part}")

    def __enter__(self) -> _ProcPoller:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


@pytest.fixture
def spied(tmp_path: Path) -> Iterator[tuple[Cryptsetup, Path]]:
    script, log = cryptsetup_spy(tmp_path)
    yield Cryptsetup(binary=str(script), timeout=30), log


def test_keys_never_in_cmdline_or_environ(spied: tuple[Cryptsetup, Path], tmp_path: Path) -> None:
    cs, log = spied
    image = tmp_path / "v.img"
    luks.create_image(image, 16 << 20)
    # Printable keys, so that a leak in text form (argv, env) would be found too.
    k0 = bytearray(secrets.token_hex(16).encode())
    k1 = bytearray(secrets.token_hex(16).encode())
    slow = Pbkdf("pbkdf2", iter_time_ms=300)  # keeps cryptsetup alive for the poller
    with _ProcPoller([bytes(k0), bytes(k1)]) as poller:
        cs.format(image, k0, pbkdf=slow)
        slot = cs.add_key(image, k0, k1, pbkdf=slow)
        assert cs.test_passphrase(image, k1, slot=slot)
        assert not cs.test_passphrase(image, b"wrong")
        cs.kill_slot(image, slot, k0)
    assert poller.hits == []
    assert poller.seen > 0  # the poller did see cryptsetup running
    records = sorted(log.iterdir())
    assert len(records) >= 2 * 5
    for rec in records:
        data = rec.read_bytes()
        assert bytes(k0) not in data and bytes(k1) not in data, rec.name
        if rec.suffix == ".environ":
            names = {e.split(b"=", 1)[0] for e in data.split(b"\0") if e}
            assert names <= {b"PATH", b"LC_ALL", b"PWD"}, names
    assert any(b"/proc/self/fd/" in r.read_bytes() for r in records if r.suffix == ".cmdline")


def test_errors_quote_cryptsetup_not_keys(cs: Cryptsetup, tmp_path: Path) -> None:
    plain = tmp_path / "plain.img"
    plain.write_bytes(b"\0" * (1 << 20))
    k = bytearray(secrets.token_hex(16).encode())
    with pytest.raises(VolumeError) as e:
        cs.add_key(plain, k, k, pbkdf=FAST, slot=1)  # cryptsetup's own message
    assert "is not a valid LUKS device" in e.value.message
    assert k.decode() not in e.value.message
    with pytest.raises(VolumeError, match="is not a LUKS volume"):
        cs.header(plain)
    with pytest.raises(VolumeError, match="1 to 8192 bytes"):
        cs.test_passphrase(plain, b"")


def test_timeout_is_enforced(tmp_path: Path, image: Path) -> None:
    slow = tmp_path / "slow"
    slow.write_text("#!/bin/sh\nexec sleep 5\n")
    slow.chmod(0o700)
    with pytest.raises(VolumeError, match=r"did not finish in 0\.3 s"):
        Cryptsetup(binary=str(slow), timeout=0.3).format(image, b"k", pbkdf=FAST)
