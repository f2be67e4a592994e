"""Sockets in another network namespace, from this process.

setns moves only the calling thread, so a short-lived thread enters the namespace
(/run/netns/NAME, as `ip netns add` makes it) and runs the function there; a socket
keeps the namespace it was made in for life, so the caller then uses it like any other.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import socket
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def enter_netns(ns: str) -> None:
    """Move the calling thread (only it) into network namespace `ns`."""
    fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"cannot enter network namespace {ns}")
    finally:
        os.close(fd)


def in_netns(ns: str, fn: Callable[[], T]) -> T:
    """Run fn on a thread that entered network namespace `ns` and return its result."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            enter_netns(ns)
            box["value"] = fn()
        except BaseException as exc:  # handed to the caller below
            box["error"] = exc

    t = threading.Thread(target=target)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


def tcp_connects(ns: str, dst: str, port: int, src: str | None = None, timeout: float = 0.5) -> bool:
    """Does a TCP connect from namespace `ns` (from address `src`, if given) get through?"""
    fam = socket.AF_INET6 if ":" in dst else socket.AF_INET
    with in_netns(ns, lambda: socket.socket(fam, socket.SOCK_STREAM)) as s:
        if src:
            s.bind((src, 0))
        s.settimeout(timeout)
        try:
            s.connect((dst, port))
            return True
        except OSError:
            return False
