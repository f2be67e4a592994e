"""iptables + ipset backend, for hosts without nftables.

tm4 owns the filter-table chain `TM4-INPUT` in both families (jumped to from
position 1 of INPUT) and every ipset named `tm4-*`. The nft rule strings that
`rules.render_ruleset` produces are translated by a small pure translator:

- `render_iptables(ruleset, family)`: iptables-restore text for one family;
- `render_ipset(ruleset, now, suffix)`: `ipset restore` text building every set
  under a temporary name (`tm4~SUFFIX~NAME`).

A full apply builds the temporary sets, renames the ones that are new, loads
the chains with one `iptables-restore -n` per family, then swaps the fresh sets
with the live ones and destroys the old contents. If any step fails, what was
already done is undone: the previous rules and sets stay in force, whole.

Sets: a hash set (single addresses) becomes `hash:ip`, an interval set
`hash:net` (a range that is not a prefix is cut into prefixes; ipset has no /0,
so 0.0.0.0/0 is two /1). Every set is created with `timeout 0` so elements can
carry their own timeout; ipset caps one at 2147483 s (24.8 days), so a longer
lifetime is loaded with the cap and renewed by the next full apply.

Responsive mode translates faithfully: a `meter` with `limit rate` becomes a
`hashlimit` match (same rate, burst, idle expiry, size), one with `ct count` a
`connlimit` match (the same conntrack count), IPv6 keyed by the same prefix;
`add @clamp { KEY }` becomes `-j SET --add-set` into a `hash:ip` set with the
clamp's default timeout (and `netmask` for a masked IPv6 key), and a rule with
side effects and a verdict goes through a helper chain (`TM4-INPUT-N`). A rule
that updates sets and then returns (port-knock stages), or anything else the
translator does not know, raises TranslateError (an ApplyError) naming the nft
backend, before anything is touched.
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import itertools
import math
import os
import re
import subprocess
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import NoReturn

from ..errors import ApplyError
from ..rules import Element, NftSet, Ruleset, SetChanges, addr_text

CHAIN = "TM4-INPUT"
CHAIN_PREFIX = "TM4-"
SET_PREFIX = "tm4-"
TEMP_PREFIX = "tm4~"
MAX_TIMEOUT = 2147483  # ipset's limit for one element's timeout, in seconds
MAXELEM = 1 << 20  # room for 200,000 bans and then some; memory grows with use only
MULTIPORT_SLOTS = 15  # xt_multiport: 15 ports, a range counts as two
NEEDS_NFT = 'this needs the nft backend (firewall.backend = "nft")'

ICMP_TYPES = {
    "echo-reply": 0, "destination-unreachable": 3, "source-quench": 4, "redirect": 5,
    "echo-request": 8, "router-advertisement": 9, "router-solicitation": 10,
    "time-exceeded": 11, "parameter-problem": 12, "timestamp-request": 13,
    "timestamp-reply": 14,
}
ICMPV6_TYPES = {
    "destination-unreachable": 1, "packet-too-big": 2, "time-exceeded": 3,
    "parameter-problem": 4, "echo-request": 128, "echo-reply": 129,
    "mld-listener-query": 130, "mld-listener-report": 131, "mld-listener-done": 132,
    "mld-listener-reduction": 132, "nd-router-solicit": 133, "nd-router-advert": 134,
    "nd-neighbor-solicit": 135, "nd-neighbor-advert": 136, "nd-redirect": 137,
    "mld2-listener-report": 143,
}
CT_STATES = {"established", "related", "new", "invalid", "untracked"}
RATE_UNITS = {"second": "sec", "minute": "min", "hour": "hour", "day": "day"}
VERDICTS = {"accept": "ACCEPT", "drop": "DROP", "reject": "REJECT", "return": "RETURN"}


class TranslateError(ApplyError):
    """An nft rule tm4 rendered has no faithful iptables form."""


# -- names -----------------------------------------------------------------------

def _digest(name: str, n: int) -> str:
    return hashlib.sha1(name.encode()).hexdigest()[:n]


def ipset_name(name: str) -> str:
    """tm4's set `name` as an ipset name (ipset allows 31 characters)."""
    full = SET_PREFIX + name
    return full if len(full) <= 31 else f"{SET_PREFIX}{name[:16]}~{_digest(name, 10)}"


def temp_name(name: str, suffix: str) -> str:
    full = f"{TEMP_PREFIX}{suffix}~{name}"
    return full if len(full) <= 31 else f"{TEMP_PREFIX}{suffix}~{_digest(name, 10)}"


def chain_name(name: str) -> str:
    """An nft chain of tm4's as an iptables chain (28 characters at most)."""
    if name == "input":
        return CHAIN
    full = CHAIN_PREFIX + name
    if len(full) > 24:  # room for helper chains' "-NN"
        full = f"{CHAIN_PREFIX}{name[:11]}~{_digest(name, 8)}"
    return full


# -- elements --------------------------------------------------------------------

def prefix_intervals(lo: int, hi: int, bits: int) -> list[tuple[int, int]]:
    """[lo, hi] as the fewest CIDR blocks, none wider than /1 (ipset has no /0)."""
    out: list[tuple[int, int]] = []
    while lo <= hi:
        size = lo & -lo if lo else 1 << (bits - 1)
        size = min(size, 1 << (bits - 1))
        while size > hi - lo + 1:
            size >>= 1
        out.append((lo, lo + size - 1))
        lo += size
    return out


