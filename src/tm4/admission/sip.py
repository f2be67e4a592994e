"""SIP admission by secret domain, in the kernel (the Travelin' Man 3 trick, done right).

A UDP datagram to an admission service whose payload *starts* with
`REGISTER sip:<domain>` followed by `>`, `;`, `:`, a space or the end of the
datagram puts its source in that domain's timeout set (`sipadmit4_<tag>` /
`sipadmit6_<tag>`, refreshed by every such REGISTER) and is accepted; a source
in a set may send anything to those services until its element times out.

nftables compares raw payload (`@ih,OFFSET,LENGTH`, at most 128 bits a piece)
from byte 0 of the UDP payload, so a name buried in a header, a REGISTER to the
server's address or to a longer name that merely starts with the secret one
never admits. The name is compared as configured and in lower case.

The cost for every other packet is one rule: `udp dport 5060 @ih,0,104
"REGISTER sip:"` jumps to the domain rules only for REGISTERs, and there one
verdict map, keyed on the first bytes of the name, picks the few rules of that
name: a flood of REGISTERs to wrong names costs one hash lookup each, however
many domains are configured. The admission rule sits right
after the ban (and blocklist) rules, ahead of conntrack's `established` accept,
so a phone's periodic REGISTER on its long-lived flow keeps refreshing its
element, and a banned source is never admitted.

One set pair per domain, tagged with a hash of the name: removing a domain drops
its sets in the same transaction (admission through it ends at once), while a
`tm4 apply` carries the other sets' elements over like knock stages. Pure; the
nft backend only (the iptables backend refuses, saying why).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from tm4.core.config import Config
from tm4.core.durations import format_duration, parse_duration
from tm4.core.errors import ConfigError, Tm4Error
from tm4.core.rules import NftSet, Ruleset, port_match
from tm4.core.services import resolve_services
from tm4.core.store import Store

PREFIX = b"REGISTER sip:"
# What may follow the name in the Request-URI: `>` `;` `:` and a space (end: see below).
TERMINATORS = b" :;>"
PIECE = 16  # bytes per raw payload comparison (nft: at most 128 bits)
SET_SIZE = 65535
REGISTER_CHAIN = "sip_register"
MAX_KEY = 16  # bytes of the name the verdict map looks at (one 128-bit key)
_FAMILIES = ((4, "ip", "ipv4"), (6, "ip6", "ipv6"))


@dataclass(frozen=True)
class AdmissionSettings:
    """`[sip_admission]` checked once."""

    domains: tuple[str, ...]  # lower case, no trailing dot, unique
    variants: dict[str, tuple[bytes, ...]]  # domain -> the byte strings that admit (as configured, lower)
    ttl: int  # seconds
    services: tuple[str, ...]

    @property
    def enabled(self) -> bool:
        return bool(self.domains)


def settings(config: Config) -> AdmissionSettings:
    sa = config.sip_admission
    try:
        services = resolve_services(sa.services, config.services)
        ttl = int(parse_duration(sa.ttl).total_seconds())
    except Tm4Error as exc:
        raise ConfigError(f"[sip_admission]: {exc}") from None
    tcp = [n for n in services if config.services[n].proto != "udp"]
    if tcp:
        raise ConfigError(f"[sip_admission] services: UDP services only ({', '.join(tcp)} is not)")
    variants: dict[str, list[bytes]] = {}
    for name in sa.domains:
        shown = name.rstrip(".")
        try:
            raw = shown.encode("ascii")
        except UnicodeEncodeError:
            raise ConfigError(f"[sip_admission] domains: {name!r} is not an ASCII DNS name") from None
        if not raw or len(raw) > 253:
            raise ConfigError(f"[sip_admission] domains: {name!r} is not a DNS name")
        key = shown.lower()
        forms = variants.setdefault(key, [])
        for form in (raw, raw.lower()):
            if form not in forms:
                forms.append(form)
    return AdmissionSettings(tuple(variants), {k: tuple(v) for k, v in variants.items()},
                             max(1, ttl), services)


def tag(domain: str) -> str:
    """The sets' tag of a domain: stable, and saying nothing of the name."""
    return hashlib.sha256(domain.lower().encode()).hexdigest()[:8]


