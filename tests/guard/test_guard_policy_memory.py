"""The guard's memory is bounded per source and in total, and a flood of distinct sources
never makes it forget a source close to its ban (issue 12, item 8). Small caps: fast."""

from __future__ import annotations

import dataclasses
import ipaddress
import tracemalloc

from hypothesis import given, settings
from hypothesis import strategies as st
from test_guard_policy import bans, crf, ev

from tm4.asterisk.events import Endpoint, SecurityEvent
from tm4.core.config import GuardConfig
from tm4.core.errors import ConfigError
from tm4.guard.policy import Guard

SCANNER = ev("InvalidAccountID", "2001:db8::1", SessionID="scan", AccountID="100")


def scanner(i: int) -> SecurityEvent:
    """A scanner's failed REGISTER from its own /64 of 2001:db8::/32."""
    src = ipaddress.IPv6Address(int(ipaddress.IPv6Address("2001:db8::")) | ((i + 1) << 64) | 7)
    return dataclasses.replace(SCANNER, remote=Endpoint(src, 5060, "UDP"), session=f"scan-{i}")


def test_the_cap_holds_and_defaults_from_the_config() -> None:
    assert Guard(GuardConfig()).max_sources == GuardConfig().max_sources
    g = Guard(GuardConfig(max_sources=50))
    for i in range(2000):
        g.observe(scanner(i), i * 0.001)
        assert g.tracked <= 50
    assert g.tracked == 50


def test_a_source_one_failure_short_survives_a_flood_of_one_shot_sources() -> None:
    g = Guard(GuardConfig(max_sources=100))
    for k in range(4):
        assert g.observe(crf("203.0.113.9", k, session=f"s{k}"), float(k)) == []
    for i in range(5000):  # 50 times the cap, all within the window
        assert g.observe(scanner(i), 4.0 + i * 0.005) == []
    out = bans(g.observe(crf("203.0.113.9", 4, session="s4"), 40.0))
    assert [(b.address, b.count, b.offences) for b in out] == [("203.0.113.9", 5, 1)]


def test_fewest_failures_go_first_then_the_oldest() -> None:
    g = Guard(GuardConfig(max_sources=3))
    g.observe(crf("198.51.100.1", 0, session="a0"), 0.0)
    g.observe(crf("198.51.100.1", 1, session="a1"), 1.0)  # two failures
    g.observe(crf("198.51.100.2", 0, session="b0"), 2.0)  # one failure, older
    g.observe(crf("198.51.100.3", 0, session="c0"), 3.0)  # one failure, newer
    g.observe(scanner(0), 4.0)  # room is made: 198.51.100.2 goes
    # 198.51.100.3 and .1 were kept: three more failures ban .1, four more ban .3
    for k in range(2, 4):
        assert bans(g.observe(crf("198.51.100.1", k, session=f"a{k}"), 5.0 + k)) == []
    assert bans(g.observe(crf("198.51.100.1", 4, session="a4"), 9.0))[0].count == 5
    for k in range(1, 4):
        assert bans(g.observe(crf("198.51.100.3", k, session=f"c{k}"), 10.0 + k)) == []
    assert bans(g.observe(crf("198.51.100.3", 4, session="c4"), 15.0))[0].count == 5
    # 198.51.100.2 starts afresh: its first failure was forgotten
    for k in range(1, 5):
        assert bans(g.observe(crf("198.51.100.2", k, session=f"b{k}"), 15.0 + k)) == []
    assert bans(g.observe(crf("198.51.100.2", 5, session="b5"), 21.0))[0].count == 5


def test_an_idle_source_goes_before_a_busy_one_of_any_level() -> None:
    g = Guard(GuardConfig(max_sources=2))
    for k in range(3):
        g.observe(crf("198.51.100.1", k, session=f"a{k}"), float(k))  # three failures, then idle
    g.observe(crf("198.51.100.2", 0, session="b0"), 99.0)
    g.observe(scanner(0), 100.0)  # .1 is idle (its failures left the window): it goes
    for k in range(1, 4):
        assert bans(g.observe(crf("198.51.100.2", k, session=f"b{k}"), 100.0 + k)) == []
    assert bans(g.observe(crf("198.51.100.2", 4, session="b4"), 105.0))[0].count == 5


def test_sweep_trims_to_the_cap_and_forgets_idle_sources() -> None:
    g = Guard(GuardConfig(max_sources=1000))
    for i in range(300):
        g.observe(scanner(i), float(i) * 0.01)
    g.max_sources = 100
    assert g.sweep(3.0) == 200 and g.tracked == 100
    assert g.sweep(1000.0) == 100 and g.tracked == 0


def test_one_source_costs_bounded_memory_whatever_it_sends() -> None:
    g = Guard(GuardConfig(failures=50, challenges=1000, window="1h", max_sources=10))
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for i in range(20_000):  # distinct proofs, sessions and accounts: all kept as hashes
            g.observe(crf("203.0.113.9", i, session=f"s{i}", account=f"a{i}"), i * 0.001)
        for i in range(5_000):
            g.observe(ev("ChallengeSent", "203.0.113.9", SessionID=f"c{i}", Challenge="x"), 20.0)
        used = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert g.tracked == 1
    # At most `failures` attempts, `challenges` pending challenges and 256 marks
    # (a few hundred bytes each), whatever came: 20,000 proofs would be megabytes.
    assert used < 50 * 300 + 1000 * 300 + 256 * 200 + 50_000


def test_a_cap_below_one_is_refused() -> None:
    try:
        Guard(GuardConfig(max_sources=0))
    except ConfigError as exc:
        assert "max_sources" in str(exc)
    else:
        raise AssertionError("max_sources = 0 accepted")


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 7), st.integers(0, 3), st.floats(0, 5)), max_size=80),
       st.integers(1, 8))
def test_with_room_for_every_source_the_cap_changes_nothing(
        steps: list[tuple[int, int, float]], room: int) -> None:
    """Eight sources, a cap of 8 vs one of 10,000: the same decisions, event for event;
    and any cap is never exceeded."""
    exact = Guard(GuardConfig(failures=3, challenges=4), max_sources=10_000)
    capped = Guard(GuardConfig(failures=3, challenges=4), max_sources=8)
    tight = Guard(GuardConfig(failures=3, challenges=4), max_sources=room)
    t = 0.0
    for n, (who, kind, dt) in enumerate(steps):
        t += dt
        ip = f"198.51.100.{who + 1}"
        e = (crf(ip, n, session=f"s{n % 3}") if kind == 0 else
             ev("InvalidAccountID", ip, SessionID=f"s{n % 3}", AccountID="100") if kind == 1 else
             ev("ChallengeSent", ip, SessionID=f"c{n}", Challenge="x") if kind == 2 else
             ev("SuccessfulAuth", ip, SessionID=f"c{n - 1}", AccountID="1001", UsingPassword="1"))
        assert capped.observe(e, t) == exact.observe(e, t)
        tight.observe(e, t)
        assert tight.tracked <= room
