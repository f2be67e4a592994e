"""DNS names end to end: dnsmasq answers, the refresher follows, nftables in a
network namespace holds the addresses, and real packets show who gets in."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from dnsserver import DnsServer
from netlab import Echo, Lab

from tm4.core.config import parse_config
from tm4.dns.refresher import Refresher
from tm4.firewall.nft import _elem_text
from tm4.ops.engine import Core

PBX4 = "192.0.2.1"
PBX6 = "2001:db8::1"
SIP = 5060


def make_core(lab: Lab, state: Path, dns: DnsServer | str, **dns_cfg: Any) -> Core:
    ns = dns.nameserver if isinstance(dns, DnsServer) else dns
    cfg = parse_config({
        "state_dir": str(state),
        "firewall": {"netns": lab.pbx.ns},
        "dns": {"nameservers": [ns], "timeout": "1s", **dns_cfg},
    })
    return Core(cfg, protect=[])


def kernel(core: Core, set_name: str) -> set[str]:
    elems = core.backend.set_elements(set_name)  # type: ignore[attr-defined]
    assert elems is not None, f"set {set_name} missing from the kernel"
    return {t.split(" ")[0] for t in (_elem_text(e) for e in elems) if t}


async def until(pred: Callable[[], bool], timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if await asyncio.to_thread(pred):
            return True
        await asyncio.sleep(0.02)
    return await asyncio.to_thread(pred)


@pytest.fixture
def echo(lab: Lab) -> Iterator[Echo]:
    e = Echo(lab.pbx, udp=[SIP])
    yield e
    e.close()


def test_changed_answer_reaches_the_kernel_within_its_ttl(lab: Lab, echo: Echo, tmp_path: Path) -> None:
    old = lab.client("old", ["192.0.2.10/24"])
    new = lab.client("new", ["192.0.2.20/24"])
    with DnsServer(tmp_path / "dns", ttl=1) as dns:
        dns.set({"office.example.com": ["192.0.2.10"]})
        core = make_core(lab, tmp_path / "state", dns, refresh_min="1s", refresh_max="30s")
        core.allow("office", ["office.example.com"], ["sip-udp"])
        core.apply()
        assert not old.udp_probe(PBX4, SIP), "the name is not resolved yet: nothing may pass"

        async def scenario() -> float:
            task = asyncio.create_task(Refresher(core).run_forever())
            try:
                assert await until(lambda: kernel(core, "wl4_sip_udp") == {"192.0.2.10"}, 3)
                assert await asyncio.to_thread(old.udp_probe, PBX4, SIP)
                assert not await asyncio.to_thread(new.udp_probe, PBX4, SIP)
                t0 = time.monotonic()
                await asyncio.to_thread(dns.set, {"office.example.com": ["192.0.2.20"]})
                assert await until(lambda: kernel(core, "wl4_sip_udp") == {"192.0.2.20"}, 5)
                return time.monotonic() - t0
            finally:
                task.cancel()

        took = asyncio.run(scenario())
        print(f"kernel followed after {took:.3f} s")
        # TTL 1 s: the answer is re-asked when it expires; allow scheduling slack
        assert took < 1.6, f"the kernel followed the new answer after {took:.2f} s (TTL 1 s)"
        assert new.udp_probe(PBX4, SIP), "the new address must pass"
        assert not old.udp_probe(PBX4, SIP), "the old address must be dropped"
        audit = [a for a in core.store.audit_log(subject="office") if a.action == "resolve"]
        assert audit[-1].detail["after"] == {"office.example.com": ["192.0.2.20/32"]}


def test_server_stopped_keeps_last_addresses_and_shows_stale(lab: Lab, echo: Echo, tmp_path: Path) -> None:
    home = lab.client("home", ["203.0.113.5/24"])
    with DnsServer(tmp_path / "dns", ttl=1) as dns:
        dns.set({"home.example.net": ["203.0.113.5"]})
        core = make_core(lab, tmp_path / "state", dns)
        core.allow("home", ["home.example.net"], ["sip-udp"])
        core.apply()
        assert asyncio.run(Refresher(core).refresh())[0].status == "changed"
        assert home.udp_probe(PBX4, SIP)
        dns.stop()
        res = asyncio.run(Refresher(core).refresh())[0]
    assert res.status == "failed" and res.after == ("203.0.113.5",) and res.error
    entry = core.get_entry("home")
    assert entry.to_json()["stale"] is True and entry.to_json()["addresses"] == ["203.0.113.5"]
    assert kernel(core, "wl4_sip_udp") == {"203.0.113.5"}
    assert home.udp_probe(PBX4, SIP), "last known address must keep working"


def test_boot_with_dns_down_loads_the_rest(lab: Lab, echo: Echo, tmp_path: Path) -> None:
    literal = lab.client("lit", ["192.0.2.30/24"])
    known = lab.client("known", ["192.0.2.20/24"])
    stranger = lab.client("stranger", ["192.0.2.40/24"])
    with DnsServer(tmp_path / "dns", ttl=1) as dns:
        dns.set({"known.example.com": ["192.0.2.20"]})
        before = make_core(lab, tmp_path / "state", dns)
        before.allow("literal", ["192.0.2.30"], ["sip-udp"])
        before.allow("known", ["known.example.com"], ["sip-udp"])
        before.allow("fresh", ["fresh.example.com"], ["sip-udp"])  # never answered
        before.apply()
        asyncio.run(Refresher(before).refresh())
        before.backend.remove()  # the reboot: no table in the kernel
        dead = dns.nameserver
    # boot: the DNS server is gone
    core = make_core(lab, tmp_path / "state", dead)
    core.apply()
    t = time.monotonic()
    results = {r.entry: r for r in asyncio.run(Refresher(core).refresh())}
    assert time.monotonic() - t < 3
    assert {k: v.status for k, v in results.items()} == {"known": "failed", "fresh": "failed"}
    assert kernel(core, "wl4_sip_udp") == {"192.0.2.30", "192.0.2.20"}
    assert literal.udp_probe(PBX4, SIP)
    assert known.udp_probe(PBX4, SIP)
    assert not stranger.udp_probe(PBX4, SIP)
    assert core.get_entry("fresh").networks() == []


def test_aaaa_answers_make_ipv6_elements(lab: Lab, echo: Echo, tmp_path: Path) -> None:
    phone = lab.client("phone6", ["2001:db8::20/64", "192.0.2.20/24"])
    other = lab.client("other6", ["2001:db8::30/64"])
    with DnsServer(tmp_path / "dns", ttl=1) as dns:
        dns.set({"phone.example.com": ["2001:db8::20", "192.0.2.20"]})
        core = make_core(lab, tmp_path / "state", dns)
        core.allow("phone", ["phone.example.com"], ["sip-udp"])
        core.apply()
        res = asyncio.run(Refresher(core).refresh())[0]
    assert res.after == ("192.0.2.20", "2001:db8::20")
    assert kernel(core, "wl6_sip_udp") == {"2001:db8::20"}
    assert kernel(core, "wl4_sip_udp") == {"192.0.2.20"}
    assert phone.udp_probe(PBX6, SIP, src="2001:db8::20")
    assert not other.udp_probe(PBX6, SIP)