_addr = addr_text  # inet_ntop: 200,000 elements render in a fraction of a second


def element_texts(version: int, lo: int, hi: int) -> list[str]:
    """ipset spellings of one element: a single address, or its prefixes."""
    if lo == hi:
        return [_addr(version, lo)]
    bits = 32 if version == 4 else 128
    out: list[str] = []
    for a, b in prefix_intervals(lo, hi, bits):
        plen = bits - (b - a + 1).bit_length() + 1
        out.append(_addr(version, a) if plen == bits else f"{_addr(version, a)}/{plen}")
    return out


def _timeout_secs(expires: datetime | None, now: datetime) -> int | None:
    """Seconds left (capped at ipset's limit); None: no timeout; 0: already expired."""
    if expires is None:
        return None
    left = (expires - now).total_seconds()
    if left <= 0:
        return 0
    return min(MAX_TIMEOUT, max(1, math.ceil(left)))


def _element_lines(ipset: str, version: int, elements: Iterable[Element], now: datetime) -> Iterator[str]:
    tails: dict[datetime | None, str | None] = {None: ""}  # many elements share one expiry
    for e in elements:
        tail = tails.get(e.expires, "?")
        if tail == "?":
            t = _timeout_secs(e.expires, now)
            tail = tails[e.expires] = None if t == 0 else f" timeout {t}"
        if tail is None:  # already over
            continue
        if e.lo == e.hi:
            yield f"add {ipset} {addr_text(version, e.lo)}{tail}"
        else:
            for text in element_texts(version, e.lo, e.hi):
                yield f"add {ipset} {text}{tail}"


# -- the rule translator -----------------------------------------------------------

_TOKEN = re.compile(r'"[^"]*"|[{}(),|&]|!=|==|[^\s{}(),|&"]+')


@dataclass
class _Key:
    """`ip saddr`, `ip6 saddr & ffff:...::` as a set/hashlimit key."""

    version: int
    direction: str  # src / dst
    prefix: int  # masked prefix length (32/128: unmasked)


@dataclass
class _Rule:
    families: set[int] = field(default_factory=lambda: {4, 6})
    proto: str = ""
    # Each part is a list of alternatives (OR); the rule is the product of its parts (AND).
    parts: list[list[str]] = field(default_factory=list)
    actions: list[str] = field(default_factory=list)  # non-terminating targets (SET, LOG)
    verdict: str = ""  # "-j ACCEPT", "-j TM4-x", "" (none)
    set_refs: list[tuple[str, int]] = field(default_factory=list)  # (set, version)
    masks: dict[str, int] = field(default_factory=dict)  # set -> netmask it is keyed by


