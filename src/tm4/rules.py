"""Pure rendering: (entries, bans, config, now) -> Ruleset. No I/O here.

The whitelist is one interval set per service and family, the bans one per
family. Sources overlap (an office /24 and a dial-in /32 inside it), so a set's
elements are the union of its sources, cut into non-overlapping pieces, each
piece living as long as the longest-lived source covering it. Pieces are
computed per *cluster* of overlapping sources, so one grant only ever changes
the elements of its own cluster: that is what makes incremental updates exact.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from .config import Config
from .model import Ban, Entry, IPNetwork
from .services import ALL, Service

FOREVER = datetime.max.replace(tzinfo=None)


@dataclass(frozen=True, order=True)
class Element:
    """One interval set element: [lo, hi] as integers, and when it stops (None: never)."""

    lo: int
    hi: int
    expires: datetime | None = None

    def key(self) -> tuple[int, int]:
        return self.lo, self.hi

    def text(self, version: int) -> str:
        return interval_text(version, self.lo, self.hi)


@dataclass
class NftSet:
    name: str
    version: int  # 4 or 6
    elements: tuple[Element, ...] = ()
    # Filled by the kernel (knock stages, meters): carried over on a full apply, never diffed.
    dynamic: bool = False
    timeout: str = ""  # default timeout for dynamic sets
    flags: tuple[str, ...] = ("interval", "timeout")
    size: int = 0

    @property
    def addr_type(self) -> str:
        return "ipv4_addr" if self.version == 4 else "ipv6_addr"


@dataclass
class Ruleset:
    sets: dict[str, NftSet] = field(default_factory=dict)
    input_rules: list[str] = field(default_factory=list)
    # Extra chains (name -> rules), for knock stages and similar.
    chains: dict[str, list[str]] = field(default_factory=dict)

    def elements(self) -> dict[str, dict[tuple[int, int], Element]]:
        return {n: {e.key(): e for e in s.elements} for n, s in self.sets.items() if not s.dynamic}


# -- intervals -----------------------------------------------------------------

def interval(net: IPNetwork) -> tuple[int, int]:
    return int(net.network_address), int(net.broadcast_address)


def interval_text(version: int, lo: int, hi: int) -> str:
    addr = ipaddress.IPv4Address if version == 4 else ipaddress.IPv6Address
    if lo == hi:
        return str(addr(lo))
    size = hi - lo + 1
    if size & (size - 1) == 0 and lo % size == 0:
        bits = (32 if version == 4 else 128) - (size.bit_length() - 1)
        return f"{addr(lo)}/{bits}"
    return f"{addr(lo)}-{addr(hi)}"


def _later(a: datetime | None, b: datetime | None) -> datetime | None:
    if a is None or b is None:
        return None
    return max(a, b)


def clusters(items: Iterable[tuple[int, int, datetime | None]]) -> list[list[tuple[int, int, datetime | None]]]:
    """Group intervals into clusters of (transitively) overlapping ones."""
    out: list[list[tuple[int, int, datetime | None]]] = []
    end = -1
    for it in sorted(items, key=lambda t: (t[0], t[1])):
        if out and it[0] <= end:
            out[-1].append(it)
            end = max(end, it[1])
        else:
            out.append([it])
            end = it[1]
    return out


def segment(cluster: Sequence[tuple[int, int, datetime | None]]) -> list[Element]:
    """Cut one cluster into non-overlapping pieces, each with the latest expiry covering it."""
    if len(cluster) == 1:
        lo, hi, exp = cluster[0]
        return [Element(lo, hi, exp)]
    points = sorted({lo for lo, _, _ in cluster} | {hi + 1 for _, hi, _ in cluster})
    pieces: list[Element] = []
    for a, b in zip(points, points[1:], strict=False):
        covering = [exp for lo, hi, exp in cluster if lo <= a and b - 1 <= hi]
        if not covering:
            continue
        exp: datetime | None = covering[0]
        for c in covering[1:]:
            exp = _later(exp, c)
        if pieces and pieces[-1].hi == a - 1 and pieces[-1].expires == exp:
            pieces[-1] = Element(pieces[-1].lo, b - 1, exp)
        else:
            pieces.append(Element(a, b - 1, exp))
    return pieces


def union_elements(items: Iterable[tuple[int, int, datetime | None]]) -> list[Element]:
    out: list[Element] = []
    for c in clusters(items):
        out.extend(segment(c))
    return out


# -- set names -----------------------------------------------------------------

def wl_set(service: str, version: int) -> str:
    return f"wl{version}_{service.replace('-', '_')}"


def ban_set(version: int) -> str:
    return f"ban{version}"


def whitelist_items(
    entries: Iterable[Entry], now: datetime
) -> dict[str, list[tuple[int, int, datetime | None]]]:
    """Set name -> raw intervals of the active entries (before union)."""
    out: dict[str, list[tuple[int, int, datetime | None]]] = {}
    for e in entries:
        if e.is_expired(now):
            continue
        for net in e.networks():
            lo, hi = interval(net)
            for svc in e.services:
                out.setdefault(wl_set(svc, net.version), []).append((lo, hi, e.expires))
    return out


def ban_items(bans: Iterable[Ban], now: datetime) -> dict[str, list[tuple[int, int, datetime | None]]]:
    out: dict[str, list[tuple[int, int, datetime | None]]] = {}
    for b in bans:
        if b.is_expired(now):
            continue
        lo, hi = interval(b.network)
        out.setdefault(ban_set(b.network.version), []).append((lo, hi, b.expires))
    return out


# -- rules ---------------------------------------------------------------------

def port_match(svc: Service) -> str:
    spec = svc.port_spec()
    return f"{svc.proto} dport {{ {spec} }}" if "," in spec else f"{svc.proto} dport {spec}"


ICMP_RULES = [
    "icmp type echo-request limit rate 20/second burst 50 packets accept",
    "icmp type { destination-unreachable, time-exceeded, parameter-problem } accept",
    "icmpv6 type echo-request limit rate 20/second burst 50 packets accept",
    "icmpv6 type { destination-unreachable, packet-too-big, time-exceeded, parameter-problem,"
    " nd-router-solicit, nd-router-advert, nd-neighbor-solicit, nd-neighbor-advert,"
    " mld-listener-query, mld-listener-report, mld2-listener-report } accept",
    # DHCP client replies (the server itself may use DHCP on a cloud host)
    "udp sport 67 udp dport 68 accept",
    "ip6 saddr fe80::/10 udp sport 547 udp dport 546 accept",
]


def public_rules(svc: Service, config: Config) -> tuple[list[str], dict[str, NftSet]]:
    """Rules admitting everyone to a public service. The guard's responsive mode extends this."""
    return [f"{port_match(svc)} accept"], {}


