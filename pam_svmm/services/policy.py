"""The policy in force on this host, for the PAM module, the session and the launcher.

`PolicyService.current()` loads once (source -> verify -> accept, see adapters.policy_store)
and returns the accepted policy; a refused candidate leaves the accepted one in force. Each
load is remembered in ``loads`` so the caller can audit it (``audit_record``): the service
decides nothing about the audit trail itself.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Callable, Collection, Sequence
from functools import cached_property
from typing import TYPE_CHECKING

from cryptography import x509

from ..adapters.policy_store import (
    AcceptedPolicy,
    BundleSource,
    DirectorySource,
    FileSource,
    LoadEvent,
    PolicyLoad,
    PolicyStore,
)
from ..config import Config, PolicySource
from ..domain import policy as pdp
from ..domain.audit_record import AuditRecord, Outcome
from ..errors import ConfigError, PolicyUnavailable

if TYPE_CHECKING:
    from ..adapters.directory import DirectoryClient


class PolicyService:
    def __init__(
        self,
        config: Config,
        *,
        anchors: Sequence[x509.Certificate] | None = None,
        intermediates: Sequence[x509.Certificate] | None = None,
        directory: DirectoryClient | None = None,
        source: BundleSource | None = None,
        now: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
    ) -> None:
        self.config = config
        self._anchors = anchors
        self._intermediates = intermediates
        self._directory = directory
        self._source = source
        self.now = now
        self.loads: list[PolicyLoad] = []  # every load since construction (for audit)
        self._current: AcceptedPolicy | None = None
        self._loaded_stamp: tuple[int, int, int] | None = None

    # -- collaborators ---------------------------------------------------------------------

    @cached_property
    def anchors(self) -> list[x509.Certificate]:
        if self._anchors is not None:
            return list(self._anchors)
        from .auth import load_pem_bundle

        if not self.config.trust.anchors:
            raise ConfigError("trust.anchors", "no trust anchor configured (policy signer)")
        try:
            return load_pem_bundle(self.config.trust.anchors)
        except (OSError, ValueError) as e:
            raise ConfigError("trust.anchors", f"cannot load: {e}") from None

    @cached_property
    def intermediates(self) -> list[x509.Certificate]:
        if self._intermediates is not None:
            return list(self._intermediates)
        from .login import load_intermediates

        return load_intermediates(self.config.trust.intermediates_dir)

    @cached_property
    def source(self) -> BundleSource:
        if self._source is not None:
            return self._source
        pc = self.config.policy
        if pc.source is PolicySource.FILE:
            return FileSource(pc.file)
        directory = self._directory
        if directory is None:
            from ..adapters.directory import DirectoryClient

            directory = DirectoryClient.from_config(self.config.directory)
        return DirectorySource(directory, pc.directory_dn)

    @cached_property
    def store(self) -> PolicyStore:
        return PolicyStore(
            self.config.policy,
            self.source,
            anchors=self.anchors,
            intermediates=self.intermediates,
            now=self.now,
        )

    @property
    def host(self) -> str:
        """This host's name in the policy."""
        return self.config.policy.host or self.config.auth.host_name or os.uname().nodename

    # -- the policy ------------------------------------------------------------------------

    def _stamp(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.config.policy.file)
        except OSError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def changed(self) -> bool:
        """The bundle file is not the one this service last loaded (a file source only; a
        directory source is asked again on request: SIGHUP, `svmm policy reload`)."""
        if self.config.policy.source is not PolicySource.FILE:
            return False
        return self._current is not None and self._stamp() != self._loaded_stamp

    def load(self) -> PolicyLoad:
        """Ask the source now; the result is also appended to ``loads``."""
        if self.config.policy.source is PolicySource.FILE:
            self._loaded_stamp = self._stamp()  # before: a change during the load is news
        result = self.store.load()
        self.loads.append(result)
        self._current = result.policy
        return result

    def current(self, *, refresh: bool = False) -> AcceptedPolicy:
        """The policy in force (loaded on first use, or again with ``refresh``);
        PolicyUnavailable when there is none: then nothing may be allowed."""
        if self._current is None or refresh:
            result = self.load()
            if result.policy is None:
                problem = result.problem.message if result.problem else "no policy"
                raise PolicyUnavailable(f"no accepted policy: {problem}")
        assert self._current is not None
        return self._current

    def accepted(self) -> AcceptedPolicy | None:
        """The accepted policy from the state folder, without asking the source."""
        return self.store.accepted()

    def take_loads(self) -> list[PolicyLoad]:
        """The loads not yet audited (and forget them)."""
        out, self.loads = self.loads, []
        return out

    # -- decisions -------------------------------------------------------------------------

    def decide(
        self, user: str, roles: Collection[str], vm_id: str, action: str, running: Collection[str]
    ) -> pdp.Decision:
        return pdp.decide(self.current().compiled, pdp.Subject(user, roles), vm_id, action, running)

    def host_login(self, service: str, roles: Collection[str]) -> pdp.Decision:
        return pdp.host_login(self.current().compiled, self.host, service, roles)

    def grants_for(self, user: str, roles: Collection[str]) -> dict[str, frozenset[str]]:
        return pdp.grants_for(self.current().compiled, pdp.Subject(user, roles))

    # -- audit -----------------------------------------------------------------------------

    def audit_record(self, load: PolicyLoad, *, service: str = "") -> AuditRecord:
        return audit_record(load, host=self.host, time=self.now(), service=service)


def audit_record(
    load: PolicyLoad, *, host: str, time: dt.datetime, service: str = ""
) -> AuditRecord:
    """One ``policy_load`` record: success when a policy is in force and the candidate was
    not refused; failure when a candidate was refused (the old one may still be in force);
    undecided when there is no policy at all."""
    if load.event is LoadEvent.NONE:
        outcome = Outcome.UNDECIDED
    elif load.problem is not None:
        outcome = Outcome.FAILURE
    else:
        outcome = Outcome.SUCCESS
    parts = [f"event={load.event.value}", f"source={load.source}"]
    if load.policy is not None:
        parts += [
            f"version={load.policy.version}",
            f"sha256={load.policy.sha256}",
            f"signer={load.policy.signer_subject}",
            f"signer_sha256={load.policy.signer_fingerprint}",
        ]
    if load.previous_version is not None:
        parts.append(f"previous_version={load.previous_version}")
    if load.candidate_sha256:
        parts.append(f"candidate_sha256={load.candidate_sha256}")
    if load.problem is not None:
        parts.append(f"refused: {load.problem.message}")
    return AuditRecord(
        event="policy_load",
        outcome=outcome,
        reason=load.reason,
        time=time,
        host=host,
        service=service,
        detail="; ".join(parts),
    )
