"""The service catalogue: what a grant can open, with ports overridable in the config."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from tm4.core.errors import ValidationError

PortRange = tuple[int, int]


@dataclass(frozen=True)
class Service:
    name: str
    proto: str  # "tcp" or "udp"; "any" only for `all`
    ports: tuple[PortRange, ...]  # empty for `all`
    description: str = ""

    @property
    def is_all(self) -> bool:
        return self.name == ALL

    def port_spec(self) -> str:
        """nft/iptables spelling: '5060', '8088-8089', '8001,8003'."""
        return ",".join(f"{lo}" if lo == hi else f"{lo}-{hi}" for lo, hi in self.ports)

    def covers(self, proto: str, port: int) -> bool:
        if self.is_all:
            return True
        return proto == self.proto and any(lo <= port <= hi for lo, hi in self.ports)


ALL = "all"

DEFAULT_CATALOGUE: dict[str, tuple[str, str, str]] = {
    # name: (proto, ports, description)
    "sip-udp": ("udp", "5060", "SIP signalling over UDP"),
    "sip-tcp": ("tcp", "5060", "SIP signalling over TCP"),
    "sip-tls": ("tcp", "5061", "SIP signalling over TLS"),
    "iax": ("udp", "4569", "IAX2 trunks and phones"),
    "http": ("tcp", "80", "web GUI (HTTP)"),
    "https": ("tcp", "443", "web GUI (HTTPS)"),
    "ssh": ("tcp", "22", "secure shell"),
    "tftp": ("udp", "69", "phone provisioning (TFTP)"),
    "ftp": ("tcp", "21", "FTP"),
    "webmin": ("tcp", "10000", "Webmin"),
    "fop": ("tcp", "4445", "Flash Operator Panel"),
    "ami": ("tcp", "5038", "Asterisk manager interface"),
    "webrtc": ("tcp", "8088-8089", "WebRTC / Asterisk HTTP server"),
    "ucp": ("tcp", "8001,8003", "user control panel"),
}

SIP_SERVICES = ("sip-udp", "sip-tcp", "sip-tls")

# Travelin' Man 3 permission codes (add-ip NAME IP 1 3 ...).
TM3_CODES: dict[str, tuple[str, ...]] = {
    "0": (ALL,),
    "1": ("sip-udp",),
    "2": ("sip-tcp",),
    "3": ("iax",),
    "4": ("http", "https"),
    "5": ("webmin",),
    "6": ("ftp",),
    "7": ("tftp",),
    "8": ("ssh",),
    "9": ("fop",),
}

TM3_MENU = """\
Which services may this entry reach? (Travelin' Man 3 codes, several allowed: 1 3 8)
  0  all services       5  webmin
  1  SIP over UDP       6  FTP
  2  SIP over TCP       7  TFTP
  3  IAX                8  SSH
  4  web (http+https)   9  FOP"""


def parse_ports(spec: str | int, what: str = "ports") -> tuple[PortRange, ...]:
    """'5060', '8088-8089', '8001,8003' -> ((5060, 5060),) ... ; refuses 0 and > 65535."""
    text = str(spec).replace(" ", "")
    if not text:
        raise ValidationError(f"{what}: empty port list")
    out: list[PortRange] = []
    for part in text.split(","):
        lo_s, sep, hi_s = part.partition("-")
        try:
            lo = int(lo_s)
            hi = int(hi_s) if sep else lo
        except ValueError:
            raise ValidationError(f"{what}: {spec!r} is not a port, range or list") from None
        if not (1 <= lo <= hi <= 65535):
            raise ValidationError(f"{what}: {part!r} is outside 1-65535 or reversed")
        out.append((lo, hi))
    return tuple(sorted(set(out)))


def build_catalogue(overrides: Mapping[str, Mapping[str, object]] | None = None) -> dict[str, Service]:
    """The default catalogue with the config's [services.NAME] tables applied.

    A table for an unknown name defines a new service (it then needs `proto`).
    """
    cat: dict[str, Service] = {ALL: Service(ALL, "any", (), "every port and protocol")}
    for name, (proto, ports, desc) in DEFAULT_CATALOGUE.items():
        cat[name] = Service(name, proto, parse_ports(ports, name), desc)
    for name, table in (overrides or {}).items():
        if name == ALL:
            raise ValidationError("the service 'all' cannot be redefined")
        base = cat.get(name)
        proto = str(table.get("proto", base.proto if base else ""))
        if proto not in ("tcp", "udp"):
            raise ValidationError(f"services.{name}: proto must be 'tcp' or 'udp'")
        if "ports" in table:
            ports = parse_ports(table["ports"], f"services.{name}.ports")  # type: ignore[arg-type]
        elif base:
            ports = base.ports
        else:
            raise ValidationError(f"services.{name}: a new service needs `ports`")
        cat[name] = Service(name, proto, ports, str(table.get("description", base.description if base else "")))
    return cat


def resolve_services(names: Iterable[str], catalogue: Mapping[str, Service]) -> tuple[str, ...]:
    """Validate service names (TM3 digit codes accepted too); `all` absorbs the rest."""
    out: list[str] = []
    for raw in names:
        for name in str(raw).replace(",", " ").split():
            name = name.strip().lower()
            expanded = TM3_CODES.get(name, (name,))
            for svc in expanded:
                if svc not in catalogue:
                    known = ", ".join(sorted(catalogue))
                    raise ValidationError(f"unknown service {svc!r} (known: {known}; or TM3 codes 0-9)")
                if svc not in out:
                    out.append(svc)
    if not out:
        raise ValidationError("no service given")
    if ALL in out:
        return (ALL,)
    return tuple(sorted(out))
