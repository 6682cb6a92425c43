"""The LUKS1 volume svmmd's key tests boot (tests/integration/test_launcher_keys.py,
test_launcher_devices.py): its passphrase ``KEY`` and the module-scoped ``luks_template``
fixture, the image made once per module."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from pam_svmm.adapters.qemu import LuksDisk, QemuVm, VmSpec

CRYPTSETUP = shutil.which("cryptsetup")
KEY = "q7LDm1r0pZJ9b8vT2xHk4wYcN5sF6gA3eU0iO_-KjRQ"  # base64url text, like real passphrases


@pytest.fixture(scope="module")
def luks_template() -> Iterator[Path]:
    """One LUKS1 volume (made once: formatting is the slow part) whose plaintext holds 0x5a at
    0..4095, written through QEMU's LUKS driver with the known key."""
    d = Path(tempfile.mkdtemp(prefix="svmm-luks-", dir="/tmp"))
    image = d / "template.img"
    with open(image, "wb") as f:
        f.truncate(16 << 20)
    subprocess.run(
        [CRYPTSETUP, "luksFormat", "--batch-mode", "--type", "luks1", "--key-file=-",
         "--pbkdf", "pbkdf2", "--pbkdf-force-iterations", "1000", str(image)],
        input=KEY.encode(), check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    with QemuVm.launch(
        VmSpec("prep", disks=(LuksDisk("disk0", image),)),
        {"disk0": bytearray(KEY.encode())},
        run_dir=d / "run",
        capture_stdout=True,
    ) as vm:
        vm.write_pattern("disk0", 0x5A, 0, 4096)
    yield image
    shutil.rmtree(d, ignore_errors=True)
