"""The refresher's decisions, with a scripted resolver, a recording backend and a
settable clock: TTL bounds, backoff, stale handling, the address limit, and that
an answer changes only its own entry's elements."""

from __future__ import annotations

import asyncio
import ipaddress
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fakes import MemoryKernel

from tm4.core import notify
from tm4.core.config import parse_config
from tm4.core.errors import ConfigError, NotFoundError
from tm4.core.model import IPNetwork, utcnow
from tm4.dns.lookup import DnsSettings, Lookup, _Family, combine, parse_nameserver
from tm4.dns.refresher import NameResult, Refresher
from tm4.ops.engine import Core


def nets(*texts: str) -> tuple[IPNetwork, ...]:
    return tuple(ipaddress.ip_network(t) for t in texts)


class ScriptedResolver:
    """name -> Lookup factory; counts calls; optional delay per lookup."""

    def __init__(self, delay: float = 0.0):
        self.answers: dict[str, Callable[[str], Lookup]] = {}
        self.calls: list[str] = []
        self.delay = delay

    def ok(self, fqdn: str, *addrs: str, ttl: int = 300) -> None:
        v4 = tuple(n for n in nets(*addrs) if n.version == 4)
        v6 = tuple(n for n in nets(*addrs) if n.version == 6)
        self.answers[fqdn] = lambda f: Lookup(f, v4, v6, ttl)

    def fail(self, fqdn: str, error: str = "NXDOMAIN (the name does not exist)") -> None:
        self.answers[fqdn] = lambda f: Lookup(f, None, None, error=error)

    async def lookup(self, fqdn: str) -> Lookup:
        self.calls.append(fqdn)
        if self.delay:
            await asyncio.sleep(self.delay)
        return self.answers[fqdn](fqdn)


class Clock:
    def __init__(self) -> None:
        self.now = utcnow()

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def env(tmp_path: Path) -> Any:
    class Env:
        clock = Clock()
        backend = MemoryKernel()
        core = Core(parse_config({"state_dir": str(tmp_path / "state")}), backend=backend,
                    clock=clock, protect=[])
        resolver = ScriptedResolver()
        mono = [1000.0]

        def refresher(self, **kw: Any) -> Refresher:
            return Refresher(self.core, resolver=self.resolver, monotonic=lambda: self.mono[0], **kw)

    return Env()


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def by_entry(results: list[NameResult]) -> dict[tuple[str, str], NameResult]:
    return {(r.entry, r.fqdn): r for r in results}


# -- settings ------------------------------------------------------------------

def test_refresh_follows_ttl_within_min_and_max() -> None:
    s = DnsSettings(refresh_min=60, refresh_max=600)
    assert s.next_delay(True, 5, 0) == 60
    assert s.next_delay(True, 300, 0) == 300
    assert s.next_delay(True, 86400, 0) == 600


def test_failures_back_off_up_to_refresh_max() -> None:
    s = DnsSettings(refresh_min=60, refresh_max=600)
    assert [s.next_delay(False, 0, n) for n in range(1, 8)] == [15, 30, 60, 120, 240, 480, 600]


def test_settings_from_config_and_nameservers() -> None:
    cfg = parse_config({"dns": {"nameservers": ["192.0.2.53", "127.0.0.1:5300", "[2001:db8::53]:54",
                                                "2001:db8::1"], "refresh_min": "10s", "timeout": "2s"}})
    s = DnsSettings.from_config(cfg.dns)
    assert s.nameservers == (("192.0.2.53", 53), ("127.0.0.1", 5300), ("2001:db8::53", 54), ("2001:db8::1", 53))
    assert (s.refresh_min, s.refresh_max, s.timeout, s.max_addresses) == (10, 600, 2, 16)
    assert s.stale_after == timedelta(days=7)
    for bad in ("ns.example.com", "192.0.2.1:0", "[2001:db8::1", "192.0.2.1:x"):
        with pytest.raises(ConfigError):
            parse_nameserver(bad)
    with pytest.raises(ConfigError):
        DnsSettings.from_config(parse_config({"dns": {"refresh_min": "1h", "refresh_max": "1m"}}).dns)


# -- combining A and AAAA ----------------------------------------------------------

