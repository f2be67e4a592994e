"""The iptables + ipset translator, pure: golden restore texts, prefixes, batches, refusals."""

from __future__ import annotations

import ipaddress
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tm4.core.config import parse_config
from tm4.core.errors import ApplyError
from tm4.core.model import Ban, Entry, Origin, Source, parse_network
from tm4.core.rules import Element, NftSet, Ruleset, SetChanges, render_ruleset, state_items
from tm4.firewall.iptables_live import LiveChains, parse_ipset_list, parse_save
from tm4.firewall.iptables_names import ipset_name, temp_name
from tm4.firewall.iptables_render import (
    MAX_TIMEOUT,
    element_texts,
    prefix_intervals,
    render_ipset,
    render_iptables,
    render_set_changes,
    restore_text,
)
from tm4.firewall.iptables_translate import translate
from tm4.firewall.plan import make_plan

GOLDEN = Path(__file__).parent.parent / "golden" / "iptables"
NOW = datetime(2026, 11, 21, 12, 0, 0, tzinfo=UTC)
V4 = int(ipaddress.ip_address("192.0.2.0"))


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("UPDATE_GOLDEN") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert text == path.read_text(), f"rendering changed; diff against {path}"


def entry(name: str, sources: list[str], services: tuple[str, ...], ttl: timedelta | None = None) -> Entry:
    return Entry(name, tuple(Source.parse(s) for s in sources), services, Origin.ADMIN, NOW,
                 NOW + ttl if ttl else None)


def sample_ruleset(now: datetime = NOW) -> Ruleset:
    """The spine's sample state, plus what exercises the translation: overlapping networks
    with different lifetimes (a range piece), a ban longer than ipset's timeout limit, a
    service with more ports than one multiport match takes, and a safe-mode-like set
    holding the whole address space. A kernel test passes the real clock: the elements'
    expiries are absolute, and a fixed date would have them expire before they load."""
    cfg = parse_config({
        "firewall": {"public_services": ["https"], "rtp": "10000-20000"},
        "services": {"many": {"proto": "udp", "ports": "7001,7003,7005,7007,7009,7011,7013,"
                                                       "7015,7017,7019,7021,7023,7025,7027,7029-7030"}},
    })
    entries = [
        entry("office", ["192.0.2.0/24", "2001:db8:1::/48"], ("sip-udp", "sip-tcp", "ssh"),
              timedelta(hours=2)),
        entry("desk", ["192.0.2.0/28"], ("sip-udp",)),
        entry("dialin-alice", ["192.0.2.77"], ("sip-udp",), timedelta(hours=24)),
        entry("provider", ["198.51.100.0/28"], ("iax", "many")),
        entry("admin", ["203.0.113.5", "2001:db8::5"], ("all",)),
    ]
    bans = [
        Ban(parse_network("203.0.113.66"), "guard", Origin.GUARD, now, now + timedelta(hours=1)),
        Ban(parse_network("203.0.113.67"), "admin", Origin.ADMIN, now, now + timedelta(days=60)),
        Ban(parse_network("2001:db8:bad::/64"), "guard", Origin.GUARD, now, None),
    ]
    extra = Ruleset()
    for v, ipf, top in ((4, "ip", 2**32 - 1), (6, "ip6", 2**128 - 1)):
        extra.sets[f"safemode{v}"] = NftSet(f"safemode{v}", v, (Element(0, top, now + timedelta(minutes=10)),))
        extra.input_rules.append(f"{ipf} saddr @safemode{v} tcp dport 22 accept")
    return render_ruleset(state_items(entries, bans, now), cfg, now, [extra])


