"""One nft rule string, parsed into the pieces of the iptables rules that express it. Pure.

`parse_rule` reads the statements `rules.render_ruleset` writes (address, port,
interface, conntrack, icmp and tcp-flag matches; `limit`, `meter`, `log`, set
updates and verdicts) into a ParsedRule: parts (ANDed lists of ORed iptables
match alternatives), non-terminating actions and a verdict. Anything it does not
know raises TranslateError (an ApplyError) naming the rule and the nft backend.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from tm4.core.errors import ApplyError
from tm4.core.rules import NftSet
from tm4.firewall.iptables_names import chain_name, digest, ipset_name

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
# nft's icmp / icmpv6: (IP version, iptables protocol, type match, type names)
_ICMP = {"icmp": (4, "icmp", "-m icmp --icmp-type", ICMP_TYPES),
         "icmpv6": (6, "ipv6-icmp", "-m icmp6 --icmpv6-type", ICMPV6_TYPES)}
CT_STATES = {"established", "related", "new", "invalid", "untracked"}
TCP_FLAGS = {"FIN", "SYN", "RST", "PSH", "ACK", "URG", "ECE", "CWR"}
RATE_UNITS = {"second": "sec", "minute": "min", "hour": "hour", "day": "day"}
VERDICTS = {"accept": "ACCEPT", "drop": "DROP", "reject": "REJECT", "return": "RETURN"}


class TranslateError(ApplyError):
    """An nft rule tm4 rendered has no faithful iptables form."""


def untranslatable(rule: str, chain: str, why: str) -> TranslateError:
    """The error for nft `rule` (in tm4's nft `chain`) that iptables cannot express."""
    where = "input chain" if chain == "input" else f"chain {chain}"
    return TranslateError(f"cannot express the nft rule {rule!r} ({where}) with iptables: "
                          f"{why}; {NEEDS_NFT}")


_TOKEN = re.compile(r'"[^"]*"|[{}(),|&]|!=|==|[^\s{}(),|&"]+')


def _bits(version: int) -> int:
    return 32 if version == 4 else 128


@dataclass
class _AddrKey:
    """`ip saddr`, `ip6 saddr & ffff:...::` as a set/hashlimit key."""

    version: int
    direction: str  # src / dst
    prefix: int  # masked prefix length (32/128: unmasked)

    @property
    def masked(self) -> bool:
        return self.prefix != _bits(self.version)


@dataclass
class ParsedRule:
    """One nft rule, as the pieces of the iptables rules that express it."""

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
        self.r = ParsedRule()

    # token helpers
    def fail(self, why: str) -> TranslateError:
        return untranslatable(self.text, self.chain, why)

    def peek(self, k: int = 0) -> str:
        j = self.i + k
        return self.toks[j] if j < len(self.toks) else ""

    def take(self, expect: str | None = None) -> str:
        t = self.peek()
        if not t or (expect is not None and t != expect):
            raise self.fail(f"expected {expect or 'more'} at {t or 'the end'!r}")
        self.i += 1
        return t

    def skip(self, word: str) -> bool:
        """Take `word` if it comes next; whether it did."""
        if self.peek() != word:
            return False
        self.i += 1
        return True

    def negation(self, ops: tuple[str, ...] = ("!=",)) -> str:
        """Take a comparison operator (one of `ops`) if one comes next: "! " for `!=`."""
        if self.peek() not in ops:
            return ""
        return "! " if self.take() == "!=" else ""

    def group(self) -> list[str]:
        """`{ a, b }` or one word, as a list of words (commas inside words split too)."""
        if self.skip("{"):
            items: list[str] = []
            while self.peek() != "}":
                t = self.take()
                if t != ",":
                    items.append(t)
            self.take("}")
            return items
        items = [self.take()]
        while self.skip(","):  # `established,related`
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

    def key(self) -> _AddrKey:
        ipf = self.take()
        if ipf not in ("ip", "ip6"):
            raise self.fail(f"unsupported key {ipf!r}")
        v = 4 if ipf == "ip" else 6
        what = self.take()
        if what not in ("saddr", "daddr"):
            raise self.fail(f"unsupported key {ipf} {what}")
        bits = _bits(v)
        prefix = bits
        if self.skip("&"):
            mask = self.take()
            try:
                m = int(ipaddress.IPv4Address(mask) if v == 4 else ipaddress.IPv6Address(mask))
            except ValueError:
                raise self.fail(f"mask {mask} is not an IPv{v} address") from None
            prefix = bits - ((1 << bits) - 1 - m).bit_length()
            if m != ((1 << bits) - 1) ^ ((1 << (bits - prefix)) - 1):
                raise self.fail(f"mask {mask} is not a prefix")
        self.family({v})
        return _AddrKey(v, "src" if what == "saddr" else "dst", prefix)

    def set_ref(self, tok: str, key: _AddrKey) -> str:
        name = tok[1:]
        s = self.sets.get(name)
        if s is None:
            raise self.fail(f"set {name} is not declared")
        if s.version != key.version:
            raise self.fail(f"set {name} holds IPv{s.version} addresses")
        if key.masked:
            if not s.dynamic:
                raise self.fail(f"masked lookups need a set the kernel fills, {name} is not one")
            if self.r.masks.get(name, key.prefix) != key.prefix:
                raise self.fail(f"set {name} is keyed by two different masks")
            self.r.masks[name] = key.prefix
        self.r.set_refs.append((name, key.version))
        return ipset_name(name)

    # statements
    def parse(self) -> ParsedRule:
        while self.i < len(self.toks):
            t = self.peek()
            if t in ("ip", "ip6"):
                self.addr_match()
            elif t in ("iif", "iifname", "oif", "oifname"):
                self.take()
                neg = self.negation()
                name = self.take().strip('"')
                opt = "-i" if t.startswith("i") else "-o"
                self.r.parts.append([f"{neg}{opt} {name}"])
            elif t == "ct":
                self.take()
                self.take("state")
                neg = self.negation()
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
        neg = self.negation(("!=", "=="))
        t = self.peek()
        if t.startswith("@"):
            self.take()
            self.r.parts.append([f"-m set {neg}--match-set {self.set_ref(t, key)} {key.direction}"])
            return
        if key.masked:
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
        version, proto, match, table = _ICMP[kind]
        try:
            codes = [str(int(n)) if n.isdigit() else str(table[n]) for n in names]
        except KeyError as exc:
            raise self.fail(f"unknown {kind} type {exc.args[0]}") from None
        self.family({version})
        self.set_proto(proto)
        self.r.parts.append([f"{match} {c}" for c in codes])

    def ports(self) -> None:
        proto = self.take()
        which = self.take()
        self.set_proto(proto)
        neg = self.negation(("!=", "=="))
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
        if not set(mask) | {want} <= TCP_FLAGS:
            raise self.fail("unknown tcp flag")
        self.set_proto("tcp")
        self.r.parts.append([f"-m tcp --tcp-flags {','.join(mask)} {want}"])

    def rate(self) -> tuple[bool, str, int | None]:
        """`rate [over] N/unit [burst B packets]` -> (over, 'N/unit', burst)."""
        self.take("rate")
        over = self.skip("over")
        m = re.fullmatch(r"(\d+)/(second|minute|hour|day)", self.take())
        if not m:
            raise self.fail("only packet rates per second, minute, hour or day translate")
        burst = None
        if self.skip("burst"):
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
        name = f"tm4-{digest(self.text, 8)}"
        hb = f" --hashlimit-burst {burst}" if burst is not None else ""
        self.r.parts.append([f"-m hashlimit --hashlimit-above {rate}{hb} --hashlimit-name {name}"])

    def meter(self) -> None:
        """`meter NAME [size N] { KEY [timeout Ts] limit rate [over] R/u [burst B packets] }`."""
        self.take("meter")
        name = self.take()
        size = None
        if self.skip("size"):
            size = int(self.take())
        self.take("{")
        key = self.key()
        expire = None
        if self.skip("timeout"):
            m = re.fullmatch(r"(\d+)s", self.take())
            if not m:
                raise self.fail("meter timeouts must be in seconds")
            expire = int(m.group(1)) * 1000
        if self.skip("ct"):  # `ct count [over] N`: connections per key, like connlimit
            self.take("count")
            over = self.skip("over")
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
        if key.masked:
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
               chain: str = "input") -> ParsedRule:
    return _Parser(rule, chain, sets, chains).parse()
