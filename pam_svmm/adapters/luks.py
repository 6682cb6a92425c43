"""cryptsetup on LUKS images and devices: format, keyslots, svmm tokens, passphrase tests.

Keys never reach argv, the environment or a file: each one is written into its own pipe
(``os.write`` straight from the caller's bytearray, no copy) and the child reads it through
``--key-file=-`` (stdin) or ``--key-file=/proc/self/fd/N`` (an inherited read end; cryptsetup
2.6 reads key files from there byte for byte, no newline handling). A pipe holds 64 KiB, so
with keys capped at ``MAX_KEY`` the write never blocks.

Tokens: LUKS2 headers carry JSON tokens; ours have types starting ``svmm-`` and are bound to
a keyslot by cryptsetup (``token import --key-slot``). LUKS1 has no tokens (and is what
QEMU 7.2's LUKS driver opens: it refuses LUKS2), so for LUKS1 ``SidecarTokens`` keeps the
same JSON beside the image, bound to the header by its UUID.

dm-crypt: ``open_dmcrypt`` maps a volume where device-mapper exists (``close_dmcrypt``,
``suspend``/``resume`` for card removal, ``mapping_active``, ``secure_mapping``: the node
root's 0600); on a host without it (no /dev/mapper/control) each raises
``VolumeError(reason="dm_unavailable")`` before running anything. services/dmcrypt.py decides
when.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import stat
import subprocess
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..domain.bounded import loads_json
from ..errors import VolumeError

TOKEN_PREFIX = "svmm-"  # noqa: S105 (a token type, not a password)
MAX_KEY = 8192  # bytes; far below a pipe's capacity
MAX_METADATA = 4 << 20  # a LUKS2 header's JSON area is at most 4 MiB
LUKS2_MAX_TOKENS = 32
DM_CONTROL = Path("/dev/mapper/control")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,126}$")  # a dm name we are willing to pass

Progress = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


@dataclass(frozen=True)
class Pbkdf:
    """Key derivation for new keyslots.

    The default leaves cryptsetup's own benchmark in charge (argon2id, ~2 s, memory up to
    1 GiB): strong, and slow on purpose. Tests use ``Pbkdf.fast()``.
    """

    kind: str = "argon2id"  # argon2id | argon2i | pbkdf2
    iter_time_ms: int | None = None  # --iter-time: benchmark target
    memory_kib: int | None = None  # --pbkdf-memory (argon2 only)
    parallel: int | None = None  # --pbkdf-parallel (argon2 only)
    force_iterations: int | None = None  # --pbkdf-force-iterations: skip the benchmark

    def __post_init__(self) -> None:
        if self.kind not in ("argon2id", "argon2i", "pbkdf2"):
            raise VolumeError(f"pbkdf: unknown kind {self.kind!r}")
        if self.kind == "pbkdf2" and (self.memory_kib or self.parallel):
            raise VolumeError("pbkdf: memory and parallel apply to argon2 only")
        for name in ("iter_time_ms", "memory_kib", "parallel", "force_iterations"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise VolumeError(f"pbkdf: {name} must be a positive integer")

    @classmethod
    def fast(cls) -> Pbkdf:
        """For tests only: PBKDF2 at cryptsetup's minimum of 1000 iterations (LUKS1 too)."""
        return cls("pbkdf2", force_iterations=1000)

    def argv(self, luks_type: str = "luks2") -> list[str]:
        args: list[str] = []
        if luks_type == "luks2":
            args += ["--pbkdf", self.kind]
        elif self.kind != "pbkdf2":
            # LUKS1 knows only PBKDF2; say so instead of silently deriving differently.
            raise VolumeError(f"LUKS1 supports only pbkdf2, not {self.kind}")
        if self.iter_time_ms is not None:
            args += ["--iter-time", str(self.iter_time_ms)]
        if self.memory_kib is not None:
            args += ["--pbkdf-memory", str(self.memory_kib)]
        if self.parallel is not None:
            args += ["--pbkdf-parallel", str(self.parallel)]
        if self.force_iterations is not None:
            args += ["--pbkdf-force-iterations", str(self.force_iterations)]
        return args

    def describe(self) -> str:
        parts = [self.kind]
        if self.force_iterations:
            parts.append(f"{self.force_iterations} iterations")
        elif self.iter_time_ms:
            parts.append(f"~{self.iter_time_ms} ms")
        else:
            parts.append("cryptsetup's benchmark")
        if self.memory_kib:
            parts.append(f"{self.memory_kib} KiB")
        return ", ".join(parts)


