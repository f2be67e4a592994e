"""tm4.toml: every key optional, each with the default documented in DESIGN.md.

The dataclasses below are the schema: msgspec checks a file against their type hints
(ranges as `Annotated[int, Meta(...)]`, values with a shape of their own as the small
`str` types of tm4.core.values; tm4.core.schema reads a document key by key), so `tm4d --check-config`, tm4d and every CLI verb read a
file the same way and refuse a bad one naming the file and the key:

    /etc/tm4/tm4.toml: [guard] failures: must be at least 1, got 0

A new section is a dataclass, one line in SECTIONS and one field of Config; a map of
tables ([zones.NAME]) is `dict[KeyType, SectionClass]` in SECTIONS. A rule that spans
keys is a function in CHECKS.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field, is_dataclass
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

from tm4.core.durations import parse_duration
from tm4.core.errors import ConfigError, Tm4Error
from tm4.core.schema import Bad, close_matches, read_key
from tm4.core.services import Service, build_catalogue, parse_ports, resolve_services
from tm4.core.values import (  # the shapes the dataclasses below are written in
    AbsPath,
    Argv,
    AutoBool,
    Count,
    Duration,
    HighRange,
    Host,
    HostPort,
    IfName,
    JailName,
    Line,
    NameServer,
    NetnsName,
    Network,
    OptionalAbsPath,
    OptionalHighRange,
    OptionalHost,
    Port,
    PortSpec,
    Probe,
    ServiceKey,
    ServiceName,
    Word,
    ZoneKey,
    is_ip,
    shown,
)

DEFAULT_PATH = "/etc/tm4/tm4.toml"


def config_path(explicit: str | None = None) -> Path:
    return Path(explicit or os.environ.get("TM4_CONFIG") or DEFAULT_PATH)


# -- the sections -------------------------------------------------------------------------

@dataclass
class FirewallConfig:
    backend: Literal["nft", "iptables"] = "nft"
    public_services: list[ServiceName] = field(default_factory=list)
    rtp: OptionalHighRange = "10000-20000"
    # Run nft inside this network namespace (tests, `tm4 lab`); empty: the host's.
    netns: NetnsName = ""
    # Responsive mode for public SIP: per-source limits before the guard sees events.
    rate_packets: Count = 50  # packets per 10 s
    rate_flows: Count = 10  # signalling flows one unknown source may hold open at once (conntrack count)
    clamp: Duration = "60s"


@dataclass
class AmiConfig:
    host: Host = "127.0.0.1"
    port: Port = 5038
    username: Word = "tm4"
    secret: Line = ""
    # A half-open connection is found by a Ping unanswered within ping_timeout.
    ping_interval: Duration = "5s"
    ping_timeout: Duration = "3s"
    connect_timeout: Duration = "3s"


@dataclass
class GuardConfig:
    failures: Count = 5
    window: Duration = "60s"
    challenges: Count = 30
    bans: Annotated[list[Duration], msgspec.Meta(min_length=1, max_length=100)] = field(
        default_factory=lambda: ["1h", "1d", "1w"])
    promote: bool = False
    promote_ttl: Duration = "1h"
    ipv6_prefix: Annotated[int, msgspec.Meta(ge=32, le=128)] = 64
    max_sources: Annotated[int, msgspec.Meta(ge=1, le=100_000_000)] = 50_000  # sources remembered at once; the furthest from a ban go first
    # Asterisk's security log (logger.conf `security => security`): after an AMI gap the
    # guard catches up from it; "" turns the catch-up off.
    security_log: OptionalAbsPath = "/var/log/asterisk/security"


@dataclass
class DialinConfig:
    external_address: OptionalHost = ""
    tts: Literal["", "espeak-ng", "flite"] = ""
    grant_services: list[ServiceName] = field(default_factory=lambda: ["sip-udp", "sip-tcp", "sip-tls"])
    grant_ttl: Duration = "24h"
    direct_endpoints: list[Word] = field(default_factory=lambda: ["anonymous"])
    caller_failures: Count = 5
    caller_window: Duration = "1h"
    global_failures: Count = 20
    forbidden: list[Network] = field(default_factory=list)
    global_window: Duration = "1h"  # window of `global_failures`
    delay_max: Duration = "30s"  # longest wait per try while failures run past global_failures
    discover: list[Probe] = field(default_factory=lambda: [
        "A myip.opendns.com @208.67.222.222 @208.67.220.220",
        "TXT o-o.myaddr.l.google.com @216.239.32.10",
        "AAAA myip.opendns.com @2620:119:35::35",
    ])  # external address by DNS: "TYPE NAME @server[:port] ...", tried in order
    discover_timeout: Duration = "2s"
    discover_cache: Duration = "10m"
    tts_cache: AbsPath = "/var/cache/tm4/tts"  # read-back files synthesized at call time
    fastagi_secret: Line = ""  # accept FastAGI from any local uid that knows it (?secret=...)


@dataclass
class DnsConfig:
    nameservers: list[NameServer] = field(default_factory=list)
    refresh_min: Duration = "60s"
    refresh_max: Duration = "10m"
    timeout: Duration = "3s"
    max_addresses: Annotated[int, msgspec.Meta(ge=1, le=1024)] = 16
    stale_after: Duration = "7d"


@dataclass
class AsteriskConfig:
    config_dir: AbsPath = "/etc/asterisk"


@dataclass
class DaemonConfig:
    socket: AbsPath = "/run/tm4/tm4.sock"
    fastagi: HostPort = "127.0.0.1:4573"
    asterisk_group: Word = "asterisk"
    notify_command: Argv = field(default_factory=list)
    notify_timeout: Duration = "10s"
    # While this file exists, `tm4 disable` refuses to open the firewall.
    lock_file: AbsPath = "/etc/tm4/locked"
    # How often tm4d compares the kernel's table with what it applied.
    drift_interval: Duration = "2s"
    sweep_interval: Duration = "30s"
    # Safe mode: after a boot that ended within `safe_mode_short_boot` of starting,
    # ssh is open to everyone until `safe_mode_uptime` of uptime.
    safe_mode: bool = True
    safe_mode_short_boot: Duration = "10m"
    safe_mode_uptime: Duration = "5m"


@dataclass
class KnockConfig:
    enabled: bool = False
    ttl: Duration = "1h"
    protocol: Literal["tcp", "udp"] = "tcp"
    ports: Annotated[list[Port], msgspec.Meta(max_length=16)] = field(default_factory=list)
    length: Annotated[int, msgspec.Meta(ge=3, le=16)] = 3
    range: HighRange = "20000-60000"
    step_timeout: Duration = "10s"
    services: list[ServiceName] = field(default_factory=lambda: ["sip-udp", "sip-tcp", "sip-tls"])
    activate: bool = False


# A SIP domain name: letters, digits, '-' and '.', at most 253 (checked further by tm4.admission).
SipDomain = Annotated[str, msgspec.Meta(min_length=1, max_length=253, pattern=r"^[A-Za-z0-9.-]+$")]


@dataclass
class SipAdmissionConfig:
    domains: Annotated[list[SipDomain], msgspec.Meta(max_length=64)] = field(
        default_factory=list)  # secret SIP domains: a REGISTER to one admits its source; empty: off
    ttl: Duration = "1h"  # how long one REGISTER admits its source (each REGISTER refreshes it)
    services: list[ServiceName] = field(default_factory=lambda: ["sip-udp"])  # UDP services only


@dataclass
class Fail2banConfig:
    # keep fail2ban's ignore lists: true, false, or "auto" (when fail2ban is installed and
    # tm4d guards the host, not a network namespace)
    enabled: AutoBool = "auto"
    jail_d: AbsPath = "/etc/fail2ban/jail.d"  # tm4 writes tm4-ignoreip.local here (read after jail.local)
    # jails whose ignoreip is tm4's whitelist
    jails: Annotated[list[JailName], msgspec.Meta(min_length=1, max_length=64)] = field(
        default_factory=lambda: ["asterisk", "sshd"])
    debounce: Duration = "5s"  # the whitelist still this long: one drop-in write and jail reload (1s-10m)


@dataclass
class ServiceTable:
    """[services.NAME]: a catalogue service's ports overridden, or a new service."""

    proto: Literal["", "tcp", "udp"] = ""
    ports: PortSpec = ""
    description: Line = ""