class _Parser:
    def __init__(self, rule: str, chain: str, sets: Mapping[str, NftSet], chains: Iterable[str]):
        self.text = rule
        self.chain = chain
        self.toks = _TOKEN.findall(rule)
        self.i = 0
        self.sets = sets
        self.chains = set(chains)
        self.r = _Rule()

    # token helpers
    def fail(self, why: str) -> TranslateError:
        where = "input chain" if self.chain == "input" else f"chain {self.chain}"
        return TranslateError(f"cannot express the nft rule {self.text!r} ({where}) with iptables: "
                              f"{why}; {NEEDS_NFT}")

    def peek(self, k: int = 0) -> str:
        j = self.i + k
        return self.toks[j] if j < len(self.toks) else ""

    def take(self, expect: str | None = None) -> str:
        t = self.peek()
        if not t or (expect is not None and t != expect):
            raise self.fail(f"expected {expect or 'more'} at {t or 'the end'!r}")
        self.i += 1
        return t

    def group(self) -> list[str]:
        """`{ a, b }` or one word, as a list of words (commas inside words split too)."""
        if self.peek() == "{":
            self.take("{")
            items: list[str] = []
            while self.peek() != "}":
                t = self.take()
                if t != ",":
                    items.append(t)
            self.take("}")
            return items
        items = [self.take()]
        while self.peek() == ",":  # `established,related`
            self.take(",")
            items.append(self.take())
        return items

    def family(self, fams: set[int]) -> None:
        self.r.families &= fams
        if not self.r.families:
            raise self.fail("it mixes IPv4 and IPv6 matches")

    def set_proto(self, proto: str) -> None:
        if self.r.proto and self.r.proto != proto:
            raise self.fail(f"it matches both {self.r.proto} and {proto}")
        self.r.proto = proto

    def key(self) -> _Key:
        ipf = self.take()
        if ipf not in ("ip", "ip6"):
            raise self.fail(f"unsupported key {ipf!r}")
        v = 4 if ipf == "ip" else 6
        what = self.take()
        if what not in ("saddr", "daddr"):
            raise self.fail(f"unsupported key {ipf} {what}")
        bits = 32 if v == 4 else 128
        prefix = bits
        if self.peek() == "&":
            self.take("&")
            mask = self.take()
            try:
                m = int(ipaddress.IPv4Address(mask) if v == 4 else ipaddress.IPv6Address(mask))
            except ValueError:
                raise self.fail(f"mask {mask} is not an IPv{v} address") from None
            prefix = bits - ((1 << bits) - 1 - m).bit_length()
            if m != ((1 << bits) - 1) ^ ((1 << (bits - prefix)) - 1):
                raise self.fail(f"mask {mask} is not a prefix")
        self.family({v})
        return _Key(v, "src" if what == "saddr" else "dst", prefix)

    def set_ref(self, tok: str, key: _Key) -> str:
        name = tok[1:]
        s = self.sets.get(name)
        if s is None:
            raise self.fail(f"set {name} is not declared")
        if s.version != key.version:
            raise self.fail(f"set {name} holds IPv{s.version} addresses")
        bits = 32 if key.version == 4 else 128
        if key.prefix != bits:
            if not s.dynamic:
                raise self.fail(f"masked lookups need a set the kernel fills, {name} is not one")
            if self.r.masks.get(name, key.prefix) != key.prefix:
                raise self.fail(f"set {name} is keyed by two different masks")
            self.r.masks[name] = key.prefix
        self.r.set_refs.append((name, key.version))
        return ipset_name(name)

    # statements
    def parse(self) -> _Rule:
        while self.i < len(self.toks):
            t = self.peek()
            if t in ("ip", "ip6"):
                self.addr_match()
            elif t in ("iif", "iifname", "oif", "oifname"):
                self.take()
                neg = self.take() if self.peek() == "!=" else ""
                name = self.take().strip('"')
                opt = "-i" if t.startswith("i") else "-o"
                self.r.parts.append([f"{'! ' if neg else ''}{opt} {name}"])
            elif t == "ct":
                self.take()
                self.take("state")
                neg = "! " if self.peek() == "!=" else ""
                if neg:
                    self.take()
                states = self.group()
                if not set(states) <= CT_STATES:
                    raise self.fail(f"unknown conntrack state in {states}")
                self.r.parts.append([f"-m conntrack {neg}--ctstate {','.join(s.upper() for s in states)}"])
            elif t == "meta":
                self.meta()
            elif t in ("icmp", "icmpv6"):
                self.icmp()
            elif t in ("tcp", "udp") and self.peek(1) in ("dport", "sport"):
                self.ports()
            elif t == "tcp" and self.peek(1) == "flags":
                self.tcp_flags()
            elif t == "limit":
                self.limit()
            elif t == "meter":
                self.meter()
            elif t == "counter":
                self.take()
                if self.peek() == "packets":  # `counter packets N bytes M`
                    self.i += 4
            elif t == "log":
                self.log()
            elif t in ("add", "update", "delete"):
                self.set_update()
            elif t in VERDICTS or t in ("jump", "goto"):
                self.verdict()
            else:
                raise self.fail(f"unsupported statement at {t!r}")
        return self.r

    def addr_match(self) -> None:
        key = self.key()
        neg = ""
        if self.peek() in ("!=", "=="):
            neg = "! " if self.take() == "!=" else ""
        t = self.peek()
        if t.startswith("@"):
            self.take()
            self.r.parts.append([f"-m set {neg}--match-set {self.set_ref(t, key)} {key.direction}"])
            return
        bits = 32 if key.version == 4 else 128
        if key.prefix != bits:
            raise self.fail("a masked address compared with a literal")
        addrs = self.group()
        for a in addrs:
            try:
                if ipaddress.ip_network(a, strict=False).version != key.version:
                    raise ValueError
            except ValueError:
                raise self.fail(f"{a} is not an IPv{key.version} address or network") from None
        opt = "-s" if key.direction == "src" else "-d"
        if neg:  # not any of them: every one is a separate condition
            self.r.parts.extend([[f"! {opt} {a}"] for a in addrs])
        else:
            self.r.parts.append([f"{opt} {a}" for a in addrs])

    def meta(self) -> None:
        self.take("meta")
        what = self.take()
        if what == "nfproto":
            fam = self.take()
            if fam not in ("ipv4", "ipv6"):
                raise self.fail(f"unknown nfproto {fam}")
            self.family({4 if fam == "ipv4" else 6})
        elif what == "l4proto":
            if self.peek() == "!=":
                raise self.fail("negated l4proto")
            protos = self.group()
            if len(protos) != 1:
                raise self.fail("several l4protos in one rule")
            self.set_proto(protos[0])
        else:
            raise self.fail(f"unsupported meta {what}")

    def icmp(self) -> None:
        kind = self.take()
        self.take("type")
        if self.peek() == "!=":
            raise self.fail("negated icmp type")
        names = self.group()
        table = ICMP_TYPES if kind == "icmp" else ICMPV6_TYPES
        try:
            codes = [str(int(n)) if n.isdigit() else str(table[n]) for n in names]
        except KeyError as exc:
            raise self.fail(f"unknown {kind} type {exc.args[0]}") from None
        if kind == "icmp":
            self.family({4})
            self.set_proto("icmp")
            self.r.parts.append([f"-m icmp --icmp-type {c}" for c in codes])
        else:
            self.family({6})
            self.set_proto("ipv6-icmp")
            self.r.parts.append([f"-m icmp6 --icmpv6-type {c}" for c in codes])

    def ports(self) -> None:
        proto = self.take()
        which = self.take()
        self.set_proto(proto)
        neg = ""
        if self.peek() in ("!=", "=="):
            neg = "! " if self.take() == "!=" else ""
        items = [p.replace("-", ":") for p in self.group()]
        for p in items:
            if not re.fullmatch(r"\d+(:\d+)?", p):
                raise self.fail(f"{p!r} is not a port or port range")
        if len(items) == 1:
            self.r.parts.append([f"-m {proto} {neg}--{which} {items[0]}"])
            return
        chunks: list[list[str]] = [[]]
        used = 0
        for p in items:
            cost = 2 if ":" in p else 1
            if used + cost > MULTIPORT_SLOTS:
                chunks.append([])
                used = 0
            chunks[-1].append(p)
            used += cost
        alts = [f"-m multiport {neg}--{which}s {','.join(c)}" for c in chunks]
        if neg:  # none of them: each chunk is its own condition
            self.r.parts.extend([[a] for a in alts])
        else:
            self.r.parts.append(alts)

    def tcp_flags(self) -> None:
        self.take("tcp")
        self.take("flags")
        self.take("&")
        self.take("(")
        mask: list[str] = []
        while self.peek() != ")":
            t = self.take()
            if t != "|":
                mask.append(t.upper())
        self.take(")")
        self.take("==")
        want = self.take().upper()
        known = {"FIN", "SYN", "RST", "PSH", "ACK", "URG", "ECE", "CWR"}
        if not set(mask) | {want} <= known:
            raise self.fail("unknown tcp flag")
        self.set_proto("tcp")
        self.r.parts.append([f"-m tcp --tcp-flags {','.join(mask)} {want}"])

    def rate(self) -> tuple[bool, str, int | None]:
        """`rate [over] N/unit [burst B packets]` -> (over, 'N/unit', burst)."""
        self.take("rate")
        over = self.peek() == "over"
        if over:
            self.take()
        m = re.fullmatch(r"(\d+)/(second|minute|hour|day)", self.take())
        if not m:
            raise self.fail("only packet rates per second, minute, hour or day translate")
        burst = None
        if self.peek() == "burst":
            self.take()
            burst = int(self.take())
            if self.take() != "packets":
                raise self.fail("byte bursts do not translate")
        return over, f"{m.group(1)}/{RATE_UNITS[m.group(2)]}", burst

    def limit(self) -> None:
        self.take("limit")
        over, rate, burst = self.rate()
        b = f" --limit-burst {burst}" if burst is not None else ""
        if not over:
            self.r.parts.append([f"-m limit --limit {rate}{b}"])
            return
        name = f"tm4-{_digest(self.text, 8)}"
        hb = f" --hashlimit-burst {burst}" if burst is not None else ""
        self.r.parts.append([f"-m hashlimit --hashlimit-above {rate}{hb} --hashlimit-name {name}"])

    def meter(self) -> None:
        """`meter NAME [size N] { KEY [timeout Ts] limit rate [over] R/u [burst B packets] }`."""
        self.take("meter")
        name = self.take()
        size = None
        if self.peek() == "size":
            self.take()
            size = int(self.take())
        self.take("{")
        key = self.key()
        expire = None
        if self.peek() == "timeout":
            self.take()
            m = re.fullmatch(r"(\d+)s", self.take())
            if not m:
                raise self.fail("meter timeouts must be in seconds")
            expire = int(m.group(1)) * 1000
        bits = 32 if key.version == 4 else 128
        if self.peek() == "ct":  # `ct count [over] N`: connections per key, like connlimit
            self.take("ct")
            self.take("count")
            over = self.peek() == "over"
            if over:
                self.take()
            n = self.take()
            if not n.isdigit():
                raise self.fail(f"ct count {n!r}")
            self.take("}")
            self.r.parts.append([f"-m connlimit --connlimit-{'above' if over else 'upto'} {n}"
                                 f" --connlimit-mask {key.prefix} --connlimit-{key.direction[0]}addr"])
            return
        self.take("limit")
        over, rate, burst = self.rate()
        self.take("}")
        mode = "srcip" if key.direction == "src" else "dstip"
        args = [f"-m hashlimit --hashlimit-{'above' if over else 'upto'} {rate}"]
        if burst is not None:
            args.append(f"--hashlimit-burst {burst}")
        args.append(f"--hashlimit-mode {mode}")
        if key.prefix != bits:
            args.append(f"--hashlimit-{key.direction}mask {key.prefix}")
        args.append(f"--hashlimit-name tm4-{name}")
        if size is not None:
            args.append(f"--hashlimit-htable-max {size}")
        if expire is not None:
            args.append(f"--hashlimit-htable-expire {expire}")
        self.r.parts.append([" ".join(args)])

    def log(self) -> None:
        self.take("log")
        args = ["-j LOG"]
        while self.peek() in ("prefix", "level"):
            what = self.take()
            val = self.take()
            args.append(f"--log-prefix {val}" if what == "prefix" else f"--log-level {val}")
        self.r.actions.append(" ".join(args))

    def set_update(self) -> None:
        op = self.take()
        t = self.take()
        if not t.startswith("@"):
            raise self.fail(f"{op} needs a set")
        self.take("{")
        key = self.key()
        if self.peek() != "}":
            raise self.fail(f"{op} with per-element options")
        self.take("}")
        name = self.set_ref(t, key)
        if op == "delete":
            self.r.actions.append(f"-j SET --del-set {name} {key.direction}")
        else:  # `update` refreshes an element's timeout, `add` leaves it
            tail = " --exist" if op == "update" else ""
            self.r.actions.append(f"-j SET --add-set {name} {key.direction}{tail}")

    def verdict(self) -> None:
        t = self.take()
        if t in ("jump", "goto"):
            target = self.take()
            if target not in self.chains:
                raise self.fail(f"chain {target} is not tm4's")
            self.r.verdict = f"{'-j' if t == 'jump' else '-g'} {chain_name(target)}"
        else:
            self.r.verdict = f"-j {VERDICTS[t]}"
        if self.i < len(self.toks):
            raise self.fail(f"statements after the verdict {t}")


