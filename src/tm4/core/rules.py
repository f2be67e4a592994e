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
import socket
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import NamedTuple

from tm4.core.config import Config
from tm4.core.model import Ban, Entry, IPNetwork
from tm4.core.services import ALL, Service

FOREVER = datetime.max.replace(tzinfo=None)


class Element(NamedTuple):
    """One set element: [lo, hi] as integers, and when it stops (None: never).
    A NamedTuple: rendering builds 100,000 of them."""

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
    # Rules an extra puts right after the ban rules, ahead of every accept (blocklists).
    early_rules: list[str] = field(default_factory=list)

    def elements(self) -> dict[str, dict[tuple[int, int], Element]]:
        return {n: {e.key(): e for e in s.elements} for n, s in self.sets.items() if not s.dynamic}


# -- intervals -----------------------------------------------------------------

def interval(net: IPNetwork) -> tuple[int, int]:
    return int(net.network_address), int(net.broadcast_address)


def addr_text(version: int, value: int) -> str:
    # inet_ntop is ~10x faster than ipaddress for the 100,000-element sets
    if version == 4:
        return socket.inet_ntop(socket.AF_INET, value.to_bytes(4, "big"))
    return socket.inet_ntop(socket.AF_INET6, value.to_bytes(16, "big"))


def interval_text(version: int, lo: int, hi: int) -> str:
    if lo == hi:
        return addr_text(version, lo)
    size = hi - lo + 1
    if size & (size - 1) == 0 and lo % size == 0:
        bits = (32 if version == 4 else 128) - (size.bit_length() - 1)
        return f"{addr_text(version, lo)}/{bits}"
    return f"{addr_text(version, lo)}-{addr_text(version, hi)}"


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
    items = list(items)
    if all(lo == hi for lo, hi, _ in items):  # single addresses: the latest expiry wins
        latest: dict[int, datetime | None] = {}
        for lo, _, exp in items:
            latest[lo] = _later(latest[lo], exp) if lo in latest else exp
        return [Element(a, a, exp) for a, exp in sorted(latest.items())]
    out: list[Element] = []
    for c in clusters(items):
        out.extend(segment(c))
    return out


# -- set names -----------------------------------------------------------------

def wl_set(service: str, version: int, network: bool = False) -> str:
    """Whitelist set of a service: single addresses live in a hash set (`wl4_ssh`),
    networks in an interval set (`wl4n_ssh`). Hash sets keep one-element changes
    cheap: nft fetches every interval set's elements before touching any set."""
    return f"wl{version}{'n' if network else ''}_{service.replace('-', '_')}"


def ban_set(version: int, network: bool = False) -> str:
    return f"ban{version}{'n' if network else ''}"


def is_interval_set(name: str) -> bool:
    return name.split("_", 1)[0].endswith("n")


def set_family(name: str) -> int:
    return 6 if name.split("_", 1)[0].rstrip("n").endswith("6") else 4


def _is_single(net: IPNetwork) -> bool:
    return net.prefixlen == net.max_prefixlen


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
                out.setdefault(wl_set(svc, net.version, not _is_single(net)), []).append((lo, hi, e.expires))
    return out


def ban_items(bans: Iterable[Ban], now: datetime) -> dict[str, list[tuple[int, int, datetime | None]]]:
    out: dict[str, list[tuple[int, int, datetime | None]]] = {}
    for b in bans:
        if b.is_expired(now):
            continue
        lo, hi = interval(b.network)
        out.setdefault(ban_set(b.network.version, not _is_single(b.network)), []).append((lo, hi, b.expires))
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
    """Rules admitting everyone to a public service. A public SIP service is guarded by
    responsive mode: its clamp sets are declared here, its meters are `responsive_rules`."""
    from tm4.core.services import SIP_SERVICES

    sets: dict[str, NftSet] = {}
    if svc.name in SIP_SERVICES:
        from tm4.core.durations import parse_duration

        clamp = max(1, int(parse_duration(config.firewall.clamp).total_seconds()))
        for v in (4, 6):
            name = clamp_set(v)
            # Filled by the kernel; a full apply carries the clamped sources over.
            sets[name] = NftSet(name, v, dynamic=True, timeout=f"{clamp}s",
                                flags=("dynamic", "timeout"), size=65535)
    return [f"{port_match(svc)} accept"], sets


def clamp_set(version: int) -> str:
    return f"rsp{version}_clamp"