def test_combine_refuses_more_addresses_than_the_limit() -> None:
    many = tuple(ipaddress.ip_network(f"192.0.2.{i}/32") for i in range(1, 18))
    lk = combine("x.example.com", _Family(many, 60), _Family((), 60), max_addresses=16)
    assert not lk.ok and "17 addresses" in lk.error and lk.v4 is None and lk.v6 is None
    lk = combine("x.example.com", _Family(many[:16], 60), _Family((), 60), max_addresses=16)
    assert lk.ok and len(lk.v4 or ()) == 16


def test_combine_nodata_for_both_families_is_a_failure() -> None:
    lk = combine("x.example.com", _Family((), 30), _Family((), 30), 16)
    assert not lk.ok and "no A or AAAA" in lk.error


def test_partial_answer_updates_one_family_keeps_the_other() -> None:
    lk = combine("x.example.com", _Family(nets("192.0.2.20/32"), 60), _Family(None, error="timeout"), 16)
    assert not lk.ok
    merged = lk.merge(nets("192.0.2.10/32", "2001:db8::10/128"))
    assert merged == nets("192.0.2.20/32", "2001:db8::10/128")
    assert lk.merge(nets("192.0.2.10/32", "2001:db8::10/128"), drop_failed=True) == nets("192.0.2.20/32")


# -- the refresher against a store --------------------------------------------------

def test_changed_answer_changes_only_that_entry_with_audit(env: Any) -> None:
    env.core.allow("office", ["office.example.com"], ["sip-udp"])
    env.core.allow("trunk", ["192.0.2.50", "trunk.example.net"], ["sip-udp"])
    env.resolver.ok("office.example.com", "192.0.2.10")
    env.resolver.ok("trunk.example.net", "198.51.100.7")
    r = env.refresher()
    first = by_entry(run(r.refresh()))
    assert first["office", "office.example.com"].status == "changed"
    assert first["office", "office.example.com"].after == ("192.0.2.10",)
    assert env.core.get_entry("office").networks() == list(nets("192.0.2.10/32"))

    env.backend.batches.clear()
    env.resolver.ok("office.example.com", "192.0.2.20")
    second = by_entry(run(r.refresh()))
    assert second["office", "office.example.com"].status == "changed"
    assert second["trunk", "trunk.example.net"].status == "unchanged"
    # one batch, touching only office's element
    assert len(env.backend.batches) == 1
    b = env.backend.batches[0]
    assert {k: [e.text(4) for e in v] for k, v in b.delete.items()} == {"wl4_sip_udp": ["192.0.2.10"]}
    assert {k: [e.text(4) for e in v] for k, v in b.add.items()} == {"wl4_sip_udp": ["192.0.2.20"]}
    audit = [a for a in env.core.store.audit_log(subject="office") if a.action == "resolve"]
    assert audit[-1].detail["before"] == {"office.example.com": ["192.0.2.10/32"]}
    assert audit[-1].detail["after"] == {"office.example.com": ["192.0.2.20/32"]}
    assert audit[-1].actor == "dns"


def test_failure_keeps_last_addresses_and_marks_stale(env: Any) -> None:
    env.core.allow("home", ["home.example.com"], ["sip-udp"])
    env.resolver.ok("home.example.com", "203.0.113.5", "2001:db8::5")
    r = env.refresher()
    run(r.refresh())
    env.backend.batches.clear()
    env.resolver.fail("home.example.com", "no answer within 3s")
    res = run(r.refresh("home"))[0]
    assert res.status == "failed" and res.after == ("203.0.113.5", "2001:db8::5")
    assert res.error == "no answer within 3s"
    e = env.core.get_entry("home")
    assert [str(n) for n in e.networks()] == ["203.0.113.5/32", "2001:db8::5/128"]
    assert e.stale_since == env.clock.now and e.to_json()["stale"] is True
    assert env.backend.batches == []  # nothing changed in the kernel
    # the first failure time stays while it keeps failing
    first = env.clock.now
    env.clock.now += timedelta(hours=1)
    run(r.refresh())
    assert env.core.get_entry("home").stale_since == first
    # and a good answer clears it
    env.resolver.ok("home.example.com", "203.0.113.5", "2001:db8::5")
    assert run(r.refresh())[0].status == "unchanged"
    e = env.core.get_entry("home")
    assert e.stale_since is None and e.to_json()["stale"] is False