@dataclass(frozen=True)
class Keyslot:
    slot: int
    kdf: str  # "pbkdf2", "argon2id", ...
    tokens: tuple[int, ...] = ()  # tokens bound to this slot


@dataclass(frozen=True)
class LuksHeader:
    """What ``luksDump`` says, keys aside."""

    version: int  # 1 or 2
    uuid: str
    keyslots: Mapping[int, Keyslot]
    tokens: Mapping[int, Mapping[str, Any]]  # every token (LUKS2), ours and others'

    def svmm_tokens(self) -> dict[int, Mapping[str, Any]]:
        return {
            i: t for i, t in self.tokens.items() if str(t.get("type", "")).startswith(TOKEN_PREFIX)
        }


# --- the key pipes ------------------------------------------------------------------------


def _check_key(key: bytes | bytearray | memoryview) -> None:
    if not isinstance(key, bytes | bytearray | memoryview):
        raise TypeError("a key is bytes or bytearray")
    if not 1 <= len(key) <= MAX_KEY:
        raise VolumeError(f"a key must be 1 to {MAX_KEY} bytes long")


def _key_pipe(key: bytes | bytearray | memoryview) -> int:
    """A pipe holding ``key`` with its write end closed; returns the read end."""
    _check_key(key)
    r, w = os.pipe()
    try:
        view = memoryview(key)
        while view:
            view = view[os.write(w, view) :]
    except BaseException:
        os.close(r)
        raise
    finally:
        os.close(w)
    return r


# --- cryptsetup ---------------------------------------------------------------------------


