"""The guard wired to the core and its SQLite store (kernel stand-in; e2e tests use nftables)."""

from __future__ import annotations

import ipaddress
from datetime import timedelta
from pathlib import Path

from amisim import address, render_event
from fakes import MemoryKernel

from tm4.asterisk.events import FrameParser, SecurityEvent, to_security_event
from tm4.core.config import parse_config
from tm4.core.model import Origin
from tm4.guard.policy import BanDecision, PromoteDecision, RevokeDecision
from tm4.guard.runtime import GuardRuntime
from tm4.ops.engine import Core

OWN = ipaddress.ip_address("192.0.2.1")


def ev(event: str, ip: str, n: int = 0, **values: str) -> SecurityEvent:
    values.setdefault("SessionID", f"{ip}-{n}")
    raw = render_event(event, RemoteAddress=address(ip, 5060), LocalAddress=address("192.0.2.1", 5060), **values)
    e = to_security_event(FrameParser().feed(raw)[0])
    assert e is not None
    return e


def crf(ip: str, n: int) -> SecurityEvent:
    return ev("ChallengeResponseFailed", ip, n, AccountID="1001", Challenge=f"1/{n}", Response=f"r{n}",
              ExpectedResponse="")


def runtime(tmp: Path, *, ssh: list[str] | None = None, **guard: object) -> GuardRuntime:
    cfg = parse_config({"state_dir": str(tmp), "guard": guard})
    core = Core(cfg, backend=MemoryKernel(), protect=[ipaddress.ip_network(a) for a in ssh or []])  # type: ignore[arg-type]
    return GuardRuntime(core, own={OWN})


def attack(rt: GuardRuntime, ip: str, n: int = 5, t0: float = 0.0) -> list[BanDecision]:
    start = len(rt.applied)
    for i in range(n):
        rt.handle(crf(ip, int(t0 * 1000) + i), t0 + i * 0.01)
    return [a.decision for a in list(rt.applied)[start:] if isinstance(a.decision, BanDecision)]


def test_escalation_survives_a_restart(tmp_path: Path) -> None:
    rt = runtime(tmp_path)
    (b1,) = attack(rt, "203.0.113.9")
    assert b1.ttl == timedelta(hours=1)
    rt.core.unblock("203.0.113.9")  # as if it had expired
    rt.core.store.close()
    rt2 = runtime(tmp_path)  # a new process: nothing in memory, only the store
    (b2,) = attack(rt2, "203.0.113.9")
    assert b2.ttl == timedelta(days=1) and b2.offences == 2
    ban = rt2.core.store.get_ban("203.0.113.9")
    assert ban is not None and ban.offences == 2 and ban.origin == Origin.GUARD
    assert ban.expires is not None and ban.expires - ban.created == timedelta(days=1)


def test_whitelist_own_and_ssh_session_are_protected_through_the_core(tmp_path: Path) -> None:
    rt = runtime(tmp_path, ssh=["198.51.100.99"])
    rt.core.allow("office", ["198.51.100.0/28"], ["sip-udp"])
    rt.core.allow("v6phone", ["2001:db8:0:7::100"], ["sip-udp"])
    for ip in ("198.51.100.5", "192.0.2.1", "198.51.100.99", "127.0.0.1"):
        assert attack(rt, ip, 50) == []
    (b,) = attack(rt, "2001:db8:0:7::5")
    assert b.network.prefixlen > 64 and ipaddress.ip_address("2001:db8:0:7::100") not in b.network
    assert not [a for a in rt.applied if a.error]
    # Learnt from the events' LocalAddress as well:
    assert ipaddress.ip_address("192.0.2.1") in rt.own


def test_promotion_is_granted_then_revoked_by_a_failure_then_the_source_can_be_banned(tmp_path: Path) -> None:
    rt = runtime(tmp_path, promote=True, promote_ttl="2h")
    rt.handle(ev("SuccessfulAuth", "198.51.100.30", AccountID="1001", UsingPassword="1"), 0.0)
    (p,) = [a.decision for a in rt.applied]
    assert isinstance(p, PromoteDecision)
    e = rt.core.get_entry(p.name)
    assert e.origin == Origin.GUARD and e.expires is not None
    assert set(e.services) == {"sip-tcp", "sip-tls", "sip-udp"}
    # A restart remembers the grant as the guard's own, so a failure still revokes it.
    rt.core.store.close()
    rt = runtime(tmp_path, promote=True, promote_ttl="2h")
    bans = attack(rt, "198.51.100.30", 5, t0=10.0)
    kinds = [type(a.decision) for a in rt.applied]
    assert kinds[0] is RevokeDecision and not [a for a in rt.applied if a.error]
    assert rt.core.store.get_entry(p.name) is None
    assert [b.address for b in bans] == ["198.51.100.30"]


def test_ami_timing_comes_from_the_config(tmp_path: Path) -> None:
    import asyncio

    cfg = parse_config({"state_dir": str(tmp_path), "ami": {"secret": "s", "ping_interval": "7s",
                                                            "ping_timeout": "2s"}})
    rt = GuardRuntime(Core(cfg, backend=MemoryKernel(), protect=[]), own={OWN})  # type: ignore[arg-type]

    async def build() -> tuple[float, float, float]:
        c = rt.make_client()
        return c.ping_interval, c.ping_timeout, c.connect_timeout

    assert asyncio.run(build()) == (7.0, 2.0, 3.0)
