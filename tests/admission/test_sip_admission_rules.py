"""SIP admission's rules, pure: the rendered nft fragment, run through a small model of
nftables' raw payload matching, against the rule in words (issue 13)."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tm4.admission import sip
from tm4.core.config import parse_config
from tm4.core.errors import ConfigError
from tm4.core.rules import Ruleset

SECRET = "xq356jq.dyndns.org"


def config(**sa: object):  # noqa: ANN201
    return parse_config({"sip_admission": sa})


def rendered(*domains: str) -> Ruleset:
    cfg = config(domains=list(domains))
    return sip.render_admission(cfg, sip.settings(cfg))


_PIECE = re.compile(r"@ih,(\d+),(\d+) 0x([0-9a-f]+)")
_TERM = re.compile(r"@ih,(\d+),8 \{ ([0-9a-fx, ]+) \}")
_LEN = re.compile(r"udp length (\d+)")
_VMAP = re.compile(r"@ih,(\d+),(\d+) vmap \{ (.*) \}")


def _matches(rule: str, payload: bytes) -> bool:
    """nftables' view: a comparison beyond the end of the packet does not match."""
    m = _LEN.search(rule)
    if m and int(m.group(1)) != 8 + len(payload):
        return False
    for off, bits, hexa in _PIECE.findall(rule):
        o, n = int(off) // 8, int(bits) // 8
        assert int(bits) <= 128 and int(bits) % 8 == 0 and len(hexa) == 2 * n
        if payload[o:o + n] != bytes.fromhex(hexa) or len(payload) < o + n:
            return False
    t = _TERM.search(rule)
    if t:
        o = int(t.group(1)) // 8
        allowed = {int(x, 16) for x in t.group(2).split(",")}
        if len(payload) <= o or payload[o] not in allowed:
            return False
    return True


def kernel_admits(rs: Ruleset, payload: bytes) -> str | None:
    """The admit chain a UDP datagram to 5060 with `payload` ends in, or None."""
    if not any(_matches(r, payload) for r in rs.early_rules):
        return None
    [dispatch] = rs.chains[sip.REGISTER_CHAIN]  # one verdict map keyed on the name's first bytes
    m = _VMAP.fullmatch(dispatch)
    assert m, dispatch
    o, n = int(m.group(1)) // 8, int(m.group(2)) // 8
    assert int(m.group(2)) <= 128
    if len(payload) < o + n:
        return None
    targets = dict(re.findall(r"0x([0-9a-f]+) : goto (\w+)", m.group(3)))
    chain = targets.get(payload[o:o + n].hex())
    if chain is None:
        return None
    for rule in rs.chains[chain]:
        if _matches(rule, payload):
            return rule.rsplit("goto ", 1)[1]
    return None


def spec_admits(domains: list[str], payload: bytes) -> str | None:
    """Issue 13 in words: starts with `REGISTER sip:<name>` (as configured or in lower
    case), then `>`, `;`, `:`, a space or the end."""
    for d in domains:
        name = d.rstrip(".")
        for form in (name, name.lower()):
            head = b"REGISTER sip:" + form.encode()
            if payload.startswith(head) and payload[len(head):len(head) + 1] in (b"", b">", b";", b":", b" "):
                return sip.admit_chain(d)
    return None


@pytest.mark.parametrize(("payload", "admitted"), [
    (b"REGISTER sip:xq356jq.dyndns.org SIP/2.0\r\n", True),
    (b"REGISTER sip:xq356jq.dyndns.org:5060 SIP/2.0\r\n", True),
    (b"REGISTER sip:xq356jq.dyndns.org;transport=udp SIP/2.0\r\n", True),
    (b"REGISTER sip:xq356jq.dyndns.org>", True),
    (b"REGISTER sip:xq356jq.dyndns.org", True),  # the datagram ends with the name
    (b"REGISTER sip:xq356jq.dyndns.org.evil.example SIP/2.0\r\n", False),  # a longer name
    (b"REGISTER sip:xq356jq.dyndns.orgx SIP/2.0\r\n", False),
    (b"REGISTER sip:XQ356JQ.DYNDNS.ORG SIP/2.0\r\n", False),  # neither as configured nor lower case
    (b"REGISTER sip:192.0.2.1 SIP/2.0\r\nTo: <sip:1001@xq356jq.dyndns.org>\r\n", False),
    (b"OPTIONS sip:xq356jq.dyndns.org SIP/2.0\r\n", False),
    (b"\r\nREGISTER sip:xq356jq.dyndns.org SIP/2.0\r\n", False),  # not from byte 0
    (b"register sip:xq356jq.dyndns.org SIP/2.0\r\n", False),
    (b"REGISTER sip:xq356jq.dyndns.or", False),
    (b"", False),
])
def test_what_admits(payload: bytes, admitted: bool) -> None:
    rs = rendered(SECRET)
    assert (kernel_admits(rs, payload) is not None) is admitted
    assert (spec_admits([SECRET], payload) is not None) is admitted