@dataclass
class Cryptsetup:
    """cryptsetup, run with argv lists, a bounded time, a clean environment and keys by pipe.

    ``binary`` may be a path (tests wrap cryptsetup in a script that records what it saw);
    ``timeout`` bounds every call (key derivation on a slow host takes seconds, not minutes).
    """

    binary: str = "cryptsetup"
    timeout: float = 120.0
    env: Mapping[str, str] = dataclasses.field(
        default_factory=lambda: {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}
    )

    # -- the one runner --

    def _run(
        self,
        what: str,
        target: Path | str,
        args: Sequence[str],
        *,
        stdin_key: bytes | bytearray | memoryview | None = None,
        fd_keys: Sequence[bytes | bytearray | memoryview] = (),
        refused: str | None = None,
    ) -> str:
        """Run ``cryptsetup ARGS``; ``fd_keys`` are substituted for ``{fd0}``, ``{fd1}``...
        in ``args`` as /proc/self/fd/N. Exit code 2 (no key) raises ``refused`` if given."""
        fds: list[int] = []
        try:
            stdin = subprocess.DEVNULL if stdin_key is None else _key_pipe(stdin_key)
            if stdin_key is not None:
                fds.append(stdin)
            names: dict[str, str] = {}
            passed: list[int] = []
            for i, key in enumerate(fd_keys):
                fd = _key_pipe(key)
                fds.append(fd)
                passed.append(fd)
                names[f"fd{i}"] = f"/proc/self/fd/{fd}"
            argv = [self.binary, *(_subst(a, names) for a in args)]
            try:
                proc = subprocess.run(
                    argv,
                    stdin=stdin,
                    capture_output=True,
                    pass_fds=passed,
                    env=dict(self.env),
                    timeout=self.timeout,
                    check=False,
                )
            except subprocess.TimeoutExpired:
                raise VolumeError(
                    f"cryptsetup {what} on {target} did not finish in {self.timeout:g} s"
                ) from None
            except OSError as e:
                raise VolumeError(f"cannot run {self.binary}: {e.strerror}") from None
        finally:
            for fd in fds:
                os.close(fd)
        if proc.returncode == 0:
            return proc.stdout.decode("utf-8", "replace")
        said = _said(proc.stderr) or f"exit code {proc.returncode}"
        if proc.returncode == 2 and refused is not None:
            raise VolumeError(f"{refused} ({said})", reason="volume_key_refused")
        raise VolumeError(f"cryptsetup {what} failed on {target}: {said}")

    # -- reading --

    def is_luks(self, path: Path) -> bool:
        try:
            self._run("isLuks", path, ["isLuks", str(path)])
        except VolumeError:
            return False
        return True

    def header(self, path: Path) -> LuksHeader:
        if not self.is_luks(path):
            raise VolumeError(f"{path} is not a LUKS volume")
        uuid = self._run("luksUUID", path, ["luksUUID", str(path)]).strip()
        try:
            text = self._run("luksDump", path, ["luksDump", "--dump-json-metadata", str(path)])
        except VolumeError:
            return self._luks1_header(path, uuid)
        try:
            meta = loads_json(text, max_bytes=MAX_METADATA, what="LUKS2 metadata")
            tokens = {int(i): t for i, t in meta.get("tokens", {}).items()}
            bound: dict[int, list[int]] = {}
            for i, t in tokens.items():
                for s in t.get("keyslots", []):
                    bound.setdefault(int(s), []).append(i)
            slots = {
                int(s): Keyslot(
                    int(s),
                    str(k.get("kdf", {}).get("type", "?")),
                    tuple(sorted(bound.get(int(s), ()))),
                )
                for s, k in meta.get("keyslots", {}).items()
            }
        except (ValueError, TypeError, AttributeError) as e:
            raise VolumeError(f"{path}: unreadable LUKS2 metadata: {e}") from None
        return LuksHeader(2, uuid, slots, tokens)

    def _luks1_header(self, path: Path, uuid: str) -> LuksHeader:
        text = self._run("luksDump", path, ["luksDump", str(path)])
        if not re.search(r"^Version:\s*1\s*$", text, re.M):
            raise VolumeError(f"{path}: luksDump gave neither LUKS2 JSON nor a LUKS1 header")
        slots = {
            int(m.group(1)): Keyslot(int(m.group(1)), "pbkdf2")
            for m in re.finditer(r"^Key Slot (\d+): ENABLED\s*$", text, re.M)
        }
        return LuksHeader(1, uuid, slots, {})

    def test_passphrase(
        self, path: Path, key: bytes | bytearray, *, slot: int | None = None
    ) -> bool:
        """True when ``key`` opens a keyslot (``slot`` only, if given); maps nothing."""
        args = ["open", "--test-passphrase", "--key-file=-"]
        if slot is not None:
            args += ["--key-slot", str(slot)]
        try:
            self._run(
                "open --test-passphrase", path, [*args, str(path)], stdin_key=key, refused="refused"
            )
        except VolumeError as e:
            if e.reason == "volume_key_refused":
                return False
            raise
        return True

    # -- writing --

    def format(
        self,
        path: Path,
        key: bytes | bytearray,
        *,
        pbkdf: Pbkdf,
        luks_type: str = "luks2",
        slot: int = 0,
        label: str | None = None,
    ) -> None:
        """luksFormat ``path`` (an image file or a device) with ``key`` in ``slot``."""
        if luks_type not in ("luks1", "luks2"):
            raise VolumeError(f"unknown LUKS type {luks_type!r}")
        args = [
            "luksFormat",
            "--type",
            luks_type,
            "--batch-mode",
            "--key-file=-",
            "--key-slot",
            str(slot),
            *pbkdf.argv(luks_type),
        ]
        if label is not None and luks_type == "luks2":
            args += ["--label", _label(label)]
        self._run("luksFormat", path, [*args, str(path)], stdin_key=key)

    def add_key(
        self,
        path: Path,
        existing: bytes | bytearray,
        new: bytes | bytearray,
        *,
        pbkdf: Pbkdf,
        slot: int | None = None,
        luks_type: str = "luks2",
    ) -> int:
        """Add ``new`` in ``slot`` (the first free one if None), authorised by ``existing``;
        returns the slot used."""
        before = set(self.header(path).keyslots) if slot is None else set()
        args = [
            "luksAddKey",
            "--batch-mode",
            "--key-file={fd0}",
            "--new-keyfile={fd1}",
            *pbkdf.argv(luks_type),
        ]
        if slot is not None:
            args += ["--new-key-slot", str(slot)]
        self._run(
            "luksAddKey",
            path,
            [*args, str(path)],
            fd_keys=(existing, new),
            refused=f"{path}: no keyslot accepts the existing key",
        )
        if slot is not None:
            return slot
        added = set(self.header(path).keyslots) - before
        if len(added) != 1:
            raise VolumeError(f"{path}: luksAddKey added {len(added)} keyslots, expected one")
        return added.pop()

    def kill_slot(self, path: Path, slot: int, remaining: bytes | bytearray) -> None:
        """Remove ``slot``; ``remaining`` must open another slot (so the last one never goes)."""
        self._run(
            "luksKillSlot",
            path,
            ["luksKillSlot", "--batch-mode", "--key-file=-", str(path), str(slot)],
            stdin_key=remaining,
            refused=f"{path}: the key given opens no keyslot other than {slot}",
        )

    def import_token(
        self, path: Path, token: Mapping[str, Any], *, slot: int | None, token_id: int | None = None
    ) -> int:
        """Store ``token`` (type ``svmm-*``) in the LUKS2 header, bound to ``slot``; returns
        its id. A token with no slot (volume metadata) is bound to none."""
        body = _token_body(token, slot)
        if token_id is None:
            used = set(self.header(path).tokens)
            token_id = min(set(range(LUKS2_MAX_TOKENS)) - used, default=-1)
            if token_id < 0:
                raise VolumeError(f"{path}: no free LUKS2 token")
        args = ["token", "import", "--json-file", "{fd0}", "--token-id", str(token_id)]
        if slot is not None:
            args += ["--key-slot", str(slot)]
        self._run(
            "token import",
            path,
            [*args, str(path)],
            fd_keys=(json.dumps(body, sort_keys=True).encode(),),
        )
        return token_id

    def export_token(self, path: Path, token_id: int) -> dict[str, Any]:
        text = self._run(
            "token export", path, ["token", "export", "--token-id", str(token_id), str(path)]
        )
        try:
            value = loads_json(text, max_bytes=MAX_METADATA, what="token")
        except ValueError:
            raise VolumeError(f"{path}: token {token_id} is not JSON") from None
        if not isinstance(value, dict):
            raise VolumeError(f"{path}: token {token_id} is not a JSON object")
        return value

    def remove_token(self, path: Path, token_id: int) -> None:
        self._run("token remove", path, ["token", "remove", "--token-id", str(token_id), str(path)])

    # -- header backups (devices) --

    def header_backup(self, path: Path, backup: Path) -> None:
        self._run(
            "luksHeaderBackup",
            path,
            ["luksHeaderBackup", "--batch-mode", "--header-backup-file", str(backup), str(path)],
        )

    def header_restore(self, path: Path, backup: Path) -> None:
        self._run(
            "luksHeaderRestore",
            path,
            ["luksHeaderRestore", "--batch-mode", "--header-backup-file", str(backup), str(path)],
        )

    # -- dm-crypt --

    def require_dm(self) -> None:
        """Raise ``dm_unavailable`` before running anything on a host without device-mapper
        (a method, so a test double can stand in for the kernel)."""
        require_device_mapper()

    def open_dmcrypt(self, path: Path, name: str, key: bytes | bytearray) -> Path:
        """Map ``path`` as /dev/mapper/NAME with ``key`` (on stdin); the mapping is root's."""
        self.require_dm()
        _dm_name(name)
        self._run(
            "open",
            path,
            ["open", "--type", "luks", "--key-file=-", str(path), name],
            stdin_key=key,
            refused=f"{path}: no keyslot accepts the key",
        )
        return Path("/dev/mapper") / name

    def close_dmcrypt(self, name: str, *, deferred: bool = False) -> None:
        """Remove the mapping; ``deferred``: when its last opener (a running QEMU) lets go."""
        self.require_dm()
        _dm_name(name)
        self._run("close", name, ["close", *(["--deferred"] if deferred else []), name])

    def cancel_deferred(self, name: str) -> None:
        """Keep a mapping that a deferred close would remove."""
        self.require_dm()
        self._run("close --cancel-deferred", name, ["close", "--cancel-deferred", _dm_name(name)])

    def mapping_active(self, name: str) -> bool:
        """Is /dev/mapper/NAME an active dm-crypt mapping? (``cryptsetup status``: 0 active,
        4 no such device.)"""
        self.require_dm()
        try:
            self._run("status", name, ["status", _dm_name(name)])
        except VolumeError:
            return False
        return True

    def suspend(self, name: str) -> None:
        """luksSuspend: I/O to the mapping blocks and the kernel forgets its key."""
        self.require_dm()
        self._run("luksSuspend", name, ["luksSuspend", _dm_name(name)])

    def resume(self, name: str, key: bytes | bytearray) -> None:
        """luksResume with ``key`` (on stdin)."""
        self.require_dm()
        self._run(
            "luksResume",
            name,
            ["luksResume", "--key-file=-", _dm_name(name)],
            stdin_key=key,
            refused=f"{name}: no keyslot accepts the key",
        )

    def secure_mapping(self, name: str) -> Path:
        """Make the mapped device node root's 0600 (udev makes it root:disk 0660) and return
        /dev/mapper/NAME; refuses anything but a block device under /dev."""
        _dm_name(name)
        link = Path("/dev/mapper") / name
        try:
            node = link.resolve(strict=True)
            st = os.stat(node)
            if not stat.S_ISBLK(st.st_mode) or node.parts[:2] != ("/", "dev"):
                raise VolumeError(f"{link} is not a block device under /dev")
            if st.st_uid != 0:
                os.chown(node, 0, 0)
            if stat.S_IMODE(st.st_mode) != 0o600:
                os.chmod(node, 0o600)
        except OSError as e:
            raise VolumeError(f"cannot secure {link}: {e.strerror}") from None
        return link


