"""Resolution against a real DNS server the test controls (dnsmasq on loopback)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import dns.message
import dns.rcode
import pytest
from dnsserver import DnsServer, ScriptedServer, SilentServer, reply, unique_endpoint

from tm4.dns import client as dnsclient
from tm4.dns.lookup import DnsResolver, DnsSettings, Lookup, parse_nameserver


@pytest.fixture
def dns_server(tmp_path: Path) -> Iterator[DnsServer]:
    with DnsServer(tmp_path / "dns", ttl=7) as s:
        yield s


def lookup(nameserver: str, fqdn: str, **kw: object) -> Lookup:
    settings = DnsSettings(nameservers=(parse_nameserver(nameserver),), **kw)  # type: ignore[arg-type]

    async def go() -> Lookup:
        return await DnsResolver(settings).lookup(fqdn)

    return asyncio.run(go())


def texts(lk: Lookup) -> tuple[list[str] | None, list[str] | None]:
    return ([str(n) for n in lk.v4] if lk.v4 is not None else None,
            [str(n) for n in lk.v6] if lk.v6 is not None else None)


def test_a_and_aaaa_with_the_servers_ttl(dns_server: DnsServer) -> None:
    dns_server.set({"pbx.example.com": ["192.0.2.10", "192.0.2.11", "2001:db8::10"],
                    "v6only.example.net": ["2001:db8::20"]})
    lk = lookup(dns_server.nameserver, "pbx.example.com")
    assert lk.ok and lk.ttl == 7
    assert texts(lk) == (["192.0.2.10/32", "192.0.2.11/32"], ["2001:db8::10/128"])
    lk = lookup(dns_server.nameserver, "v6only.example.net")
    assert lk.ok and texts(lk) == ([], ["2001:db8::20/128"])


def test_nxdomain_is_a_failure_of_both_families(dns_server: DnsServer) -> None:
    lk = lookup(dns_server.nameserver, "gone.example.com")
    assert not lk.ok and "NXDOMAIN" in lk.error and texts(lk) == (None, None)


def test_too_many_addresses_are_refused(dns_server: DnsServer) -> None:
    dns_server.set({"hijacked.example.com": [f"198.51.100.{i}" for i in range(1, 21)]})
    lk = lookup(dns_server.nameserver, "hijacked.example.com", max_addresses=16)
    assert not lk.ok and "20 addresses" in lk.error and texts(lk) == (None, None)
    assert lookup(dns_server.nameserver, "hijacked.example.com", max_addresses=20).ok


def test_multicast_answers_are_not_addresses(dns_server: DnsServer) -> None:
    dns_server.set({"odd.example.com": ["224.0.0.1", "192.0.2.30"]})
    lk = lookup(dns_server.nameserver, "odd.example.com")
    assert lk.ok and texts(lk) == (["192.0.2.30/32"], []) and lk.ignored == ("224.0.0.1",)


def test_each_query_is_bounded_by_the_timeout() -> None:
    silent = SilentServer()
    try:
        t = time.monotonic()
        lk = lookup(silent.nameserver, "slow.example.com", timeout=0.5)
        took = time.monotonic() - t
    finally:
        silent.close()
    assert not lk.ok and "no answer within 0.5s" in lk.error and texts(lk) == (None, None)
    assert silent.received >= 2  # A and AAAA were both asked
    assert took < 1.5, f"a 0.5 s timeout took {took:.2f} s"


def test_stopped_server_is_a_failure_not_an_exception(dns_server: DnsServer) -> None:
    ns = dns_server.nameserver
    dns_server.stop()
    t = time.monotonic()
    lk = lookup(ns, "pbx.example.com", timeout=1.0)
    assert not lk.ok and texts(lk) == (None, None)
    assert time.monotonic() - t < 2.5


def test_no_resolver_configuration_at_boot_is_a_failure(tmp_path: Path) -> None:
    settings = DnsSettings()  # no nameservers: the system's, from a resolv.conf that is missing
    resolver = DnsResolver(settings, resolv_conf=str(tmp_path / "missing-resolv.conf"))
    lk = asyncio.run(resolver.lookup("pbx.example.com"))
    assert not lk.ok and "no usable DNS resolver configuration" in lk.error


def test_resolv_conf_appearing_later_is_picked_up(tmp_path: Path) -> None:
    conf = tmp_path / "resolv.conf"
    resolver = DnsResolver(DnsSettings(), resolv_conf=str(conf))
    assert "no usable DNS resolver configuration" in asyncio.run(resolver.lookup("a.example.com")).error
    conf.write_text("nameserver 192.0.2.53\n")  # the network came up (no query is sent here)
    resolver._configure()
    assert resolver.servers == [("192.0.2.53", 53)]
    conf.write_text("nameserver 198.51.100.53\nnameserver 2001:db8::53\n")
    resolver._configure()
    assert resolver.servers == [("198.51.100.53", 53), ("2001:db8::53", 53)]


def test_unique_endpoints_differ() -> None:
    assert unique_endpoint() != unique_endpoint()


# -- the stub client's own duties ------------------------------------------------------

def ask(ns: str, fqdn: str, rdtype: str = "A", timeout: float = 2.0, *more: str) -> dnsclient.Answer:
    servers = [parse_nameserver(ns), *(parse_nameserver(m) for m in more)]
    return asyncio.run(dnsclient.query(servers, fqdn, rdtype, timeout))


def test_truncated_answers_are_asked_again_over_tcp(dns_server: DnsServer) -> None:
    many = [f"198.51.100.{i}" for i in range(1, 61)]  # 60 A records: > 512 bytes over UDP
    dns_server.set({"big.example.com": many})
    assert sorted(ask(dns_server.nameserver, "big.example.com.").addresses) == sorted(many)


def test_cname_chains_are_followed(tmp_path: Path) -> None:
    with DnsServer(tmp_path / "dns", ttl=9, extra=["--cname=alias.example.com,target.example.net"]) as s:
        s.set({"target.example.net": ["192.0.2.44", "2001:db8::44"]})
        lk = lookup(s.nameserver, "alias.example.com")
    assert lk.ok and texts(lk) == (["192.0.2.44/32"], ["2001:db8::44/128"]) and lk.ttl == 9


def test_garbage_and_foreign_ids_are_ignored() -> None:
    def plan(q: dns.message.Message, n: int) -> list[bytes]:
        return [b"\x00garbage", reply(q, a=["203.0.113.66"], qid=(q.id + 1) % 65536),
                reply(q, a=["192.0.2.99"])]

    srv = ScriptedServer(plan)
    try:
        assert ask(srv.nameserver, "x.example.com.").addresses == ("192.0.2.99",)
    finally:
        srv.close()


def test_a_lost_query_is_sent_again() -> None:
    srv = ScriptedServer(lambda q, n: [] if n == 1 else [reply(q, a=["192.0.2.7"])])
    try:
        t = time.monotonic()
        assert ask(srv.nameserver, "x.example.com.", "A", 1.0).addresses == ("192.0.2.7",)
        assert len(srv.queries) == 2 and time.monotonic() - t < 1.0
    finally:
        srv.close()


def test_servfail_and_refused_move_on_to_the_next_nameserver(dns_server: DnsServer) -> None:
    dns_server.set({"pbx.example.com": ["192.0.2.10"]})
    bad = [ScriptedServer(lambda q, n: [reply(q, dns.rcode.SERVFAIL)]),
           ScriptedServer(lambda q, n: [reply(q, dns.rcode.REFUSED)])]
    try:
        got = ask(bad[0].nameserver, "pbx.example.com.", "A", 2.0, bad[1].nameserver, dns_server.nameserver)
        assert got.addresses == ("192.0.2.10",)
        with pytest.raises(dnsclient.QueryFailed, match="SERVFAIL.*REFUSED"):
            ask(bad[0].nameserver, "pbx.example.com.", "A", 1.0, bad[1].nameserver)
    finally:
        for b in bad:
            b.close()