def test_the_name_as_configured_and_in_lower_case() -> None:
    rs = rendered("Xq356JQ.DynDNS.org")
    for uri in (b"Xq356JQ.DynDNS.org", b"xq356jq.dyndns.org"):
        assert kernel_admits(rs, b"REGISTER sip:" + uri + b" SIP/2.0\r\n")
    assert not kernel_admits(rs, b"REGISTER sip:XQ356JQ.DYNDNS.ORG SIP/2.0\r\n")


def test_each_domain_has_its_own_sets_and_a_253_byte_name_fits() -> None:
    long_name = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 61])
    assert len(long_name) == 253
    rs = rendered(SECRET, "Other.Example.NET", long_name)
    assert kernel_admits(rs, f"REGISTER sip:{long_name}:5060 SIP/2.0".encode()) == sip.admit_chain(long_name)
    assert kernel_admits(rs, b"REGISTER sip:other.example.net>") == sip.admit_chain("other.example.net")
    assert kernel_admits(rs, b"REGISTER sip:Other.Example.NET>") == sip.admit_chain("other.example.net")
    # one verdict map in the REGISTER chain, keyed on as many bytes as the shortest form has
    assert re.fullmatch(r"@ih,104,128 vmap \{ .* \}", rs.chains[sip.REGISTER_CHAIN][0])
    assert len(rs.chains[sip.REGISTER_CHAIN]) == 1
    short = rendered("ab.cd", SECRET)
    assert short.chains[sip.REGISTER_CHAIN][0].startswith("@ih,104,40 vmap")
    assert kernel_admits(short, f"REGISTER sip:{SECRET}:5060".encode()) == sip.admit_chain(SECRET)
    assert kernel_admits(short, b"REGISTER sip:ab.cd:5060") == sip.admit_chain("ab.cd")
    assert kernel_admits(short, b"REGISTER sip:ab.cde") is None
    names = {n for n in rs.sets if n.startswith("sipadmit")}
    assert names == {sip.admit_set(v, d) for v in (4, 6) for d in (SECRET, "other.example.net", long_name)}
    assert all(rs.sets[n].dynamic and rs.sets[n].timeout == "3600s" for n in names)
    # the sets' names say nothing of the secret
    assert not any("xq356" in n or "other" in n for n in rs.sets)
    # one rule per service for everything that is not a REGISTER
    assert rs.early_rules == ["udp dport 5060 @ih,0,104 0x5245474953544552207369703a jump sip_register"]


def test_admitted_sources_reach_the_admission_services_only() -> None:
    cfg = parse_config({"sip_admission": {"domains": [SECRET], "services": ["sip-udp", "tftp"]}})
    rs = sip.render_admission(cfg, sip.settings(cfg))
    a4, a6 = sip.admit_set(4, SECRET), sip.admit_set(6, SECRET)
    assert rs.input_rules == [f"ip saddr @{a4} udp dport 5060 accept", f"ip saddr @{a4} udp dport 69 accept",
                              f"ip6 saddr @{a6} udp dport 5060 accept", f"ip6 saddr @{a6} udp dport 69 accept"]


