"""An in-memory directory for the `svmm nss` and `svmm id` tests (tests/unit/test_nss_files.py,
tests/unit/test_cli_nss.py): two accounts and their groups."""

from __future__ import annotations

from collections.abc import Iterator

from pam_svmm.domain.identity import (
    AccountState,
    AccountStatus,
    Identity,
    PosixAccount,
    PosixGroup,
)
from pam_svmm.errors import DirectoryUnavailable


class Directory:
    """An in-memory IdentitySource (the real one is DirectoryClient against slapd)."""

    def __init__(self, accounts: list[PosixAccount], groups: list[PosixGroup]) -> None:
        self._accounts, self._groups = accounts, groups
        self.fail_after: int | None = None

    def accounts(self) -> Iterator[PosixAccount]:
        for i, a in enumerate(self._accounts):
            if self.fail_after is not None and i >= self.fail_after:
                raise DirectoryUnavailable("no directory server answered (ldap://x)")
            yield a

    def groups(self) -> Iterator[PosixGroup]:
        yield from self._groups

    def user_by_name(self, name: str) -> Identity | None:
        for a in self._accounts:
            if a.name == name:
                groups = tuple(g for g in self._groups if name in g.members or g.gid == a.gid)
                return Identity(
                    dn=f"uid={name},ou=people,dc=demo,dc=example",
                    account=a,
                    roles=("vm-users",),
                    groups=groups,
                    state=AccountState(AccountStatus.ACTIVE),
                )
        return None


ALICE = PosixAccount("alice", 10001, 10001, "Alice", "/home/alice", "/bin/bash")
BOB = PosixAccount("bob", 10002, 10002, "Bob", "/home/bob", "/bin/bash")
GROUPS = [PosixGroup("alice", 10001), PosixGroup("vm-users", 20001, ("alice", "bob"))]
