"""The server's external address: config, Asterisk's pjsip.conf, then DNS servers the test runs."""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import dns.message
import dns.rrset
import pytest
from dialin_support import Clock, make_core

from tm4.core.config import parse_config
from tm4.core.errors import ConfigError
from tm4.dialin.external_ip import ExternalAddress, by_dns, from_asterisk, parse_probe, usable


class EchoDns:
    """A DNS server on loopback answering like OpenDNS/Google's "what is my address" names."""

    def __init__(self, answers: dict[tuple[str, str], str], silent: bool = False):
        self.answers = answers
        self.silent = silent
        self.queries: list[str] = []
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self._stop = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while not self._stop:
            try:
                data, peer = self.sock.recvfrom(4096)
            except (TimeoutError, OSError):
                continue
            q = dns.message.from_wire(data)
            name, rdtype = q.question[0].name.to_text(), dns.rdatatype.to_text(q.question[0].rdtype)
            self.queries.append(f"{rdtype} {name}")
            if self.silent:
                continue
            r = dns.message.make_response(q)
            value = self.answers.get((rdtype, name))
            if value is not None:
                r.answer.append(dns.rrset.from_text(name, 0, "IN", rdtype, value))
            self.sock.sendto(r.to_wire(), peer)

    def close(self) -> None:
        self._stop = True
        self.thread.join(2)
        self.sock.close()


@pytest.fixture
def dns_server() -> Iterator[EchoDns]:
    srv = EchoDns({("A", "myip.opendns.com."): "203.0.113.50",
                   ("TXT", "o-o.myaddr.l.google.com."): '"edns0-client-subnet 0.0.0.0/0" "198.51.100.9"'})
    yield srv
    srv.close()


@pytest.fixture
def silent_server() -> Iterator[EchoDns]:
    srv = EchoDns({}, silent=True)
    yield srv
    srv.close()


def test_probe_syntax() -> None:
    p = parse_probe("A myip.opendns.com @208.67.222.222 @[2620:119:35::35]:5353 @127.0.0.1:5300")
    assert p.rdtype == "A" and p.name == "myip.opendns.com."
    assert p.servers == (("208.67.222.222", 53), ("2620:119:35::35", 5353), ("127.0.0.1", 5300))
    for bad in ("MX x @1.2.3.4", "A myip.opendns.com", "A n 1.2.3.4", "A n @ns1.google.com", "A n @1.2.3.4:0"):
        with pytest.raises(ConfigError):
            parse_probe(bad)


def test_the_defaults_parse() -> None:
    ext = ExternalAddress(parse_config({}))
    assert [str(p) for p in ext.probes] == [
        "A myip.opendns.com. @208.67.222.222 @208.67.220.220",
        "TXT o-o.myaddr.l.google.com. @216.239.32.10",
        "AAAA myip.opendns.com. @[2620:119:35::35]",
    ]


def test_usable_addresses() -> None:
    assert usable('"198.51.100.9"') == "198.51.100.9"
    assert usable("2001:db8::1") == "2001:db8::1"
    for junk in ("127.0.0.1", "0.0.0.0", "224.0.0.1", "fe80::1", "edns0-client-subnet", ""):
        assert usable(junk) is None


def test_dns_a_then_txt(dns_server: EchoDns) -> None:
    a = parse_probe(f"A myip.opendns.com @127.0.0.1:{dns_server.port}")
    txt = parse_probe(f"TXT o-o.myaddr.l.google.com @127.0.0.1:{dns_server.port}")
    assert by_dns([a, txt], 1.0) == "203.0.113.50"
    assert by_dns([txt, a], 1.0) == "198.51.100.9", "the TXT string that is an address, not the ECS note"
    missing = parse_probe(f"AAAA myip.opendns.com @127.0.0.1:{dns_server.port}")
    assert by_dns([missing, txt], 1.0) == "198.51.100.9"


def test_a_dead_server_costs_at_most_twice_the_timeout(silent_server: EchoDns, dns_server: EchoDns) -> None:
    dead = parse_probe(f"A myip.opendns.com @127.0.0.1:{silent_server.port} @127.0.0.1:{silent_server.port}")
    good = parse_probe(f"TXT o-o.myaddr.l.google.com @127.0.0.1:{dns_server.port}")
    t = time.monotonic()
    assert by_dns([dead, good], 0.3) is None, "two dead servers eat the whole budget (2 x timeout)"
    assert time.monotonic() - t < 0.3 * 2 + 0.3
    t = time.monotonic()
    assert by_dns([parse_probe(f"A myip.opendns.com @127.0.0.1:{silent_server.port}"), good], 0.3) == "198.51.100.9"
    assert 0.25 < time.monotonic() - t < 0.9


