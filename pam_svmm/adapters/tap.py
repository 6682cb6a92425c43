"""Tap devices for bridged VM networks: svmmd (root) makes one per VM and network, attaches
it to the host bridge the configuration names, and hands QEMU the descriptor
(``-netdev tap,fd=N``), so the unprivileged QEMU needs no CAP_NET_ADMIN, no setuid bridge
helper and no access to /dev/net/tun.

The tap is not persistent: the kernel removes it when its last descriptor closes, that is
when QEMU exits (svmmd closes its own copy right after the launch).
"""

from __future__ import annotations

import fcntl
import os
import re
import struct
import subprocess
from pathlib import Path

from ..errors import VmError

TUN_DEVICE = "/dev/net/tun"
IP = "/usr/bin/ip" if os.path.exists("/usr/bin/ip") else "/sbin/ip"
TAP_TEMPLATE = "svmm%d"  # the kernel picks the number
_TUNSETIFF = 0x400454CA
_IFF_TAP = 0x0002
_IFF_NO_PI = 0x1000
_IFNAME = re.compile(r"[A-Za-z0-9_.-]{1,15}")


def is_bridge(name: str) -> bool:
    return bool(_IFNAME.fullmatch(name)) and Path(f"/sys/class/net/{name}/bridge").is_dir()


def open_tap(bridge: str) -> tuple[int, str]:
    """A new tap device on ``bridge``, up: (its descriptor, its interface name).
    VmError(reason="network_unavailable") when the bridge is not there or the tap cannot
    be made."""
    if not is_bridge(bridge):
        raise VmError(f"host bridge {bridge!r} does not exist", reason="network_unavailable")
    try:
        fd = os.open(TUN_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        raise VmError(f"{TUN_DEVICE}: {e.strerror}", reason="network_unavailable") from None
    try:
        ifr = struct.pack("16sH22x", TAP_TEMPLATE.encode(), _IFF_TAP | _IFF_NO_PI)
        answer = fcntl.ioctl(fd, _TUNSETIFF, ifr)
        name = answer[:16].rstrip(b"\0").decode("ascii")
        # argv, never a shell: the names are checked (the bridge above, the tap is ours).
        done = subprocess.run(
            [IP, "link", "set", "dev", name, "master", bridge, "up"],
            capture_output=True,
            timeout=10,
            check=False,
        )
        if done.returncode != 0:
            why = done.stderr.decode("utf-8", "replace").strip()[:200]
            raise VmError(
                f"cannot attach tap {name} to bridge {bridge}: {why}",
                reason="network_unavailable",
            )
    except OSError as e:
        os.close(fd)
        raise VmError(
            f"cannot make a tap device: {e.strerror}", reason="network_unavailable"
        ) from None
    except BaseException:
        os.close(fd)
        raise
    return fd, name