def test_stale_limit_drops_addresses_and_tells(env: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    told: list[tuple[str, str, dict[str, Any]]] = []

    class Sink:
        def event(self, kind: str, message: str, **fields: Any) -> None:
            told.append((kind, message, fields))

    monkeypatch.setattr(notify, "_sink", Sink())
    env.core.allow("home", ["home.example.com"], ["sip-udp"])
    env.resolver.ok("home.example.com", "203.0.113.5")
    r = env.refresher()
    run(r.refresh())
    env.resolver.fail("home.example.com")
    run(r.refresh())
    env.clock.now += timedelta(days=7) - timedelta(seconds=1)
    assert run(r.refresh())[0].status == "failed"
    assert env.core.get_entry("home").networks() == list(nets("203.0.113.5/32"))
    env.clock.now += timedelta(seconds=1)
    env.backend.batches.clear()
    res = run(r.refresh())[0]
    assert res.status == "dropped" and res.before == ("203.0.113.5",) and res.after == ()
    e = env.core.get_entry("home")
    assert e.networks() == [] and e.stale_since is not None
    assert [x.text(4) for x in env.backend.batches[0].delete["wl4_sip_udp"]] == ["203.0.113.5"]
    audit = [a for a in env.core.store.audit_log(subject="home") if a.action == "resolve"][-1]
    assert "stale" in audit.detail["reason"] and audit.detail["after"] == {}
    [(kind, message, fields)] = told
    assert kind == "dns_stale" and "home.example.com" in message and "dropped" in message
    assert fields == {"entry": "home", "fqdn": "home.example.com", "dropped": ["203.0.113.5"]}
    # still failing afterwards: nothing more to drop, still stale
    assert run(r.refresh())[0].status == "failed"


def test_never_resolved_name_is_not_in_the_kernel(env: Any) -> None:
    env.core.allow("new", ["new.example.com"], ["sip-udp"])
    env.resolver.fail("new.example.com")
    res = run(env.refresher().refresh())[0]
    assert res.status == "failed" and res.after == ()
    assert env.core.get_entry("new").networks() == []
    assert env.backend.batches == []


def test_one_broken_name_does_not_stop_the_others(env: Any) -> None:
    env.core.allow("a", ["a.example.com"], ["sip-udp"])
    env.core.allow("b", ["b.example.com"], ["sip-udp"])
    env.resolver.ok("a.example.com", "192.0.2.1")

    def boom(f: str) -> Lookup:
        raise RuntimeError("resolver bug")

    env.resolver.answers["b.example.com"] = boom
    res = by_entry(run(env.refresher().refresh()))
    assert res["a", "a.example.com"].status == "changed"
    assert res["b", "b.example.com"].status == "failed" and "resolver bug" in res["b", "b.example.com"].error


def test_names_are_resolved_concurrently(env: Any) -> None:
    env.resolver.delay = 0.2
    for i in range(40):
        env.core.allow(f"n{i}", [f"n{i}.example.com"], ["sip-udp"])
        env.resolver.ok(f"n{i}.example.com", f"192.0.2.{i + 1}")
    t = time.monotonic()
    res = run(env.refresher().refresh())
    took = time.monotonic() - t
    assert len(res) == 40 and all(x.status == "changed" for x in res)
    assert took < 0.2 * 40 / 4, f"40 lookups of 0.2 s took {took:.2f} s: not concurrent"


def test_shared_name_is_resolved_once_for_every_entry(env: Any) -> None:
    env.core.allow("sip", ["pbx.example.net"], ["sip-udp"])
    env.core.allow("web", ["pbx.example.net"], ["https"])
    env.resolver.ok("pbx.example.net", "198.51.100.9")
    res = run(env.refresher().refresh())
    assert env.resolver.calls == ["pbx.example.net"]
    assert sorted(r.entry for r in res) == ["sip", "web"]
    assert env.core.get_entry("web").networks() == list(nets("198.51.100.9/32"))


def test_expired_entries_are_not_resolved_and_unknown_name_raises(env: Any) -> None:
    env.core.allow("old", ["old.example.com"], ["sip-udp"], ttl=timedelta(minutes=1))
    env.clock.now += timedelta(minutes=2)
    assert run(env.refresher().refresh()) == []
    assert env.resolver.calls == []
    with pytest.raises(NotFoundError):
        run(env.refresher().refresh("nosuch"))


def test_refresh_by_dns_name_too(env: Any) -> None:
    env.core.allow("office", ["office.example.com"], ["sip-udp"])
    env.core.allow("other", ["other.example.com"], ["sip-udp"])
    env.resolver.ok("office.example.com", "192.0.2.10")
    res = run(env.refresher().refresh("OFFICE.example.com."))
    assert [r.entry for r in res] == ["office"] and env.resolver.calls == ["office.example.com"]


def test_on_change_hook_runs_only_when_addresses_change(env: Any) -> None:
    env.core.allow("office", ["office.example.com"], ["sip-udp"])
    env.resolver.ok("office.example.com", "192.0.2.10")
    seen: list[int] = []

    async def hook(results: list[NameResult]) -> None:
        seen.append(len(results))

    r = env.refresher(on_change=hook)
    run(r.refresh())
    run(r.refresh())
    assert seen == [1]


def test_tick_resolves_each_name_when_its_ttl_runs_out(env: Any) -> None:
    s = DnsSettings(refresh_min=60, refresh_max=600)
    env.core.allow("short", ["short.example.com"], ["sip-udp"])
    env.core.allow("long", ["long.example.com"], ["sip-udp"])
    env.core.allow("bad", ["bad.example.com"], ["sip-udp"])
    env.resolver.ok("short.example.com", "192.0.2.1", ttl=90)
    env.resolver.ok("long.example.com", "192.0.2.2", ttl=3600)
    env.resolver.fail("bad.example.com")
    r = env.refresher(settings=s)

    async def at(t: float) -> list[str]:
        env.mono[0] = 1000.0 + t
        env.resolver.calls.clear()
        await r.tick()
        return sorted(env.resolver.calls)

    async def scenario() -> list[list[str]]:
        return [await at(t) for t in (0, 14, 15.6, 44, 46, 89, 90, 600)]

    assert run(scenario()) == [
        ["bad.example.com", "long.example.com", "short.example.com"],  # start: everything
        [],  # nothing due yet
        ["bad.example.com"],  # first retry after refresh_min / 4 = 15 s
        [],  # second retry 30 s later, at 45.6
        ["bad.example.com"],
        [],  # short's TTL of 90 s is not over yet
        ["short.example.com"],
        # long's TTL of 3600 s is capped at refresh_max (600 s); bad (3rd retry, 60 s) and
        # short (90 s) are due again too
        ["bad.example.com", "long.example.com", "short.example.com"],
    ]


def test_new_entries_are_picked_up_and_removed_ones_forgotten(env: Any) -> None:
    env.core.allow("a", ["a.example.com"], ["sip-udp"])
    env.resolver.ok("a.example.com", "192.0.2.1")
    env.resolver.ok("b.example.com", "192.0.2.2")
    r = env.refresher()

    async def scenario() -> None:
        await r.tick()
        env.core.allow("b", ["b.example.com"], ["sip-udp"])
        env.core.revoke("a")
        env.resolver.calls.clear()
        await r.tick()

    run(scenario())
    assert env.resolver.calls == ["b.example.com"]
    assert set(r.schedule.due) == {"b.example.com"}


def test_entries_changed_while_resolving_are_applied_as_they_are_now(env: Any) -> None:
    env.core.allow("gone", ["gone.example.com"], ["sip-udp"])
    env.core.allow("moved", ["old.example.com"], ["sip-udp"])
    env.core.allow("stays", ["stays.example.com"], ["sip-udp"])
    env.resolver.ok("stays.example.com", "192.0.2.3")
    env.resolver.ok("old.example.com", "192.0.2.2")

    def revoke_meanwhile(f: str) -> Lookup:
        env.core.revoke("gone")  # the admin acts while the answers are on their way
        env.core.allow("moved", ["198.51.100.2"], ["sip-udp"], replace=True)
        return Lookup(f, nets("192.0.2.1/32"), (), 60)

    env.resolver.answers["gone.example.com"] = revoke_meanwhile
    res = run(env.refresher().refresh())
    assert [(r.entry, r.status) for r in res] == [("stays", "changed")]
    assert env.core.get_entry("moved").networks() == list(nets("198.51.100.2/32"))
    assert env.core.store.get_entry("gone") is None
