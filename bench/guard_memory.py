"""Guard memory under a flood of distinct sources (issue 12, item 8).

An attacker holding an IPv6 /32 (or a botnet) makes every failed REGISTER come
from a new source. The pure policy is fed 1,000,000 InvalidAccountID events
(the event a scanner's REGISTER raises), each from its own /64 in
2001:db8::/32, all within one `window` (nothing goes idle, the worst case for the
cap). Amid the flood, one brute-forcer (203.0.113.77) fails `failures` - 1 times
early on, then its last try comes after 900,000 flood sources. Figures: peak RSS of the process (target ≤ 100 MB), time
per event, sources remembered, and whether the brute-forcer was banned at its
N-th failure exactly as a guard without the flood bans it.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from amisim import address, render_event  # noqa: E402

from tm4.asterisk.events import Endpoint, FrameParser, SecurityEvent, to_security_event  # noqa: E402
from tm4.core.config import GuardConfig  # noqa: E402
from tm4.guard.policy import BanDecision, Guard  # noqa: E402

FLOOD = 1_000_000
TARGET = "203.0.113.77"
RSS_TARGET_MB = 100.0


def event(name: str, ip: str, **values: str) -> SecurityEvent:
    frame = FrameParser().feed(render_event(name, Service="PJSIP", RemoteAddress=address(ip, 5060),
                                            **values))[0]
    e = to_security_event(frame)
    assert e is not None
    return e


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def brute_force(n: int, ip: str = TARGET) -> list[SecurityEvent]:
    return [event("ChallengeResponseFailed", ip, SessionID=f"bf-{i}", AccountID="1001",
                  Challenge=f"1795236590/{i:032x}", Response=f"{i:08x}" * 4, ExpectedResponse="")
            for i in range(n)]


def main() -> int:
    cfg = GuardConfig()
    base_rss = peak_rss_mb()
    template = event("InvalidAccountID", "2001:db8::1", SessionID="x", AccountID="100")
    net = int(ipaddress.IPv6Address("2001:db8::"))
    tries = brute_force(cfg.failures)
    # Its first tries 10,000 flood events apart (a source with one failure looks like
    # the flood and goes oldest first; with two or more it outranks the flood), the last
    # one after 900,000 more distinct sources.
    at = {k * 10_000: e for k, e in enumerate(tries[:-1])}
    at[FLOOD * 9 // 10] = tries[-1]
    span = 50.0  # seconds of guard time for the whole flood: inside one 60 s window
    g = Guard(cfg)
    flood_bans = 0
    target_bans: list[tuple[int, BanDecision]] = []
    samples: list[float] = []
    started = time.perf_counter()
    for i in range(FLOOD):
        t = i * span / FLOOD
        src = ipaddress.IPv6Address(net | ((i + 1) << 64) | 1)
        e = dataclasses.replace(template, remote=Endpoint(src, 5060, "UDP"), session=f"flood-{i}")
        if i % 1000 == 0:
            t0 = time.perf_counter()
            out = g.observe(e, t)
            samples.append(time.perf_counter() - t0)
        else:
            out = g.observe(e, t)
        flood_bans += sum(isinstance(d, BanDecision) for d in out)
        bf = at.get(i)
        if bf is not None:
            n = len(target_bans)
            target_bans.extend((tries.index(bf) + 1, d) for d in g.observe(bf, t)
                               if isinstance(d, BanDecision))
            assert len(target_bans) - n <= 1
    elapsed = time.perf_counter() - started
    rss = peak_rss_mb()

    # The same brute force with no flood at all: the reference decision.
    ref = Guard(cfg)
    ref_bans = [(k + 1, d) for k, e in enumerate(tries) for d in ref.observe(e, float(k))
                if isinstance(d, BanDecision)]

    same = (len(target_bans) == 1 and len(ref_bans) == 1 and target_bans[0][0] == ref_bans[0][0]
            and target_bans[0][1].network == ref_bans[0][1].network
            and target_bans[0][1].count == ref_bans[0][1].count)
    p50 = statistics.median(samples) * 1e6
    p99 = statistics.quantiles(samples, n=100)[98] * 1e6
    print(f"flood: {FLOOD:,} distinct sources (IPv6 /64s), InvalidAccountID each, within one window")
    print(f"guard max_sources = {g.max_sources:,}; remembered at the end: {g.tracked:,}")
    print(f"peak RSS: {rss:.1f} MB (before the flood {base_rss:.1f} MB)   target <= {RSS_TARGET_MB:.0f} MB")
    print(f"per event: mean {elapsed / FLOOD * 1e6:.1f} us, p50 {p50:.1f} us, p99 {p99:.1f} us "
          f"({FLOOD / elapsed:,.0f} events/s)")
    print(f"bans among the flood sources: {flood_bans} (each failed once: expected 0)")
    if target_bans:
        k, d = target_bans[0]
        print(f"brute-forcer {TARGET}: banned at failure {k} of {cfg.failures} "
              f"(without the flood: {ref_bans[0][0] if ref_bans else 'never'}): {d.reason}")
    else:
        print(f"brute-forcer {TARGET}: NOT banned (without the flood: at failure "
              f"{ref_bans[0][0] if ref_bans else 'never'})")
    ok = rss <= RSS_TARGET_MB and same and flood_bans == 0
    print("OK" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
