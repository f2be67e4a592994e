"""DNS names in the whitelist, one lookup at a time: the [dns] settings, and A + AAAA
for a name with the address limit applied.

A name is resolved on the asyncio loop (tm4.dns.client: dnspython messages, a socket
per query), both families concurrently, each query with its own timeout. A family
whose query failed is reported as such, so the caller (tm4.dns.refresher) can keep that
family's last known addresses.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Protocol

import dns.exception

from tm4.core.config import DnsConfig
from tm4.core.durations import parse_duration
from tm4.core.errors import ConfigError, ValidationError
from tm4.core.model import IPNetwork, parse_network
from tm4.dns.client import QueryFailed, Server, query, system_nameservers

CONCURRENCY = 128  # names resolved at the same time (two queries each)


# -- settings -------------------------------------------------------------------

@dataclass(frozen=True)
class DnsSettings:
    nameservers: tuple[tuple[str, int], ...] = ()
    refresh_min: float = 60.0
    refresh_max: float = 600.0
    timeout: float = 3.0
    max_addresses: int = 16
    stale_after: timedelta = timedelta(days=7)

    @classmethod
    def from_config(cls, cfg: DnsConfig) -> DnsSettings:
        try:
            lo = parse_duration(cfg.refresh_min).total_seconds()
            hi = parse_duration(cfg.refresh_max).total_seconds()
            timeout = parse_duration(cfg.timeout).total_seconds()
            stale = parse_duration(cfg.stale_after)
        except ValidationError as exc:
            raise ConfigError(f"[dns]: {exc}") from None
        if hi < lo:
            raise ConfigError(f"[dns] refresh_max ({cfg.refresh_max}) is shorter than refresh_min ({cfg.refresh_min})")
        if not 1 <= cfg.max_addresses <= 1024:
            raise ConfigError("[dns] max_addresses must be between 1 and 1024")
        return cls(tuple(parse_nameserver(s) for s in cfg.nameservers), lo, hi, timeout,
                   cfg.max_addresses, stale)

    def next_delay(self, ok: bool, ttl: int, failures: int) -> float:
        """Seconds until a name is resolved again: its TTL bounded by refresh_min and
        refresh_max; after a failure, a backoff starting at a quarter of refresh_min
        and doubling up to refresh_max."""
        if ok:
            return min(max(float(ttl), self.refresh_min), self.refresh_max)
        first = max(1.0, self.refresh_min / 4)
        return min(first * 2 ** max(0, failures - 1), self.refresh_max)


def parse_nameserver(text: str) -> tuple[str, int]:
    """'192.0.2.53', '192.0.2.53:5353', '2001:db8::53', '[2001:db8::53]:5353'."""
    raw = text.strip()
    host, port = raw, 53
    if raw.startswith("["):
        host, sep, rest = raw[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ConfigError(f"[dns] nameserver {text!r}: use [IPv6]:port")
        if rest:
            port = _port(text, rest[1:])
    elif raw.count(":") == 1:
        host, _, p = raw.partition(":")
        port = _port(text, p)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(f"[dns] nameserver {text!r} is not an IP address (optionally :port)") from None
    return host, port


def _port(text: str, p: str) -> int:
    if not p.isdigit() or not 0 < int(p) < 65536:
        raise ConfigError(f"[dns] nameserver {text!r}: bad port")
    return int(p)


# -- one lookup -----------------------------------------------------------------

@dataclass(frozen=True)
class Lookup:
    """What one name resolved to. A family is None when its query failed: the
    caller then keeps that family's last known addresses."""

    fqdn: str
    v4: tuple[IPNetwork, ...] | None
    v6: tuple[IPNetwork, ...] | None
    ttl: int = 0
    error: str = ""
    ignored: tuple[str, ...] = ()  # answers refused as addresses (multicast, ...)

    @property
    def ok(self) -> bool:
        return not self.error

    def merge(self, old: Sequence[IPNetwork], *, drop_failed: bool = False) -> tuple[IPNetwork, ...]:
        """The name's addresses after this lookup: answered families replace theirs,
        failed families keep the old ones (or lose them when `drop_failed`)."""
        out: list[IPNetwork] = []
        for version, fresh in ((4, self.v4), (6, self.v6)):
            if fresh is not None:
                out.extend(fresh)
            elif not drop_failed:
                out.extend(n for n in old if n.version == version)
        return sort_networks(out)


class Resolver(Protocol):
    async def lookup(self, fqdn: str) -> Lookup: ...


