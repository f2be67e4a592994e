"""A DNS server the tests control: dnsmasq (Debian's dnsmasq-base) on a private
loopback address and port, answering only from a hosts file the test rewrites
(SIGHUP re-reads it), with every answer's TTL set by --local-ttl.

Names under example.com, example.net and .test only; the addresses are data,
never a destination.
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import dns.message
import dns.query
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import pytest

DOMAINS = ("example.com", "example.net", "test")
SENTINEL = "serial.tm4dns.test"
_counter = itertools.count()


def dnsmasq_binary() -> str | None:
    return shutil.which("dnsmasq") or (
        "/usr/sbin/dnsmasq" if os.access("/usr/sbin/dnsmasq", os.X_OK) else None)


def need_dnsmasq() -> str:
    """The dnsmasq path; skip the test (fail it under CI=true) if it is missing."""
    exe = dnsmasq_binary()
    if exe is None:
        reason = "needs dnsmasq (Debian package dnsmasq-base)"
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"{reason}; CI must run every test (run `make deps` as root)")
        pytest.skip(reason)
    return exe


def unique_endpoint() -> tuple[str, int]:
    """A loopback address and port no other test process picks."""
    n = next(_counter)
    pid = os.getpid()
    addr = f"127.53.{pid % 251 + 1}.{(pid // 251 + n) % 251 + 1}"
    port = 20000 + (pid * 13 + n * 101) % 30000
    return addr, port


class DnsServer:
    def __init__(self, workdir: Path, ttl: int = 1, extra: Iterable[str] = ()):
        self.exe = need_dnsmasq()
        self.extra = list(extra)  # more dnsmasq options, e.g. --cname=alias,target
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.hosts = workdir / "hosts"
        self.log = workdir / "dnsmasq.log"
        self.ttl = ttl
        self.address, self.port = unique_endpoint()
        self.proc: subprocess.Popen[bytes] | None = None
        self.serial = 0
        self.records: dict[str, list[str]] = {}
        self._write()

    @property
    def nameserver(self) -> str:
        return f"{self.address}:{self.port}"

    # -- lifecycle --------------------------------------------------------------
    def start(self) -> DnsServer:
        for _ in range(5):
            argv = [
                self.exe, "--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv", "--no-hosts",
                f"--addn-hosts={self.hosts}", f"--listen-address={self.address}", "--bind-interfaces",
                f"--port={self.port}", f"--local-ttl={self.ttl}", f"--neg-ttl={self.ttl}",
                "--pid-file=", "--user=root", f"--log-facility={self.log}", "--cache-size=0",
                *(f"--local=/{d}/" for d in DOMAINS), *self.extra,
            ]
            self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            if self._wait_serial(3.0):
                return self
            self.stop()
            self.address, self.port = unique_endpoint()  # taken: try another endpoint
        raise RuntimeError(f"dnsmasq would not start; see {self.log}")

    def stop(self) -> None:
        p, self.proc = self.proc, None
        if p is not None and p.poll() is None:
            p.terminate()
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        if p is not None and p.stderr is not None:
            p.stderr.close()

    def __enter__(self) -> DnsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- answers ----------------------------------------------------------------
    def set(self, records: Mapping[str, Iterable[str]]) -> None:
        """Replace every answer (name -> addresses); returns once dnsmasq serves them."""
        self.records = {k: list(v) for k, v in records.items()}
        self._write()
        if self.proc is not None:
            self.proc.send_signal(signal.SIGHUP)
            if not self._wait_serial(5.0):
                raise RuntimeError("dnsmasq did not pick up the new hosts file")

    def _write(self) -> None:
        self.serial += 1
        lines = [f"192.0.2.{self.serial % 250 + 1} {SENTINEL}"]
        for name, addrs in self.records.items():
            lines.extend(f"{a} {name}" for a in addrs)
        tmp = self.hosts.with_suffix(".tmp")
        tmp.write_text("\n".join(lines) + "\n")
        tmp.chmod(0o644)
        os.replace(tmp, self.hosts)

    def _wait_serial(self, timeout: float) -> bool:
        want = f"192.0.2.{self.serial % 250 + 1}"
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc is None or self.proc.poll() is not None:
                return False
            if self.query(SENTINEL, "A") == [want]:
                return True
            time.sleep(0.02)
        return False

    def query(self, name: str, rdtype: str = "A") -> list[str] | None:
        """Ask the server directly; None on no answer or an error rcode."""
        q = dns.message.make_query(name, rdtype)
        try:
            r = dns.query.udp(q, self.address, port=self.port, timeout=0.3)
        except (dns.exception.Timeout, OSError):
            return None
        if r.rcode() != dns.rcode.NOERROR:
            return None
        want = dns.rdatatype.from_text(rdtype)
        return sorted(rd.to_text() for rrset in r.answer if rrset.rdtype == want for rd in rrset)


class _LoopbackUdp:
    """A UDP socket on a loopback endpoint of its own, served by a thread until close():
    each datagram goes to `received_from(data, peer)`."""

    def __init__(self) -> None:
        self.address, self.port = unique_endpoint()
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((self.address, self.port))
        self.sock.settimeout(0.2)
        self._stop = False
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    @property
    def nameserver(self) -> str:
        return f"{self.address}:{self.port}"

    def _run(self) -> None:
        while not self._stop:
            try:
                data, peer = self.sock.recvfrom(4096)
            except (TimeoutError, OSError):
                continue
            self.received_from(data, peer)

    def received_from(self, data: bytes, peer: tuple[str, int]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        self._stop = True
        self._t.join(1)
        self.sock.close()


class ScriptedServer(_LoopbackUdp):
    """A UDP nameserver on loopback that answers as a test scripts it: `plan` is
    called with each query and returns the datagrams to send back (none: drop)."""

    def __init__(self, plan: Callable[[dns.message.Message, int], list[bytes]]):
        self.plan = plan
        self.queries: list[dns.message.Message] = []
        super().__init__()

    def received_from(self, data: bytes, peer: tuple[str, int]) -> None:
        q = dns.message.from_wire(data)
        self.queries.append(q)
        for out in self.plan(q, len(self.queries)):
            self.sock.sendto(out, peer)


def reply(q: dns.message.Message, rcode: int = dns.rcode.NOERROR, a: Iterable[str] = (),
          ttl: int = 30, qid: int | None = None) -> bytes:
    """An answer to `q` (A records only), optionally with another query ID."""
    r = dns.message.make_response(q)
    r.set_rcode(rcode)
    addrs = list(a)
    if addrs and q.question[0].rdtype == dns.rdatatype.A:
        rrset = r.find_rrset(r.answer, q.question[0].name, dns.rdataclass.IN, dns.rdatatype.A, create=True)
        for addr in addrs:
            rrset.add(dns.rdata.from_text(dns.rdataclass.IN, dns.rdatatype.A, addr), ttl)
    if qid is not None:
        r.id = qid
    return r.to_wire()


class SilentServer(_LoopbackUdp):
    """A UDP socket on loopback that swallows queries: every lookup times out."""

    def __init__(self) -> None:
        self.received = 0
        super().__init__()

    def received_from(self, data: bytes, peer: tuple[str, int]) -> None:
        self.received += 1
