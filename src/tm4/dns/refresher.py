"""DNS names in the whitelist: the TTL-aware refresher.

The kernel only ever sees addresses. Every name is resolved concurrently (one
lookup: tm4.dns.lookup). What a name resolves to becomes its entry's `resolved`
addresses through `Core.set_resolved`, so a changed answer changes only that
entry's set elements, in one kernel transaction, with an audit record.

A name that fails (NXDOMAIN, SERVFAIL, timeout, no network) keeps its last
known addresses and is marked stale; it is retried with backoff, and after
`dns.stale_after` its addresses are dropped (logged, audited, and a `dns_stale`
alert through tm4.core.notify).
Nothing here can stop the rule set from loading: `Core.apply` never resolves,
it uses the stored addresses.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from tm4.core.durations import format_duration
from tm4.core.errors import NotFoundError, Tm4Error
from tm4.core.model import Entry, IPNetwork, format_time, net_text, parse_time
from tm4.dns.lookup import DnsResolver, DnsSettings, Lookup, Resolver, sort_networks
from tm4.ops.engine import Core

log = logging.getLogger("tm4.dns")

STATE_KEY = "dns_state"  # store meta: per-name failure state, JSON
RESCAN = 5.0  # seconds between looks at the store for added/removed names


# -- results --------------------------------------------------------------------

@dataclass(frozen=True)
class NameResult:
    """What one refresh did to one name of one entry."""

    entry: str
    fqdn: str
    status: str  # "changed", "unchanged", "failed" (kept), "dropped" (stale limit)
    before: tuple[str, ...]
    after: tuple[str, ...]
    ttl: int = 0
    error: str = ""
    stale_since: datetime | None = None
    next_refresh: float | None = None

    @property
    def changed(self) -> bool:
        return self.before != self.after

    def to_json(self) -> dict[str, Any]:
        return {
            "entry": self.entry, "fqdn": self.fqdn, "status": self.status,
            "before": list(self.before), "after": list(self.after), "changed": self.changed,
            "ttl": self.ttl, "error": self.error or None, "stale_since": format_time(self.stale_since),
            "next_refresh": self.next_refresh,
        }


@dataclass
class _NameState:
    failing_since: datetime | None = None
    failures: int = 0
    error: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"failing_since": format_time(self.failing_since), "failures": self.failures,
                "error": self.error}


def _load_state(core: Core) -> dict[str, _NameState]:
    try:
        raw = json.loads(core.store.get_meta(STATE_KEY) or "{}")
    except ValueError:
        raw = {}
    out: dict[str, _NameState] = {}
    for name, v in raw.items() if isinstance(raw, dict) else ():
        with contextlib.suppress(TypeError, ValueError, AttributeError):
            out[name] = _NameState(parse_time(v.get("failing_since")), int(v.get("failures", 0)),
                                   str(v.get("error", "")))
    return out


OnChange = Callable[[list[NameResult]], Awaitable[Any] | Any]


# -- the refresher --------------------------------------------------------------

@dataclass
class _Schedule:
    due: dict[str, float] = field(default_factory=dict)  # fqdn -> monotonic time
    failures: dict[str, int] = field(default_factory=dict)


class Refresher:
    """Keeps every DNS source's addresses current.

    `await refresh()` resolves now (all names, or one entry's); `await run_forever()`
    re-resolves each name when its answer expires. `on_change` is called (and awaited
    if it returns an awaitable) after a batch that changed addresses: the daemon
    passes the Asterisk ACL sync there.
    """

    def __init__(
        self,
        core: Core,
        *,
        resolver: Resolver | None = None,
        settings: DnsSettings | None = None,
        on_change: OnChange | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        rescan: float = RESCAN,
    ):
        self.core = core
        self.settings = settings or DnsSettings.from_config(core.config.dns)
        self.resolver: Resolver = resolver or DnsResolver(self.settings)
        self.on_change = on_change
        self.monotonic = monotonic
        self.rescan = rescan
        self.schedule = _Schedule()
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()

    # -- public -----------------------------------------------------------------
    async def refresh(self, name: str | None = None) -> list[NameResult]:
        """Resolve now. `name` is an entry name (or one of the DNS names it holds);
        None: every DNS name in the whitelist."""
        entries = self._active_entries()
        if name is None:
            fqdns = sorted(_names_of(entries))
        else:
            picked = [e for e in entries if e.name == name] or [
                e for e in entries if any(s.fqdn == name.lower().rstrip(".") for s in e.sources)
            ]
            if not picked:
                raise NotFoundError(f"no active entry named {name!r} (nor one holding that DNS name)")
            fqdns = sorted(_names_of(picked))
        results = await self._refresh(fqdns, entries, prune=name is None)
        await self._notify(results)
        return results

    async def run_forever(self) -> None:
        """Refresh each name when its TTL runs out. Never returns; cancel it to stop."""
        while True:
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception:  # a bug here must not stop the refresher for good
                log.exception("DNS refresh round failed")
            await self._sleep()

    def wake(self) -> None:
        """Look at the store now (an entry with a DNS name was added)."""
        self._wake.set()

    async def tick(self) -> list[NameResult]:
        """One round of run_forever: resolve the names that are due."""
        entries = self._active_entries()
        names = _names_of(entries)
        now = self.monotonic()
        due = self.schedule.due
        for gone in set(due) - names:
            due.pop(gone, None)
            self.schedule.failures.pop(gone, None)
        for new in names - set(due):
            due[new] = now
        # Names due within the next half second go in this batch too.
        ready = sorted(n for n, t in due.items() if t <= now + 0.5)
        if not ready:
            return []
        results = await self._refresh(ready, entries, prune=False)
        await self._notify(results)
        return results

    # -- internals --------------------------------------------------------------
    def _active_entries(self) -> list[Entry]:
        now = self.core.clock()
        return [e for e in self.core.entries() if not e.is_expired(now)]

    async def _sleep(self) -> None:
        now = self.monotonic()
        nxt = min(self.schedule.due.values(), default=now + self.rescan)
        delay = max(0.05, min(nxt - now, self.rescan))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), delay)
        self._wake.clear()

    async def _notify(self, results: list[NameResult]) -> None:
        if self.on_change is None or not any(r.changed for r in results):
            return
        try:
            out = self.on_change(results)
            if asyncio.iscoroutine(out) or isinstance(out, asyncio.Future):
                await out
        except Exception:
            log.exception("DNS change hook failed")

    async def _refresh(self, fqdns: Sequence[str], entries: list[Entry], *, prune: bool) -> list[NameResult]:
        if not fqdns:
            return []
        lookups = await asyncio.gather(*(self._safe_lookup(f) for f in fqdns))
        async with self._lock:
            return await self._apply({lk.fqdn: lk for lk in lookups}, entries, prune=prune)

    async def _safe_lookup(self, fqdn: str) -> Lookup:
        try:
            return await self.resolver.lookup(fqdn)
        except Exception as exc:  # one name must never break the others
            log.exception("resolving %s failed unexpectedly", fqdn)
            return Lookup(fqdn, None, None, error=f"internal error: {exc}")

    async def _apply(self, lookups: dict[str, Lookup], entries: list[Entry], *,
                     prune: bool) -> list[NameResult]:
        """Write the answers: per entry one set_resolved (one kernel transaction).
        Yields to the event loop between entries, so that a thousand changed answers
        never hold up the guard."""
        core = self.core
        now = core.clock()
        results: list[NameResult] = []
        with core.store.transaction():
            state = _load_state(core)
            for fqdn, lk in lookups.items():
                st = state.setdefault(fqdn, _NameState())
                if lk.ok:
                    state[fqdn] = _NameState()
                else:
                    st.failing_since = st.failing_since or now
                    st.failures += 1
                    st.error = lk.error
                    log.warning("DNS name %s: %s", fqdn, lk.error)
            if prune:
                live = _names_of(entries)
                state = {k: v for k, v in state.items() if k in live}
            core.store.set_meta(STATE_KEY, json.dumps({k: v.to_json() for k, v in sorted(state.items())}))
        for fqdn, lk in lookups.items():
            self._reschedule(fqdn, lk)
        for i, snap in enumerate(entries):
            if not any(s.fqdn in lookups for s in snap.sources if s.fqdn):
                continue
            # the lookups took a while: apply to the entry as it is now
            e = core.store.get_entry(snap.name)
            if e is None or e.is_expired(now):
                continue
            mine = [s.fqdn for s in e.sources if s.fqdn and s.fqdn in lookups]
            if not mine:
                continue
            results.extend(self._apply_entry(e, mine, lookups, state, now))
            if i % 16 == 15:
                await asyncio.sleep(0)
        return results

    def _reschedule(self, fqdn: str, lk: Lookup) -> None:
        sch = self.schedule
        fails = 0 if lk.ok else sch.failures.get(fqdn, 0) + 1
        sch.failures[fqdn] = fails
        sch.due[fqdn] = self.monotonic() + self.settings.next_delay(lk.ok, lk.ttl, fails)

    def _apply_entry(self, e: Entry, mine: list[str], lookups: dict[str, Lookup],
                     state: dict[str, _NameState], now: datetime) -> list[NameResult]:
        limit = self.settings.stale_after
        resolved = dict(e.resolved)
        per: list[tuple[str, str, tuple[IPNetwork, ...], tuple[IPNetwork, ...]]] = []
        reasons: list[str] = []
        for fqdn in mine:
            lk = lookups[fqdn]
            st = state.get(fqdn, _NameState())
            old = sort_networks(e.resolved.get(fqdn, ()))
            too_old = (not lk.ok and st.failing_since is not None
                       and now - st.failing_since >= limit)
            new = lk.merge(old, drop_failed=too_old)
            status = "dropped" if too_old and new != old else (
                "failed" if not lk.ok else ("changed" if new != old else "unchanged"))
            if status == "dropped":
                _tell_admin(e.name, fqdn, format_duration(now - st.failing_since),  # type: ignore[operator]
                            lk.error, old)
                reasons.append(f"{fqdn} stale since {format_time(st.failing_since)} "
                               f"(longer than dns.stale_after): addresses dropped")
            elif new != old:
                reasons.append(f"{fqdn} answered" + (f" (partly; {lk.error})" if lk.error else ""))
            if new:
                resolved[fqdn] = new
            else:
                resolved.pop(fqdn, None)
            per.append((fqdn, status, old, new))
        fqdns = [s.fqdn for s in e.sources if s.fqdn]
        failing = [state[f].failing_since for f in fqdns if f in state and state[f].failing_since]
        stale_since = min(failing) if failing else None  # type: ignore[type-var]
        changed_addr = any(old != new for _, _, old, new in per)
        if changed_addr or stale_since != e.stale_since:
            try:
                self.core.set_resolved(e.name, resolved, stale_since, actor="dns",
                                       reason="; ".join(reasons))
            except Tm4Error as exc:
                log.error("entry %s: could not apply the DNS answer: %s", e.name, exc)
                return [NameResult(e.name, f, "failed", _texts(old), _texts(old), lookups[f].ttl,
                                   f"not applied: {exc}", stale_since) for f, _, old, _ in per]
        out: list[NameResult] = []
        for fqdn, status, old, new in per:
            lk = lookups[fqdn]
            due = self.schedule.due.get(fqdn)
            out.append(NameResult(
                e.name, fqdn, status, _texts(old), _texts(new), lk.ttl, lk.error,
                state[fqdn].failing_since if fqdn in state else None,
                None if due is None else round(max(0.0, due - self.monotonic()), 1),
            ))
        return out


def _tell_admin(entry: str, fqdn: str, age: str, error: str, old: Sequence[IPNetwork]) -> None:
    addrs = ", ".join(net_text(n) for n in old)
    msg = (f"entry {entry}: DNS name {fqdn} has failed for {age} ({error}), longer than "
           f"dns.stale_after; its addresses {addrs} are dropped")
    log.warning("%s", msg)
    try:
        from tm4.core import notify
    except ImportError:  # pragma: no cover - notify ships with tm4d
        return
    notify.alert("dns_stale", msg, entry=entry, fqdn=fqdn, dropped=[net_text(n) for n in old])


def _texts(nets: Iterable[IPNetwork]) -> tuple[str, ...]:
    return tuple(net_text(n) for n in nets)


def _names_of(entries: Iterable[Entry]) -> set[str]:
    return {s.fqdn for e in entries for s in e.sources if s.fqdn}


# -- sync entry points ------------------------------------------------------------

def refresh_now(core: Core, name: str | None = None, *, resolver: Resolver | None = None) -> list[NameResult]:
    """`tm4 refresh`: resolve now, outside any running event loop."""

    async def go() -> list[NameResult]:
        return await Refresher(core, resolver=resolver).refresh(name)

    return asyncio.run(go())