def render_ruleset(
    entries: Iterable[Entry],
    bans: Iterable[Ban],
    config: Config,
    now: datetime,
    extras: Sequence[Ruleset] = (),
) -> Ruleset:
    """The whole desired rule set. `extras` (knock, ...) add sets, chains and rules
    that run after the whitelist and before the public services."""
    cat = config.services
    rs = Ruleset()
    for v in (4, 6):
        rs.sets[ban_set(v)] = NftSet(ban_set(v), v)
        for name in cat:
            rs.sets[wl_set(name, v)] = NftSet(wl_set(name, v), v)
    for name, items in {**whitelist_items(entries, now), **ban_items(bans, now)}.items():
        if name in rs.sets:  # an entry naming a service the config no longer has grants nothing
            rs.sets[name].elements = tuple(union_elements(items))

    r = rs.input_rules
    r.append("ip saddr @ban4 counter drop")
    r.append("ip6 saddr @ban6 counter drop")
    r.append('iif "lo" accept')
    r.append("ct state established,related accept")
    r.append("ct state invalid drop")
    r.extend(ICMP_RULES)
    r.append("ip saddr @wl4_all accept")
    r.append("ip6 saddr @wl6_all accept")
    for name in sorted(cat):
        svc = cat[name]
        if svc.is_all:
            continue
        for v, ipf in ((4, "ip"), (6, "ip6")):
            r.append(f"{ipf} saddr @{wl_set(name, v)} {port_match(svc)} accept")
    for extra in extras:
        rs.sets.update(extra.sets)
        rs.chains.update(extra.chains)
        r.extend(extra.input_rules)
    rtp = config.rtp_range()
    if rtp:
        r.append(f"udp dport {rtp[0]}-{rtp[1]} accept")
    for name in config.firewall.public_services:
        rules, sets = public_rules(cat[name], config)
        r.extend(rules)
        rs.sets.update(sets)
    r.append("counter drop")
    return rs


# -- diff ----------------------------------------------------------------------

@dataclass
class SetChanges:
    """Element changes per set: what to delete and what to add, in one batch."""

    delete: dict[str, list[Element]] = field(default_factory=dict)
    add: dict[str, list[Element]] = field(default_factory=dict)
    versions: dict[str, int] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return any(self.delete.values()) or any(self.add.values())

    def count(self) -> int:
        return sum(map(len, self.delete.values())) + sum(map(len, self.add.values()))


def diff_elements(
    old: Mapping[str, Iterable[Element]],
    new: Mapping[str, Iterable[Element]],
    versions: Mapping[str, int],
) -> SetChanges:
    """Elements to delete and add so that `old` becomes `new`. A changed expiry is a
    delete + add: re-adding an existing element would keep its old timeout."""
    ch = SetChanges()
    for name in sorted(set(old) | set(new)):
        o = set(old.get(name, ()))
        n = set(new.get(name, ()))
        if o - n:
            ch.delete[name] = sorted(o - n)
        if n - o:
            ch.add[name] = sorted(n - o)
        if o ^ n:
            ch.versions[name] = versions[name]
    return ch


def admits(
    entries: Iterable[Entry], bans: Iterable[Ban], config: Config, now: datetime,
    address: ipaddress.IPv4Address | ipaddress.IPv6Address, service: str,
) -> bool:
    """Would the rendered rule set let `address` open a new connection to `service`?"""
    for b in bans:
        if not b.is_expired(now) and address in b.network:
            return False
    if service in config.firewall.public_services:
        return True
    for e in entries:
        if e.is_expired(now) or not ({service, ALL} & set(e.services)):
            continue
        if any(address in n for n in e.networks() if n.version == address.version):
            return True
    return False