@dataclass
class ZoneTable:
    """[zones.NAME]: the services a zone's members (entries, interfaces) reach."""

    services: list[ServiceName] = field(default_factory=list)


# Every top-level key of the file and its type: a section (dataclass), a map of tables
# (dict[KeyType, dataclass]) or a plain value.
SECTIONS: dict[str, Any] = {
    "state_dir": AbsPath,
    "services": dict[ServiceKey, ServiceTable],
    "firewall": FirewallConfig,
    "ami": AmiConfig,
    "guard": GuardConfig,
    "dialin": DialinConfig,
    "dns": DnsConfig,
    "asterisk": AsteriskConfig,
    "daemon": DaemonConfig,
    "knock": KnockConfig,
    "sip_admission": SipAdmissionConfig,
    "fail2ban": Fail2banConfig,
    "zones": dict[ZoneKey, ZoneTable],
    "interfaces": dict[IfName, ZoneKey],
}

# The plain [section] tables, in file order (the skeleton of `tm4 init` is made from them).
_SECTIONS: dict[str, type] = {
    name: tp for name, tp in SECTIONS.items() if isinstance(tp, type) and is_dataclass(tp)
}


@dataclass
class Config:
    path: Path | None = None
    state_dir: Path = Path("/var/lib/tm4")
    firewall: FirewallConfig = field(default_factory=FirewallConfig)
    ami: AmiConfig = field(default_factory=AmiConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    dialin: DialinConfig = field(default_factory=DialinConfig)
    dns: DnsConfig = field(default_factory=DnsConfig)
    asterisk: AsteriskConfig = field(default_factory=AsteriskConfig)
    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    knock: KnockConfig = field(default_factory=KnockConfig)
    sip_admission: SipAdmissionConfig = field(default_factory=SipAdmissionConfig)
    fail2ban: Fail2banConfig = field(default_factory=Fail2banConfig)
    zones: dict[str, ZoneTable] = field(default_factory=dict)
    interfaces: dict[str, str] = field(default_factory=dict)  # interface name -> zone
    services: dict[str, Service] = field(default_factory=build_catalogue)
    raw: dict[str, Any] = field(default_factory=dict)

    @property
    def store_path(self) -> Path:
        return self.state_dir / "tm4.db"

    def rtp_range(self) -> tuple[int, int] | None:
        if not self.firewall.rtp:
            return None
        (lo, hi), *rest = parse_ports(self.firewall.rtp, "firewall.rtp")
        if rest:
            raise ConfigError("firewall.rtp must be one range, e.g. 10000-20000")
        return lo, hi

    def duration(self, value: str) -> timedelta:
        return parse_duration(value)


# -- rules that span keys: each raises Bad(section, key, problem) -------------------------

def _known_services(cfg: Config) -> None:
    for section, key, names in (("firewall", "public_services", cfg.firewall.public_services),
                                ("dialin", "grant_services", cfg.dialin.grant_services),
                                ("knock", "services", cfg.knock.services)):
        if names or key == "public_services":
            try:
                resolve_services(names or ["ssh"], cfg.services)
            except Tm4Error as exc:
                raise Bad(f"[{section}] {key}", str(exc)) from None


def _refresh_bounds(cfg: Config) -> None:
    lo, hi = parse_duration(cfg.dns.refresh_min), parse_duration(cfg.dns.refresh_max)
    if hi < lo:
        raise Bad("[dns] refresh_max", f"must not be shorter than refresh_min ({cfg.dns.refresh_min}), "
                                       f"got {shown(cfg.dns.refresh_max)}")


def _sip_admission(cfg: Config) -> None:
    sa = cfg.sip_admission
    if sa.domains and cfg.firewall.backend != "nft":
        raise Bad("[sip_admission] domains", 'needs [firewall] backend = "nft" (the REGISTER is matched on '
                  "the first bytes of the UDP payload, which the iptables backend does not translate)")
    for i, name in enumerate(sa.domains):
        labels = name.rstrip(".").split(".")
        if is_ip(name) or len(labels) < 2 or not all(
                re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?", x) for x in labels):
            raise Bad(f"[sip_admission] domains[{i}]", "must be a DNS name such as \"xq356jq.dyndns.org\" "
                      f"(an address is no secret: scanners use it), got {shown(name)}")
    try:
        names = resolve_services(sa.services, cfg.services)
    except Tm4Error as exc:
        raise Bad("[sip_admission] services", str(exc)) from None
    tcp = [n for n in names if cfg.services[n].proto != "udp"]
    if tcp:
        raise Bad("[sip_admission] services", f"UDP services only ({', '.join(tcp)} is not): a REGISTER "
                  "can start anywhere in a TCP segment and TLS cannot be read")


def _zones(cfg: Config) -> None:
    from tm4.core.zones import zone_names

    for name, z in cfg.zones.items():
        try:
            resolve_services(z.services, cfg.services) if z.services else ()
        except Tm4Error as exc:
            raise Bad(f"[zones.{name}] services", str(exc)) from None
    known = zone_names(cfg)
    for iface, zone in cfg.interfaces.items():
        if zone not in known:
            raise Bad(f"[interfaces] {iface}", f"no zone named {shown(zone)} (zones: {', '.join(known)})")


def _fail2ban(cfg: Config) -> None:
    d = parse_duration(cfg.fail2ban.debounce)
    if not timedelta(seconds=1) <= d <= timedelta(minutes=10):
        raise Bad("[fail2ban] debounce", f"must be 1s to 10m, got {shown(cfg.fail2ban.debounce)}")
    if len(set(cfg.fail2ban.jails)) != len(cfg.fail2ban.jails):
        raise Bad("[fail2ban] jails", f"names a jail twice, got {shown(list(cfg.fail2ban.jails))}")


CHECKS: list[Callable[[Config], None]] = [_known_services, _refresh_bounds, _sip_admission, _zones, _fail2ban]


def _build(data: dict[str, Any], path: Path | None) -> Config:
    cfg = Config(path=path, raw=data)
    for key in data:
        if key not in SECTIONS:
            near = close_matches(str(key), list(SECTIONS))
            raise Bad(str(key), "unknown section or key" + (f" (did you mean {near[0]}?)" if near else ""))
    for name, tp in SECTIONS.items():
        if name not in data:
            continue
        value = read_key(name, tp, data[name])
        if name == "state_dir":
            cfg.state_dir = Path(value)
        elif name == "services":
            try:
                cfg.services = build_catalogue(data["services"])
            except Tm4Error as exc:
                raise Bad("", str(exc)) from None  # it names [services.NAME]
        else:
            setattr(cfg, name, value)
    for check in CHECKS:
        check(cfg)
    return cfg


def parse_config(data: dict[str, Any], path: Path | None = None) -> Config:
    """Build a Config from parsed TOML; every value is checked here, once."""
    try:
        return _build(data, path)
    except Bad as exc:
        raise ConfigError(f"{path}: {exc}" if path else str(exc)) from None


def load_config(path: str | Path | None = None, *, missing_ok: bool = True) -> Config:
    """Load tm4.toml; a missing file gives the defaults (unless missing_ok is False)."""
    p = config_path(str(path) if path else None)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        if missing_ok:
            return Config(path=p)
        raise ConfigError(f"config file {p} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {p}: {exc.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError(f"{p}: line {line}: not UTF-8 text (byte 0x{raw[exc.start]:02x}); "
                          "save the file as UTF-8") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: not valid TOML: {exc}") from None
    return parse_config(data, p)
