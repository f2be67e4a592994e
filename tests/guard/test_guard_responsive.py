"""Responsive mode: public SIP is metered per source in the kernel, before the guard
even sees an event. Rendering (pure) and real floods in namespaces."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

from netlab import Host, Lab, wait_for
from sipsim import SipResponder

from tm4.core.config import parse_config
from tm4.core.rules import public_rules, render_ruleset, responsive_rules
from tm4.ops.engine import Core

PBX4, PBX6 = "192.0.2.1", "2001:db8::1"


def config(tmp: Path, netns: str = "", **fw: object) -> object:
    return parse_config({"state_dir": str(tmp), "firewall": {"netns": netns, **fw}})


def test_meters_render_for_public_sip_only_and_before_conntrack(tmp_path: Path) -> None:
    cfg = config(tmp_path, public_services=["sip-udp", "ssh"], rate_packets=50, rate_flows=10, clamp="2m")
    rules = responsive_rules(cfg)  # type: ignore[arg-type]
    assert len(rules) == 6  # clamp, flows, packets; IPv4 and IPv6; sip-udp only
    assert not any("dport 22" in r for r in rules)
    assert any("limit rate over 300/minute burst 50 packets" in r for r in rules)  # 50 per 10 s
    assert any("ct state new meter" in r and "ct count over 10" in r for r in rules)
    assert all("!= @wl4_all" in r or "!= @wl6_all" in r for r in rules)  # whitelisted: never metered
    assert any("ip6 saddr & ffff:ffff:ffff:ffff::" in r for r in rules)  # IPv6 by /64
    _, sets = public_rules(cfg.services["sip-udp"], cfg)  # type: ignore[attr-defined]
    assert {n: (s.dynamic, s.timeout) for n, s in sets.items()} == {
        "rsp4_clamp": (True, "120s"), "rsp6_clamp": (True, "120s")}
    assert public_rules(cfg.services["ssh"], cfg)[1] == {}  # type: ignore[attr-defined]
    rs = render_ruleset({}, cfg, __import__("datetime").datetime.now(__import__("datetime").UTC))  # type: ignore[arg-type]
    est = rs.input_rules.index("ct state established,related accept")
    assert all(rs.input_rules.index(r) < est for r in rules)
    assert config(tmp_path, public_services=["ssh"]) and responsive_rules(
        config(tmp_path, public_services=["ssh"])) == []  # type: ignore[arg-type]


REGISTER = (b"REGISTER sip:192.0.2.1 SIP/2.0\r\nVia: SIP/2.0/UDP %s:%d;branch=z9hG4bK-%d\r\n"
            b"From: <sip:1001@192.0.2.1>;tag=1\r\nTo: <sip:1001@192.0.2.1>\r\nCall-ID: %d@x\r\n"
            b"CSeq: 1 REGISTER\r\nContent-Length: 0\r\n\r\n")


def send(host: Host, src: str, dst: str, n: int, *, gap: float = 0.0, new_flows: bool = False,
         sock: socket.socket | None = None) -> socket.socket:
    fam = socket.AF_INET6 if ":" in dst else socket.AF_INET
    s = sock
    for i in range(n):
        if s is None or new_flows:
            if s is not None and new_flows:
                s.close()
            s = host.socket(fam, socket.SOCK_DGRAM)
            s.bind((src, 0))
        s.sendto(REGISTER % (src.encode(), s.getsockname()[1], i, i), (dst, 5060))
        if gap:
            time.sleep(gap)
    assert s is not None
    return s


def clamp_elems(lab: Lab, name: str) -> list[str]:
    out = lab.pbx.run("nft", "-j", "list", "set", "inet", "tm4", name).stdout
    elems = []
    for obj in json.loads(out)["nftables"]:
        for e in obj.get("set", {}).get("elem", []):
            elems.append(e["elem"]["val"] if isinstance(e, dict) else e)
    return elems


def test_flood_is_clamped_in_the_kernel_slow_and_whitelisted_sources_are_not(lab: Lab, tmp_path: Path) -> None:
    flood = lab.client("flood", ["203.0.113.80/24", "2001:db8::80/64"])
    slow = lab.client("slow", ["203.0.113.81/24", "2001:db8::81/64"])
    friend = lab.client("friend", ["198.51.100.20/24"])
    scan = lab.client("scan", ["203.0.113.82/24"])
    cfg = config(tmp_path, lab.pbx.ns, public_services=["sip-udp"], rate_packets=50, rate_flows=10, clamp="60s")
    core = Core(cfg, protect=[])  # type: ignore[arg-type]
    core.allow("friend", ["198.51.100.20"], ["sip-udp"])
    core.apply()
    r = SipResponder(lab.pbx.socket, emit=None)
    try:
        # One UDP flow, answered (so conntrack calls it established), 1,000 packets at once.
        s = send(flood, "203.0.113.80", PBX4, 1000)
        assert wait_for(lambda: "203.0.113.80" in clamp_elems(lab, "rsp4_clamp"), 2)
        time.sleep(0.3)
        first = r.count("203.0.113.80")
        assert 45 <= first <= 60, first  # the burst of 50, then the kernel drops
        send(flood, "203.0.113.80", PBX4, 50, sock=s)
        time.sleep(0.3)
        assert r.count("203.0.113.80") == first  # clamped: nothing more gets through
        # Too many new flows (fresh source ports): clamped after 10.
        send(scan, "203.0.113.82", PBX4, 40, new_flows=True)
        time.sleep(0.3)
        assert 9 <= r.count("203.0.113.82") <= 12, r.count("203.0.113.82")
        # A whitelisted source is never metered, even flooding.
        send(friend, "198.51.100.20", PBX4, 1000)
        assert wait_for(lambda: r.count("198.51.100.20") >= 990, 3), r.count("198.51.100.20")
        # A source under the meter's rate (4 packets/s) is not clamped.
        ss = send(slow, "203.0.113.81", PBX4, 8, gap=0.25)
        assert wait_for(lambda: r.count("203.0.113.81") == 8, 2)
        # A full re-apply keeps the clamped source clamped and restarts the meters afresh
        # (a carried-over meter element without its limit state would clamp everybody).
        core.apply()
        send(flood, "203.0.113.80", PBX4, 20, sock=s)
        send(slow, "203.0.113.81", PBX4, 4, gap=0.25, sock=ss)
        assert wait_for(lambda: r.count("203.0.113.81") == 12, 2)
        assert r.count("203.0.113.80") == first
        # IPv6: clamped by the source's /64.
        send(flood, "2001:db8::80", PBX6, 1000)
        assert wait_for(lambda: "2001:db8::" in clamp_elems(lab, "rsp6_clamp"), 2)
        time.sleep(0.2)
        assert 45 <= r.count("2001:db8::80") <= 60
    finally:
        r.close()
