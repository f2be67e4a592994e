"""The iptables + ipset backend in namespaces the test builds, with real packets."""

from __future__ import annotations

import ipaddress
import re
import socket
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import need_root_tools
from netlab import Echo, Lab
from test_iptables_render import responsive_ruleset, sample_ruleset

from tm4.core.config import parse_config
from tm4.core.errors import ApplyError
from tm4.core.rules import Element, NftSet
from tm4.firewall.iptables import IptablesBackend, TranslateError
from tm4.ops.engine import Core, _rules_part

PBX4, PBX6 = "192.0.2.1", "2001:db8::1"
TOOLS = ("iptables", "ip6tables", "iptables-restore", "ip6tables-restore", "iptables-save", "ipset")


def make_core(lab: Lab, tmp: Path, **firewall: Any) -> Core:
    fw = {"backend": "iptables", "netns": lab.pbx.ns, **firewall}
    return Core(parse_config({"state_dir": str(tmp / "state"), "firewall": fw}), protect=[])


@pytest.fixture
def net(lab: Lab, tmp_path: Path):  # type: ignore[no-untyped-def]
    need_root_tools(*TOOLS)
    phone = lab.client("phone", ["192.0.2.10/24", "2001:db8::10/64"])
    stranger = lab.client("strngr", ["203.0.113.66/24", "2001:db8::66/64"])
    echo = Echo(lab.pbx, udp=[5060, 10000], tcp=[22, 5060])
    core = make_core(lab, tmp_path)
    assert isinstance(core.backend, IptablesBackend)
    yield lab, phone, stranger, core
    echo.close()


def snapshot(lab: Lab) -> tuple[str, str]:
    """Both families' filter tables and every ipset (with each set's initval: the same set
    objects, not look-alikes), minus what ticks (timeouts, the save header's date)."""
    rules = "".join(lab.pbx.run(t, "-t", "filter").stdout for t in ("iptables-save", "ip6tables-save"))
    rules = "\n".join(ln for ln in rules.splitlines() if not ln.startswith("#"))
    sets = re.sub(r"^(add .*) timeout \d+$", r"\1 timeout T", lab.pbx.run("ipset", "save").stdout, flags=re.M)
    return rules, sets


def ipsets(lab: Lab) -> list[str]:
    return lab.pbx.run("ipset", "list", "-n").stdout.split()


def test_whitelisted_sip_udp_reaches_5060_not_ssh_and_strangers_only_rtp(net) -> None:  # type: ignore[no-untyped-def]
    lab, phone, stranger, core = net
    core.allow("phone", ["192.0.2.10", "2001:db8::10"], ["sip-udp"])
    core.apply()
    for dst in (PBX4, PBX6):
        assert phone.udp_probe(dst, 5060)
        assert not phone.tcp_probe(dst, 22)
        assert not phone.tcp_probe(dst, 5060)  # sip-tcp was not granted
        assert not stranger.udp_probe(dst, 5060)
        assert not stranger.tcp_probe(dst, 22)
        assert stranger.udp_probe(dst, 10000)  # RTP is open to all
    assert lab.pbx.run("iptables", "-S", "INPUT").stdout.splitlines()[-1] == "-A INPUT -j TM4-INPUT"
    assert core.backend.present()


def test_ban_cuts_an_established_udp_flow_in_both_families(net) -> None:  # type: ignore[no-untyped-def]
    lab, phone, stranger, core = net
    core.apply()
    for fam, dst, addr in ((socket.AF_INET, PBX4, "203.0.113.66"), (socket.AF_INET6, PBX6, "2001:db8::66")):
        s = stranger.socket(fam, socket.SOCK_DGRAM)
        try:
            assert stranger.udp_probe(dst, 10000, sock=s)  # conntrack now calls this flow established
            assert stranger.udp_probe(dst, 10000, sock=s)
            core.block(addr, reason="test", ttl=timedelta(hours=1))
            assert not stranger.udp_probe(dst, 10000, sock=s)
            core.unblock(addr)
            assert stranger.udp_probe(dst, 10000, sock=s)
        finally:
            s.close()
    core.block("2001:db8::/64")  # a prefix ban lands in the hash:net set
    assert not stranger.udp_probe(PBX6, 10000)
    assert not phone.udp_probe(PBX6, 10000)
    assert stranger.udp_probe(PBX4, 10000)


