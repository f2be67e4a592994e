"""The guard at work: AMI security events -> policy -> core (kernel ban sets, store).

`tm4 guard` runs this in the foreground; `tm4d` hosts the same object on its loop.
Everything here runs on the event loop's thread: the core's SQLite connection is
never shared between threads.

Nothing is lost while the guard is logged out of AMI (an Asterisk restart, a dead
connection): on the next login it reads Asterisk's security log ([guard]
security_log) from shortly before it lost AMI, and feeds the policy each event it
did not see live, once (events seen live cancel their log lines, see
tm4.asterisk.securitylog), at the time the event happened.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import subprocess
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from tm4.asterisk import securitylog
from tm4.asterisk.ami import AmiClient
from tm4.asterisk.events import SecurityEvent, to_security_event
from tm4.core.durations import parse_duration
from tm4.core.errors import ConfigError, Tm4Error
from tm4.core.model import IPAddress, IPNetwork, Origin, never_source_reason, normalise_address
from tm4.core.services import SIP_SERVICES
from tm4.guard.policy import BanDecision, Decision, Guard, PromoteDecision, RevokeDecision
from tm4.ops.engine import Core

log = logging.getLogger("tm4.guard")

# Catch-up: read the log from this long before AMI was lost (events raised just before
# the connection died may never have reached us), and wait this long after the login
# for Asterisk to write what it raised meanwhile.
CATCHUP_MARGIN = 2.0
CATCHUP_DELAY = 0.5
# Live events remembered to cancel their log lines: long enough to cover a gap's margin.
SEEN_HORIZON = 120.0
SEEN_MAX = 200_000
# Where the previous run stopped seeing (store meta, wall time): a restarted guard catches
# up from there, at most MAX_OFFLINE back.
SEEN_UNTIL_KEY = "guard_seen_until"
MAX_OFFLINE = 24 * 3600.0

_LOOPBACK: tuple[IPNetwork, ...] = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))
_UNSPECIFIED: tuple[IPNetwork, ...] = (ipaddress.ip_network("0.0.0.0/32"), ipaddress.ip_network("::/128"))


@dataclass(frozen=True)
class Applied:
    decision: Decision
    received: float  # clock() when the deciding event's bytes arrived
    done: float  # clock() when the core returned (kernel updated)
    error: str = ""


def own_addresses(netns: str = "") -> set[IPAddress]:
    """The server's addresses (every interface), from `ip -j address`."""
    argv = ["ip", "-j", "address", "show"]
    if netns:
        argv = ["ip", "-n", netns, "-j", "address", "show"]
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=True).stdout
        data = json.loads(out or "[]")
    except (OSError, subprocess.SubprocessError, ValueError) as exc:
        log.warning("cannot list the server's own addresses (%s); relying on events' LocalAddress", exc)
        return set()
    found: set[IPAddress] = set()
    for iface in data:
        for info in iface.get("addr_info", []):
            with contextlib.suppress(ValueError, KeyError):
                found.add(normalise_address(ipaddress.ip_address(info["local"])))
    return found