def parse_rule(rule: str, sets: Mapping[str, NftSet], chains: Iterable[str] = (),
               chain: str = "input") -> _Rule:
    return _Parser(rule, chain, sets, chains).parse()


@dataclass
class Translation:
    """One family's chains (iptables name -> rule argument strings) and set needs."""

    chains: dict[str, list[str]]
    masks: dict[str, int]


def translate(rs: Ruleset, family: int) -> Translation:
    """The whole rule set for one family; raises TranslateError for what iptables cannot do."""
    chains: dict[str, list[str]] = {}
    masks: dict[str, int] = {}
    nft_chains = list(rs.chains)
    for nft_chain, rules in [("input", rs.input_rules), *sorted(rs.chains.items())]:
        name = chain_name(nft_chain)
        out = chains.setdefault(name, [])
        helpers = 0
        for text in rules:
            p = _Parser(text, nft_chain, rs.sets, nft_chains)
            r = p.parse()
            for s, m in r.masks.items():
                if masks.setdefault(s, m) != m:
                    raise p.fail(f"set {s} is keyed by two different masks")
            if family not in r.families:
                continue
            target = r.verdict
            if r.actions and not r.verdict and len(r.actions) == 1:
                target = r.actions[0]
            elif r.actions:
                if r.verdict.startswith("-g") or r.verdict == "-j RETURN":
                    raise p.fail("it updates sets and then leaves the chain; iptables can only "
                                 "do that through a helper chain, which changes where it returns to")
                helpers += 1
                helper = f"{name}-{helpers}"
                chains[helper] = [*r.actions, *([r.verdict] if r.verdict else [])]
                target = f"-j {helper}"
            head = [f"-p {r.proto}"] if r.proto else []
            for combo in itertools.product(*r.parts):
                out.append(" ".join([*head, *_merge_ports(list(combo)), *([target] if target else [])]))
    return Translation(chains, masks)