@dataclass(frozen=True)
class _Family:
    addresses: tuple[IPNetwork, ...] | None  # None: failed
    ttl: int | None = None
    error: str = ""
    nxdomain: bool = False
    ignored: tuple[str, ...] = ()


class DnsResolver:
    """A and AAAA for a name, concurrently, each query bounded by the timeout.

    Without configured nameservers it uses the system's from resolv.conf, and reads
    that file again when it changes: at boot the network (and resolv.conf) may come
    up after tm4.
    """

    def __init__(self, settings: DnsSettings, *, resolv_conf: str = "/etc/resolv.conf"):
        self.settings = settings
        self.resolv_conf = resolv_conf
        self.servers: list[Server] = list(settings.nameservers)
        self._setup_error = ""
        self._conf_stamp: tuple[int, int] | None = (-1, -1)
        self._sem = asyncio.Semaphore(CONCURRENCY)
        self._configure()

    def _stamp(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.resolv_conf)
        except OSError:
            return None
        return st.st_mtime_ns, st.st_ino

    def _configure(self) -> None:
        """Read the system's nameservers again if resolv.conf changed; a missing
        configuration is an error kept for every lookup, never an exception."""
        if self.settings.nameservers:
            return
        stamp = self._stamp()
        if stamp == self._conf_stamp:
            return
        self._conf_stamp = stamp
        try:
            self.servers = system_nameservers(self.resolv_conf)
            self._setup_error = "" if self.servers else f"no nameserver in {self.resolv_conf}"
        except (dns.exception.DNSException, OSError) as exc:
            self.servers = []
            self._setup_error = f"no usable DNS resolver configuration ({self.resolv_conf}): {exc}"

    async def lookup(self, fqdn: str) -> Lookup:
        self._configure()
        if not self.servers:
            return Lookup(fqdn, None, None, error=self._setup_error)
        async with self._sem:
            a, aaaa = await asyncio.gather(self._query(fqdn, "A"), self._query(fqdn, "AAAA"))
        return combine(fqdn, a, aaaa, self.settings.max_addresses)

    async def _query(self, fqdn: str, rdtype: str) -> _Family:
        try:
            ans = await query(self.servers, fqdn + ".", rdtype, self.settings.timeout)
        except QueryFailed as exc:
            return _Family(None, error=_short(str(exc)))
        except (dns.exception.DNSException, OSError, ValueError) as exc:
            return _Family(None, error=_short(f"{type(exc).__name__}: {exc}"))
        if ans.nxdomain:
            return _Family(None, error="NXDOMAIN (the name does not exist)", nxdomain=True)
        nets: list[IPNetwork] = []
        ignored: list[str] = []
        for addr in ans.addresses:
            try:
                nets.append(parse_network(addr))
            except ValidationError:
                ignored.append(addr)
        return _Family(tuple(sort_networks(nets)), ans.ttl, ignored=tuple(ignored))


def combine(fqdn: str, a: _Family, aaaa: _Family, max_addresses: int) -> Lookup:
    """One Lookup from the A and AAAA outcomes, with the address limit applied."""
    ignored = a.ignored + aaaa.ignored
    if a.nxdomain and aaaa.nxdomain:
        return Lookup(fqdn, None, None, error=a.error, ignored=ignored)
    errors = [f"{t}: {f.error}" for t, f in (("A", a), ("AAAA", aaaa)) if f.addresses is None]
    count = len(a.addresses or ()) + len(aaaa.addresses or ())
    if count > max_addresses:
        return Lookup(fqdn, None, None, error=(
            f"the answer holds {count} addresses, more than dns.max_addresses ({max_addresses}); refused"
        ), ignored=ignored)
    ttls = [f.ttl for f in (a, aaaa) if f.addresses and f.ttl is not None]
    if not ttls:
        ttls = [f.ttl for f in (a, aaaa) if f.addresses is not None and f.ttl is not None]
    ttl = min(ttls) if ttls else 0
    if not errors and count == 0:
        why = "no A or AAAA records" + (f" (refused: {', '.join(ignored)})" if ignored else "")
        return Lookup(fqdn, None, None, ttl, error=why, ignored=ignored)
    return Lookup(fqdn, a.addresses, aaaa.addresses, ttl, "; ".join(errors), ignored)


def _short(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def sort_networks(nets: Iterable[IPNetwork]) -> tuple[IPNetwork, ...]:
    return tuple(sorted(set(nets), key=lambda n: (n.version, int(n.network_address), n.prefixlen)))
