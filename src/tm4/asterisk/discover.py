"""Trunk discovery: read Asterisk's trunks and propose entries reaching ONLY the trunk's protocol.

Sources: pjsip.conf (+ includes, pjsip_wizard.conf): `type=identify` `match=`,
registrations' `server_uri` / `outbound_proxy`, `type=aor` static `contact=`;
sip.conf and iax.conf `host=` and `register =>`; and AMI (discover_ami.py).
A trunk's protocol comes from its transport (pjsip `transport=`, chan_sip
`transport=`, a URI's `;transport=` or `sips:`); IAX trunks get `iax` only.

`plan()` compares the proposal with the store; `apply()` stores it as entries
of origin trunk named `trunk-TECH-NAME`, updating those that changed and (unless
told not to) removing trunk entries whose trunk is gone.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tm4.asterisk.confparse import ConfFile, Section, read_conf
from tm4.core.errors import ValidationError
from tm4.core.model import Origin, Source, net_text, parse_network, validate_fqdn
from tm4.core.services import Service, build_catalogue

if TYPE_CHECKING:
    from tm4.ops.engine import Core

TRANSPORT_SERVICE = {"udp": "sip-udp", "tcp": "sip-tcp", "tls": "sip-tls", "ws": "webrtc", "wss": "webrtc"}
ENTRY_PREFIX = "trunk-"


@dataclass
class Trunk:
    tech: str  # pjsip | sip | iax
    name: str  # the Asterisk object's name
    sources: list[str] = field(default_factory=list)
    protocols: list[str] = field(default_factory=list)  # udp/tcp/tls/ws/wss, or iax
    found: list[str] = field(default_factory=list)  # where each source was read

    @property
    def entry_name(self) -> str:
        slug = re.sub(r"[^a-z0-9._-]+", "-", self.name.lower()).strip("-._") or "trunk"
        return f"{ENTRY_PREFIX}{self.tech}-{slug}"[:63].rstrip("-._")

    @property
    def services(self) -> list[str]:
        if self.tech == "iax":
            return ["iax"]
        return sorted({TRANSPORT_SERVICE[p] for p in self.protocols})

    def add_source(self, text: str, where: str) -> None:
        if text not in self.sources:
            self.sources.append(text)
        self.found.append(f"{where} {text}")

    def add_protocol(self, proto: str) -> None:
        if proto not in self.protocols:
            self.protocols.append(proto)

    def to_json(self) -> dict[str, Any]:
        return {
            "entry": self.entry_name, "tech": self.tech, "trunk": self.name,
            "sources": list(self.sources), "services": self.services, "found": list(self.found),
        }


@dataclass
class Discovery:
    trunks: list[Trunk] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def trunk(self, tech: str, name: str) -> Trunk:
        for t in self.trunks:
            if t.tech == tech and t.name == name:
                return t
        t = Trunk(tech, name)
        self.trunks.append(t)
        return t

    def finish(self) -> Discovery:
        """Drop trunks without a source, sort, and give each one a protocol."""
        kept = []
        for t in self.trunks:
            if not t.sources:
                continue
            if not t.protocols:
                t.protocols.append("iax" if t.tech == "iax" else "udp")
                if t.tech != "iax":
                    self.notes.append(f"{t.tech} trunk {t.name}: no transport given; assuming UDP (SIP's default)")
            kept.append(t)
        self.trunks = sorted(kept, key=lambda t: (t.tech, t.name))
        return self

    def to_json(self) -> dict[str, Any]:
        return {"trunks": [t.to_json() for t in self.trunks], "notes": list(self.notes)}


# -- addresses -----------------------------------------------------------------------

@dataclass(frozen=True)
class Host:
    source: str  # normalised: an address, a network or a DNS name
    transport: str = ""  # from a URI: sips: -> tls, ;transport=tcp -> tcp


def parse_host(text: str) -> Host:
    """A host as Asterisk writes it: a SIP URI, host[:port], [v6]:port, addr/mask (dotted or bits)."""
    t = text.strip()
    if not t:
        raise ValidationError("empty value")
    if t.startswith("!"):
        raise ValidationError(f"{t!r} is a negated match; nothing to allow")
    transport = ""
    m = re.match(r"(?i)(sips?):", t)
    if m:
        if m.group(1).lower() == "sips":
            transport = "tls"
        t = t[m.end():]
    t, _, params = t.partition(";")
    t = t.split("?", 1)[0]
    for p in params.split(";"):
        k, _, v = p.partition("=")
        if k.strip().lower() == "transport" and v.strip().lower() in TRANSPORT_SERVICE:
            transport = v.strip().lower()
    if "@" in t:
        t = t.rsplit("@", 1)[1]
    mask = ""
    if t.startswith("["):
        host, sep, rest = t[1:].partition("]")
        if not sep:
            raise ValidationError(f"{text!r}: unclosed '['")
        if rest.startswith("/"):
            mask = rest[1:]
    elif t.count(":") > 1:  # bare IPv6, maybe with /mask
        host, _, mask = t.partition("/")
    else:
        host, _, mask = t.partition("/")
        host = host.split(":", 1)[0]
    host = host.strip()
    if not host:
        raise ValidationError(f"{text!r}: no host")
    if host.lower() == "dynamic":
        raise ValidationError("host=dynamic: the peer registers from anywhere; nothing fixed to allow")
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        if mask:
            raise ValidationError(f"{text!r}: a mask needs an address") from None
        return Host(validate_fqdn(host), transport)
    prefix = addr.max_prefixlen
    if mask:
        prefix = _prefix(mask, addr.version, text)
    try:
        net = ipaddress.ip_network(f"{addr}/{prefix}", strict=False)
    except ValueError:
        raise ValidationError(f"{text!r}: prefix /{prefix} does not fit the address") from None
    return Host(net_text(parse_network(str(net))), transport)


def _prefix(mask: str, version: int, text: str) -> int:
    if mask.isdigit():
        return int(mask)
    try:
        bits = int(ipaddress.ip_address(mask))
    except ValueError:
        raise ValidationError(f"{text!r}: bad mask {mask!r}") from None
    width = 32 if version == 4 else 128
    n = bin(bits).count("1")
    if bits != ((1 << width) - 1) ^ ((1 << (width - n)) - 1):
        raise ValidationError(f"{text!r}: mask {mask!r} is not contiguous")
    return n


def add_hosts(disc: Discovery, trunk: Trunk, values: list[tuple[str, str]], what: str) -> list[str]:
    """Add each comma-separated host; return the transports the URIs asked for."""
    hints: list[str] = []
    for value, where in values:
        for item in (i.strip() for i in value.split(",")):
            if not item:
                continue
            try:
                h = parse_host(item)
            except ValidationError as exc:
                disc.notes.append(f"{where}: {trunk.tech} {trunk.name} {what}: {exc}")
                continue
            trunk.add_source(h.source, f"{where} {what}")
            if h.transport:
                hints.append(h.transport)
    return hints


# -- pjsip ---------------------------------------------------------------------------

def discover_pjsip(config_dir: Path, disc: Discovery, catalogue: Mapping[str, Service]) -> None:
    confs = []
    for fname in ("pjsip.conf", "pjsip_wizard.conf"):
        if (config_dir / fname).is_file():
            conf = read_conf(config_dir / fname, config_dir)
            disc.notes.extend(conf.notes)
            confs.append(conf)
    transports: dict[str, str] = {}
    for conf in confs:
        transports.update(_transports(conf))
    for conf in confs:
        _pjsip_objects(conf, transports, disc)
        _check_binds(conf, disc, catalogue)


def _check_binds(conf: ConfFile, disc: Discovery, catalogue: Mapping[str, Service]) -> None:
    """A transport listening where its tm4 service does not point would stay closed."""
    for s in conf.of_type("transport"):
        proto = (s.get("protocol") or "udp").strip().lower()
        svc = catalogue.get(TRANSPORT_SERVICE.get(proto, ""))
        bind = (s.get("bind") or "").strip()
        m = re.search(r":(\d+)$", bind)
        if svc is None or not m:
            continue
        port = int(m.group(1))
        if not svc.covers(svc.proto, port):
            disc.notes.append(
                f"{s.where}: transport {s.name} listens on {proto} port {port}, but service {svc.name} "
                f"is port {svc.port_spec()}; set [services.{svc.name}] ports = \"{port}\" in tm4.toml"
            )


def _transports(conf: ConfFile) -> dict[str, str]:
    return {s.name: (s.get("protocol") or "udp").strip().lower() for s in conf.of_type("transport")}


def _pjsip_objects(conf: ConfFile, transports: Mapping[str, str], disc: Discovery) -> None:
    endpoints = {s.name: s for s in conf.of_type("endpoint")}
    aor_owner: dict[str, list[str]] = {}
    for ep in endpoints.values():
        for a in (ep.get("aors") or "").split(","):
            if a.strip():
                aor_owner.setdefault(a.strip(), []).append(ep.name)

    def protocol_of(section: Section | None, trunk: Trunk, hints: list[str]) -> None:
        tname = (section.get("transport") or "").strip() if section else ""
        if tname and section is not None:
            proto = transports.get(tname)
            if proto is None:
                disc.notes.append(f"{section.where}: transport {tname!r} is not defined")
            elif proto not in TRANSPORT_SERVICE:
                disc.notes.append(f"{section.where}: transport {tname!r} has unknown protocol {proto!r}")
            else:
                trunk.add_protocol(proto)
        for h in hints:
            trunk.add_protocol(h)

    for s in conf.of_type("identify"):
        epname = (s.get("endpoint") or "").strip()
        if not epname:
            disc.notes.append(f"{s.where}: identify {s.name} names no endpoint; skipped")
            continue
        t = disc.trunk("pjsip", epname)
        hints = add_hosts(disc, t, [(o.value, o.where) for o in s.get_all("match")], "identify match")
        protocol_of(endpoints.get(epname), t, hints)
    for s in conf.of_type("registration"):
        t = disc.trunk("pjsip", (s.get("endpoint") or s.name).strip())
        values = [(o.value, o.where) for o in s.get_all("server_uri") + s.get_all("outbound_proxy")]
        hints = add_hosts(disc, t, values, "registration")
        protocol_of(s, t, hints)
        if not s.get("transport"):
            protocol_of(endpoints.get(t.name), t, [])
    for s in conf.of_type("aor"):
        contacts = s.get_all("contact") + s.get_all("outbound_proxy")
        if not contacts:
            continue
        for owner in aor_owner.get(s.name, [s.name]):
            t = disc.trunk("pjsip", owner)
            hints = add_hosts(disc, t, [(o.value, o.where) for o in contacts], "aor contact")
            protocol_of(endpoints.get(owner), t, hints)
    for ep in endpoints.values():
        proxies = ep.get_all("outbound_proxy")
        if proxies:
            t = disc.trunk("pjsip", ep.name)
            protocol_of(ep, t, add_hosts(disc, t, [(o.value, o.where) for o in proxies], "outbound_proxy"))
    for s in conf.of_type("wizard"):
        hosts = s.get_all("remote_hosts")
        if not hosts:
            continue
        t = disc.trunk("pjsip", s.name)
        hints = add_hosts(disc, t, [(o.value, o.where) for o in hosts], "wizard remote_hosts")
        protocol_of(s, t, hints)


# -- chan_sip and chan_iax2 ------------------------------------------------------------

_REGISTER = re.compile(r"^(?:(?P<peer>[^?@:/]+)\?)?(?:(?P<tr>udp|tcp|tls)://)?(?P<rest>.+)$", re.IGNORECASE)


def _register_host(value: str) -> tuple[str, str, str]:
    """`register => [peer?][transport://]user[:secret]@host[:port][/ext][~expiry]` -> (peer, transport, host)."""
    m = _REGISTER.match(value.strip())
    if not m or "@" not in m.group("rest"):
        raise ValidationError(f"unreadable register line {value[:60]!r}")
    hostpart = m.group("rest").rsplit("@", 1)[1]
    hostpart = hostpart.split("~", 1)[0].split("/", 1)[0]
    return (m.group("peer") or ""), (m.group("tr") or "").lower(), hostpart


def discover_channel(config_dir: Path, fname: str, tech: str, disc: Discovery) -> None:
    path = config_dir / fname
    if not path.is_file():
        return
    conf = read_conf(path, config_dir)
    disc.notes.extend(conf.notes)
    general = next((s for s in conf.sections if s.name == "general" and not s.is_template), None)
    default = "udp"
    if tech == "sip" and general is not None and general.get("transport"):
        default = general.get("transport", "udp").split(",")[0].strip().lower() or "udp"
    by_host: dict[str, Trunk] = {}
    for s in conf.sections:
        if s.is_template or s.name == "general":
            continue
        host = (s.get("host") or "").strip()
        if not host or host.lower() == "dynamic":
            continue
        t = disc.trunk(tech, s.name)
        values = [(o.value, o.where) for o in s.get_all("host")]
        if tech == "sip":
            values += [(o.value, o.where) for o in s.get_all("outboundproxy")]
        add_hosts(disc, t, values, "host")
        if tech == "sip":
            listed = [p.strip().lower() for p in (s.get("transport") or default).split(",") if p.strip()]
            for p in listed:
                if p in ("udp", "tcp", "tls"):
                    t.add_protocol(p)
                else:
                    disc.notes.append(f"{s.where}: sip {s.name}: unknown transport {p!r}")
        else:
            t.add_protocol("iax")
        for src in t.sources:
            by_host.setdefault(src, t)
    if general is None:
        return
    for o in general.get_all("register"):
        try:
            peer, transport, hostpart = _register_host(o.value)
            h = parse_host(hostpart)
        except ValidationError as exc:
            disc.notes.append(f"{o.where}: {tech} register: {exc}")
            continue
        t = disc.trunk(tech, peer) if peer else by_host.get(h.source) or disc.trunk(tech, h.source)
        t.add_source(h.source, f"{o.where} register")
        t.add_protocol("iax" if tech == "iax" else (transport or default))


# -- all of it -----------------------------------------------------------------------

def discover_files(config_dir: str | Path, catalogue: Mapping[str, Service] | None = None) -> Discovery:
    d = Path(config_dir)
    if not d.is_dir():
        raise ValidationError(f"{d} is not a directory (set [asterisk] config_dir)")
    disc = Discovery()
    discover_pjsip(d, disc, catalogue if catalogue is not None else build_catalogue())
    discover_channel(d, "sip.conf", "sip", disc)
    discover_channel(d, "iax.conf", "iax", disc)
    if not any((d / f).is_file() for f in ("pjsip.conf", "sip.conf", "iax.conf")):
        disc.notes.append(f"{d}: no pjsip.conf, sip.conf or iax.conf")
    return disc.finish()


# -- store ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Change:
    action: str  # add | update | keep | remove | conflict
    entry: str
    sources: tuple[str, ...] = ()
    services: tuple[str, ...] = ()
    why: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"action": self.action, "entry": self.entry, "sources": list(self.sources),
                "services": list(self.services), "why": self.why}


def plan(core: Core, disc: Discovery, *, prune: bool = True) -> list[Change]:
    """What `apply` would do, without doing it."""
    out: list[Change] = []
    names = set()
    for t in disc.trunks:
        name = t.entry_name
        names.add(name)
        services = tuple(s for s in t.services if s in core.config.services)
        if not services:
            out.append(Change("conflict", name, tuple(t.sources), (), "its service is not in the catalogue"))
            continue
        old = core.store.get_entry(name)
        if old is None:
            out.append(Change("add", name, tuple(t.sources), services))
        elif old.origin != Origin.TRUNK:
            out.append(Change("conflict", name, tuple(t.sources), services,
                              f"an entry of origin {old.origin} has this name; left alone"))
        elif {s.text for s in old.sources} == {Source.parse(s).text for s in t.sources} and \
                set(old.services) == set(services):
            out.append(Change("keep", name, tuple(t.sources), services))
        else:
            out.append(Change("update", name, tuple(t.sources), services))
    if prune:
        for e in core.store.entries():
            if e.origin == Origin.TRUNK and e.name.startswith(ENTRY_PREFIX) and e.name not in names:
                out.append(Change("remove", e.name, tuple(s.text for s in e.sources), e.services,
                                  "no longer in Asterisk's configuration"))
    return out


def apply(core: Core, disc: Discovery, *, prune: bool = True, actor: str = "") -> list[Change]:
    """Store the discovery: one entry per trunk, origin trunk, its protocol only."""
    changes = plan(core, disc, prune=prune)
    found = {t.entry_name: t for t in disc.trunks}
    for ch in changes:
        if ch.action in ("add", "update"):
            t = found[ch.entry]
            core.allow(ch.entry, list(ch.sources), list(ch.services), origin=Origin.TRUNK, actor=actor,
                       replace=True, note=f"discovered: {t.tech} trunk {t.name}")
        elif ch.action == "remove":
            core.revoke(ch.entry, origin=Origin.TRUNK, actor=actor)
    return changes
