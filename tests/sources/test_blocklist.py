"""Blocklists: parsing, carving, safety checks, the CLI, and real packets in a namespace."""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from cli_support import store_only_cli
from click.testing import Result
from hypothesis import given, settings
from hypothesis import strategies as st
from netlab import Echo, Lab

from tm4.core.config import parse_config
from tm4.core.errors import ConflictError, NotFoundError, ValidationError
from tm4.core.model import Entry, Source, parse_network
from tm4.core.store import Store
from tm4.ops.engine import Core
from tm4.sources import blocklists as bl_mod

# -- parsing ---------------------------------------------------------------------


def test_parse_list_reads_common_formats_and_counts_the_rest() -> None:
    data = (b"# VoIPBL style\n203.0.113.66\n203.0.113.64/28 ; SBL123\n198.51.100.7 # comment\n"
            b"\n  2001:db8:9::/48  \n203.0.113.66\nnot-an-address\n0.0.0.0/0\n127.0.0.1\n10.0.0.1/33\n"
            b"203.0.113.65/28\n")
    p = bl_mod.parse_list(data)
    assert [str(n) for n in p.nets] == ["203.0.113.66/32", "203.0.113.64/28", "198.51.100.7/32",
                                        "2001:db8:9::/48"]
    assert p.skipped == 4 and p.examples[0] == "not-an-address"


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=2000))
def test_parse_list_survives_any_bytes(data: bytes) -> None:
    p = bl_mod.parse_list(data)
    for n in p.nets:
        assert n.prefixlen > 0 and not n.network_address.is_loopback
    assert len(set(p.nets)) == len(p.nets)


intervals = st.lists(st.tuples(st.integers(0, 200), st.integers(0, 30)).map(lambda t: (t[0], t[0] + t[1])),
                     max_size=12)


@settings(max_examples=300, deadline=None)
@given(intervals, intervals)
def test_subtract_is_set_difference(items: list[tuple[int, int]], holes: list[tuple[int, int]]) -> None:
    a, h = bl_mod.merge(items), bl_mod.merge(holes)
    got = bl_mod.subtract(a, h)
    points = {x for lo, hi in got for x in range(lo, hi + 1)}
    want = {x for lo, hi in items for x in range(lo, hi + 1)} - {x for lo, hi in holes for x in range(lo, hi + 1)}
    assert points == want
    assert all(lo <= hi for lo, hi in got) and all(b[0] > a_[1] for a_, b in zip(got, got[1:], strict=False))


# -- safety ------------------------------------------------------------------------

GUARDS = [(parse_network("203.0.113.1"), "the server's address 203.0.113.1"),
          (ipaddress.ip_network("203.0.113.0/24"), "the server's network 203.0.113.0/24 (eth0)"),
          (parse_network("198.51.100.9"), "your SSH client 198.51.100.9")]


@pytest.mark.parametrize("listed, covered", [
    ("203.0.113.1", "server's address"),
    ("203.0.113.0/25", "server's address"),
    ("203.0.112.0/23", "server's network"),
    ("198.51.100.0/24", "SSH client"),
])
def test_a_list_covering_the_server_lan_or_ssh_client_is_unsafe(listed: str, covered: str) -> None:
    why = bl_mod.coverage([parse_network(listed)], GUARDS)
    assert why and any(covered in w for w in why)


def test_a_neighbour_inside_the_lan_is_fine() -> None:
    assert bl_mod.coverage([parse_network("203.0.113.66"), parse_network("203.0.113.64/28")], GUARDS) == []


# -- the CLI (store only) ----------------------------------------------------------------


@pytest.fixture
def run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., Result]:
    # The store-only config names a namespace that does not exist: no addresses to read.
    monkeypatch.setattr(bl_mod, "interface_networks", lambda netns="": list(GUARDS[:2]))
    return store_only_cli(tmp_path, monkeypatch)


