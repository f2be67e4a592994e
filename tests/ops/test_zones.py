"""Zones: members reach exactly their zone's services and change together; interfaces in
zones (`iifname`), a tunnel recreated later, and the public interface never trusted unforced."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cli_support import store_only_cli
from click.testing import Result
from netlab import Echo, Host, Lab, sh

from tm4.core.config import parse_config
from tm4.core.errors import ConfigError, ValidationError
from tm4.core.zones import BUILTIN, zone_services
from tm4.ops import zones as zones_mod
from tm4.ops.engine import Core


def cfg(lab: Lab, tmp_path: Path, **extra: Any) -> Any:
    return parse_config({"state_dir": str(tmp_path / "s"), "firewall": {"netns": lab.pbx.ns}, **extra})


def test_builtin_zones_follow_freepbx() -> None:
    c = parse_config({})
    assert zone_services(c, "trusted") == ("all",)
    assert zone_services(c, "internet") == ()
    assert set(zone_services(c, "local")) == {"sip-udp", "sip-tcp", "sip-tls", "iax", "http", "https", "ssh", "tftp"}
    assert set(zone_services(c, "other")) == {"sip-udp", "sip-tcp", "sip-tls", "iax", "ucp"}
    c2 = parse_config({"zones": {"local": {"services": ["ssh"]}}})
    assert zone_services(c2, "local") == ("ssh",) and set(BUILTIN) <= set(zones_mod.zone_names(c2))
    with pytest.raises(ValidationError, match="no zone named 'nope'"):
        zone_services(c, "nope")


@pytest.mark.parametrize("data, msg", [
    ({"interfaces": {"wg0": "nope"}}, "no zone named"),
    ({"zones": {"x": {"services": ["bogus"]}}}, "unknown service"),
    ({"zones": {"Bad Name": {"services": []}}}, "zone name"),
    ({"interfaces": {"much-too-long-interface": "trusted"}}, "interface name"),
])
def test_bad_zone_config_is_refused(data: dict[str, Any], msg: str) -> None:
    with pytest.raises(ConfigError, match=msg):
        parse_config(data)


def test_interface_rules_are_pure_and_refuse_the_public_interface() -> None:
    c = parse_config({"zones": {"voip": {"services": ["sip-udp", "ssh"]}},
                      "interfaces": {"wg0": "trusted", "eth1": "voip", "eth0": "trusted"}})
    rules, refused = zones_mod.interface_rules(c, public={"eth0"}, forced_ifaces=set())
    assert rules == ['iifname "eth1" udp dport 5060 accept', 'iifname "eth1" tcp dport 22 accept',
                     'iifname "wg0" accept']
    assert refused and "eth0 is the public interface" in refused[0]
    rules, refused = zones_mod.interface_rules(c, public={"eth0"}, forced_ifaces={"eth0"})
    assert 'iifname "eth0" accept' in rules and refused == []


@pytest.fixture
def run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., Result]:
    return store_only_cli(tmp_path, monkeypatch)


def test_cli_add_with_zone_shows_it(run) -> None:  # type: ignore[no-untyped-def]
    r = run("add", "desk", "203.0.113.10", "--zone", "local")
    assert r.exit_code == 0, r.output
    assert "zone local" in r.output
    [e] = json.loads(run("list", "--json").output)
    assert e["zone"] == "local" and "ssh" in e["services"] and "ucp" not in e["services"]
    assert "zone local" in run("list").output
    r = run("add", "x", "203.0.113.11", "--zone", "local", "-s", "ssh")
    assert isinstance(r.exception, ValidationError) and "not both" in str(r.exception)
    r = run("add", "y", "203.0.113.12", "--zone", "nope")
    assert isinstance(r.exception, ValidationError) and "no zone named" in str(r.exception)
    zl = json.loads(run("zones", "list", "--json").output)
    assert next(z for z in zl if z["name"] == "local")["members"] == ["desk"]
    r = run("add", "plain", "203.0.113.13", "-s", "sip-udp")
    assert json.loads(run("list", "--json").output)[1]["zone"] is None
    r = run("zones", "trust-public", "eth0")
    assert isinstance(r.exception, ValidationError) and "--force" in str(r.exception)


def test_zone_members_reach_exactly_the_zone_and_change_together(lab: Lab, tmp_path: Path) -> None:
    core = Core(cfg(lab, tmp_path, zones={"voip": {"services": ["sip-udp"]}}), protect=[])
    core.apply()
    echo = Echo(lab.pbx, udp=[5060], tcp=[22, 80])
    try:
        a = lab.client("a", ["203.0.113.10/24"])
        b = lab.client("b", ["203.0.113.11/24"])
        c = lab.client("c", ["203.0.113.12/24"])
        core.allow("a", ["203.0.113.10"], [], zone="voip")
        core.allow("b", ["203.0.113.11"], [], zone="voip")
        core.allow("c", ["203.0.113.12"], ["sip-udp"])
        for h in (a, b):
            assert h.udp_probe("203.0.113.1", 5060, timeout=0.5)
            assert not h.tcp_probe("203.0.113.1", 22, timeout=0.2)
            assert not h.tcp_probe("203.0.113.1", 80, timeout=0.2)
        # The zone changes in the config: both members follow, in one apply; c does not.
        core.config = cfg(lab, tmp_path, zones={"voip": {"services": ["ssh", "http"]}})
        assert zones_mod.reconcile(core) == ["a", "b"]
        for h in (a, b):
            assert not h.udp_probe("203.0.113.1", 5060, timeout=0.2)
            assert h.tcp_probe("203.0.113.1", 22, timeout=0.5)
            assert h.tcp_probe("203.0.113.1", 80, timeout=0.5)
        assert c.udp_probe("203.0.113.1", 5060, timeout=0.5)
        assert not c.tcp_probe("203.0.113.1", 22, timeout=0.2)
        assert [e.services for e in core.entries() if e.zone] == [("http", "ssh"), ("http", "ssh")]
        assert zones_mod.reconcile(core) == []  # nothing left to do
        # A zone in use cannot be deleted: refused, members unchanged.
        core.config = cfg(lab, tmp_path)
        with pytest.raises(ConfigError, match="zone 'voip' \\(used by a, b\\) is in use"):
            zones_mod.reconcile(core)
        assert a.tcp_probe("203.0.113.1", 22, timeout=0.5)
    finally:
        echo.close()


def tunnel(lab: Lab) -> Host:
    """A peer behind an interface named wg0 on the PBX (a veth standing in for WireGuard)."""
    h = lab._ns("tun", ["2001:db8:77::2/64"])
    plug_tunnel(lab, h)
    return h


def plug_tunnel(lab: Lab, h: Host) -> None:
    sh("ip", "link", "add", "eth0", "netns", h.ns, "type", "veth", "peer", "name", "wg0", "netns", lab.pbx.ns)
    lab.pbx.run("ip", "addr", "add", "2001:db8:77::1/64", "dev", "wg0", "nodad")
    lab.pbx.run("ip", "link", "set", "wg0", "up")
    h.run("ip", "addr", "add", "2001:db8:77::2/64", "dev", "eth0", "nodad")
    h.run("ip", "link", "set", "eth0", "up")
    h.run("ip", "-6", "route", "replace", "default", "via", "2001:db8:77::1")


def test_a_tunnel_interface_reaches_its_zone_before_and_after_it_is_recreated(lab: Lab, tmp_path: Path) -> None:
    core = Core(cfg(lab, tmp_path, zones={"voip": {"services": ["sip-udp"]}}, interfaces={"wg0": "voip"}),
                protect=[])
    core.apply()
    echo = Echo(lab.pbx, udp=[5060], tcp=[22])
    try:
        peer = tunnel(lab)
        outsider = lab.client("out", ["2001:db8::99/64"])
        assert peer.udp_probe("2001:db8:77::1", 5060, timeout=0.5)
        assert not peer.tcp_probe("2001:db8:77::1", 22, timeout=0.2)
        assert not outsider.udp_probe("2001:db8::1", 5060, timeout=0.2)  # other interfaces: nothing
        # The tunnel goes down and comes back (a new ifindex): no re-apply needed.
        lab.pbx.run("ip", "link", "del", "wg0")
        plug_tunnel(lab, peer)
        assert peer.udp_probe("2001:db8:77::1", 5060, timeout=0.5)
        assert not peer.tcp_probe("2001:db8:77::1", 22, timeout=0.2)
        # Trusted: everything, from that interface only.
        core.config = cfg(lab, tmp_path, interfaces={"wg0": "trusted"})
        core.apply()
        assert peer.tcp_probe("2001:db8:77::1", 22, timeout=0.5)
        assert not outsider.tcp_probe("2001:db8::1", 22, timeout=0.2)
        # Now wg0 carries the default route: the public interface is not trusted unforced.
        lab.pbx.run("ip", "-6", "route", "add", "default", "via", "2001:db8:77::2", "dev", "wg0")
        assert zones_mod.public_interfaces(lab.pbx.ns) == {"wg0"}
        core.apply()
        assert not peer.tcp_probe("2001:db8:77::1", 22, timeout=0.2)
        assert "wg0 is the public interface" in zones_mod.overview(core)["refused"][0]
        with pytest.raises(ValidationError, match="--force"):
            zones_mod.trust_public(core, "wg0", force=False)
        zones_mod.trust_public(core, "wg0", force=True)
        assert peer.tcp_probe("2001:db8:77::1", 22, timeout=0.5)
        zones_mod.trust_public(core, "wg0", force=False, off=True)
        assert not peer.tcp_probe("2001:db8:77::1", 22, timeout=0.2)
    finally:
        echo.close()
