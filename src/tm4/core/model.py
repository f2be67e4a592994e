"""The whitelist model: entries (named grants), sources, bans. Validation lives here."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from tm4.core.errors import NeverSourceError, ValidationError

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
_LABEL_RE = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")


class Origin(StrEnum):
    ADMIN = "admin"
    DIALIN = "dialin"
    KNOCK = "knock"
    PROVIDER = "provider"
    TRUNK = "trunk"
    GUARD = "guard"


def utcnow() -> datetime:
    """Now, to the millisecond: what the store and the audit trail keep."""
    now = datetime.now(UTC)
    return now.replace(microsecond=now.microsecond // 1000 * 1000)


def parse_time(text: str | None) -> datetime | None:
    """ISO 8601; whole seconds (rows of older tm4 versions) and milliseconds both parse."""
    if text is None or text == "":
        return None
    t = datetime.fromisoformat(text)
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def format_time(t: datetime | None) -> str | None:
    """UTC, always with milliseconds (2026-01-02T03:04:05.678Z): one fixed width, so
    SQL string order stays time order."""
    if t is None:
        return None
    return t.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def validate_name(name: str) -> str:
    if not NAME_RE.fullmatch(name or ""):
        raise ValidationError(
            f"bad entry name {name!r}: use 1-63 of a-z 0-9 . _ - starting with a letter or digit"
        )
    return name


def validate_fqdn(text: str) -> str:
    """RFC 1123 host name: labels of a-z0-9-, no wildcard, at most 253 characters, not all-numeric."""
    name = text.strip().lower().rstrip(".")
    if not name or len(name) > 253:
        raise ValidationError(f"bad DNS name {text!r}: empty or longer than 253 characters")
    if "*" in name:
        raise ValidationError(f"bad DNS name {text!r}: wildcards are not allowed")
    labels = name.split(".")
    if len(labels) < 2:
        raise ValidationError(f"bad DNS name {text!r}: give a fully qualified name (host.example.com)")
    for label in labels:
        if not _LABEL_RE.fullmatch(label):
            raise ValidationError(
                f"bad DNS name {text!r}: label {label!r} must be 1-63 of a-z 0-9 - "
                "and not start or end with '-'"
            )
    if labels[-1].isdigit():
        raise ValidationError(f"bad DNS name {text!r}: the last label cannot be numeric")
    return name


ENDPOINT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+@-]{0,79}")


def validate_endpoint(name: str) -> str:
    """A PJSIP endpoint name tm4 may write into an ACL name and a section header."""
    if not isinstance(name, str) or not ENDPOINT_RE.fullmatch(name):
        raise ValidationError(
            f"bad endpoint name {name!r}: use 1-80 of A-Z a-z 0-9 _ . + @ - starting with a letter or digit"
        )
    return name


def normalise_address(addr: IPAddress) -> IPAddress:
    """IPv4-mapped IPv6 (::ffff:192.0.2.7) is the IPv4 address it carries."""
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


# Where no packet arriving at this host can come from: the rule for every ban and every
# entry, however it is made (CLI, control socket, guard, import, DNS, peers). Loopback is
# left out on purpose: it is a real source (protected separately: never banned).
# 240.0.0.0/4 ("reserved", class E) is left out too: Linux routes it as unicast.
NEVER_SOURCE: tuple[tuple[IPNetwork, str], ...] = (
    (ipaddress.ip_network("0.0.0.0/32"), "the unspecified address"),
    (ipaddress.ip_network("0.0.0.0/8"), "'this network', 0.0.0.0/8: Linux drops it as a martian source"),
    (ipaddress.ip_network("224.0.0.0/4"), "multicast, 224.0.0.0/4: packets go to it, never come from it"),
    (ipaddress.ip_network("255.255.255.255/32"), "the broadcast address: packets go to it, never come from it"),
    (ipaddress.ip_network("::/128"), "the unspecified address"),
    (ipaddress.ip_network("ff00::/8"), "multicast, ff00::/8: packets go to it, never come from it"),
)


def never_source_reason(net: IPNetwork) -> str | None:
    """Why `net` can never be the source of a packet (it lies wholly inside a range of
    NEVER_SOURCE), or None when it can. Pure; networks that merely overlap such a range
    (0.0.0.0/0 with --force) are fine."""
    for rng, why in NEVER_SOURCE:
        if rng.version == net.version and net.subnet_of(rng):  # type: ignore[arg-type]
            return why
    return None


def check_source(net: IPNetwork, shown: str | None = None) -> IPNetwork:
    """Refuse a network that can never be a source, naming it and why (NeverSourceError)."""
    why = never_source_reason(net)
    if why is not None:
        raise NeverSourceError(f"{shown or _net_text(net)} can never be the source of a packet ({why}); refused")
    return net


def validate_network(net: IPNetwork, *, force: bool = False, shown: str | None = None) -> IPNetwork:
    """The checks for a grant or ban on an already parsed network (IPv4-mapped IPv6
    becomes IPv4): too wide without `force`, or never a source (never allowed)."""
    text = shown or str(net)
    if isinstance(net, ipaddress.IPv6Network) and net.network_address.ipv4_mapped is not None:
        if net.prefixlen < 96:
            raise ValidationError(f"{text!r}: an IPv4-mapped range must be /96 or longer")
        v4 = net.network_address.ipv4_mapped
        net = ipaddress.ip_network(f"{v4}/{net.prefixlen - 96}")
    if net.prefixlen == 0:
        if not force:
            raise ValidationError(
                f"{text!r} is the whole internet; that would turn the firewall off (use --force if you mean it)"
            )
    elif net.version == 4 and net.prefixlen < 8 and not force:
        raise ValidationError(f"{text!r}: prefixes shorter than /8 are refused without --force")
    elif net.version == 6 and net.prefixlen < 32 and not force:
        raise ValidationError(f"{text!r}: IPv6 prefixes shorter than /32 are refused without --force")
    return check_source(net, shown)


def parse_network(text: str, *, force: bool = False) -> IPNetwork:
    """Parse an address or CIDR for a grant or ban; refuse what is dangerous or meaningless.

    `force` allows the whole internet and very short prefixes, never what cannot be a source.
    """
    raw = text.strip()
    if raw.startswith("[") and raw.endswith("]"):
        raw = raw[1:-1]
    try:
        net = ipaddress.ip_network(raw, strict=False)
    except ValueError:
        raise ValidationError(f"{text!r} is not an IPv4/IPv6 address or network") from None
    if "/" in raw:
        host = ipaddress.ip_address(raw.split("/", 1)[0])
        if net.network_address != host:
            raise ValidationError(
                f"{text!r} has host bits set; did you mean {net} ?"
            )
    return validate_network(net, force=force, shown=text)


@dataclass(frozen=True)
class Source:
    """One source of an entry: a network (a single address is a /32 or /128) or a DNS name."""

    text: str
    network: IPNetwork | None = None
    fqdn: str | None = None

    @classmethod
    def parse(cls, text: str, *, force: bool = False) -> Source:
        raw = text.strip()
        if not raw:
            raise ValidationError("empty source")
        if re.fullmatch(r"[0-9a-fA-F:.\[\]/]+", raw) and (":" in raw or re.fullmatch(r"[\d./]+", raw)):
            net = parse_network(raw, force=force)
            return cls(text=_net_text(net), network=net)
        return cls(text=validate_fqdn(raw), fqdn=validate_fqdn(raw))

    @property
    def is_dns(self) -> bool:
        return self.fqdn is not None


def _net_text(net: IPNetwork) -> str:
    return str(net.network_address) if net.prefixlen == net.max_prefixlen else str(net)


@dataclass
class Entry:
    name: str
    sources: tuple[Source, ...]
    services: tuple[str, ...]
    origin: Origin = Origin.ADMIN
    created: datetime = field(default_factory=utcnow)
    expires: datetime | None = None
    note: str = ""
    # Addresses a DNS source resolved to (name -> networks), kept across failures.
    resolved: dict[str, tuple[IPNetwork, ...]] = field(default_factory=dict)
    stale_since: datetime | None = None
    # PJSIP endpoints this entry serves: each gets a named ACL `tm4-<endpoint>` (tm4.asterisk.acl).
    endpoints: tuple[str, ...] = ()
    # The zone whose services this entry has (tm4.core.zones), or None: services of its own.
    zone: str | None = None

    def networks(self) -> list[IPNetwork]:
        """Every network this entry grants right now: literal ones plus resolved names."""
        out: list[IPNetwork] = []
        for s in self.sources:
            if s.network is not None:
                out.append(s.network)
            elif s.fqdn:
                out.extend(self.resolved.get(s.fqdn, ()))
        return out

    def is_expired(self, now: datetime) -> bool:
        return self.expires is not None and self.expires <= now

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "sources": [s.text for s in self.sources],
            "addresses": [_net_text(n) for n in self.networks()],
            "services": list(self.services),
            "origin": str(self.origin),
            "created": format_time(self.created),
            "expires": format_time(self.expires),
            "note": self.note,
            "stale": self.stale_since is not None,
            "endpoints": list(self.endpoints),
            "zone": self.zone,
        }


@dataclass
class Ban:
    network: IPNetwork
    reason: str = ""
    origin: Origin = Origin.ADMIN
    created: datetime = field(default_factory=utcnow)
    expires: datetime | None = None
    offences: int = 1

    @property
    def address(self) -> str:
        return _net_text(self.network)

    def is_expired(self, now: datetime) -> bool:
        return self.expires is not None and self.expires <= now

    def to_json(self) -> dict[str, Any]:
        return {
            "address": self.address,
            "reason": self.reason,
            "origin": str(self.origin),
            "created": format_time(self.created),
            "expires": format_time(self.expires),
            "offences": self.offences,
        }


def net_text(net: IPNetwork) -> str:
    return _net_text(net)