def _dm_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise VolumeError(f"{name!r} is not a valid device-mapper name")
    return name


def device_mapper_available(control: Path = DM_CONTROL, misc: Path = Path("/proc/misc")) -> bool:
    """True when the kernel offers device-mapper: /dev/mapper/control is a character
    device and /proc/misc lists device-mapper."""
    try:
        if not stat.S_ISCHR(os.stat(control).st_mode):
            return False
        return any(line.split()[-1:] == ["device-mapper"] for line in misc.read_text().splitlines())
    except OSError:
        return False


def require_device_mapper(control: Path = DM_CONTROL, misc: Path = Path("/proc/misc")) -> None:
    if not device_mapper_available(control, misc):
        raise VolumeError(
            f"device-mapper is not available on this host (no {control}); dm-crypt cannot open"
            " volumes here: use the QEMU LUKS driver",
            reason="dm_unavailable",
        )


# --- LUKS1: tokens beside the image --------------------------------------------------------


@dataclass(frozen=True)
class SidecarTokens:
    """svmm tokens of a LUKS1 volume, in ``IMAGE.svmm.json`` next to it.

    The file holds only wrapped keys and metadata (as a LUKS2 header would) and names the
    LUKS UUID, so a sidecar copied beside another volume is refused. Written atomically
    (temporary file, fsync, rename) with mode 0600.
    """

    image: Path
    uuid: str

    @property
    def path(self) -> Path:
        return self.image.with_name(self.image.name + ".svmm.json")

    def read(self) -> dict[int, dict[str, Any]]:
        try:
            data = loads_json(self.path.read_bytes(), max_bytes=MAX_METADATA, what="token file")
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            raise VolumeError(f"{self.path}: unreadable token file: {e}") from None
        if not isinstance(data, dict) or data.get("uuid") != self.uuid:
            raise VolumeError(f"{self.path}: token file belongs to another LUKS header")
        try:
            return {int(i): dict(t) for i, t in data.get("tokens", {}).items()}
        except (ValueError, TypeError, AttributeError):
            raise VolumeError(f"{self.path}: malformed tokens") from None

    def write(self, tokens: Mapping[int, Mapping[str, Any]]) -> None:
        body = {"uuid": self.uuid, "tokens": {str(i): dict(t) for i, t in tokens.items()}}
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump(body, f, sort_keys=True, indent=1)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except OSError as e:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise VolumeError(f"{self.path}: cannot write token file: {e.strerror}") from None

    def add(self, token: Mapping[str, Any], *, slot: int | None) -> int:
        tokens = self.read()
        token_id = min(set(range(LUKS2_MAX_TOKENS)) - set(tokens), default=-1)
        if token_id < 0:
            raise VolumeError(f"{self.path}: no free token")
        tokens[token_id] = _token_body(token, slot)
        self.write(tokens)
        return token_id

    def remove(self, token_id: int) -> None:
        tokens = self.read()
        if tokens.pop(token_id, None) is None:
            raise VolumeError(f"{self.path}: no token {token_id}")
        self.write(tokens)


