"""`svmm vm console`'s relay: what the VM sends reaches stdout, what is typed reaches the VM
up to the escape (Ctrl-]), which ends the session; the VM closing ends it too."""

from __future__ import annotations

import os
import socket

from pam_svmm.cli.vm import ESCAPE, attach


def test_typed_bytes_go_to_the_vm_until_the_escape() -> None:
    mine, vm = socket.socketpair()
    r, w = os.pipe()
    out_r, out_w = os.pipe()
    with mine, vm:
        vm.sendall(b"login: ")
        os.write(w, b"root\r" + ESCAPE + b"never sent")
        attach(mine, r, out_w)
        vm.settimeout(1)
        assert vm.recv(100) == b"root\r"
        mine.close()
        assert vm.recv(100) == b""
    os.close(w)
    os.close(out_w)
    assert os.read(out_r, 100) == b"login: "
    os.close(r)
    os.close(out_r)


def test_the_vm_closing_ends_the_session() -> None:
    mine, vm = socket.socketpair()
    r, w = os.pipe()
    out_r, out_w = os.pipe()
    vm.sendall(b"bye\r\n")
    vm.close()
    with mine:
        attach(mine, r, out_w)
    for fd in (w, out_w):
        os.close(fd)
    assert os.read(out_r, 100) == b"bye\r\n"
    os.close(r)
    os.close(out_r)