def _merge_ports(parts: list[str]) -> list[str]:
    """`-m udp --sport 67` + `-m udp --dport 68` -> `-m udp --sport 67 --dport 68`."""
    out: list[str] = []
    for p in parts:
        m = re.match(r"-m (tcp|udp) (--[sd]port \S+)$", p)
        if m and out and re.match(rf"-m {m.group(1)} --[sd]port \S+$", out[-1]) \
                and m.group(2).split()[0] not in out[-1]:
            out[-1] = f"{out[-1]} {m.group(2)}"
        else:
            out.append(p)
    return out


# -- iptables-restore text ------------------------------------------------------------

@dataclass
class LiveChains:
    """What one family's filter table holds of tm4's: its chains, and INPUT's rules."""

    chains: dict[str, list[str]] = field(default_factory=dict)  # TM4-* -> rule args (no -A NAME)
    input_rules: list[str] = field(default_factory=list)  # every INPUT rule, in order

    def jumps(self) -> list[int]:
        """1-based positions of INPUT rules sending packets to a TM4-* chain."""
        return [i + 1 for i, r in enumerate(self.input_rules) if _targets_tm4(r)]


def _targets_tm4(rule: str) -> bool:
    return re.search(rf"(^|\s)-[jg] {re.escape(CHAIN_PREFIX)}\S", rule) is not None


def parse_save(text: str) -> LiveChains:
    """tm4's part of `iptables-save -t filter`."""
    live = LiveChains()
    in_filter = False
    for line in text.splitlines():
        if line.startswith("*"):
            in_filter = line == "*filter"
            continue
        if not in_filter or line.startswith("#"):
            continue
        if line.startswith(":"):
            name = line[1:].split()[0]
            if name.startswith(CHAIN_PREFIX):
                live.chains.setdefault(name, [])
        elif line.startswith("-A "):
            _, chain, *rest = line.split(" ", 2)
            args = rest[0] if rest else ""
            if chain == "INPUT":
                live.input_rules.append(args)
            elif chain.startswith(CHAIN_PREFIX):
                live.chains.setdefault(chain, []).append(args)
    return live


JUMP = ((1, f"-j {CHAIN}"),)


def restore_text(chains: Mapping[str, Sequence[str]], live: LiveChains | None,
                 jumps: Sequence[tuple[int, str]] = JUMP) -> str:
    """iptables-restore -n text turning `live` into `chains`, with INPUT's rules that lead
    to tm4's chains being exactly `jumps` ((position, rule) pairs)."""
    live = live or LiveChains()
    out = ["*filter"]
    out += [f":{c} - [0:0]" for c in chains]  # declaring an existing chain flushes it
    current = _old_jumps(live)
    want = sorted(jumps)
    if current != want:
        # by rule, not number: a rule another tool inserts meanwhile cannot shift what goes
        out += [f"-D INPUT {j}" for _, j in reversed(current)]
        out += [f"-I INPUT {p} {j}" for p, j in want]
    stale = [c for c in live.chains if c not in chains]
    out += [f"-F {c}" for c in stale]
    out += [f"-X {c}" for c in stale]
    for c, rules in chains.items():
        out += [f"-A {c} {r}".rstrip() for r in rules]
    out.append("COMMIT")
    return "\n".join(out) + "\n"


def render_iptables(ruleset: Ruleset, family: int, live: LiveChains | None = None) -> str:
    """iptables-restore (-n) text loading tm4's chains for one family (4 or 6), replacing
    what `live` holds (None: a host without tm4's chains) and keeping one jump from INPUT
    at position 1. Pure."""
    return restore_text(translate(ruleset, family).chains, live)


# -- ipset restore text ----------------------------------------------------------------