def responsive_ruleset() -> Ruleset:
    """Responsive mode's rule shapes (as rules.responsive_rules writes them), fixed here so
    this golden file follows the translator, not the renderer."""
    rs = Ruleset()
    for v in (4, 6):
        for n in ("all", "sip_udp"):
            rs.sets[f"wl{v}_{n}"] = NftSet(f"wl{v}_{n}", v, flags=("timeout",))
            rs.sets[f"wl{v}n_{n}"] = NftSet(f"wl{v}n_{n}", v)
        rs.sets[f"rsp{v}_clamp"] = NftSet(f"rsp{v}_clamp", v, dynamic=True, timeout="60s",
                                          flags=("dynamic", "timeout"), size=65535)
    for v, ipf, key in ((4, "ip", "ip saddr"), (6, "ip6", "ip6 saddr & ffff:ffff:ffff:ffff::")):
        exempt = " ".join(f"{ipf} saddr != @wl{v}{n}" for n in ("_all", "n_all", "_sip_udp", "n_sip_udp"))
        clamp = f"add @rsp{v}_clamp {{ {key} }} counter drop"
        rs.input_rules += [
            f"{exempt} udp dport 5060 {key} @rsp{v}_clamp counter drop",
            f"{exempt} udp dport 5060 ct state new meter rsp{v}_flows_sip_udp size 65535 "
            f"{{ {key} ct count over 10 }} {clamp}",
            f"{exempt} udp dport 5060 ct state new meter rsp{v}_newflows_sip_udp size 65535 "
            f"{{ {key} timeout 60s limit rate over 10/minute burst 10 packets }} {clamp}",
            f"{exempt} udp dport 5060 meter rsp{v}_pkts_sip_udp size 65535 "
            f"{{ {key} timeout 10s limit rate over 300/minute burst 50 packets }} {clamp}",
        ]
    rs.input_rules += ["ct state established,related accept", "udp dport 5060 accept", "counter drop"]
    return rs


def test_golden_iptables_restore_texts() -> None:
    rs = sample_ruleset()
    check_golden("ruleset.v4", render_iptables(rs, 4))
    check_golden("ruleset.v6", render_iptables(rs, 6))


def test_golden_ipset_restore_text() -> None:
    check_golden("sets.ipset", render_ipset(sample_ruleset(), NOW, "t0"))


def test_golden_responsive_mode_becomes_connlimit_hashlimit_and_set_target() -> None:
    rs = responsive_ruleset()
    check_golden("responsive.v4", render_iptables(rs, 4))
    check_golden("responsive.v6", render_iptables(rs, 6))
    sets = render_ipset(rs, NOW, "t0")
    assert "create tm4~t0~rsp6_clamp hash:ip family inet6 hashsize 1024 maxelem 65535 timeout 60 netmask 64" in sets
    assert "create tm4~t0~rsp4_clamp hash:ip family inet hashsize 1024 maxelem 65535 timeout 60\n" in sets


def test_the_renderers_responsive_mode_translates() -> None:
    """Whatever rules.py writes for public SIP today must translate (or this fails loudly)."""
    cfg = parse_config({"firewall": {"public_services": ["sip-udp", "sip-tcp"]}})
    rs = render_ruleset({}, cfg, NOW)
    for v in (4, 6):
        text = render_iptables(rs, v)
        assert f"--match-set tm4-rsp{v}_clamp src -j DROP" in text
        assert f"-j SET --add-set tm4-rsp{v}_clamp src" in text


def test_order_and_families() -> None:
    rs = sample_ruleset()
    v4 = render_iptables(rs, 4).splitlines()
    v6 = render_iptables(rs, 6).splitlines()
    a4 = [ln for ln in v4 if ln.startswith("-A TM4-INPUT")]
    assert a4[0] == "-A TM4-INPUT -m set --match-set tm4-ban4 src -j DROP"
    assert a4[-1] == "-A TM4-INPUT -j DROP"
    est = a4.index("-A TM4-INPUT -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT")
    assert a4.index("-A TM4-INPUT -i lo -j ACCEPT") < est < a4.index(
        "-A TM4-INPUT -m conntrack --ctstate INVALID -j DROP")
    assert "-I INPUT 1 -j TM4-INPUT" in v4 and "-I INPUT 1 -j TM4-INPUT" in v6
    assert not any("icmp6" in ln or "wl6" in ln or "fe80" in ln for ln in v4)
    assert not any("--icmp-type" in ln or "wl4" in ln for ln in v6)
    # the DHCP client rule has no family in nft: both get it
    assert "-A TM4-INPUT -p udp -m udp --sport 67 --dport 68 -j ACCEPT" in v4
    assert "-A TM4-INPUT -p udp -m udp --sport 67 --dport 68 -j ACCEPT" in v6
    # 16 multiport slots: split into two rules, 15 + the rest
    many = [ln for ln in v4 if "tm4-wl4n_many" in ln]
    assert len(many) == 2 and many[1].endswith("--dports 7029:7030 -j ACCEPT")


