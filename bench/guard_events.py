"""Guard benchmark 1: security events per second through AMI parsing + the policy, one core.

The stream is built from the captures' event shapes (tests/amisim.py renders them
byte for byte as Asterisk 22 does): password guessing from 698 IPv4 addresses and
1,000 IPv6 /64s (rotating addresses inside them) (InvalidAccountID x2 + ChallengeSent +
ChallengeResponseFailed per attempt, or ChallengeSent + ChallengeResponseFailed),
mixed with phones registering (ChallengeSent + SuccessfulAuth). The bytes are fed
in 64 KiB reads, as a socket would deliver them. Target (issue 3): >= 50,000 events/s.
"""

from __future__ import annotations

import ipaddress
import os
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from amisim import address, event_tv, render_event  # noqa: E402

from tm4.asterisk.events import FrameParser, to_security_event  # noqa: E402
from tm4.core.config import GuardConfig  # noqa: E402
from tm4.core.model import IPNetwork  # noqa: E402
from tm4.guard.policy import Guard  # noqa: E402

N_ATTEMPTS = 60_000
READ = 64 * 1024


def build_stream(seed: int = 4) -> tuple[bytes, int]:
    rnd = random.Random(seed)
    v4 = [f"203.0.113.{i}" for i in range(1, 255)]
    v4 += [f"198.51.100.{i}" for i in range(1, 192)]  # .192/26: the whitelisted phones
    v4 += [f"192.0.2.{i}" for i in range(2, 255)]
    sources = [(ip, p) for ip in v4 for p in range(5060, 5060 + 6)]
    v6 = [(f"2001:db8:{i:x}:7::{rnd.randrange(1, 65535):x}", 5060) for i in range(1000)]
    phones = [(f"198.51.100.{i}", 5060) for i in range(200, 255)]
    tv = event_tv()
    frames: list[bytes] = []
    n_events = 0
    local = address("192.0.2.1", 5060)
    for i in range(N_ATTEMPTS):
        r = rnd.random()
        if r < 0.1:
            ip, port = phones[i % len(phones)]
            sid = f"{i}-reg@{ip}"
            remote = address(ip, port)
            frames.append(render_event("ChallengeSent", EventTV=tv, AccountID="1001", SessionID=sid,
                                       LocalAddress=local, RemoteAddress=remote, Challenge=""))
            frames.append(render_event("SuccessfulAuth", EventTV=tv, AccountID="1001", SessionID=sid,
                                       LocalAddress=local, RemoteAddress=remote, UsingPassword="1"))
            n_events += 2
            continue
        ip, port = (v6 if r < 0.25 else sources)[rnd.randrange(len(v6) if r < 0.25 else len(sources))]
        if ":" in ip:  # rotate inside the /64
            ip = ip.rsplit(":", 1)[0] + f":{rnd.randrange(1, 65535):x}"
        remote = address(ip, port)
        sid = f"{i}-{rnd.randrange(1 << 30)}@{ip}"
        chal = f"1795236590/{rnd.getrandbits(128):032x}"
        resp = f"{rnd.getrandbits(128):032x}"
        if r < 0.6:  # unknown user: the 4-event pattern of the capture
            frames.append(render_event("InvalidAccountID", EventTV=tv, AccountID="admin", SessionID=sid,
                                       LocalAddress=local, RemoteAddress=remote))
            frames.append(render_event("ChallengeSent", EventTV=tv, SessionID=sid, LocalAddress=local,
                                       RemoteAddress=remote, Challenge=""))
            frames.append(render_event("InvalidAccountID", EventTV=tv, AccountID="admin", SessionID=sid,
                                       LocalAddress=local, RemoteAddress=remote))
            n_events += 3
        else:  # wrong password for a real endpoint
            frames.append(render_event("ChallengeSent", EventTV=tv, AccountID="1001", SessionID=sid,
                                       LocalAddress=local, RemoteAddress=remote, Challenge=""))
            n_events += 1
        frames.append(render_event("ChallengeResponseFailed", EventTV=tv, AccountID="1001", SessionID=sid,
                                   LocalAddress=local, RemoteAddress=remote, Challenge=chal, Response=resp,
                                   ExpectedResponse=""))
        n_events += 1
    return b"Asterisk Call Manager/11.0.0\r\n" + b"".join(frames), n_events


def protected_factory() -> object:
    wl = [ipaddress.ip_network("198.51.100.192/26"), ipaddress.ip_network("127.0.0.0/8"),
          ipaddress.ip_network("192.0.2.1/32")]

    def protected(net: IPNetwork) -> bool:
        return any(n.version == net.version and n.overlaps(net) for n in wl)  # type: ignore[arg-type]
    return protected


def run(data: bytes, with_policy: bool = True) -> tuple[float, int, int]:
    parser = FrameParser()
    guard = Guard(GuardConfig(), protected=protected_factory(), offences=lambda a: 0)  # type: ignore[arg-type]
    observe = guard.observe
    n = 0
    bans = 0
    t = 0.0
    start = time.perf_counter()
    for off in range(0, len(data), READ):
        t += 0.001  # receive time: one read per millisecond
        for frame in parser.feed(data[off:off + READ]):
            ev = to_security_event(frame)
            if ev is None:
                continue
            n += 1
            if with_policy:
                for _ in observe(ev, t):
                    bans += 1
    return time.perf_counter() - start, n, bans


def main() -> None:
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # one core
    data, n_events = build_stream()
    run(data[: len(data) // 10])  # warm-up
    best_parse = min(run(data, with_policy=False)[0] for _ in range(3))
    results = [run(data) for _ in range(3)]
    took, n, bans = min(results)
    assert n == n_events, (n, n_events)
    print(f"guard events: {n:,} security events ({len(data) / 1e6:.1f} MB of AMI) from 698 IPv4 "
          "attackers, 1,000 IPv6 /64s and 55 phones")
    print(f"guard events: parse only      {n / best_parse:12,.0f} events/s")
    print(f"guard events: parse + policy  {n / took:12,.0f} events/s  (target >= 50,000)  "
          f"{bans} ban decisions")
    print(f"guard events: policy alone    {n / (took - best_parse):12,.0f} events/s  "
          f"({(took - best_parse) / n * 1e6:.2f} us/event)")


if __name__ == "__main__":
    main()
