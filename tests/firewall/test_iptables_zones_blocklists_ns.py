"""Blocklists, zones and interface zones through the iptables + ipset backend, with real
packets in namespaces the test builds, for both iptables-nft and iptables-legacy."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import need_root_tools
from netlab import Echo, Host, Lab, sh

from tm4.core.config import parse_config
from tm4.firewall.iptables import IptablesBackend
from tm4.ops import zones as zones_mod
from tm4.ops.engine import Core
from tm4.sources import blocklists as bl_mod

TOOLS = ("iptables", "ip6tables", "iptables-restore", "ip6tables-restore", "iptables-save", "ipset")
PBX4, PBX6, TUN, TUN4 = "203.0.113.1", "2001:db8::1", "2001:db8:77::1", "198.51.100.253"
VARIANTS = pytest.mark.parametrize("legacy", [False, True], ids=["iptables-nft", "iptables-legacy"])


def cfg(lab: Lab, tmp: Path, **extra: Any) -> Any:
    fw = {"backend": "iptables", "netns": lab.pbx.ns, **extra.pop("firewall", {})}
    return parse_config({"state_dir": str(tmp / "s"), "firewall": fw, **extra})


def make_core(lab: Lab, tmp: Path, legacy: bool, **extra: Any) -> Core:
    need_root_tools(*TOOLS, "iptables-legacy-restore" if legacy else "iptables-nft-restore")
    core = Core(cfg(lab, tmp, **extra), protect=[])
    assert isinstance(core.backend, IptablesBackend)
    core.backend = IptablesBackend(lab.pbx.ns, legacy=legacy)
    core.apply()
    return core


def other_variant_is_empty(lab: Lab, legacy: bool) -> None:
    """The rules really went to the variant under test, not the other one."""
    other = "" if legacy else "-legacy"
    for tool in (f"iptables{other}-save", f"ip6tables{other}-save"):
        assert "TM4" not in lab.pbx.run(tool).stdout
    mine = "-legacy" if legacy else ""
    assert "TM4-INPUT" in lab.pbx.run(f"iptables{mine}-save").stdout


@pytest.fixture
def echo(lab: Lab) -> Iterator[Echo]:
    e = Echo(lab.pbx, udp=[5060], tcp=[22, 80])
    yield e
    e.close()


@VARIANTS
def test_blocklist_drops_its_sources_never_a_whitelisted_one(lab: Lab, tmp_path: Path, echo: Echo,
                                                             legacy: bool) -> None:
    core = make_core(lab, tmp_path, legacy, firewall={"public_services": ["sip-udp"]})
    attacker = lab.client("attacker", ["203.0.113.66/24", "2001:db8::66/64"])
    phone = lab.client("phone", ["203.0.113.70/24", "2001:db8::70/64"])
    late = lab.client("late", ["203.0.113.72/24"])
    other = lab.client("other", ["203.0.113.100/24", "2001:db8::100/64"])
    core.allow("phone", ["203.0.113.70", "2001:db8::70"], ["sip-udp", "ssh"])
    f = tmp_path / "list.txt"
    f.write_text("203.0.113.64/28\n2001:db8::64/124\n")
    assert attacker.udp_probe(PBX4, 5060, timeout=0.3)  # public SIP, before the list
    bl, _ = bl_mod.add(core, "voipbl", str(f))
    other_variant_is_empty(lab, legacy)
    for dst in (PBX4, PBX6):
        assert not attacker.udp_probe(dst, 5060, timeout=0.3)
        assert phone.udp_probe(dst, 5060, timeout=0.5)  # whitelisted inside the list
        assert phone.tcp_probe(dst, 22, timeout=0.5)
        assert other.udp_probe(dst, 5060, timeout=0.5)  # outside the list
    assert not late.udp_probe(PBX4, 5060, timeout=0.3)
    # The kernel's set never holds the phone: carved out (prefixes around it).
    held = " ".join(str(x) for x in (core.backend.set_elements(bl_mod.set_name("voipbl", 4)) or ()))
    assert "203.0.113.64" in held and "203.0.113.70" not in held.split()
    # An entry added later (one ipset batch, no reload) wins at once.
    core.allow("late", ["203.0.113.72"], ["sip-udp"])
    assert late.udp_probe(PBX4, 5060, timeout=0.5)
    # A full apply (re-carving) keeps all of it.
    core.apply()
    assert late.udp_probe(PBX4, 5060, timeout=0.5) and phone.udp_probe(PBX6, 5060, timeout=0.5)
    assert not attacker.udp_probe(PBX6, 5060, timeout=0.3)
    # The whitelist wins over the list for non-public services too, and nothing else gets in.
    assert not attacker.tcp_probe(PBX4, 22, timeout=0.2) and not other.tcp_probe(PBX4, 22, timeout=0.2)
    # The list changes: a refresh loads the new addresses and lets the old ones go.
    f.write_text("203.0.113.96/27\n")
    bl_mod.refresh(core, ["voipbl"])
    assert not other.udp_probe(PBX4, 5060, timeout=0.3)
    assert attacker.udp_probe(PBX4, 5060, timeout=0.5) and attacker.udp_probe(PBX6, 5060, timeout=0.5)
    f.write_text("203.0.113.64/28\n2001:db8::64/124\n")
    bl_mod.refresh(core, ["voipbl"])
    assert not attacker.udp_probe(PBX4, 5060, timeout=0.3) and other.udp_probe(PBX4, 5060, timeout=0.5)
    bl_mod.delete(core, "voipbl")
    assert attacker.udp_probe(PBX4, 5060, timeout=0.5) and attacker.udp_probe(PBX6, 5060, timeout=0.5)
    assert not [n for n in lab.pbx.run("ipset", "list", "-n").stdout.split() if "voipbl" in n]


@VARIANTS
def test_zone_members_reach_exactly_the_zone_and_change_together(lab: Lab, tmp_path: Path, echo: Echo,
                                                                 legacy: bool) -> None:
    core = make_core(lab, tmp_path, legacy, zones={"voip": {"services": ["sip-udp"]}})
    a = lab.client("a", ["203.0.113.10/24", "2001:db8::10/64"])
    b = lab.client("b", ["203.0.113.11/24"])
    c = lab.client("c", ["203.0.113.12/24"])
    core.allow("a", ["203.0.113.10", "2001:db8::10"], [], zone="voip")
    core.allow("b", ["203.0.113.11"], [], zone="voip")
    core.allow("c", ["203.0.113.12"], ["sip-udp"])
    for h, dst in ((a, PBX4), (a, PBX6), (b, PBX4)):
        assert h.udp_probe(dst, 5060, timeout=0.5)
        assert not h.tcp_probe(dst, 22, timeout=0.2)
        assert not h.tcp_probe(dst, 80, timeout=0.2)
    core.config = cfg(lab, tmp_path, zones={"voip": {"services": ["ssh", "http"]}})
    assert zones_mod.reconcile(core) == ["a", "b"]
    other_variant_is_empty(lab, legacy)
    for h, dst in ((a, PBX4), (a, PBX6), (b, PBX4)):
        assert not h.udp_probe(dst, 5060, timeout=0.2)
        assert h.tcp_probe(dst, 22, timeout=0.5)
        assert h.tcp_probe(dst, 80, timeout=0.5)
    assert c.udp_probe(PBX4, 5060, timeout=0.5)
    assert not c.tcp_probe(PBX4, 22, timeout=0.2)
    # The built-in trusted zone: everything, for its members only.
    d = lab.client("d", ["203.0.113.13/24", "2001:db8::13/64"])
    core.allow("d", ["203.0.113.13", "2001:db8::13"], [], zone="trusted")
    for dst in (PBX4, PBX6):
        assert d.tcp_probe(dst, 22, timeout=0.5) and d.tcp_probe(dst, 80, timeout=0.5)
        assert d.udp_probe(dst, 5060, timeout=0.5)
    assert not c.tcp_probe(PBX4, 80, timeout=0.2)


def plug_tunnel(lab: Lab, h: Host) -> None:
    """A veth named wg0 on the PBX standing in for WireGuard, its peer in `h`."""
    sh("ip", "link", "add", "eth0", "netns", h.ns, "type", "veth", "peer", "name", "wg0", "netns", lab.pbx.ns)
    lab.pbx.run("ip", "addr", "add", "2001:db8:77::1/64", "dev", "wg0", "nodad")
    # a /30 inside the bridge's /24: the more specific route sends replies back through wg0
    lab.pbx.run("ip", "addr", "add", "198.51.100.253/30", "dev", "wg0")
    lab.pbx.run("ip", "link", "set", "wg0", "up")
    h.run("ip", "addr", "add", "2001:db8:77::2/64", "dev", "eth0", "nodad")
    h.run("ip", "addr", "add", "198.51.100.254/30", "dev", "eth0")
    h.run("ip", "link", "set", "eth0", "up")
    h.run("ip", "-6", "route", "replace", "default", "via", "2001:db8:77::1")
    h.run("ip", "route", "replace", "default", "via", "198.51.100.253")


@VARIANTS
def test_a_tunnel_interface_reaches_its_zone_before_and_after_it_is_recreated(
        lab: Lab, tmp_path: Path, echo: Echo, legacy: bool) -> None:
    zones = {"voip": {"services": ["sip-udp", "http"]}}
    core = make_core(lab, tmp_path, legacy, zones=zones, interfaces={"wg0": "voip"})
    peer = lab._ns("tun", ["2001:db8:77::2/64"])
    plug_tunnel(lab, peer)
    outsider = lab.client("out", ["203.0.113.99/24", "2001:db8::99/64"])
    other_variant_is_empty(lab, legacy)

    def reaches_zone() -> None:
        for dst in (TUN, TUN4):
            assert peer.udp_probe(dst, 5060, timeout=0.5)
            assert peer.tcp_probe(dst, 80, timeout=0.5)
            assert not peer.tcp_probe(dst, 22, timeout=0.2)
        for dst in (PBX4, PBX6):  # other interfaces: nothing
            assert not outsider.udp_probe(dst, 5060, timeout=0.2)
            assert not outsider.tcp_probe(dst, 80, timeout=0.2)

    reaches_zone()
    # The tunnel goes down and comes back (a new ifindex): no re-apply.
    lab.pbx.run("ip", "link", "del", "wg0")
    plug_tunnel(lab, peer)
    reaches_zone()
    # Trusted: everything, from that interface only.
    core.config = cfg(lab, tmp_path, interfaces={"wg0": "trusted"})
    core.apply()
    assert peer.tcp_probe(TUN, 22, timeout=0.5) and peer.tcp_probe(TUN4, 22, timeout=0.5)
    assert not outsider.tcp_probe(PBX6, 22, timeout=0.2)
    lab.pbx.run("ip", "link", "del", "wg0")
    plug_tunnel(lab, peer)
    assert peer.tcp_probe(TUN, 22, timeout=0.5)