class GuardRuntime:
    def __init__(
        self,
        core: Core,
        *,
        dry_run: bool = False,
        clock: Callable[[], float] = time.monotonic,
        on_decision: Callable[[Applied], object] | None = None,
        client_options: dict[str, Any] | None = None,
        own: set[IPAddress] | None = None,
        wall: Callable[[], float] = time.time,
        catchup_delay: float = CATCHUP_DELAY,
    ) -> None:
        self.core = core
        self.config = core.config
        self.dry_run = dry_run
        self.clock = clock
        self.on_decision = on_decision
        self.client_options = dict(client_options or {})
        self.own: set[IPAddress] = set(own) if own is not None else own_addresses(core.config.firewall.netns)
        self.guard = Guard(core.config.guard, protected=self.protected, offences=core.store.offences,
                           clock=clock)
        self.applied: deque[Applied] = deque(maxlen=10_000)
        self.client: AmiClient | None = None
        self.wall = wall
        self.catchup_delay = catchup_delay
        self.security_log = core.config.guard.security_log
        # (wall time, key) of live security events, and their multiset, to cancel log lines
        self._seen: deque[tuple[float, securitylog.EventKey]] = deque()
        self._seen_count: Counter[securitylog.EventKey] = Counter()
        self.gaps: deque[dict[str, Any]] = deque(maxlen=20)
        self.recovered = 0
        self._catchups: set[asyncio.Task[None]] = set()
        self._hold_seen = False  # between losing AMI and the catch-up: keep what was seen
        self._away_since: float | None = self._stored_seen_until()
        self._away_margin = 0.0  # a stored mark is exact: the previous run saw up to it
        self._seed_promoted()

    # -- what must never be banned -------------------------------------------------
    def protected(self, net: IPNetwork) -> bool:
        if any(net.overlaps(n) for n in _LOOPBACK + _UNSPECIFIED if n.version == net.version):
            return True
        if never_source_reason(net) is not None:
            return True  # multicast, broadcast...: a forged RemoteAddress; the core would refuse it
        if any(a.version == net.version and a in net for a in self.own):
            return True
        client = self.client
        if client is not None and client.local_address is not None:
            a = client.local_address
            if a.version == net.version and a in net:
                return True
        for ssh in self.core.protected_sources():
            if ssh.version == net.version and ssh.overlaps(net):  # type: ignore[arg-type]
                return True
        # The guard's own promotions do not protect: a failure revokes them first.
        return any(e.origin != Origin.GUARD for e in self.core.whitelisted(net))

    # -- events in -----------------------------------------------------------------
    def handle(self, ev: SecurityEvent, received: float) -> None:
        self._remember(ev)
        self._decide(ev, received)

    def _decide(self, ev: SecurityEvent, received: float) -> None:
        if ev.local is not None and ev.local.address not in self.own:
            self.own.add(ev.local.address)  # the address Asterisk answered on is ours
        for d in self.guard.observe(ev, received):
            self.apply(d, received)

    def apply(self, d: Decision, received: float) -> Applied:
        error = ""
        try:
            if self.dry_run:
                pass
            elif isinstance(d, BanDecision):
                self.core.block(
                    d.network, ttl=d.ttl, reason=d.reason, origin=Origin.GUARD,  # type: ignore[arg-type]
                    actor=f"ami:{d.event.value} x{d.count}", offences=d.offences,
                )
                log.warning("banned %s for %s: %s", d.address, d.ttl, d.reason)
            elif isinstance(d, PromoteDecision):
                services = [s for s in SIP_SERVICES if s in self.config.services]
                self.core.allow(
                    d.name, [str(d.address)], services, ttl=d.ttl, origin=Origin.GUARD,
                    actor=f"ami:SuccessfulAuth {d.account}", replace=True,
                    note=f"promoted: password authentication as {d.account}",
                )
                log.info("promoted %s (%s) to a %s SIP grant", d.address, d.account, d.ttl)
            elif isinstance(d, RevokeDecision):
                try:
                    self.core.revoke(d.name, origin=Origin.GUARD, actor=f"ami:{d.event.value}")
                    log.warning("revoked promotion %s: %s failed again (%s)", d.name, d.address, d.event)
                except Tm4Error as exc:
                    log.info("promotion %s already gone: %s", d.name, exc)
        except Tm4Error as exc:
            error = str(exc)
            log.error("guard could not apply %s: %s", type(d).__name__, exc)
        rec = Applied(d, received, self.clock(), error)
        self.applied.append(rec)
        if self.on_decision is not None:
            try:
                self.on_decision(rec)
            except Exception:  # a reporting hook must not stop the guard
                log.exception("guard decision hook failed")
        return rec

    # -- catching up from the security log ----------------------------------------------
    def _remember(self, ev: SecurityEvent) -> None:
        now = self.wall()
        key = securitylog.event_key(ev.frame)
        self._seen.append((now, key))
        self._seen_count[key] += 1
        while self._seen and (len(self._seen) > SEEN_MAX
                              or (not self._hold_seen and now - self._seen[0][0] > SEEN_HORIZON)):
            _, old = self._seen.popleft()
            self._seen_count[old] -= 1
            if self._seen_count[old] <= 0:
                del self._seen_count[old]

    def _stored_seen_until(self) -> float | None:
        """The previous run was blind from when it stopped: catch up from there."""
        try:
            t = float(self.core.store.get_meta(SEEN_UNTIL_KEY) or "")
        except (ValueError, Tm4Error):
            return None
        return max(t, self.wall() - MAX_OFFLINE)

    def _save_seen_until(self) -> None:
        client = self.client
        if client is None or not client.connected or self._hold_seen:
            return  # not seeing, or a gap not yet caught up: keep the older mark
        try:
            self.core.store.set_meta(SEEN_UNTIL_KEY, f"{self.wall():.3f}")
        except Tm4Error as exc:
            log.warning("cannot record how far the guard has seen: %s", exc)

    def _logged_out(self) -> None:
        """AMI lost: the guard has been blind since the last bytes it got (a dead peer
        is noticed only when a Ping goes unanswered)."""
        self._hold_seen = bool(self.security_log)
        client, now = self.client, self.wall()
        last = client.last_frame_at if client is not None else None
        self._away_since = now if last is None else min(now, now - (self.clock() - last))
        self._away_margin = CATCHUP_MARGIN

    def _logged_in(self) -> None:
        away, self._away_since = self._away_since, None
        if away is None or not self.security_log:
            return
        now = self.wall()
        gap = {"from": away, "to": now, "seconds": round(now - away, 3),
               "recovered": None, "read": None, "error": None, "margin": self._away_margin}
        self.gaps.append(gap)
        task = asyncio.ensure_future(self._catch_up(gap))
        self._catchups.add(task)
        task.add_done_callback(self._catchups.discard)

    async def _catch_up(self, gap: dict[str, Any]) -> None:
        try:
            await self._catch_up_once(gap)
        finally:
            if not self._catchups - {asyncio.current_task()}:
                self._hold_seen = False

    async def _catch_up_once(self, gap: dict[str, Any]) -> None:
        await asyncio.sleep(self.catchup_delay)
        try:
            logged = await asyncio.to_thread(securitylog.read_since, self.security_log,
                                             gap["from"] - gap.pop("margin"))
        except OSError as exc:
            gap["error"] = f"cannot read {self.security_log}: {exc.strerror or exc}"
            log.warning("guard was away %.1f s and %s: events of that time are not counted",
                        gap["seconds"], gap["error"])
            return
        # after the login, Asterisk sends events live
        logged = [e for e in logged if e.when <= gap["to"]]
        res = securitylog.missed_events(logged, self._seen_count)
        now_wall, now = self.wall(), self.clock()
        for le in res.missed:
            ev = to_security_event(le.frame)
            if ev is None:
                continue
            self._remember(ev)
            # at the time it happened, on the policy's clock: windows stay true
            self._decide(ev, now - max(0.0, now_wall - le.when))
        self.recovered += len(res.missed)
        gap.update(recovered=len(res.missed), read=res.read)
        log.warning("guard was logged out of AMI for %.1f s; caught up from %s: %d event(s) missed, "
                    "%d already seen live", gap["seconds"], self.security_log, len(res.missed),
                    res.already_seen)

    def status(self) -> dict[str, Any]:
        """The AMI session and the gaps, for `tm4 daemon status`: `state` is "running" only
        while logged in to AMI, else "logged out" (the guard sees nothing live then)."""
        client = self.client
        ami = client.state() if client is not None else {"logged_in": False}
        gaps = [{**g, "from": _iso(g["from"]), "to": _iso(g["to"])} for g in self.gaps]
        out: dict[str, Any] = {
            "state": "running" if ami.get("logged_in") else "logged out",
            "ami": {**ami, "logged_in_since": _iso(ami.get("logged_in_since")),
                    "logged_out_since": _iso(ami.get("logged_out_since"))},
            "gaps": gaps, "recovered": self.recovered, "security_log": self.security_log or None,
        }
        out["summary"] = _summary(out)
        if not ami.get("logged_in"):
            out["error"] = f"AMI: {ami.get('last_error') or 'not connected yet'}"
        return out

    # -- running -------------------------------------------------------------------
    def make_client(self) -> AmiClient:
        ami = self.config.ami
        if not ami.secret:
            raise ConfigError("set [ami] secret (and username) in tm4.toml: the guard logs in to AMI")
        timing = {
            "ping_interval": parse_duration(ami.ping_interval).total_seconds(),
            "ping_timeout": parse_duration(ami.ping_timeout).total_seconds(),
            "connect_timeout": parse_duration(ami.connect_timeout).total_seconds(),
        }
        return AmiClient(ami.host, ami.port, ami.username, ami.secret, on_event=self.handle,
                         on_login=self._logged_in, on_logout=self._logged_out, clock=self.clock, wall=self.wall,
                         loop=asyncio.get_running_loop(),
                         **{**timing, **self.client_options})

    async def run(self) -> None:
        """Connect to AMI and guard until `close()`; reconnects by itself."""
        self.client = self.make_client()
        sweeper = asyncio.ensure_future(self._sweep_forever())
        try:
            await self.client.run()
        finally:
            sweeper.cancel()

    async def close(self) -> None:
        self._save_seen_until()
        if self.client is not None:
            await self.client.close()
        for t in list(self._catchups):
            t.cancel()

    async def _sweep_forever(self, every: float = 30.0) -> None:
        while True:
            await asyncio.sleep(every)
            self.guard.sweep()
            self._save_seen_until()

    def _seed_promoted(self) -> None:
        """Grants this guard made before a restart are still revocable by a failure."""
        now = self.core.clock()
        for e in self.core.entries():
            if e.origin != Origin.GUARD or not e.name.startswith("guard-") or e.expires is None:
                continue
            remaining = (e.expires - now).total_seconds()
            if remaining <= 0:
                continue
            for n in e.networks():
                if n.prefixlen == n.max_prefixlen:
                    self.guard.remember_promoted(n.network_address, e.name, remaining)


def _iso(t: float | None) -> str | None:
    if t is None:
        return None
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _summary(st: dict[str, Any]) -> str:
    """One line for `tm4 daemon status` and `tm4 status`."""
    ami = st["ami"]
    if ami.get("logged_in"):
        age = ami.get("last_event_age")
        text = (f"AMI logged in since {ami['logged_in_since']}"
                + (f", last event {age:.1f}s ago" if age is not None else "")
                + f", {ami.get('reconnects', 0)} reconnect(s)")
    else:
        text = (f"AMI LOGGED OUT since {ami.get('logged_out_since') or 'start'}: "
                f"{ami.get('last_error') or 'not connected yet'}")
    if st["gaps"]:
        g = st["gaps"][-1]
        got = ("catching up" if g["recovered"] is None and not g["error"]
               else g["error"] or f"{g['recovered']} event(s) caught up from the security log")
        text += f"; last gap {g['seconds']:.1f}s from {g['from']} ({got})"
    return text