def test_cli_add_list_refresh_del(run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    f = tmp_path / "voipbl.txt"
    f.write_text("203.0.113.66\n198.51.100.0/25\nbogus\n")
    r = run("blocklist", "add", "voipbl", str(f), "--refresh", "12h")
    assert r.exit_code == 0, r.output
    assert "2 networks, 1 lines skipped" in r.output
    [obj] = json.loads(run("blocklist", "list", "--json").output)
    assert obj["name"] == "voipbl" and obj["source"] == str(f) and obj["networks"] == 2
    assert obj["refresh"] == "12h" and obj["fetched"] and obj["error"] is None
    r = run("blocklist", "add", "voipbl", str(f))
    assert isinstance(r.exception, ConflictError)
    f.unlink()
    r = run("blocklist", "refresh", "--json")
    [res] = json.loads(r.output)
    assert res["changed"] is False and "cannot read" in res["error"] and "kept the last copy" in res["message"]
    [obj] = json.loads(run("blocklist", "list", "--json").output)
    assert obj["networks"] == 2 and "cannot read" in obj["error"]
    assert "last error" in run("blocklist", "list").output
    assert run("blocklist", "del", "voipbl").exit_code == 0
    assert json.loads(run("blocklist", "list", "--json").output) == []
    assert isinstance(run("blocklist", "del", "voipbl").exception, NotFoundError)


@pytest.mark.parametrize("args, msg", [
    (("Bad_Name", "/tmp/x"), "bad blocklist name"),
    (("ok", "relative/path"), "absolute file path"),
    (("ok", "ftp://example.org/x"), "absolute file path"),
])
def test_cli_refuses_bad_names_and_sources(run, args: tuple[str, str], msg: str) -> None:  # type: ignore[no-untyped-def]
    r = run("blocklist", "add", *args)
    assert isinstance(r.exception, ValidationError) and msg in str(r.exception)


def test_cli_refuses_a_list_covering_the_server(run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    f = tmp_path / "bad.txt"
    f.write_text("203.0.113.66\n203.0.113.0/24\n")
    r = run("blocklist", "add", "bad", str(f))
    assert isinstance(r.exception, ValidationError) and "would cut the server off" in str(r.exception)
    assert json.loads(run("blocklist", "list", "--json").output) == []


# -- real packets ------------------------------------------------------------------


def make_core(lab: Lab, tmp_path: Path, public: list[str]) -> Core:
    cfg = parse_config({"state_dir": str(tmp_path / "s"),
                        "firewall": {"netns": lab.pbx.ns, "public_services": public}})
    core = Core(cfg, protect=[])
    core.apply()
    return core


def test_blocklist_drops_its_sources_never_a_whitelisted_one(lab: Lab, tmp_path: Path) -> None:
    core = make_core(lab, tmp_path, ["sip-udp"])
    echo = Echo(lab.pbx, udp=[5060], tcp=[22])
    try:
        attacker = lab.client("attacker", ["203.0.113.66/24", "2001:db8::66/64"])
        phone = lab.client("phone", ["203.0.113.70/24"])
        late = lab.client("late", ["203.0.113.72/24"])
        other = lab.client("other", ["203.0.113.100/24"])
        core.allow("phone", ["203.0.113.70"], ["sip-udp", "ssh"])
        f = tmp_path / "list.txt"
        f.write_text("203.0.113.64/28\n2001:db8::66\n")
        assert attacker.udp_probe("203.0.113.1", 5060, timeout=0.3)  # public SIP, before the list
        bl, _ = bl_mod.add(core, "voipbl", str(f))
        assert not attacker.udp_probe("203.0.113.1", 5060, timeout=0.3)
        assert not attacker.udp_probe("2001:db8::1", 5060, timeout=0.3)
        assert phone.udp_probe("203.0.113.1", 5060, timeout=0.5)  # whitelisted inside the list
        assert phone.tcp_probe("203.0.113.1", 22, timeout=0.5)
        assert other.udp_probe("203.0.113.1", 5060, timeout=0.5)  # outside the list
        assert not late.udp_probe("203.0.113.1", 5060, timeout=0.3)
        # The carve-out: the phone's address is not in the kernel set, and it is reported.
        rs = core.render()
        v4 = [e.text(4) for e in rs.sets[bl_mod.set_name("voipbl", 4)].elements]
        assert v4 == ["203.0.113.64-203.0.113.69", "203.0.113.71-203.0.113.79"]
        assert bl_mod.whitelist_overlaps(core, bl) == ["203.0.113.64/28 (phone)"]
        # An entry added later wins at once, before any full apply re-carves the set.
        core.allow("late", ["203.0.113.72"], ["sip-udp"])
        assert late.udp_probe("203.0.113.1", 5060, timeout=0.5)
        bl_mod.delete(core, "voipbl")
        assert attacker.udp_probe("203.0.113.1", 5060, timeout=0.5)
    finally:
        echo.close()


def test_the_servers_real_addresses_are_never_listed(lab: Lab, tmp_path: Path) -> None:
    core = make_core(lab, tmp_path, [])
    nets = bl_mod.interface_networks(lab.pbx.ns)
    assert (ipaddress.ip_network("203.0.113.1/32"), "the server's address 203.0.113.1") in nets
    f = tmp_path / "list.txt"
    for bad in ("203.0.113.1", "198.51.100.0/24", "2001:db8::/48"):
        f.write_text(f"203.0.113.66\n{bad}\n")
        with pytest.raises(ValidationError, match="would cut the server off"):
            bl_mod.add(core, "x", str(f))
    core_ssh = Core(core.config, protect=[parse_network("203.0.113.77")])
    f.write_text("203.0.113.64/28\n")
    with pytest.raises(ValidationError, match="your SSH client 203.0.113.77"):
        bl_mod.add(core_ssh, "x", str(f))
    assert bl_mod.lists(core.store) == []


nets_in_lab = st.lists(st.tuples(st.integers(0, 255), st.integers(26, 32)).map(
    lambda t: ipaddress.ip_network(f"203.0.113.{t[0]}/{t[1]}", strict=False)), min_size=1, max_size=8)


@settings(max_examples=40, deadline=None)
@given(listed=nets_in_lab, whitelisted=nets_in_lab)
def test_rendered_sets_never_hold_a_whitelisted_address(tmp_path_factory: pytest.TempPathFactory,
                                                        listed: list[Any], whitelisted: list[Any]) -> None:
    cfg = parse_config({"state_dir": str(tmp_path_factory.mktemp("s"))})
    store = Store(cfg.store_path)
    for i, n in enumerate(whitelisted):
        store.put_entry(Entry(f"e{i}", (Source.parse(str(n)),), ("ssh",)))
    bl_mod._put(store, bl_mod.Blocklist("x", "/x", nets=listed))
    rs = bl_mod.ruleset_extra(cfg, store)
    assert rs is not None
    elems = rs.sets[bl_mod.set_name("x", 4)].elements
    got = {a for e in elems for a in range(e.lo, e.hi + 1)}
    want = ({int(a) for n in listed for a in (n.network_address + i for i in range(n.num_addresses))}
            - {int(a) for n in whitelisted for a in (n.network_address + i for i in range(n.num_addresses))})
    assert got == want
    assert rs.early_rules[0].startswith("ip saddr @bl4n_x ip saddr != @wl4_all ")
    store.close()