def test_overlapping_networks_survive_each_others_removal(net, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from tm4.firewall.plan import kernel_intervals, make_plan

    lab, phone, stranger, core = net
    desk = lab.client("desk", ["192.0.2.100/24", "2001:db8::100/64"])
    core.allow("office", ["192.0.2.0/24", "2001:db8::/64"], ["ssh"])
    core.allow("dialin-bob", ["192.0.2.10", "2001:db8::10"], ["ssh"], ttl=timedelta(hours=2))
    core.apply()
    for dst in (PBX4, PBX6):
        assert phone.tcp_probe(dst, 22) and desk.tcp_probe(dst, 22)
    core.revoke("office")
    for dst in (PBX4, PBX6):
        assert phone.tcp_probe(dst, 22)  # the /32 (/128) still holds
        assert not desk.tcp_probe(dst, 22)
    core.allow("office", ["192.0.2.0/24", "2001:db8::/64"], ["ssh"])
    core.revoke("dialin-bob")
    for dst in (PBX4, PBX6):
        assert phone.tcp_probe(dst, 22) and desk.tcp_probe(dst, 22)  # the /24 (/64) still holds

    # Overlap inside one hash:net set: a short-lived /24 around a permanent /28. The /24's
    # rest is a range piece, loaded as the prefixes /28 /27 /26 /25.
    core.revoke("office")
    core.allow("office", ["192.0.2.0/24"], ["sip-udp"], ttl=timedelta(hours=1))
    core.allow("desk-net", ["192.0.2.0/28"], ["sip-udp"])
    base = int(ipaddress.ip_address("192.0.2.0"))
    assert kernel_intervals(core.backend, "wl4n_sip_udp") == {  # type: ignore[arg-type]
        (base, base + 15), (base + 16, base + 31), (base + 32, base + 63), (base + 64, base + 127),
        (base + 128, base + 255)}
    assert phone.udp_probe(PBX4, 5060) and desk.udp_probe(PBX4, 5060)
    rs = core.render()
    assert make_plan(rs, core.backend, None, "", core.clock()).add == {}  # type: ignore[arg-type]
    core.revoke("office")
    assert phone.udp_probe(PBX4, 5060) and not desk.udp_probe(PBX4, 5060)
    core.allow("office", ["192.0.2.0/24"], ["sip-udp"], ttl=timedelta(hours=1))
    core.revoke("desk-net")
    assert phone.udp_probe(PBX4, 5060) and desk.udp_probe(PBX4, 5060)
    assert kernel_intervals(core.backend, "wl4n_sip_udp") == {(base, base + 255)}  # type: ignore[arg-type]
    plan = make_plan(core.render(), core.backend, None, "", core.clock())  # type: ignore[arg-type]
    assert not plan.add and not plan.remove


def test_incremental_grant_and_ban_are_one_ipset_batch(net) -> None:  # type: ignore[no-untyped-def]
    lab, phone, stranger, core = net
    core.apply()
    before = snapshot(lab)[0]
    calls: list[list[str]] = []
    real = core.backend._run

    def spy(argv: list[str], stdin: str | None = None) -> Any:
        calls.append([*argv, stdin or ""])
        return real(argv, stdin)

    core.backend._run = spy  # type: ignore[method-assign]
    core.allow("phone-ssh", ["192.0.2.10", "2001:db8::10"], ["ssh"], ttl=timedelta(hours=1))
    assert [c[:3] for c in calls] == [["ipset", "-exist", "restore"]]
    assert calls[0][3].splitlines() == ["add tm4-wl4_ssh 192.0.2.10 timeout 3600",
                                        "add tm4-wl6_ssh 2001:db8::10 timeout 3600"]
    assert phone.tcp_probe(PBX4, 22) and phone.tcp_probe(PBX6, 22)
    calls.clear()
    core.block("203.0.113.66", ttl=timedelta(hours=1))
    assert len(calls) == 1 and calls[0][3] == "add tm4-ban4 203.0.113.66 timeout 3600\n"
    assert not stranger.udp_probe(PBX4, 10000)
    calls.clear()
    core.unblock("203.0.113.66")
    core.revoke("phone-ssh")
    assert [c[:3] for c in calls] == [["ipset", "-exist", "restore"]] * 2
    assert calls[1][3].startswith("del tm4-wl4_ssh 192.0.2.10\n")
    assert stranger.udp_probe(PBX4, 10000) and not phone.tcp_probe(PBX4, 22)
    assert snapshot(lab)[0] == before  # the chains were never reloaded


def test_rejected_apply_keeps_the_old_rules_and_sets_whole(net, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    lab, phone, stranger, core = net
    core.allow("phone", ["192.0.2.10", "2001:db8::10"], ["sip-udp"])
    core.block("203.0.113.99", ttl=timedelta(hours=1))
    core.apply()
    before = snapshot(lab)
    be: IptablesBackend = core.backend

    def still_old() -> None:
        assert snapshot(lab) == before
        assert not [n for n in ipsets(lab) if n.startswith("tm4~")]  # temporary sets cleaned up
        assert phone.udp_probe(PBX4, 5060) and phone.udp_probe(PBX6, 5060)
        assert not stranger.udp_probe(PBX4, 5060)

    # 1. the kernel refuses a set (more elements than it may hold): nothing else was touched
    bad = core.render()
    bad.sets["overfull"] = NftSet("overfull", 4, tuple(Element(3221225984 + i, 3221225984 + i) for i in range(3)), flags=("timeout",), size=2)
    bad.sets["ban4"].elements = ()
    with pytest.raises(ApplyError, match="Hash is full"):
        core.apply(bad)
    still_old()

    # 2. IPv4 loads, IPv6 is refused: IPv4 is put back, the new sets dropped
    bad = core.render()
    bad.input_rules.insert(5, "ip6 saddr 2001:db8::/32 limit rate 100000/second accept")
    bad.input_rules.insert(5, "tcp dport 2222 accept")
    bad.sets["brand_new4"] = NftSet("brand_new4", 4, (Element(7, 7),))
    with pytest.raises(ApplyError, match="ip6tables-restore refused.*Rate too fast"):
        core.apply(bad)
    still_old()

    # 3. swapping the sets in fails half way: the swapped ones go back, the rules too
    orig = be._ipset

    def failing_swap(script: str, **kw: Any) -> None:
        if script.startswith("swap") and not kw.get("exist") and "swapping in" in kw.get("what", ""):
            lines = script.splitlines()
            tmp_ban4 = next(ln.split()[1] for ln in lines if ln.endswith(" tm4-ban4"))
            lines.insert(1, f"swap {tmp_ban4} tm4-ban4n")  # hash:ip with hash:net: the kernel refuses
            script = "\n".join(lines) + "\n"
        orig(script, **kw)

    monkeypatch.setattr(be, "_ipset", failing_swap)
    bad = core.render()
    bad.input_rules.insert(5, "tcp dport 2222 accept")
    bad.sets["ban4"].elements = ()
    with pytest.raises(ApplyError, match="type does not match"):
        core.apply(bad)
    monkeypatch.undo()
    still_old()

    # 4. a rule iptables cannot express: refused before anything is touched
    bad = core.render()
    bad.input_rules.insert(5, "ip saddr @ban4 update @ban4 { ip saddr } return")
    with pytest.raises(TranslateError, match='firewall.backend = "nft"'):
        core.apply(bad)
    still_old()

    core.apply()  # and a good apply still goes through, replacing everything
    assert snapshot(lab)[0] == before[0]
    assert snapshot(lab)[1] != before[1]  # fresh set objects


def test_one_jump_at_position_one_and_remove_leaves_foreign_rules(net) -> None:  # type: ignore[no-untyped-def]
    lab, phone, stranger, core = net
    lab.pbx.run("iptables", "-A", "INPUT", "-s", "198.51.100.7", "-j", "ACCEPT")
    core.apply()
    lab.pbx.run("iptables", "-I", "INPUT", "1", "-s", "198.51.100.8", "-j", "ACCEPT")
    lab.pbx.run("iptables", "-A", "INPUT", "-j", "TM4-INPUT")
    lab.pbx.run("ip6tables", "-D", "INPUT", "-j", "TM4-INPUT")
    core.apply()
    for tool in ("iptables", "ip6tables"):
        rules = lab.pbx.run(tool, "-S", "INPUT").stdout.splitlines()
        jumps = [i for i, r in enumerate(rules) if "TM4-INPUT" in r]
        assert jumps == [1], rules  # rules[0] is the policy line
    assert len(lab.pbx.run("iptables", "-S", "INPUT").stdout.splitlines()) == 4
    listing = core.backend.listing()
    assert listing is not None and "set tm4-ban4 hash:ip family inet" in listing
    assert _rules_part(listing) == _rules_part(core.backend.listing(terse=True) or "")
    core.backend.remove()
    assert lab.pbx.run("iptables", "-S", "INPUT").stdout.splitlines()[1:] == [
        "-A INPUT -s 198.51.100.8/32 -j ACCEPT", "-A INPUT -s 198.51.100.7/32 -j ACCEPT"]
    assert "TM4" not in "".join(snapshot(lab)[0]) and not [n for n in ipsets(lab) if n.startswith("tm4")]
    assert not core.backend.present() and core.backend.listing() is None
    assert core.backend.set_elements("ban4") is None
    core.backend.remove()  # twice: nothing to do


def test_status_drift_and_plan_follow_the_kernel(net) -> None:  # type: ignore[no-untyped-def]
    from tm4.daemon.status import gather_status
    from tm4.ops import drift

    lab, phone, stranger, core = net
    core.allow("phone", ["192.0.2.10"], ["sip-udp"])
    core.allow("office", ["198.51.100.0/24"], ["sip-udp"])
    core.apply()
    assert gather_status(core)["drift"] == ""
    assert not drift.check(core)
    lab.pbx.run("ipset", "del", "tm4-wl4_sip_udp", "192.0.2.10")
    assert "1 element(s) missing" in gather_status(core)["drift"]
    lab.pbx.run("iptables", "-I", "TM4-INPUT", "1", "-p", "tcp", "--dport", "22", "-j", "ACCEPT")
    assert "changed from outside" in gather_status(core)["drift"]
    assert drift.check(core).rules
    core.apply()
    assert gather_status(core)["drift"] == "" and not drift.check(core)
    core.backend.remove()
    assert gather_status(core)["table_present"] is False


def test_responsive_mode_clamps_a_flood_and_a_full_apply_keeps_the_clamp(lab: Lab, tmp_path: Path) -> None:
    need_root_tools(*TOOLS)
    phone = lab.client("phone", ["192.0.2.10/24"])
    flood = lab.client("flood", ["203.0.113.66/24"])
    echo = Echo(lab.pbx, udp=[5060, 10000])
    try:
        core = make_core(lab, tmp_path, public_services=["sip-udp"], rate_packets=5, clamp="120s")
        core.allow("phone", ["192.0.2.10"], ["sip-udp"])
        core.apply()
        assert flood.udp_probe(PBX4, 5060)  # public: a stranger gets in
        s = flood.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            for _ in range(40):
                s.sendto(b"x", (PBX4, 5060))
        finally:
            s.close()
        assert not flood.udp_probe(PBX4, 5060)  # clamped, on a fresh flow too
        assert flood.udp_probe(PBX4, 10000)  # RTP is not SIP
        for _ in range(40):
            assert phone.udp_probe(PBX4, 5060, timeout=0.3)  # whitelisted: never metered
        assert "203.0.113.66" in str(core.backend.set_elements("rsp4_clamp"))
        core.apply()  # a full apply carries the kernel's clamped sources over
        assert "203.0.113.66" in str(core.backend.set_elements("rsp4_clamp"))
        assert not flood.udp_probe(PBX4, 5060)
    finally:
        echo.close()


@pytest.mark.parametrize("legacy", [False, True], ids=["iptables-nft", "iptables-legacy"])
def test_golden_rule_sets_load_into_the_kernel(lab: Lab, legacy: bool) -> None:
    need_root_tools(*TOOLS, "iptables-legacy-restore" if legacy else "iptables-nft-restore")
    be = IptablesBackend(lab.pbx.ns, legacy=legacy)
    be.apply(sample_ruleset(datetime.now(UTC)))
    listing = be.listing() or ""
    assert "-A TM4-INPUT -p udp -m multiport --dports 7029:7030 -j ACCEPT" in listing.replace(
        "-m set --match-set tm4-wl4n_many src ", "")
    assert "0.0.0.0/1" in listing and "128.0.0.0/1" in listing  # safe mode's whole address space
    be.apply(responsive_ruleset())
    listing = be.listing() or ""
    assert "--connlimit-above 10" in listing and "--hashlimit-srcmask 64" in listing
    assert "set tm4-rsp6_clamp hash:ip family inet6 maxelem 65535 timeout 60 netmask 64" in listing
    assert "tm4-wl4n_many" not in listing  # sets the new rule set does not have are gone
    be.remove()
    assert be.listing() is None