def admit_set(version: int, domain: str) -> str:
    return f"sipadmit{version}_{tag(domain)}"


def admit_chain(domain: str) -> str:
    return f"sip_admit_{tag(domain)}"


def payload_match(data: bytes, offset: int = 0) -> str:
    """`@ih` comparisons of `data` at byte `offset` of the UDP payload, 16 bytes a piece."""
    out = []
    for pos in range(0, len(data), PIECE):
        chunk = data[pos:pos + PIECE]
        out.append(f"@ih,{(offset + pos) * 8},{len(chunk) * 8} 0x{chunk.hex()}")
    return " ".join(out)


def register_rules(domain_forms: tuple[bytes, ...], goto: str) -> list[str]:
    """The rules matching `REGISTER sip:<form><terminator or end>` for each form (the
    `REGISTER sip:` prefix itself is checked by the rule that jumps here)."""
    start = len(PREFIX)
    term = ", ".join(f"0x{b:02x}" for b in TERMINATORS)
    out = []
    for form in domain_forms:
        name = payload_match(form, start)
        end = start + len(form)
        out.append(f"{name} @ih,{end * 8},8 {{ {term} }} goto {goto}")
        # the datagram ends right after the name: the UDP length says so
        out.append(f"udp length {8 + end} {name} goto {goto}")
    return out


def key_chain(key: bytes) -> str:
    return f"sip_name_{hashlib.sha256(key).hexdigest()[:8]}"


def render_admission(config: Config, s: AdmissionSettings) -> Ruleset:
    """Pure: the admission fragment (sets, chains, rules) for the configured domains."""
    rs = Ruleset()
    ttl = f"{s.ttl}s"
    prefix = payload_match(PREFIX)
    # The verdict map's key: the name's first bytes, as many as the shortest form has.
    width = min([MAX_KEY, *(len(f) for forms in s.variants.values() for f in forms)])
    by_key: dict[bytes, list[str]] = {}
    for domain in s.domains:
        chain = admit_chain(domain)
        adds = []
        for v, ipf, nfproto in _FAMILIES:
            name = admit_set(v, domain)
            rs.sets[name] = NftSet(name, v, dynamic=True, timeout=ttl, flags=("dynamic", "timeout"),
                                   size=SET_SIZE)
            adds.append(f"meta nfproto {nfproto} update @{name} {{ {ipf} saddr }} counter accept")
            for svc in s.services:
                rs.input_rules.append(f"{ipf} saddr @{name} {port_match(config.services[svc])} accept")
        rs.chains[chain] = adds
        for form in s.variants[domain]:
            by_key.setdefault(form[:width], []).extend(register_rules((form,), chain))
    for key, rules in by_key.items():
        rs.chains[key_chain(key)] = rules
    vmap = ", ".join(f"0x{key.hex()} : goto {key_chain(key)}" for key in sorted(by_key))
    rs.chains[REGISTER_CHAIN] = [f"@ih,{len(PREFIX) * 8},{width * 8} vmap {{ {vmap} }}"]
    for svc in s.services:
        # ahead of conntrack's accept: a phone's periodic REGISTER refreshes its element
        rs.early_rules.append(f"{port_match(config.services[svc])} {prefix} jump {REGISTER_CHAIN}")
    return rs


def ruleset_extra(config: Config, store: Store) -> Ruleset | None:
    """The admission fragment, or None when no domain is configured."""
    s = settings(config)
    if not s.enabled:
        return None
    if config.firewall.backend != "nft":
        raise ConfigError(
            'SIP admission needs firewall.backend = "nft": it matches the first bytes of the UDP '
            "payload and adds the source to a timeout set in one rule; the iptables backend "
            "translates neither (xt_string counts offsets from the IP header, so IP options "
            "would move the match). Remove [sip_admission] domains or switch to nft")
    return render_admission(config, s)


def describe(config: Config) -> dict[str, object]:
    """The settings as `tm4 sip-domain show --json` reports them (no resolution)."""
    s = settings(config)
    return {
        "enabled": s.enabled,
        "domains": list(s.domains),
        "ttl": format_duration(parse_duration(config.sip_admission.ttl)),
        "services": list(s.services),
        "transport": "UDP",
    }
