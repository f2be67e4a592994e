"""The guard's policy, pure: an injected clock, an injected whitelist, no sleeping."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from datetime import timedelta

from amisim import FIXTURES, address, render_event
from hypothesis import given, settings
from hypothesis import strategies as st

from tm4.asterisk.events import (
    EventType,
    FrameParser,
    SecurityEvent,
    parse_events,
    to_security_event,
)
from tm4.core.config import GuardConfig
from tm4.core.model import IPNetwork
from tm4.guard.policy import BanDecision, Guard, PromoteDecision, RevokeDecision, promote_name


def ev(event: str, ip: str, *, port: int = 5060, service: str = "PJSIP", **values: str) -> SecurityEvent:
    values.setdefault("SessionID", "call-1")
    frame = FrameParser().feed(render_event(event, Service=service, RemoteAddress=address(ip, port), **values))[0]
    e = to_security_event(frame)
    assert e is not None
    return e


def protect(*nets: str):  # noqa: ANN201 - a test helper returning the injected predicate
    parsed = [ipaddress.ip_network(n) for n in nets]

    def protected(net: IPNetwork) -> bool:
        return any(n.version == net.version and n.overlaps(net) for n in parsed)  # type: ignore[arg-type]
    return protected


def bans(decisions: Iterable[object]) -> list[BanDecision]:
    return [d for d in decisions if isinstance(d, BanDecision)]


def feed(g: Guard, events: Iterable[tuple[float, SecurityEvent]]) -> list[tuple[float, object]]:
    out = []
    for t, e in events:
        out.extend((t, d) for d in g.observe(e, t))
    return out


def crf(ip: str, n: int, session: str = "one-call-id", account: str = "1001") -> SecurityEvent:
    return ev("ChallengeResponseFailed", ip, SessionID=session, AccountID=account,
              Challenge=f"1795236590/{n:032x}", Response=f"{n:08x}" * 4, ExpectedResponse="")


def test_five_failed_attempts_in_the_window_ban_the_source() -> None:
    g = Guard(GuardConfig())
    out = [g.observe(crf("203.0.113.9", i, session=f"s{i}"), float(i)) for i in range(5)]
    assert out[:4] == [[], [], [], []]
    (b,) = bans(out[4])
    assert b.network == ipaddress.ip_network("203.0.113.9/32")
    assert b.ttl == timedelta(hours=1) and b.offences == 1 and b.count == 5
    assert b.event is EventType.CHALLENGE_RESPONSE_FAILED
    assert "ChallengeResponseFailed" in b.reason and "5 failed attempts" in b.reason and "60s" in b.reason


def test_the_window_slides() -> None:
    g = Guard(GuardConfig(failures=5, window="60s"))
    times = [0, 20, 40, 61, 75, 90, 110]  # never 5 within any 60 s
    assert feed(g, [(t, crf("203.0.113.9", i, session=f"s{i}")) for i, t in enumerate(times)]) == []
    # one more at 115: 61, 75, 90, 110, 115 are within 60 s
    assert bans(g.observe(crf("203.0.113.9", 99, session="s99"), 115.0))


def test_the_capture_counts_attempts_not_events() -> None:
    """Capture (a): unknown user x1 then x8 (each: InvalidAccountID twice + CRF), wrong
    password x3, correct password, an INVITE by an unknown user: 13 attempts from
    127.0.0.1, 20 each from 127.0.0.2 and 127.0.0.3; 3 AMI login failures."""
    g = Guard(GuardConfig(failures=1000))
    events = parse_events((FIXTURES / "ami_security_events.raw").read_bytes())
    events += parse_events((FIXTURES / "ami_failed_logins.raw").read_bytes())
    for i, e in enumerate(events):
        g.observe(e, i * 0.001)  # all well inside one second: the worst case for de-dup
    assert g.stats.attempts == 1 + 8 + 3 + 1 + 20 + 20 + 3
    failures_in_capture = sum(1 for e in events if e.is_failure)
    assert failures_in_capture > g.stats.attempts  # raw events would have over-counted


def test_digest_retry_of_one_request_is_one_attempt() -> None:
    """InvalidAccountID for the REGISTER, ChallengeSent, InvalidAccountID again for the
    retry with credentials (same SessionID, same second), ChallengeResponseFailed."""
    g = Guard(GuardConfig(failures=2))
    seq = [
        ev("InvalidAccountID", "203.0.113.9", SessionID="1-1@x", AccountID="9999"),
        ev("ChallengeSent", "203.0.113.9", SessionID="1-1@x", Challenge=""),
        ev("InvalidAccountID", "203.0.113.9", SessionID="1-1@x", AccountID="9999"),
        ev("ChallengeResponseFailed", "203.0.113.9", SessionID="1-1@x", Challenge="17/aa",
           Response="r1", ExpectedResponse=""),
    ]
    assert feed(g, [(0.001 * i, e) for i, e in enumerate(seq)]) == []
    assert g.stats.attempts == 1


def test_svcrack_one_call_id_many_passwords_counts_every_guess() -> None:
    """svcrack sends every password on ONE Call-ID: the SessionID must never collapse them."""
    g = Guard(GuardConfig())
    out = [g.observe(crf("203.0.113.9", i, session="314159"), 0.01 * i) for i in range(5)]
    assert bans(out[4]) and g.stats.attempts == 5


def test_svcrack_on_an_unknown_user_counts_every_guess_too() -> None:
    g = Guard(GuardConfig(failures=5))
    got: list[object] = []
    for i in range(5):  # one Call-ID, all within one second
        got += g.observe(ev("InvalidAccountID", "203.0.113.9", SessionID="314159", AccountID="9999"), 0.1 * i)
        got += g.observe(crf("203.0.113.9", i, session="314159", account="<unknown>"), 0.1 * i + 0.001)
    assert len(bans(got)) == 1


def test_a_replayed_identical_guess_counts_once() -> None:
    g = Guard(GuardConfig(failures=2))
    assert feed(g, [(0.0, crf("203.0.113.9", 1)), (0.5, crf("203.0.113.9", 1)), (30.0, crf("203.0.113.9", 1))]) == []


def test_ami_login_failures_count() -> None:
    g = Guard(GuardConfig(failures=3))
    out: list[object] = []
    for i in range(3):
        out += g.observe(ev("InvalidPassword", "198.51.100.50", port=40000 + i, service="AMI",
                            SessionID=hex(0x7F00 + i), AccountID="tm4"), float(i))
    assert bans(out)[0].service == "AMI"


def test_unanswered_challenges_flood_bans_answered_ones_do_not() -> None:
    g = Guard(GuardConfig(challenges=30))
    # A busy office NAT: 100 challenges, every one answered by a success.
    for i in range(100):
        assert g.observe(ev("ChallengeSent", "198.51.100.9", SessionID=f"reg-{i}", Challenge=""), i * 0.1) == []
        assert g.observe(ev("SuccessfulAuth", "198.51.100.9", SessionID=f"reg-{i}", AccountID="1001",
                            UsingPassword="1"), i * 0.1 + 0.01) == []
    # A scanner that never answers.
    out: list[object] = []
    for i in range(30):
        out += g.observe(ev("ChallengeSent", "203.0.113.77", SessionID=f"scan-{i}", Challenge=""), i * 0.1)
    (b,) = bans(out)
    assert b.rule == "challenges" and b.count == 30 and b.event is EventType.CHALLENGE_SENT
    assert "30 unanswered challenges" in b.reason


def test_ipv6_sources_are_counted_and_banned_by_their_64() -> None:
    g = Guard(GuardConfig())
    out: list[object] = []
    for i in range(5):  # rotating inside 2001:db8:0:7::/64
        out += g.observe(crf(f"2001:db8:0:7::{i + 1:x}", i, session=f"s{i}"), float(i))
    (b,) = bans(out)
    assert b.network == ipaddress.ip_network("2001:db8:0:7::/64")


def test_ipv6_ban_never_covers_a_whitelisted_source() -> None:
    g = Guard(GuardConfig(), protected=protect("2001:db8:0:7::100/128"))
    out: list[object] = []
    for i in range(5):
        out += g.observe(crf(f"2001:db8:0:7::{i + 1:x}", i, session=f"s{i}"), float(i))
    (b,) = bans(out)
    assert not b.network.overlaps(ipaddress.ip_network("2001:db8:0:7::100/128"))
    assert ipaddress.ip_address("2001:db8:0:7::5") in b.network
    assert b.network.prefixlen > 64


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1), st.integers(48, 128))
def test_property_no_ipv6_ban_overlaps_the_whitelist(attacker: int, friend: int, prefix: int) -> None:
    base = 0x20010DB8000000070000000000000000
    a, f = ipaddress.IPv6Address(base | attacker), ipaddress.IPv6Address(base | friend)
    g = Guard(GuardConfig(failures=1, ipv6_prefix=prefix), protected=protect(f"{f}/128"))
    out = bans(g.observe(crf(str(a), 1), 0.0))
    if a == f:
        assert out == []
    else:
        (b,) = out
        assert a in b.network and f not in b.network and b.network.prefixlen >= prefix


def test_whitelisted_loopback_and_own_addresses_are_never_banned_even_by_a_flood() -> None:
    calls: list[IPNetwork] = []
    inner = protect("198.51.100.20/32", "127.0.0.0/8", "192.0.2.1/32")

    def protected(net: IPNetwork) -> bool:
        calls.append(net)
        return inner(net)

    g = Guard(GuardConfig(), protected=protected)
    out: list[object] = []
    for i in range(3000):
        for ip in ("198.51.100.20", "127.0.0.1", "192.0.2.1"):
            out += g.observe(crf(ip, i, session=f"s{i}"), i * 0.01)
    assert bans(out) == []
    assert len(calls) <= 3 * 4  # checked once per 10 s per address, not per event
    # ...while an attacker in the same flood is banned (the test can fail).
    out = []
    for i in range(5):
        out += g.observe(crf("203.0.113.66", i, session=f"a{i}"), 30.0 + i * 0.01)
    assert [b.address for b in bans(out)] == ["203.0.113.66"]


def test_bans_escalate_with_the_offences_the_store_remembers() -> None:
    offences: dict[str, int] = {}
    ttls = []
    for round_ in range(4):
        g = Guard(GuardConfig(), offences=lambda a: offences.get(a, 0))  # a restart each round
        out: list[object] = []
        for i in range(5):
            out += g.observe(crf("203.0.113.9", round_ * 10 + i, session=f"r{round_}{i}"), float(i))
        (b,) = bans(out)
        ttls.append(b.ttl)
        assert b.offences == round_ + 1 and f"offence {round_ + 1}" in b.reason
        offences["203.0.113.9"] = b.offences  # what Store.put_ban records
    assert ttls == [timedelta(hours=1), timedelta(days=1), timedelta(weeks=1), timedelta(weeks=1)]


def test_events_in_flight_after_a_ban_do_not_ban_again() -> None:
    g = Guard(GuardConfig())
    out: list[object] = []
    for i in range(15):
        out += g.observe(crf("203.0.113.9", i, session=f"s{i}"), i * 0.001)
    assert len(bans(out)) == 1


def test_promote_is_off_by_default() -> None:
    g = Guard(GuardConfig())
    assert g.observe(ev("SuccessfulAuth", "198.51.100.30", AccountID="1001", UsingPassword="1"), 0.0) == []


def test_promote_grants_on_password_success_and_revokes_at_the_next_failure() -> None:
    g = Guard(GuardConfig(promote=True, promote_ttl="1h"))
    (p,) = g.observe(ev("SuccessfulAuth", "198.51.100.30", AccountID="1001", UsingPassword="1"), 0.0)
    assert isinstance(p, PromoteDecision) and p.name == promote_name(ipaddress.ip_address("198.51.100.30"))
    assert p.ttl == timedelta(hours=1)
    # re-registering a minute later does not grant again
    assert g.observe(ev("SuccessfulAuth", "198.51.100.30", AccountID="1001", UsingPassword="1"), 60.0) == []
    out = g.observe(crf("198.51.100.30", 1), 61.0)
    assert [type(d) for d in out] == [RevokeDecision] and out[0].name == p.name  # type: ignore[union-attr]
    # ...and from then on it is an ordinary source: 4 more failures ban it.
    for i in range(2, 6):
        out = g.observe(crf("198.51.100.30", i, session=f"s{i}"), 61.0 + i)
    assert bans(out)


def test_no_promotion_for_ami_no_password_or_right_after_failures() -> None:
    g = Guard(GuardConfig(promote=True))
    assert g.observe(ev("SuccessfulAuth", "198.51.100.31", service="AMI", AccountID="tm4",
                        UsingPassword="1"), 0.0) == []
    assert g.observe(ev("SuccessfulAuth", "198.51.100.31", AccountID="1001", UsingPassword="0"), 0.0) == []
    for i in range(3):
        g.observe(crf("198.51.100.32", i, session=f"s{i}"), float(i))
    assert g.observe(ev("SuccessfulAuth", "198.51.100.32", AccountID="1001", UsingPassword="1"), 5.0) == []


def test_informational_and_unwatched_services_are_ignored() -> None:
    g = Guard(GuardConfig(failures=1, challenges=1))
    assert g.observe(ev("ChallengeSent", "203.0.113.9", service="HTTP", Challenge=""), 0.0) == []
    assert g.observe(ev("InvalidAccountID", "203.0.113.9", service="HTTP", AccountID="x"), 0.0) == []
    assert g.observe(ev("SuccessfulAuth", "203.0.113.9", AccountID="1001", UsingPassword="1"), 0.0) == []


def test_memory_is_bounded() -> None:
    g = Guard(GuardConfig(), max_sources=1000)
    for i in range(5000):
        g.observe(crf(str(ipaddress.IPv4Address(0xCB007100 + i)), i, session="x"), i * 0.0001)
    assert g.tracked <= 1001
    g.sweep(1000.0)
    assert g.tracked == 0
