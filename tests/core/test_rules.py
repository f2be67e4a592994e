"""Pure rendering: golden nft scripts, the union of overlapping sources, incremental diffs."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from tm4.core.config import parse_config
from tm4.core.model import Ban, Entry, Origin, Source, parse_network
from tm4.core.rules import Element, diff_elements, render_ruleset, state_items, union_elements
from tm4.core.store import Store
from tm4.firewall.nft import render_changes, render_script

GOLDEN = Path(__file__).parent.parent / "golden"
NOW = datetime(2026, 11, 21, 12, 0, 0, tzinfo=UTC)


def entry(name: str, sources: list[str], services: tuple[str, ...], ttl: timedelta | None = None) -> Entry:
    return Entry(name, tuple(Source.parse(s) for s in sources), services, Origin.ADMIN, NOW,
                 NOW + ttl if ttl else None)


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if os.environ.get("UPDATE_GOLDEN") == "1":
        path.write_text(text)
    assert text == path.read_text(), f"rendering changed; diff against {path}"


def sample_state() -> tuple[list[Entry], list[Ban]]:
    entries = [
        entry("office", ["192.0.2.0/24", "2001:db8:1::/48"], ("sip-udp", "sip-tcp", "ssh")),
        entry("dialin-alice", ["192.0.2.77"], ("sip-udp",), timedelta(hours=24)),
        entry("provider", ["198.51.100.0/28"], ("iax",)),
        entry("admin", ["203.0.113.5"], ("all",)),
    ]
    bans = [
        Ban(parse_network("203.0.113.66"), "guard", Origin.GUARD, NOW, NOW + timedelta(hours=1)),
        Ban(parse_network("2001:db8:bad::/64"), "guard", Origin.GUARD, NOW, None),
    ]
    return entries, bans


def test_golden_full_ruleset() -> None:
    cfg = parse_config({"firewall": {"public_services": ["https"], "rtp": "10000-20000"}})
    entries, bans = sample_state()
    rs = render_ruleset(state_items(entries, bans, NOW), cfg, NOW)
    check_golden("ruleset_basic.nft", render_script(rs, NOW))


def test_input_chain_order_ban_first_then_established_then_deny() -> None:
    cfg = parse_config({"firewall": {"public_services": ["https"]}})
    rs = render_ruleset({}, cfg, NOW)
    r = rs.input_rules
    assert [x.split()[2] for x in r[:4]] == ["@ban4", "@ban4n", "@ban6", "@ban6n"]
    est = r.index("ct state established,related accept")
    assert est > 3 and r.index('iif "lo" accept') < est
    assert r.index("udp dport 10000-20000 accept") > r.index("ip saddr @wl4_all accept")
    assert r[-2] == "tcp dport 443 accept" and r[-1] == "counter drop"


def test_overlapping_sources_become_one_union_with_longest_lifetime() -> None:
    t1, t2 = NOW + timedelta(hours=1), NOW + timedelta(hours=5)
    lo = int(parse_network("192.0.2.0").network_address)
    items = [(lo, lo + 255, t1), (lo + 7, lo + 7, None), (lo + 100, lo + 120, t2)]
    got = union_elements(items)
    assert got == [
        Element(lo, lo + 6, t1), Element(lo + 7, lo + 7, None), Element(lo + 8, lo + 99, t1),
        Element(lo + 100, lo + 120, t2), Element(lo + 121, lo + 255, t1),
    ]
    assert [e.text(4) for e in got][:2] == ["192.0.2.0-192.0.2.6", "192.0.2.7"]


def test_contained_source_with_same_lifetime_merges_away() -> None:
    lo = int(parse_network("192.0.2.0").network_address)
    assert union_elements([(lo, lo + 255, None), (lo + 7, lo + 7, None)]) == [Element(lo, lo + 255, None)]


def test_adjacent_but_not_overlapping_sources_stay_separate_clusters() -> None:
    # so one grant's change never touches a neighbour's element
    lo = int(parse_network("192.0.2.0").network_address)
    got = union_elements([(lo, lo + 127, None), (lo + 128, lo + 255, None)])
    assert len(got) == 2


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 60), st.integers(0, 20), st.one_of(st.none(), st.integers(1, 5))),
                min_size=1, max_size=12))
def test_union_is_exact_pointwise(raw: list[tuple[int, int, int | None]]) -> None:
    items = [(a, a + n, NOW + timedelta(hours=h) if h else None) for a, n, h in raw]
    elems = union_elements(items)
    # non-overlapping, sorted
    for a, b in zip(elems, elems[1:], strict=False):
        assert a.hi < b.lo
    for p in range(0, 90):
        covering = [exp for lo, hi, exp in items if lo <= p <= hi]
        hit = [e for e in elems if e.lo <= p <= e.hi]
        if not covering:
            assert not hit
            continue
        assert len(hit) == 1
        want = None if None in covering else max(covering)  # type: ignore[type-var]
        assert hit[0].expires == want


def test_diff_refreshes_changed_expiry_by_delete_then_add() -> None:
    old = {"wl4_ssh": [Element(1, 1, NOW)]}
    new = {"wl4_ssh": [Element(1, 1, NOW + timedelta(hours=1))]}
    ch = diff_elements(old, new, {"wl4_ssh": 4})
    assert ch.delete["wl4_ssh"] == [Element(1, 1, NOW)]
    assert ch.add["wl4_ssh"] == [Element(1, 1, NOW + timedelta(hours=1))]
    script = render_changes(ch, NOW)
    assert script.splitlines() == [
        "delete element inet tm4 wl4_ssh { 0.0.0.1 }",
        "add element inet tm4 wl4_ssh { 0.0.0.1 timeout 3600s }",
    ]


def test_expired_entries_are_not_rendered() -> None:
    cfg = parse_config({})
    e = entry("old", ["192.0.2.9"], ("ssh",), timedelta(hours=1))
    rs = render_ruleset(state_items([e], [], NOW), cfg, NOW + timedelta(hours=2))
    assert rs.sets["wl4_ssh"].elements == ()
    assert rs.sets["wl4_ssh"].flags == ("timeout",) and rs.sets["wl4n_ssh"].flags == ("interval", "timeout")


def test_port_overrides_reach_the_rules() -> None:
    cfg = parse_config({"services": {"sip-udp": {"ports": "5080"}, "ucp": {"ports": "8001,8003"}}})
    r = render_ruleset({}, cfg, NOW).input_rules
    assert "ip saddr @wl4_sip_udp udp dport 5080 accept" in r
    assert "ip saddr @wl4n_sip_udp udp dport 5080 accept" in r
    assert "ip saddr @wl4_ucp tcp dport { 8001,8003 } accept" in r


def test_store_fast_path_renders_the_same_items_as_the_model(tmp_path: Path) -> None:
    entries, bans = sample_state()
    store = Store(tmp_path / "tm4.db")
    for e in entries:
        store.put_entry(e)
    for b in bans:
        store.put_ban(b)
    want = {k: sorted(v) for k, v in state_items(entries, bans, NOW).items()}
    got = {k: sorted(v) for k, v in store.set_items(NOW).items()}
    assert got == want
    later = NOW + timedelta(hours=30)  # dialin-alice (24 h) and the 1 h ban are gone
    assert sum(map(len, store.set_items(later).values())) == sum(map(len, want.values())) - 2
