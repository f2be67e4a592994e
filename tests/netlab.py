"""Network namespaces for tests: a PBX host and clients on one bridged segment.

Sockets are opened inside a namespace with tm4.firewall.netns.in_netns (a thread that entered
it; setns only moves the calling thread); a socket keeps its namespace for life, so
the test then uses it like any other. Addresses only from 192.0.2.0/24, 198.51.100.0/24,
203.0.113.0/24 and 2001:db8::/32.
"""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from tm4.firewall.netns import in_netns, tcp_connects

_counter = itertools.count()

PBX_ADDRS = ["192.0.2.1/24", "198.51.100.1/24", "203.0.113.1/24", "2001:db8::1/64"]


def sh(*argv: str, check: bool = True, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), check=check, capture_output=True, text=True, **kw)


class Host:
    def __init__(self, lab: Lab, name: str, ns: str, addrs: Sequence[str]):
        self.lab = lab
        self.name = name
        self.ns = ns
        self.addrs = [a.split("/")[0] for a in addrs]

    @property
    def v4(self) -> str:
        return next(a for a in self.addrs if ":" not in a)

    @property
    def v6(self) -> str:
        return next(a for a in self.addrs if ":" in a)

    def run(self, *argv: str, check: bool = True, **kw: Any) -> subprocess.CompletedProcess[str]:
        return sh("ip", "netns", "exec", self.ns, *argv, check=check, **kw)

    def popen(self, *argv: str, **kw: Any) -> subprocess.Popen[str]:
        return subprocess.Popen(["ip", "netns", "exec", self.ns, *argv], text=True, **kw)

    def socket(self, family: int, type_: int) -> socket.socket:
        return in_netns(self.ns, lambda: socket.socket(family, type_))

    # -- probes -----------------------------------------------------------------
    def udp_probe(self, dst: str, port: int, src: str | None = None, timeout: float = 0.5,
                  sock: socket.socket | None = None, payload: bytes = b"tm4-probe") -> bool:
        """Send one datagram and wait for the echo; True if it came back."""
        fam = socket.AF_INET6 if ":" in dst else socket.AF_INET
        s = sock or self.socket(fam, socket.SOCK_DGRAM)
        try:
            if src and sock is None:
                s.bind((src, 0))
            s.settimeout(timeout)
            s.sendto(payload, (dst, port))
            try:
                data, _ = s.recvfrom(2048)
                return data == payload
            except (TimeoutError, ConnectionRefusedError):
                return False
        finally:
            if sock is None:
                s.close()

    def tcp_probe(self, dst: str, port: int, src: str | None = None, timeout: float = 0.5) -> bool:
        return tcp_connects(self.ns, dst, port, src, timeout)


class Echo:
    """UDP echo and TCP accept servers on the PBX (threads; stop with close())."""

    def __init__(self, host: Host, udp: Sequence[int] = (), tcp: Sequence[int] = ()):
        self.socks: list[socket.socket] = []
        self.received: dict[int, int] = {}
        self._stop = False
        for port in udp:
            for fam, addr in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
                s = host.socket(fam, socket.SOCK_DGRAM)
                if fam == socket.AF_INET6:
                    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                s.bind((addr, port))
                s.settimeout(0.2)
                self.socks.append(s)
                threading.Thread(target=self._udp, args=(s, port), daemon=True).start()
        for port in tcp:
            for fam, addr in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
                s = host.socket(fam, socket.SOCK_STREAM)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if fam == socket.AF_INET6:
                    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                s.bind((addr, port))
                s.listen(64)
                s.settimeout(0.2)
                self.socks.append(s)
                threading.Thread(target=self._tcp, args=(s,), daemon=True).start()

    def _udp(self, s: socket.socket, port: int) -> None:
        while not self._stop:
            try:
                data, peer = s.recvfrom(4096)
            except (TimeoutError, OSError):
                continue
            self.received[port] = self.received.get(port, 0) + 1
            with contextlib.suppress(OSError):
                s.sendto(data, peer)

    def _tcp(self, s: socket.socket) -> None:
        while not self._stop:
            try:
                c, _ = s.accept()
                c.close()
            except (TimeoutError, OSError):
                continue

    def close(self) -> None:
        self._stop = True
        for s in self.socks:
            s.close()


class Lab:
    """A PBX namespace with a bridge, and client namespaces plugged into it."""

    def __init__(self, tag: str = "t"):
        self.prefix = f"tm4{tag}{os.getpid() % 10000}x{next(_counter)}"
        self.hosts: list[Host] = []
        self.pbx = self._ns("pbx", PBX_ADDRS, pbx=True)

    def _ns(self, name: str, addrs: Sequence[str], pbx: bool = False) -> Host:
        ns = f"{self.prefix}{name}"[:48]
        sh("ip", "netns", "add", ns)
        h = Host(self, name, ns, addrs)
        self.hosts.append(h)
        h.run("ip", "link", "set", "lo", "up")
        h.run("sysctl", "-qw", "net.ipv6.conf.all.accept_dad=0")
        h.run("sysctl", "-qw", "net.ipv6.conf.default.accept_dad=0")
        if pbx:
            h.run("ip", "link", "add", "br0", "type", "bridge")
            h.run("ip", "link", "set", "br0", "up")
            for a in addrs:
                h.run("ip", "addr", "add", a, "dev", "br0", *(["nodad"] if ":" in a else []))
        return h

    def client(self, name: str, addrs: Sequence[str]) -> Host:
        h = self._ns(name, addrs)
        idx = len(self.hosts)
        peer = f"v{idx}{self.prefix[-6:]}"[:15]
        sh("ip", "link", "add", "eth0", "netns", h.ns, "type", "veth", "peer", "name", peer, "netns", self.pbx.ns)
        self.pbx.run("ip", "link", "set", peer, "master", "br0")
        self.pbx.run("ip", "link", "set", peer, "up")
        for a in addrs:
            h.run("ip", "addr", "add", a, "dev", "eth0", *(["nodad"] if ":" in a else []))
        h.run("ip", "link", "set", "eth0", "up")
        # default routes via the PBX's address in the client's own subnet
        v4 = [a for a in addrs if ":" not in a]
        if v4:
            gw = ipaddress.ip_interface(v4[0]).network.network_address + 1
            h.run("ip", "route", "add", "default", "via", str(gw))
        if any(":" in a for a in addrs):
            h.run("ip", "-6", "route", "add", "default", "via", "2001:db8::1")
        return h

    def close(self) -> None:
        for h in reversed(self.hosts):
            sh("ip", "netns", "del", h.ns, check=False)
        self.hosts.clear()


def wait_for(pred: Callable[[], bool], timeout: float = 3.0, interval: float = 0.02) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(interval)
    return pred()