def responsive_rules(config: Config) -> list[str]:
    """Responsive mode: per-source meters for the public SIP services, in the kernel.

    An unknown source sending more than `rate_packets` packets in 10 s (a token
    bucket: burst `rate_packets`, refilled at `rate_packets`/10 s), or holding more
    than `rate_flows` flows at once (conntrack's count: a UDP flow lives 30-120 s,
    so about "new flows per minute"), lands in the clamp set for `clamp` and is
    dropped on the SIP ports until then. Whitelisted sources (for that
    service or `all`) are never metered nor clamped. These rules must run before
    `ct state established,related accept`: one UDP flow carries a whole flood.
    The meters are rule-local (`meter`), so a full apply starts them afresh
    instead of copying elements that would lose their limit state.
    IPv6 sources are metered and clamped by their /`guard.ipv6_prefix`.
    """
    from tm4.core.services import SIP_SERVICES

    fw = config.firewall
    names = [n for n in fw.public_services if n in SIP_SERVICES and n in config.services]
    if not names:
        return []
    pkts = max(1, fw.rate_packets)
    flows = max(1, fw.rate_flows)
    prefix = config.guard.ipv6_prefix
    mask = ipaddress.IPv6Address(((1 << 128) - 1) ^ ((1 << (128 - prefix)) - 1))
    out: list[str] = []
    for name in names:
        svc = config.services[name]
        pm = port_match(svc)
        tag = name.replace("-", "_")
        for v, ipf in ((4, "ip"), (6, "ip6")):
            key = f"{ipf} saddr" if v == 4 or prefix == 128 else f"ip6 saddr & {mask}"
            exempt = " ".join(f"{ipf} saddr != @{wl_set(s, v, net)}"
                              for s in (ALL, name) for net in (False, True))
            clamp = f"add @{clamp_set(v)} {{ {key} }} counter drop"
            out.append(f"{exempt} {pm} {key} @{clamp_set(v)} counter drop")
            out.append(f"{exempt} {pm} ct state new meter rsp{v}_flows_{tag} size 65535 "
                       f"{{ {key} ct count over {flows} }} {clamp}")
            out.append(f"{exempt} {pm} meter rsp{v}_pkts_{tag} size 65535 "
                       f"{{ {key} timeout 10s limit rate over {pkts * 6}/minute burst {pkts} packets }} {clamp}")
    return out


Item = tuple[int, int, datetime | None]


def state_items(entries: Iterable[Entry], bans: Iterable[Ban], now: datetime) -> dict[str, list[Item]]:
    """Set name -> raw intervals for entries and bans (the store has a faster path)."""
    return {**whitelist_items(entries, now), **ban_items(bans, now)}


def render_ruleset(
    items: Mapping[str, list[Item]],
    config: Config,
    now: datetime,
    extras: Sequence[Ruleset] = (),
) -> Ruleset:
    """The whole desired rule set from the raw intervals of every set (see
    `state_items`). `extras` (knock, ...) add sets, chains and rules that run after
    the whitelist and before the public services."""
    cat = config.services
    rs = Ruleset()
    hashed = ("timeout",)
    for v in (4, 6):
        rs.sets[ban_set(v)] = NftSet(ban_set(v), v, flags=hashed)
        rs.sets[ban_set(v, True)] = NftSet(ban_set(v, True), v)
        for name in cat:
            rs.sets[wl_set(name, v)] = NftSet(wl_set(name, v), v, flags=hashed)
            rs.sets[wl_set(name, v, True)] = NftSet(wl_set(name, v, True), v)
    for name, its in items.items():
        if name in rs.sets:  # an entry naming a service the config no longer has grants nothing
            rs.sets[name].elements = tuple(union_elements(i for i in its if i[2] is None or i[2] > now))

    r = rs.input_rules
    r.append("ip saddr @ban4 counter drop")
    r.append("ip saddr @ban4n counter drop")
    r.append("ip6 saddr @ban6 counter drop")
    r.append("ip6 saddr @ban6n counter drop")
    for extra in extras:
        r.extend(extra.early_rules)
    r.append('iif "lo" accept')
    r.extend(responsive_rules(config))  # before conntrack: a flood may ride one established flow
    r.append("ct state established,related accept")
    r.append("ct state invalid drop")
    r.extend(ICMP_RULES)
    for name in sorted(cat, key=lambda n: (n != ALL, n)):
        svc = cat[name]
        match = "" if svc.is_all else f" {port_match(svc)}"
        for v, ipf in ((4, "ip"), (6, "ip6")):
            for net in (False, True):
                r.append(f"{ipf} saddr @{wl_set(name, v, net)}{match} accept")
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
