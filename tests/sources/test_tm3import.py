"""Travelin' Man 3 migration: account files, the rules file, malformed input, dry run vs --apply."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from cli_support import store_only_cli
from click.testing import Result

from tm4.core.config import parse_config
from tm4.core.model import Origin
from tm4.sources.tm3import import Rule, map_services, read_tm3

FIX = Path(__file__).parent.parent / "fixtures" / "tm3"
CONFIG = parse_config({})


def imported(case: str):  # type: ignore[no-untyped-def]
    return read_tm3(FIX / case, CONFIG.services, CONFIG.rtp_range())


def test_good_accounts_map_to_entries() -> None:
    imp = imported("good")
    got = {e.name: (e.sources, e.services, e.origin) for e in imp.entries}
    assert got == {
        "john": (["203.0.113.7"], ["iax", "sip-udp"], Origin.ADMIN),
        "knock-20190302-140512": (["192.0.2.30"], ["all"], Origin.KNOCK),
        "mixed_account": (["192.0.2.20"], ["iax", "sip-udp"], Origin.ADMIN),
        "mixed_account-2": (["192.0.2.21"], ["ssh"], Origin.ADMIN),  # split, never crossed
        "office": (["198.51.100.0/24", "2001:db8:10::/48"], ["all"], Origin.ADMIN),
        "roadwarrior": (["home.roadwarrior.example"], ["sip-tls"], Origin.ADMIN),
        "tm3-203.0.113.51": (["203.0.113.51"], ["sip-tcp", "sip-tls"], Origin.ADMIN),
        "web-admin": (["203.0.113.50"], ["https"], Origin.ADMIN),
    }
    john = next(e for e in imp.entries if e.name == "john")
    assert john.note == "tm3: Travelin' Man 3 account: john; added by add-ip, codes 1 3"
    reasons = {p.where: p.reason for p in imp.problems}
    assert reasons == {
        "rules.v4:12": "tcp port(s) 5062-5080 match no tm4 service",
        "rules.v4:14": "open to everyone; if you mean it, add the service to firewall.public_services",
        "rules.v4:16": "a block: use `tm4 block` for it; not imported",
        "rules.v4:17": "chain FORWARD: tm4 only imports INPUT rules",
    }
    skipped = {p.where: p.reason for p in imp.skipped}
    assert skipped["rules.v4:6"] == skipped["rules.v4:7"] == "tm4 does this itself"
    assert skipped["rules.v4:8"] == "already imported from account john"  # the account's own lines
    assert skipped["rules.v4:10"] == "already imported from account office"
    assert "RTP" in skipped["rules.v4:13"] and "RTP" in skipped["rules.v4:15"]


def test_malformed_files_are_reported_not_fatal() -> None:
    imp = imported("malformed")
    assert {e.name: e.sources for e in imp.entries} == {
        "broken": ["192.0.2.49"], "latin1": ["192.0.2.60"], "tm3-192.0.2.70": ["192.0.2.70"]}
    reasons = {p.where: p.reason for p in imp.problems}
    expect = {
        "binary.iptables": "binary file",
        "empty.iptables": "no -A INPUT rule",
        "broken.iptables:2": "not an IPv4/IPv6 address",
        "broken.iptables:3": "-s without a value",
        "broken.iptables:4": "--hitcount has no tm4 equivalent",
        "broken.iptables:5": "negated source",
        "broken.iptables:6": "not an -A/-I rule",
        "broken.iptables:7": "whole internet",
        "broken.iptables:8": "unreadable",
        "broken.iptables:9": "outside 1-65535",
        "broken.iptables:10": "no -j target",
        "broken.iptables:11": "icmp",
        "broken.iptables:12": "interface eth1",
        "broken.iptables:13": "every tcp port",
        "broken.iptables:14": "ports without -p",
        "iptables:4": "two -j targets",
        "iptables:5": "not an -A/-I rule",
    }
    assert set(reasons) == set(expect)
    for where, part in expect.items():
        assert part in reasons[where], (where, reasons[where])
    # nothing from a refused line slipped into an entry
    everything = {s for e in imp.entries for s in e.sources}
    assert not everything & {f"192.0.2.{n}" for n in range(40, 49)}


@pytest.mark.parametrize("proto, ports, services, rest", [
    ("udp", [(5060, 5060)], ["sip-udp"], ""),
    ("tcp", [(8088, 8088)], [], "tcp port(s) 8088 match no tm4 service"),  # webrtc is 8088-8089: never widened
    ("tcp", [(8088, 8089)], ["webrtc"], ""),
    ("tcp", [(80, 80), (443, 443)], ["http", "https"], ""),
    ("udp", [(4569, 4569), (10000, 20000)], ["iax"], ""),  # RTP needs nothing
    ("", [], ["all"], ""),
])
def test_port_mapping(proto: str, ports: list[tuple[int, int]], services: list[str], rest: str) -> None:
    r = Rule(["192.0.2.1"], proto, ports, "ACCEPT", "", "x:1")
    got, left, _ = map_services(r, CONFIG.services, CONFIG.rtp_range())
    assert (got, left) == (services, rest)


@pytest.fixture
def run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., Result]:
    return store_only_cli(tmp_path, monkeypatch)


def test_dry_run_by_default_then_apply(run) -> None:  # type: ignore[no-untyped-def]
    r = run("import", "tm3", str(FIX / "good"))
    assert r.exit_code == 0, r.output
    assert "dry run" in r.output and "could not map 4 line(s)" in r.output
    assert json.loads(run("list", "--json").output) == []
    r = run("import", "tm3", str(FIX / "good"), "--apply", "--json")
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["applied"] and {x["result"] for x in out["results"]} == {"imported"}
    assert len(out["unmapped"]) == 4 and all({"where", "line", "reason"} <= set(p) for p in out["unmapped"])
    listed = {e["name"]: e for e in json.loads(run("list", "--json").output)}
    assert set(listed) == {e["name"] for e in out["entries"]}
    assert listed["knock-20190302-140512"]["origin"] == "knock"
    again = json.loads(run("import", "tm3", str(FIX / "good"), "--apply", "--json").output)
    assert {x["result"] for x in again["results"]} == {"exists; left alone (use --replace)"}
    again = json.loads(run("import", "tm3", str(FIX / "good"), "--apply", "--replace", "--json").output)
    assert {x["result"] for x in again["results"]} == {"imported"}


def test_empty_and_missing_directories(run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    empty = tmp_path / "empty"
    empty.mkdir()
    out = json.loads(run("import", "tm3", str(empty), "--json").output)
    assert out["entries"] == [] and "no *.iptables" in out["unmapped"][0]["reason"]
    r = run("import", "tm3", str(tmp_path / "nowhere"))
    assert r.exit_code != 0 and "not a directory" in str(r.exception)


def test_explicit_rules_file(run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    d = tmp_path / "only-rules"
    d.mkdir()
    out = json.loads(run("import", "tm3", str(d), "--rules", str(FIX / "good" / "rules.v4"), "--json").output)
    names = {e["name"] for e in out["entries"]}
    assert names == {"tm3-203.0.113.7", "tm3-198.51.100.0-24", "web-admin", "tm3-203.0.113.51"}
