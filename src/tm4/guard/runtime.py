"""The guard at work: AMI security events -> policy -> core (kernel ban sets, store).

`tm4 guard` runs this in the foreground; `tm4d` hosts the same object on its loop.
Everything here runs on the event loop's thread: the core's SQLite connection is
never shared between threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import subprocess
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tm4.asterisk.ami import AmiClient
from tm4.asterisk.events import SecurityEvent
from tm4.core.durations import parse_duration
from tm4.core.errors import ConfigError, Tm4Error
from tm4.core.model import IPAddress, IPNetwork, Origin, normalise_address
from tm4.core.services import SIP_SERVICES
from tm4.guard.policy import BanDecision, Decision, Guard, PromoteDecision, RevokeDecision
from tm4.ops.engine import Core

log = logging.getLogger("tm4.guard")

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
        self._seed_promoted()

    # -- what must never be banned -------------------------------------------------
    def protected(self, net: IPNetwork) -> bool:
        if any(net.overlaps(n) for n in _LOOPBACK + _UNSPECIFIED if n.version == net.version):
            return True
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
                         clock=self.clock, loop=asyncio.get_running_loop(),
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
        if self.client is not None:
            await self.client.close()

    async def _sweep_forever(self, every: float = 30.0) -> None:
        while True:
            await asyncio.sleep(every)
            self.guard.sweep()

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