def _core_with(tmp: Path, port: int):  # type: ignore[no-untyped-def]
    return make_core(tmp, {"external_address": "", "discover_timeout": "1s",
                           "discover": [f"A myip.opendns.com @127.0.0.1:{port}"]}, clock=Clock())


def test_order_config_then_asterisk_then_dns(tmp_path: Path, dns_server: EchoDns) -> None:
    core = _core_with(tmp_path, dns_server.port)
    core.config.asterisk.config_dir = str(tmp_path / "asterisk")
    ext = ExternalAddress(core.config, core.store, core.clock)
    assert ext.get() == ("203.0.113.50", "dns")
    (tmp_path / "asterisk").mkdir()
    (tmp_path / "asterisk" / "pjsip.conf").write_text(
        "[transport-udp]\ntype=transport\nprotocol=udp\nexternal_signaling_address = 198.51.100.20 ; NAT\n")
    assert ext.get() == ("198.51.100.20", "asterisk")
    core.config.dialin.external_address = "pbx.example.com"
    assert ext.get() == ("pbx.example.com", "config")


def test_dns_answers_are_cached(tmp_path: Path, dns_server: EchoDns) -> None:
    clock = Clock()
    core = make_core(tmp_path, {"external_address": "", "discover_timeout": "1s",
                                "discover": [f"A myip.opendns.com @127.0.0.1:{dns_server.port}"]}, clock=clock)
    core.config.asterisk.config_dir = str(tmp_path / "none")
    ext = ExternalAddress(core.config, core.store, clock)
    assert ext.get() == ("203.0.113.50", "dns")
    assert ext.get() == ("203.0.113.50", "cache")
    assert len(dns_server.queries) == 1
    clock.advance(minutes=11)
    assert ext.get() == ("203.0.113.50", "dns")
    assert len(dns_server.queries) == 2


def test_a_failure_is_remembered_for_a_minute(tmp_path: Path, silent_server: EchoDns) -> None:
    clock = Clock()
    core = make_core(tmp_path, {"external_address": "", "discover_timeout": "1s",
                                "discover": [f"A myip.opendns.com @127.0.0.1:{silent_server.port}"]}, clock=clock)
    core.config.asterisk.config_dir = str(tmp_path / "none")
    ext = ExternalAddress(core.config, core.store, clock)
    ext.timeout = 0.2
    assert ext.get() == (None, "dns")
    assert ext.get() == (None, "cache")
    clock.advance(seconds=61)
    assert ext.get()[1] == "dns"


def test_pjsip_includes_and_templates(tmp_path: Path) -> None:
    (tmp_path / "pjsip.conf").write_text(
        "; FreePBX style\n[global]\ntype=global\n#include pjsip.transports.conf\n#tryinclude missing.conf\n")
    (tmp_path / "pjsip.transports.conf").write_text(
        "[0.0.0.0-udp](!)\ntype=transport\n;external_signaling_address=192.0.2.99\n"
        "external_signaling_address=203.0.113.60\n")
    assert from_asterisk(tmp_path) == "203.0.113.60"
    (tmp_path / "pjsip.transports.conf").write_text("[t]\nexternal_signaling_address => sip.example.com\n")
    assert from_asterisk(tmp_path) == "sip.example.com"
    (tmp_path / "pjsip.transports.conf").write_text("[t]\nexternal_signaling_address=127.0.0.1\n")
    assert from_asterisk(tmp_path) is None
    assert from_asterisk(tmp_path / "nowhere") is None
    (tmp_path / "loop.conf").write_text("#include loop.conf\n")
    assert from_asterisk(tmp_path, "loop.conf") is None


def test_with_dnsmasq(tmp_path: Path) -> None:
    """The same through dnsmasq, the DNS server Debian ships (the "internet" is on loopback)."""
    from conftest import need_root_tools

    need_root_tools("dnsmasq")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([
        shutil.which("dnsmasq") or "dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv",
        "--no-hosts", f"--port={port}", "--listen-address=127.0.0.1", "--bind-interfaces", "--pid-file=",
        "--address=/myip.opendns.com/203.0.113.51", "--txt-record=o-o.myaddr.l.google.com,198.51.100.10",
    ], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        probes = [parse_probe(f"A myip.opendns.com @127.0.0.1:{port}"),
                  parse_probe(f"TXT o-o.myaddr.l.google.com @127.0.0.1:{port}")]
        deadline = time.monotonic() + 5
        got = None
        while got is None and time.monotonic() < deadline:
            got = by_dns(probes[:1], 0.3)
        assert got == "203.0.113.51"
        assert by_dns(probes[1:], 1.0) == "198.51.100.10"
    finally:
        proc.terminate()
        proc.wait(5)
