"""A seccomp filter for the card helper, through libseccomp (libseccomp2, which systemd needs).

The helper runs vendor code (the PKCS#11 module and what it loads) on data from a card. It
needs files, memory, threads and AF_UNIX sockets (pcscd); it never needs to run programs,
reach the network, trace or mount anything, or load kernel code. Those calls fail with EPERM
(an error the code sees, not a kill, so a module that probes them still works). The filter
is a deny list over the default "allow": a narrower allow list would break on the next
module or libc that uses a syscall the list did not foresee.
"""

from __future__ import annotations

import ctypes
import errno
import socket

LIBSECCOMP = "libseccomp.so.2"
_ACT_ALLOW = 0x7FFF0000
_ACT_ERRNO = 0x00050000
_CMP_NE = 1

DENIED = (
    "execve", "execveat",  # no programs: a planted driver cannot start a shell
    "ptrace", "process_vm_readv", "process_vm_writev",
    "mount", "umount2", "pivot_root", "chroot", "unshare", "setns", "open_by_handle_at",
    "init_module", "finit_module", "delete_module", "kexec_load", "kexec_file_load",
    "bpf", "perf_event_open", "userfaultfd", "keyctl", "add_key", "request_key",
    "reboot", "swapon", "swapoff", "acct", "settimeofday", "clock_settime", "clock_adjtime",
)  # fmt: skip


class _ArgCmp(ctypes.Structure):
    _fields_ = (
        ("arg", ctypes.c_uint),
        ("op", ctypes.c_int),
        ("datum_a", ctypes.c_uint64),
        ("datum_b", ctypes.c_uint64),
    )


class SeccompUnavailable(OSError):
    """The filter could not be installed (the helper then refuses to run)."""


def install() -> None:
    """Deny ``DENIED`` and every socket family but AF_UNIX for this process from now on."""
    try:
        lib = ctypes.CDLL(LIBSECCOMP, use_errno=True)
    except OSError as e:
        raise SeccompUnavailable(f"cannot load {LIBSECCOMP}: {e}") from None
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = (ctypes.c_uint32,)
    lib.seccomp_rule_add_array.argtypes = (
        ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int, ctypes.c_uint, ctypes.POINTER(_ArgCmp),
    )  # fmt: skip
    lib.seccomp_syscall_resolve_name.argtypes = (ctypes.c_char_p,)
    lib.seccomp_load.argtypes = (ctypes.c_void_p,)
    lib.seccomp_release.argtypes = (ctypes.c_void_p,)
    ctx = lib.seccomp_init(_ACT_ALLOW)
    if not ctx:
        raise SeccompUnavailable("seccomp_init failed")
    deny = _ACT_ERRNO | errno.EPERM
    try:
        for name in DENIED:
            nr = lib.seccomp_syscall_resolve_name(name.encode())
            if nr < 0:
                continue  # not a syscall on this architecture
            _check(lib.seccomp_rule_add_array(ctx, deny, nr, 0, None), f"rule for {name}")
        not_unix = (_ArgCmp * 1)(_ArgCmp(0, _CMP_NE, socket.AF_UNIX, 0))
        for name in ("socket", "socketpair"):
            nr = lib.seccomp_syscall_resolve_name(name.encode())
            _check(lib.seccomp_rule_add_array(ctx, deny, nr, 1, not_unix), f"rule for {name}")
        _check(lib.seccomp_load(ctx), "seccomp_load")
    finally:
        lib.seccomp_release(ctx)


def _check(rc: int, what: str) -> None:
    if rc != 0:
        raise SeccompUnavailable(f"libseccomp: {what} failed ({-rc})")