@dataclass(frozen=True)
class SetSpec:
    name: str  # tm4's name (as in the Ruleset)
    ipset: str
    kind: str  # hash:ip / hash:net
    version: int
    timeout: int
    maxelem: int
    netmask: int | None = None

    def create_args(self, elements: int = 0) -> str:
        fam = "inet" if self.version == 4 else "inet6"
        # Pre-size big sets: growing a hash 200,000 elements long costs several rehashes.
        hashsize = 1024
        while hashsize < elements // 2 and hashsize < (1 << 20):
            hashsize <<= 1
        extra = f" netmask {self.netmask}" if self.netmask else ""
        return (f"{self.kind} family {fam} hashsize {hashsize} maxelem {self.maxelem}"
                f" timeout {self.timeout}{extra}")

    def header(self) -> tuple[str, str]:
        """What a live set's `ipset list -t` must show to be swapped with this one (the
        kernel swaps sets of one type and family; timeout, netmask and size may differ)."""
        return self.kind, "inet" if self.version == 4 else "inet6"


def _seconds(text: str) -> int:
    if not text:
        return 0
    from ..durations import parse_duration

    return max(0, int(parse_duration(text).total_seconds()))


def set_specs(rs: Ruleset) -> dict[str, SetSpec]:
    masks: dict[str, int] = {}
    for fam in (4, 6):
        for s, m in translate(rs, fam).masks.items():
            masks[s] = m
    out: dict[str, SetSpec] = {}
    for name, s in sorted(rs.sets.items()):
        kind = "hash:net" if "interval" in s.flags else "hash:ip"
        mask = masks.get(name)
        if mask is not None and kind != "hash:ip":
            raise TranslateError(f"set {name}: masked keys need a hash:ip set; {NEEDS_NFT}")
        out[name] = SetSpec(name, ipset_name(name), kind, s.version,
                            _seconds(s.timeout) if s.dynamic else 0,
                            s.size or MAXELEM, mask)
    return out


def render_ipset(ruleset: Ruleset, now: datetime, suffix: str,
                 carried: Mapping[str, Sequence[str]] | None = None) -> str:
    """`ipset restore` text creating every set of `ruleset` under its temporary name
    (`temp_name(name, suffix)`), with its elements and their remaining timeouts. `carried`:
    element lines ("ADDR [timeout N]") of dynamic sets, copied from the live ones. Pure."""
    carried = carried or {}
    out: list[str] = []
    for name, spec in set_specs(ruleset).items():
        s = ruleset.sets[name]
        tmp = temp_name(name, suffix)
        out.append(f"create {tmp} {spec.create_args(len(s.elements))}")
        out.extend(_element_lines(tmp, s.version, s.elements, now))
        out.extend(f"add {tmp} {e}" for e in carried.get(name, ()))
    return "\n".join(out) + "\n"


def render_set_changes(changes: SetChanges, now: datetime) -> str:
    """Element changes as one `ipset restore -exist` batch, deletes first (a piece re-cut
    in place is deleted, then added with its new timeout)."""
    out: list[str] = []
    for name, elems in changes.delete.items():
        v = changes.versions[name]
        for e in elems:
            out.extend(f"del {ipset_name(name)} {t}" for t in element_texts(v, e.lo, e.hi))
    for name, elems in changes.add.items():
        out.extend(_element_lines(ipset_name(name), changes.versions[name], elems, now))
    return "\n".join(out) + ("\n" if out else "")


# -- ipset listings ------------------------------------------------------------------------

@dataclass
class LiveSet:
    name: str
    kind: str
    header: dict[str, str]
    members: list[str] = field(default_factory=list)  # "ADDR[/LEN] [timeout N]"

    def signature(self) -> tuple[str, str]:
        return self.kind, self.header.get("family", "")


def parse_ipset_list(text: str) -> dict[str, LiveSet]:
    """`ipset list [-t]` output -> name -> LiveSet."""
    out: dict[str, LiveSet] = {}
    cur: LiveSet | None = None
    in_members = False
    for line in text.splitlines():
        if line.startswith("Name: "):
            cur = LiveSet(line[6:].strip(), "", {})
            out[cur.name] = cur
            in_members = False
        elif cur is None:
            continue
        elif line.startswith("Type: "):
            cur.kind = line[6:].strip()
        elif line.startswith("Header: "):
            words = line[8:].split()
            cur.header = dict(zip(words[::2], words[1::2], strict=False))
        elif line.startswith("Members:"):
            in_members = True
        elif in_members and line.strip():
            cur.members.append(line.strip())
        elif not line.strip():
            in_members = False
    return out


_STABLE_HEADER = ("family", "maxelem", "timeout", "netmask")


def _set_listing(s: LiveSet, members: bool) -> list[str]:
    head = " ".join(f"{k} {s.header[k]}" for k in _STABLE_HEADER if k in s.header)
    out = [f"set {s.name} {s.kind} {head}"]
    if members and s.members:
        ms = sorted(m.removesuffix(" timeout 0") for m in s.members)
        out.append("\telements = { " + ",\n\t\t".join(ms) + " }")
    return out


def _member_json(member: str) -> object:
    """One ipset member in the shape `nft -j` gives set elements."""
    words = member.split()
    addr = words[0]
    val: object = addr
    if "/" in addr:
        a, plen = addr.split("/", 1)
        val = {"prefix": {"addr": a, "len": int(plen)}}
    if "timeout" in words:
        left = int(words[words.index("timeout") + 1])
        if left > 0:
            return {"elem": {"val": val, "expires": left}}
    return val