def test_ranges_become_prefixes_and_slash_zero_two_halves() -> None:
    assert element_texts(4, V4, V4 + 255) == ["192.0.2.0/24"]
    assert element_texts(4, V4 + 16, V4 + 255) == [
        "192.0.2.16/28", "192.0.2.32/27", "192.0.2.64/26", "192.0.2.128/25"]
    assert element_texts(4, V4 + 7, V4 + 7) == ["192.0.2.7"]
    assert element_texts(4, 0, 2**32 - 1) == ["0.0.0.0/1", "128.0.0.0/1"]
    assert element_texts(6, 0, 2**128 - 1) == ["::/1", "8000::/1"]
    sets = render_ipset(sample_ruleset(), NOW, "t0")
    assert "add tm4~t0~safemode4 0.0.0.0/1 timeout 600" in sets
    assert f"add tm4~t0~ban4 203.0.113.67 timeout {MAX_TIMEOUT}" in sets  # 60 days, capped


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(0, 2**16))
def test_prefix_split_covers_exactly_the_range(lo: int, span: int) -> None:
    hi = min(2**32 - 1, lo + span)
    pieces = prefix_intervals(lo, hi, 32)
    assert pieces[0][0] == lo and pieces[-1][1] == hi
    for (_, b), (c, _) in zip(pieces, pieces[1:], strict=False):
        assert b + 1 == c
    for a, b in pieces:
        size = b - a + 1
        assert size & (size - 1) == 0 and a % size == 0 and size <= 2**31


def test_set_changes_are_one_batch_deletes_first() -> None:
    ch = SetChanges(
        delete={"wl4n_ssh": [Element(V4, V4 + 255, NOW + timedelta(hours=1))]},
        add={"wl4n_ssh": [Element(V4, V4 + 15, None), Element(V4 + 16, V4 + 255, NOW + timedelta(hours=2))],
             "ban4": [Element(V4 + 9, V4 + 9, NOW - timedelta(seconds=1))]},  # already over: left out
        versions={"wl4n_ssh": 4, "ban4": 4},
    )
    assert render_set_changes(ch, NOW).splitlines() == [
        "del tm4-wl4n_ssh 192.0.2.0/24",
        "add tm4-wl4n_ssh 192.0.2.0/28",
        "add tm4-wl4n_ssh 192.0.2.16/28 timeout 7200",
        "add tm4-wl4n_ssh 192.0.2.32/27 timeout 7200",
        "add tm4-wl4n_ssh 192.0.2.64/26 timeout 7200",
        "add tm4-wl4n_ssh 192.0.2.128/25 timeout 7200",
    ]
    assert render_set_changes(SetChanges(), NOW) == ""


@pytest.mark.parametrize("rule, why", [
    ("tcp dport 22 ip saddr @knock4_x_1 delete @knock4_x_1 { ip saddr } update @knock4_x_2 { ip saddr } return",
     "leaves the chain"),
    ("ip saddr @nope accept", "not declared"),
    ("ip saddr @ban6 drop", "holds IPv6"),
    ("tcp dport 22 limit rate 10 mbytes/second accept", "packet rates"),
    ("ip saddr 192.0.2.1 ip6 saddr 2001:db8::1 accept", "mixes IPv4 and IPv6"),
    ("meta mark 0x1 accept", "unsupported meta"),
    ("fib saddr type local accept", "unsupported statement"),
    ("tcp dport 22 jump elsewhere", "not tm4's"),
])
def test_untranslatable_rules_raise_apply_error_naming_nft(rule: str, why: str) -> None:
    rs = Ruleset(sets={"ban6": NftSet("ban6", 6), "knock4_x_1": NftSet("knock4_x_1", 4, dynamic=True),
                       "knock4_x_2": NftSet("knock4_x_2", 4, dynamic=True)},
                 input_rules=[rule])
    with pytest.raises(ApplyError, match=why) as exc:
        translate(rs, 4)
    assert 'firewall.backend = "nft"' in str(exc.value)


