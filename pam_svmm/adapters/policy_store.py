"""Where the signed policy comes from, and the host's accepted copy of it.

A *source* gives the candidate bundle's bytes (a file, or the svmmPolicyBundle attribute of
an entry in the directory). The *store* keeps the last accepted bundle in ``state_dir``
(root-only, opened with ``open_private_dir``; one JSON file replaced atomically) and decides,
under an exclusive lock so concurrent logins cannot race a version backwards:

* the candidate is the accepted bundle (same bytes): unchanged;
* it verifies (signature, signer chain with the policy-signing EKU at ``now``, a valid policy)
  and its version is higher than the accepted one: it becomes the accepted one;
* anything else (missing, unreadable, malformed, bad signature, untrusted signer, invalid
  policy, a lower version, the same version with other content): refused; the accepted one
  stays in force. A bad bundle never replaces a good one.

Every ``load()`` returns a ``PolicyLoad`` that says what happened and why, for the audit trail.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import enum
import fcntl
import hashlib
import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from cryptography import x509
from cryptography.hazmat.primitives import hashes

from ..config import PolicyConfig
from ..domain.bounded import loads_json
from ..domain.policy import CompiledPolicy, load_policy
from ..domain.policy_bundle import MAX_BUNDLE_BYTES, parse_bundle, verify_bundle
from ..errors import (
    PolicyBundleInvalid,
    PolicyError,
    PolicyRollback,
    PolicyUnavailable,
    SvmmError,
)
from .private_dir import open_private_dir, replace_file

if TYPE_CHECKING:
    from .directory import DirectoryClient

STATE_FILE = "accepted.json"
LOCK_FILE = ".lock"
STATE_FORMAT = "svmm-policy-state/1"
BUNDLE_ATTRIBUTE = "svmmPolicyBundle"


# --- sources ------------------------------------------------------------------------------


class BundleSource(Protocol):
    description: str

    def read(self) -> bytes | None:
        """The candidate bundle, None when there is none; SvmmError when it cannot be read."""
        ...


class FileSource:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.description = f"file {path}"

    def read(self) -> bytes | None:
        # The signature protects the content; the file needs no trusted path.
        try:
            with open(self.path, "rb") as f:
                data = f.read(MAX_BUNDLE_BYTES + 1)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise PolicyUnavailable(
                f"cannot read the policy bundle {self.path}: {e.strerror}",
                reason="policy_source_unreadable",
            ) from None
        return data


class DirectorySource:
    def __init__(self, client: DirectoryClient, dn: str) -> None:
        self.client = client
        self.dn = dn
        self.description = f"directory {dn} ({BUNDLE_ATTRIBUTE})"

    def read(self) -> bytes | None:
        # DirectoryUnavailable (Undecided) propagates: the store keeps the accepted bundle.
        return self.client.read_attribute(self.dn, BUNDLE_ATTRIBUTE)


# --- results ------------------------------------------------------------------------------


@dataclass(frozen=True)
class AcceptedPolicy:
    compiled: CompiledPolicy
    signer: x509.Certificate
    bundle: bytes
    accepted_at: dt.datetime

    @property
    def version(self) -> int:
        return self.compiled.version

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.bundle).hexdigest()

    @property
    def signer_subject(self) -> str:
        return self.signer.subject.rfc4514_string()

    @property
    def signer_fingerprint(self) -> str:
        return self.signer.fingerprint(hashes.SHA256()).hex()


class LoadEvent(enum.Enum):
    ACCEPTED = "accepted"  # a new bundle became the accepted one
    UNCHANGED = "unchanged"  # the source holds the accepted bundle
    KEPT = "kept"  # the candidate was refused or unavailable; the accepted one stays
    NONE = "none"  # nothing usable: no candidate and nothing accepted before


@dataclass(frozen=True)
class PolicyLoad:
    event: LoadEvent
    source: str
    policy: AcceptedPolicy | None  # what is in force after this load
    previous_version: int | None  # the accepted version before this load
    problem: SvmmError | None = None  # why the candidate was not accepted
    candidate_sha256: str = ""

    @property
    def refused(self) -> bool:
        return self.problem is not None

    @property
    def reason(self) -> str:
        if self.problem is not None:
            return self.problem.reason
        return f"policy_{self.event.value}"

    def describe(self) -> str:
        now = (
            f"version {self.policy.version} signed by {self.policy.signer_subject}"
            if self.policy
            else "no policy"
        )
        text = f"{self.source}: {self.event.value}; in force: {now}"
        if self.problem is not None:
            text += f"; refused: {self.problem.message}"
        return text


# --- the store ----------------------------------------------------------------------------


class PolicyStore:
    def __init__(
        self,
        config: PolicyConfig,
        source: BundleSource,
        *,
        anchors: Sequence[x509.Certificate],
        intermediates: Sequence[x509.Certificate] = (),
        now: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
    ) -> None:
        self.config = config
        self.source = source
        self.anchors = list(anchors)
        self.intermediates = list(intermediates)
        self.now = now

    # -- public ----------------------------------------------------------------------------

    def load(self) -> PolicyLoad:
        """Fetch the candidate, verify it, accept it if it is newer; never raises for a bad
        candidate (see the module doc). ConfigError for an unsafe state_dir."""
        with self._locked() as dfd:
            accepted, floor, _ = self._read_state(dfd)
            previous = accepted.version if accepted else floor
            try:
                candidate = self.source.read()
            except SvmmError as e:
                return self._kept(accepted, previous, e)
            if candidate is None:
                return self._kept(
                    accepted,
                    previous,
                    PolicyUnavailable(
                        f"{self.source.description}: no policy bundle", reason="policy_missing"
                    ),
                )
            digest = hashlib.sha256(candidate).hexdigest()
            if accepted is not None and candidate == accepted.bundle:
                return PolicyLoad(
                    LoadEvent.UNCHANGED, self.source.description, accepted, previous, None, digest
                )
            now = self.now()
            try:
                new = self._verify(candidate, at=now, accepted_at=now)
                if floor is not None and new.version < floor:
                    raise PolicyRollback(
                        f"policy version {new.version} is older than the accepted version {floor}"
                    )
                # The same version again with another policy is refused while a good copy is
                # in force; when the copy is damaged, re-accepting that version heals it. The
                # same policy signed again (a renewed signer) is fine.
                if (
                    accepted is not None
                    and new.version == floor
                    and parse_bundle(new.bundle).policy != parse_bundle(accepted.bundle).policy
                ):
                    raise PolicyRollback(
                        f"policy version {new.version} is already accepted with other content; "
                        "a changed policy needs a higher version",
                        reason="policy_version_reused",
                    )
            except (PolicyBundleInvalid, PolicyError) as e:
                return self._kept(accepted, previous, e, digest)
            try:
                self._write_state(dfd, new)
            except OSError as e:
                problem = PolicyUnavailable(
                    f"cannot save the accepted policy in {self.config.state_dir}: {e.strerror}",
                    reason="policy_state_write_failed",
                )
                return self._kept(accepted, previous, problem, digest)
            return PolicyLoad(
                LoadEvent.ACCEPTED, self.source.description, new, previous, None, digest
            )

    def accepted(self) -> AcceptedPolicy | None:
        """The accepted policy, without asking the source."""
        with self._locked() as dfd:
            return self._read_state(dfd)[0]

    def accepted_state(self) -> tuple[AcceptedPolicy | None, int | None, SvmmError | None]:
        """The accepted policy, the version floor, and what is wrong with the state if any."""
        with self._locked() as dfd:
            return self._read_state(dfd)

    # -- internals -------------------------------------------------------------------------

    def _kept(
        self,
        accepted: AcceptedPolicy | None,
        previous: int | None,
        problem: SvmmError,
        digest: str = "",
    ) -> PolicyLoad:
        event = LoadEvent.KEPT if accepted is not None else LoadEvent.NONE
        return PolicyLoad(event, self.source.description, accepted, previous, problem, digest)

    def _verify(
        self, bundle: bytes, *, at: dt.datetime, accepted_at: dt.datetime
    ) -> AcceptedPolicy:
        verified = verify_bundle(
            bundle, self.anchors, self.intermediates, at=at, eku=self.config.signer_eku
        )
        compiled = load_policy(verified.policy)
        return AcceptedPolicy(compiled, verified.signer, bundle, accepted_at)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[int]:
        dfd = open_private_dir(self.config.state_dir, key="policy.state_dir")
        try:
            lock = os.open(
                LOCK_FILE,
                os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o600,
                dir_fd=dfd,
            )
            try:
                fcntl.flock(lock, fcntl.LOCK_EX)
                yield dfd
            finally:
                os.close(lock)
        finally:
            os.close(dfd)

    def _read_state(self, dfd: int) -> tuple[AcceptedPolicy | None, int | None, SvmmError | None]:
        try:
            fd = os.open(STATE_FILE, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
        except FileNotFoundError:
            return None, None, None
        except OSError as e:
            problem = PolicyUnavailable(
                f"{self.config.state_dir}/{STATE_FILE}: {e.strerror}", reason="policy_state_bad"
            )
            return None, None, problem
        with os.fdopen(fd, "rb") as f:
            raw = f.read(4 * MAX_BUNDLE_BYTES)
        floor: int | None = None
        try:
            doc = loads_json(raw, max_bytes=4 * MAX_BUNDLE_BYTES, max_depth=2, what="document")
            if not isinstance(doc, dict) or doc.get("format") != STATE_FORMAT:
                raise ValueError("not a policy state document")
            version = doc["version"]
            if isinstance(version, bool) or not isinstance(version, int):
                raise ValueError("version is not an integer")
            floor = version
            bundle = base64.b64decode(doc["bundle"], validate=True)
            accepted_at = dt.datetime.fromisoformat(doc["accepted_at"])
            if accepted_at.tzinfo is None:
                raise ValueError("accepted_at has no time zone")
        except (ValueError, KeyError, TypeError) as e:
            # The floor survives when it is readable: a damaged copy must not open the door
            # to a rollback.
            problem = PolicyUnavailable(
                f"{self.config.state_dir}/{STATE_FILE} is damaged: {e}", reason="policy_state_bad"
            )
            return None, floor, problem
        try:
            # Verified again at the time it was accepted: the copy is ours, but a damaged or
            # swapped file, or a rotated trust anchor, must not put a policy in force.
            policy = self._verify(bundle, at=accepted_at, accepted_at=accepted_at)
        except (PolicyBundleInvalid, PolicyError) as e:
            return None, floor, e
        if policy.version != floor:
            problem = PolicyUnavailable(
                f"{self.config.state_dir}/{STATE_FILE}: version {floor} does not match the "
                f"bundle's {policy.version}",
                reason="policy_state_bad",
            )
            return None, max(floor, policy.version), problem
        return policy, floor, None

    def _write_state(self, dfd: int, policy: AcceptedPolicy) -> None:
        doc = {
            "format": STATE_FORMAT,
            "version": policy.version,
            "accepted_at": policy.accepted_at.astimezone(dt.UTC).isoformat(),
            "sha256": policy.sha256,
            "signer": policy.signer_subject,
            "bundle": base64.b64encode(policy.bundle).decode("ascii"),
        }
        data = (json.dumps(doc, indent=1) + "\n").encode("ascii")
        replace_file(dfd, STATE_FILE, data)