# -- the backend ------------------------------------------------------------------------------

class IptablesBackend:
    """tm4's rules as iptables chains + ipsets (see the module docstring)."""

    # plan.py: this backend keeps interval elements as prefixes.
    prefix_elements = True

    def __init__(self, netns: str = "", legacy: bool = False):
        self.netns = netns
        v = "-legacy" if legacy else ""
        self.tools = {4: (f"iptables{v}", f"iptables{v}-save", f"iptables{v}-restore"),
                      6: (f"ip6tables{v}", f"ip6tables{v}-save", f"ip6tables{v}-restore")}

    # -- running -----------------------------------------------------------------
    def _run(self, argv: Sequence[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        full = list(argv)
        if self.netns:
            full = ["ip", "netns", "exec", self.netns, *full]
        try:
            return subprocess.run(full, input=stdin, capture_output=True, text=True, timeout=120)
        except FileNotFoundError:
            pkg = "ipset" if argv[0] == "ipset" else "iptables"
            raise ApplyError(f"{argv[0]} is not installed (Debian package {pkg})") from None
        except subprocess.TimeoutExpired:
            raise ApplyError(f"{argv[0]} did not finish within 120 s") from None

    def _ipset(self, script: str, *, exist: bool = False, what: str = "ipset") -> None:
        if not script.strip():
            return
        p = self._run(["ipset", *(["-exist"] if exist else []), "restore"], script)
        if p.returncode != 0:
            raise ApplyError(f"{what} refused: {_ipset_error(p.stderr, script)}")

    def _restore(self, family: int, text: str) -> None:
        p = self._run([self.tools[family][2], "-n", "-w"], text)
        if p.returncode != 0:
            raise ApplyError(f"{self.tools[family][2]} refused tm4's rules: {_restore_error(p.stderr, text)}")

    def _live_chains(self, family: int) -> LiveChains:
        p = self._run([self.tools[family][1], "-t", "filter"])
        if p.returncode != 0:
            raise ApplyError(f"{self.tools[family][1]} failed: {p.stderr.strip() or p.returncode}")
        return parse_save(p.stdout)

    def _live_sets(self, terse: bool = True, names: Sequence[str] | None = None) -> dict[str, LiveSet]:
        """tm4's ipsets (and leftover temporary ones)."""
        if names is not None:
            out: dict[str, LiveSet] = {}
            for n in names:
                p = self._run(["ipset", "list", *(["-t"] if terse else []), n])
                if p.returncode == 0:
                    out.update(parse_ipset_list(p.stdout))
            return out
        p = self._run(["ipset", "list", *(["-t"] if terse else [])])
        if p.returncode != 0:
            raise ApplyError(f"ipset list failed: {p.stderr.strip() or p.returncode}")
        return {n: s for n, s in parse_ipset_list(p.stdout).items()
                if n.startswith((SET_PREFIX, TEMP_PREFIX))}

    def _destroy(self, names: Iterable[str]) -> None:
        """Destroy sets, each on its own (one still referenced must not stop the rest)."""
        for n in names:
            self._run(["ipset", "destroy", n])

    # -- the Backend protocol ------------------------------------------------------
    def apply(self, ruleset: Ruleset, now: datetime | None = None) -> None:
        """Sets and both families' chains, all or nothing (see the module docstring)."""
        now = now or datetime.now(UTC)
        wanted = {f: translate(ruleset, f).chains for f in (4, 6)}  # refuses before touching anything
        specs = set_specs(ruleset)
        live_chains = {f: self._live_chains(f) for f in (4, 6)}
        live_sets = self._live_sets()
        self._destroy(n for n in live_sets if n.startswith(TEMP_PREFIX))  # an interrupted apply's
        for spec in specs.values():
            old = live_sets.get(spec.ipset)
            if old is not None and old.signature() != spec.header():
                raise ApplyError(
                    f"ipset {spec.ipset} exists as {old.kind} {old.header.get('family', '')} but tm4 "
                    f"needs {spec.kind} {spec.header()[1]}; run `tm4 disable` (drops tm4's rules and "
                    f"sets), then `tm4 enable`")
        carried = self._carried(ruleset, specs, live_sets)
        suffix = os.urandom(3).hex()
        temps = {n: temp_name(n, suffix) for n in specs}
        try:
            self._ipset(render_ipset(ruleset, now, suffix, carried), what="ipset (building the new sets)")
        except ApplyError:
            self._destroy(temps.values())
            raise
        new = [n for n, s in specs.items() if s.ipset not in live_sets]
        try:
            self._ipset("".join(f"rename {temps[n]} {specs[n].ipset}\n" for n in new))
        except ApplyError:
            self._destroy([*temps.values(), *(specs[n].ipset for n in new)])
            raise

        def put_back(families: Iterable[int]) -> list[Callable[[], object]]:
            return [functools.partial(self._put_back, f, live_chains[f]) for f in families]

        done: list[int] = []
        try:
            for f in (4, 6):
                self._restore(f, restore_text(wanted[f], live_chains[f]))
                done.append(f)
        except ApplyError as exc:
            self._undo(exc, [*put_back(done), lambda: self._destroy(
                [*(temps[n] for n in specs if n not in new), *(specs[n].ipset for n in new)])])
        swaps = [n for n in specs if n not in new]
        script = "".join(f"swap {temps[n]} {specs[n].ipset}\n" for n in swaps)
        try:
            self._ipset(script, what="ipset (swapping in the new sets)")
        except ApplyError as exc:
            n_done = max(0, _failed_line(str(exc)) - 1)  # the lines before the failing one ran
            back = "".join(f"swap {temps[n]} {specs[n].ipset}\n" for n in swaps[:n_done])
            self._undo(exc, [lambda: self._ipset(back), *put_back((4, 6)), lambda: self._destroy(
                [*(temps[n] for n in swaps), *(specs[n].ipset for n in new)])])
        # The temporary names now hold the old contents; sets tm4 no longer renders go too.
        keep = {s.ipset for s in specs.values()}
        stale = [n for n in live_sets if n.startswith(SET_PREFIX) and n not in keep]
        self._destroy([*(temps[n] for n in swaps), *stale])

    def _put_back(self, family: int, old: LiveChains) -> None:
        """Load `old` (tm4's chains and INPUT's jumps as they were) over what is there now."""
        self._restore(family, restore_text(old.chains, self._live_chains(family), _old_jumps(old)))

    @staticmethod
    def _undo(exc: ApplyError, steps: Sequence[Callable[[], object]]) -> NoReturn:
        """Run every undo step (one failing must not stop the others), then re-raise."""
        problems: list[str] = []
        for step in steps:
            try:
                step()
            except ApplyError as e:
                problems.append(str(e))
        if problems:
            raise ApplyError(f"{exc}; putting the old rules back ALSO failed: {'; '.join(problems)}") from exc
        raise exc

    def _carried(self, rs: Ruleset, specs: Mapping[str, SetSpec],
                 live_sets: Mapping[str, LiveSet]) -> dict[str, list[str]]:
        """Members the kernel put in dynamic sets (clamped sources), with their time left."""
        names = [specs[n].ipset for n, s in rs.sets.items() if s.dynamic and specs[n].ipset in live_sets]
        if not names:
            return {}
        full = self._live_sets(terse=False, names=names)
        out: dict[str, list[str]] = {}
        for n, s in rs.sets.items():
            live = full.get(specs[n].ipset)
            if s.dynamic and live is not None:
                out[n] = list(live.members)
        return out

    def apply_changes(self, changes: SetChanges, now: datetime | None = None) -> None:
        """One `ipset -exist restore` batch: deleting an element the kernel already timed
        out, or re-adding one (its timeout is then reset), is not an error."""
        self._ipset(render_set_changes(changes, now or datetime.now(UTC)), exist=True)

    def present(self) -> bool:
        """Are tm4's chains loaded (both families)?"""
        return all(self._run([self.tools[f][0], "-w", "-S", CHAIN]).returncode == 0 for f in (4, 6))

    def listing(self, terse: bool = False) -> str | None:
        """tm4's chains (iptables-save lines) in both families, then tm4's ipsets; terse:
        without set members. None when neither family has tm4's chain."""
        out: list[str] = []
        found = False
        for f in (4, 6):
            live = self._live_chains(f)
            found = found or CHAIN in live.chains
            out.append(f"# {self.tools[f][0]} filter")
            out += [f"-A INPUT {r}" for r in live.input_rules if _targets_tm4(r)]
            for c, rules in sorted(live.chains.items()):
                out.append(f":{c}")
                out += [f"-A {c} {r}" for r in rules]
        if not found:
            return None
        out.append("# ipset")
        for _, s in sorted(self._live_sets(terse=terse).items()):
            if s.name.startswith(SET_PREFIX):
                out += _set_listing(s, not terse)
        return "\n".join(out) + "\n"

    def remove(self) -> None:
        """Drop tm4's chains (and INPUT's jumps to them) in both families, then its sets."""
        for f in (4, 6):
            live = self._live_chains(f)
            if live.chains or live.jumps():
                self._restore(f, restore_text({}, live, jumps=()))
        self._destroy(sorted(self._live_sets()))

    def set_elements(self, name: str) -> list[object] | None:
        """The kernel's members of one set, shaped like `nft -j` elements (a string, a
        {"prefix": ...}, or {"elem": {"val": ..., "expires": SECONDS}}); None if missing."""
        p = self._run(["ipset", "list", ipset_name(name)])
        if p.returncode != 0:
            return None
        sets = parse_ipset_list(p.stdout)
        s = sets.get(ipset_name(name))
        return [] if s is None else [_member_json(m) for m in s.members]


def _old_jumps(live: LiveChains) -> list[tuple[int, str]]:
    return [(p, live.input_rules[p - 1]) for p in live.jumps()]


def _failed_line(msg: str) -> int:
    m = re.search(r"line (\d+)", msg)
    return int(m.group(1)) if m else 0


def _ipset_error(stderr: str, script: str) -> str:
    msg = " ".join(ln.strip() for ln in stderr.splitlines() if ln.strip()) or "unknown error"
    msg = re.sub(r"^ipset v[\d.]+:\s*", "", msg)
    n = _failed_line(msg)
    lines = script.splitlines()
    if n and 0 < n <= len(lines):
        msg += f" [{lines[n - 1]}]"
    return msg


def _restore_error(stderr: str, text: str) -> str:
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip() and not ln.startswith("Try `")]
    msg = "; ".join(lines) or "unknown error"
    m = re.search(r"line:? (\d+)", msg)
    src = text.splitlines()
    if m and 0 < int(m.group(1)) <= len(src):
        msg += f" [{src[int(m.group(1)) - 1]}]"
    return msg