def test_off_without_domains_and_refused_on_iptables() -> None:
    assert sip.ruleset_extra(config(), store=None) is None  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r'\[sip_admission\] domains: needs \[firewall\] backend = "nft"'):
        parse_config({"firewall": {"backend": "iptables"}, "sip_admission": {"domains": [SECRET]}})
    assert parse_config({"firewall": {"backend": "iptables"}, "sip_admission": {"domains": []}})
    cfg = config(domains=[SECRET])
    cfg.firewall.backend = "iptables"  # a config object made without the file checks
    with pytest.raises(ConfigError, match='needs firewall.backend = "nft"'):
        sip.ruleset_extra(cfg, store=None)  # type: ignore[arg-type]


@pytest.mark.parametrize(("sa", "problem"), [
    ({"domains": ["192.0.2.1"]}, "an address is no secret"),
    ({"domains": ["nodot"]}, "must be a DNS name"),
    ({"domains": ["a..b"]}, "must be a DNS name"),
    ({"domains": ["sip:x.example.org"]}, "domains[0]"),
    ({"domains": ["x" * 254]}, "domains[0]"),
    ({"services": ["sip-tcp"]}, "UDP services only"),
    ({"services": ["sip-tls"]}, "UDP services only"),
    ({"services": ["nope"]}, "unknown service"),
    ({"ttl": "0s"}, "ttl"),
])
def test_bad_settings_are_refused_naming_the_key(sa: dict[str, object], problem: str) -> None:
    with pytest.raises(ConfigError) as exc:
        config(**sa)
    assert "[sip_admission]" in str(exc.value) and problem in str(exc.value)


_LABEL = st.text("abcXYZ019-", min_size=1, max_size=20).filter(lambda s: s[0] != "-" and s[-1] != "-")
_NAME = st.lists(_LABEL, min_size=2, max_size=4).map(".".join)


@st.composite
def payloads(draw: st.DrawFn, domains: list[str]) -> bytes:
    name = draw(st.sampled_from(domains))
    form = draw(st.sampled_from([name, name.lower(), name.upper(), name[:-1], name + "x", "x" + name]))
    head = draw(st.sampled_from(["REGISTER sip:", "REGISTER sip:", "OPTIONS sip:", "REGISTER  sip:", "",
                                 "REGISTER sips:", "\r\nREGISTER sip:"]))
    term = draw(st.sampled_from(["", ">", ";", ":", " ", ".", "/", "\r", "x", "@"]))
    tail = draw(st.binary(max_size=40))
    return (head + form + term).encode() + (tail if term else b"")


@settings(max_examples=300, deadline=None)
@given(st.lists(_NAME, min_size=1, max_size=4, unique_by=str.lower), st.data())
def test_the_kernel_rules_admit_exactly_what_the_issue_says(domains: list[str], data: st.DataObject) -> None:
    rs = rendered(*domains)
    payload = data.draw(st.one_of(payloads(domains), st.binary(max_size=80)))
    assert kernel_admits(rs, payload) == spec_admits(domains, payload)


@given(st.binary(min_size=1, max_size=300), st.integers(0, 100))
def test_payload_pieces_are_at_most_128_bits_and_cover_the_bytes(data: bytes, offset: int) -> None:
    text = sip.payload_match(data, offset)
    got = b""
    for off, bits, hexa in _PIECE.findall(text):
        assert int(bits) <= 128 and int(off) == (offset + len(got)) * 8
        got += bytes.fromhex(hexa)
    assert got == data


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.text(max_size=300), _NAME, st.binary(max_size=40).map(lambda b: b.decode("latin-1"))),
                max_size=5))
def test_any_domains_are_refused_cleanly_or_render_loadable_pieces(domains: list[str]) -> None:
    """Hostile config input: a clean ConfigError, or rules whose every raw piece is
    within nft's limits and whose chains cover every configured name."""
    try:
        cfg = config(domains=domains)
    except ConfigError as exc:
        assert "[sip_admission]" in str(exc)
        return
    rs = sip.render_admission(cfg, sip.settings(cfg))
    for rule in rs.chains[sip.REGISTER_CHAIN]:
        for off, bits, hexa in _PIECE.findall(rule):
            assert 0 < int(bits) <= 128 and len(hexa) * 4 == int(bits) and int(off) % 8 == 0
    for d in domains:
        assert kernel_admits(rs, f"REGISTER sip:{d.rstrip('.')} SIP/2.0".encode()) == sip.admit_chain(d)