# --- helpers ------------------------------------------------------------------------------


def _token_body(token: Mapping[str, Any], slot: int | None) -> dict[str, Any]:
    body = dict(token)
    kind = body.get("type")
    if not isinstance(kind, str) or not kind.startswith(TOKEN_PREFIX):
        raise VolumeError(f"a token's type must start with {TOKEN_PREFIX!r}, not {kind!r}")
    body["keyslots"] = [] if slot is None else [str(slot)]
    return body


def _subst(arg: str, names: Mapping[str, str]) -> str:
    """Put pipe paths where an argument is exactly ``{fdN}`` or ``--opt={fdN}``; any other
    argument (a path that happens to contain braces) is left alone."""
    m = re.fullmatch(r"(--[a-z-]+=)?\{(fd\d)\}", arg)
    return arg if m is None else (m.group(1) or "") + names[m.group(2)]


def _label(label: str) -> str:
    if not re.fullmatch(r"[\x21-\x7e]{1,47}", label):
        raise VolumeError(f"LUKS label {label!r}: 1 to 47 printable ASCII characters")
    return label


def _said(stderr: bytes) -> str:
    """cryptsetup's own message: its non-empty lines, joined, bounded."""
    lines = [ln.strip() for ln in stderr.decode("utf-8", "replace").splitlines() if ln.strip()]
    return "; ".join(lines)[-400:]