def test_knock_chains_are_refused_whole() -> None:
    from tm4.knock.sequence import KnockSequence, render_knock, settings

    cfg = parse_config({"knock": {"enabled": True, "ports": [31337, 40404, 51515]}})
    frag = render_knock(cfg, settings(cfg), KnockSequence("tcp", (31337, 40404, 51515), "abcdef"))
    rs = render_ruleset({}, parse_config({}), NOW, [frag])
    with pytest.raises(ApplyError, match="chain knock4"):
        render_iptables(rs, 4)


def test_jumps_and_set_updates_that_do_translate() -> None:
    rs = Ruleset(
        sets={"seen4": NftSet("seen4", 4, dynamic=True, timeout="30s", flags=("dynamic", "timeout"))},
        input_rules=["meta nfproto ipv4 tcp flags & (fin | syn | rst | ack) == syn jump probe",
                     "udp dport { 5060-5061, 5080 } update @seen4 { ip saddr }",
                     "ip saddr != { 192.0.2.1, 192.0.2.2 } tcp dport != 22 counter drop"],
        chains={"probe": ["tcp dport 22 add @seen4 { ip saddr } log prefix \"tm4 \" accept", "return"]},
    )
    text = render_iptables(rs, 4)
    assert "-A TM4-INPUT -p tcp -m tcp --tcp-flags FIN,SYN,RST,ACK SYN -j TM4-probe" in text
    assert "-A TM4-INPUT -p udp -m multiport --dports 5060:5061,5080 -j SET --add-set tm4-seen4 src --exist" in text
    assert "-A TM4-INPUT -p tcp ! -s 192.0.2.1 ! -s 192.0.2.2 -m tcp ! --dport 22 -j DROP" in text
    assert "-A TM4-probe -p tcp -m tcp --dport 22 -j TM4-probe-1" in text
    assert '-A TM4-probe-1 -j SET --add-set tm4-seen4 src\n-A TM4-probe-1 -j LOG --log-prefix "tm4 "\n' \
           '-A TM4-probe-1 -j ACCEPT' in text
    assert "-A TM4-probe -j RETURN" in text
    v6 = render_iptables(rs, 6)
    assert "-A TM4-INPUT" not in v6 and "-A TM4-probe -j RETURN" in v6  # every IPv4-only rule left out


def test_restore_text_keeps_one_jump_at_position_one() -> None:
    save = "\n".join([
        "# Generated by iptables-save", "*nat", ":PREROUTING ACCEPT [0:0]", "-A PREROUTING -j TM4-X", "COMMIT",
        "*filter", ":INPUT ACCEPT [10:100]", ":TM4-INPUT - [0:0]", ":TM4-INPUT-1 - [0:0]", ":f2b - [0:0]",
        "-A INPUT -p tcp -j f2b", "-A INPUT -j TM4-INPUT", "-A INPUT -s 192.0.2.9/32 -j ACCEPT",
        "-A INPUT -i eth0 -j TM4-INPUT", "-A TM4-INPUT -j DROP", "-A TM4-INPUT-1 -j DROP", "COMMIT",
    ])
    live = parse_save(save)
    assert live.chains == {"TM4-INPUT": ["-j DROP"], "TM4-INPUT-1": ["-j DROP"]}
    assert live.jumps() == [2, 4]
    text = restore_text({"TM4-INPUT": ["-j DROP"]}, live).splitlines()
    assert text == ["*filter", ":TM4-INPUT - [0:0]", "-D INPUT -i eth0 -j TM4-INPUT", "-D INPUT -j TM4-INPUT",
                    "-I INPUT 1 -j TM4-INPUT",
                    "-F TM4-INPUT-1", "-X TM4-INPUT-1", "-A TM4-INPUT -j DROP", "COMMIT"]
    ok = parse_save("*filter\n-A INPUT -j TM4-INPUT\n-A INPUT -j f2b\n-A TM4-INPUT -j DROP\nCOMMIT\n")
    assert "INPUT" not in restore_text({"TM4-INPUT": ["-j DROP"]}, ok).replace("TM4-INPUT", "")
    gone = restore_text({}, live, jumps=()).splitlines()
    assert gone[1:] == ["-D INPUT -i eth0 -j TM4-INPUT", "-D INPUT -j TM4-INPUT", "-F TM4-INPUT", "-F TM4-INPUT-1", "-X TM4-INPUT",
                        "-X TM4-INPUT-1", "COMMIT"]
    assert restore_text({}, LiveChains(), jumps=()) == "*filter\nCOMMIT\n"