def parse_size(text: str) -> int:
    """``64M``, ``1G``, ``512K`` or bytes (binary units) -> bytes; at least 16 MiB, the
    room a LUKS2 header and a little data need."""
    m = re.fullmatch(r"\s*(\d+)\s*([KMGT]?)(?:i?B)?\s*", text, re.I)
    if not m:
        raise VolumeError(f"size {text!r}: use a number with K, M, G or T")
    size = int(m.group(1)) << (10 * " KMGT".index(m.group(2).upper() or " "))
    if size < 16 << 20 or size % 512:
        raise VolumeError(f"size {text!r}: at least 16M and a multiple of 512 bytes")
    return size


def create_image(path: Path, size: int) -> None:
    """A new sparse image file of ``size`` bytes, mode 0600; refuses an existing path."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        raise VolumeError(f"{path} exists; refusing to overwrite it") from None
    except OSError as e:
        raise VolumeError(f"cannot create {path}: {e.strerror}") from None
    try:
        os.ftruncate(fd, size)
    except OSError as e:
        os.close(fd)
        path.unlink()
        raise VolumeError(f"cannot size {path}: {e.strerror}") from None
    os.close(fd)


@contextlib.contextmanager
def prefix_restored_on_failure(path: Path, length: int = 16 << 20) -> Iterator[None]:
    """Keep the first ``length`` bytes of an existing volume (where luksFormat writes its
    header and keyslots: 16 MiB for LUKS2 by default) in memory and write them back if the
    block raises, so a failed format leaves a device as it was, LUKS or not."""
    try:
        with open(path, "rb") as f:
            saved = f.read(length)
    except OSError as e:
        raise VolumeError(f"cannot read {path} to back up its header: {e.strerror}") from None
    try:
        yield
    except BaseException:
        with open(path, "r+b") as f:
            f.write(saved)
            f.flush()
            os.fsync(f.fileno())
        raise


@contextlib.contextmanager
def removed_on_failure(*paths: Path) -> Iterator[None]:
    """Delete ``paths`` (if they exist) when the block raises; for half-made images."""
    try:
        yield
    except BaseException:
        for p in paths:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        raise