def test_names_fit_ipset_limits() -> None:
    long = "wl6n_" + "provisioning_https_backup"
    assert len(ipset_name(long)) <= 31 and ipset_name(long) != ipset_name(long + "2")
    assert len(temp_name(long, "abcdef")) <= 31
    assert ipset_name("ban4") == "tm4-ban4" and temp_name("ban4", "abcdef") == "tm4~abcdef~ban4"


LIST = """Name: tm4-wl4n_ssh
Type: hash:net
Revision: 7
Header: family inet hashsize 1024 maxelem 1048576 timeout 0 bucketsize 12 initval 0x1d4fbbd8
Size in memory: 648
References: 1
Number of entries: 3
Members:
192.0.2.0/28 timeout 0
192.0.2.16/28 timeout 7199
192.0.2.99 timeout 0

Name: tm4-ban4
Type: hash:ip
Revision: 6
Header: family inet hashsize 1024 maxelem 1048576 timeout 0 bucketsize 12 initval 0xa71a122b
Size in memory: 344
References: 1
Number of entries: 0
Members:
"""


class FakeBackend:
    """set_elements in this backend's shape, from an `ipset list` text."""

    prefix_elements = True

    def __init__(self, text: str):
        from tm4.firewall.iptables_live import member_json

        self.sets = {n.removeprefix("tm4-"): [member_json(m) for m in s.members]
                     for n, s in parse_ipset_list(text).items()}

    def present(self) -> bool:
        return True

    def set_elements(self, name: str) -> list[object] | None:
        return self.sets.get(name)


def test_plan_reads_ipset_members_and_compares_prefixes() -> None:
    sets = parse_ipset_list(LIST)
    assert sets["tm4-wl4n_ssh"].signature() == ("hash:net", "inet")
    assert sets["tm4-ban4"].members == []
    rs = Ruleset(sets={
        "wl4n_ssh": NftSet("wl4n_ssh", 4, (Element(V4, V4 + 15), Element(V4 + 16, V4 + 31, NOW + timedelta(hours=2)))),
        "ban4": NftSet("ban4", 4, (Element(V4 + 5, V4 + 5),), flags=("timeout",)),
    })
    plan = make_plan(rs, FakeBackend(LIST), "x", "x", NOW)  # type: ignore[arg-type]
    assert plan.add == {"ban4": ["192.0.2.5"]}
    assert plan.remove == {"wl4n_ssh": ["192.0.2.99"]}
    # a range piece: the kernel holds its prefixes, and the plan must not call that drift
    rs.sets["wl4n_ssh"].elements = (Element(V4, V4 + 15), Element(V4 + 16, V4 + 31), Element(V4 + 99, V4 + 99))
    rs.sets["ban4"].elements = ()
    assert make_plan(rs, FakeBackend(LIST), "x", "x", NOW).empty  # type: ignore[arg-type]
    rs.sets["wl4n_ssh"].elements = (Element(V4, V4 + 31), Element(V4 + 99, V4 + 99))  # one piece, not two
    plan = make_plan(rs, FakeBackend(LIST), "x", "x", NOW)  # type: ignore[arg-type]
    assert plan.add == {"wl4n_ssh": ["192.0.2.0/27"]}
    assert plan.remove == {"wl4n_ssh": ["192.0.2.0/28", "192.0.2.16/28"]}
