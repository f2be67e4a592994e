"""tm4.toml: every key optional, each with the default documented in DESIGN.md.

The dataclasses below are the schema: msgspec checks a file against their type hints
(ranges as `Annotated[int, Meta(...)]`, values with a shape of their own as the small
`str` types of the next block), so `tm4d --check-config`, tm4d and every CLI verb read a
file the same way and refuse a bad one naming the file and the key:

    /etc/tm4/tm4.toml: [guard] failures: must be at least 1, got 0

A new section is a dataclass, one line in SECTIONS and one field of Config; a map of
tables ([zones.NAME]) is `dict[KeyType, SectionClass]` in SECTIONS. A rule that spans
keys is a function in CHECKS.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import tomllib
import typing
from collections.abc import Callable
from dataclasses import dataclass, field, fields, is_dataclass
from datetime import timedelta
from functools import cache
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

from tm4.core.durations import parse_duration
from tm4.core.errors import ConfigError, Tm4Error
from tm4.core.services import Service, build_catalogue, parse_ports, resolve_services
from tm4.core.text import escape_control

DEFAULT_PATH = "/etc/tm4/tm4.toml"


def config_path(explicit: str | None = None) -> Path:
    return Path(explicit or os.environ.get("TM4_CONFIG") or DEFAULT_PATH)


# -- value types: each is a str (or int) at run time, checked by its function in _CHECKS ----

class Duration(str):
    """'90s', '15m', '2h', '1d', '1w' or combined ('1h30m'): positive, at most 1000 days."""


class AbsPath(str):
    """An absolute file system path."""


class OptionalAbsPath(str):
    """An absolute file system path, or "" for none."""


class Word(str):
    """A non-empty name without spaces or control characters (user, group, endpoint)."""


class Line(str):
    """Free text on one line: no control characters (it may end up in AMI or a log)."""


class Host(str):
    """A host name or IP address."""


class HostPort(str):
    """HOST:PORT ([v6]:PORT), or "" for off."""


class OptionalHost(str):
    """A host name or IP address, or "" for none."""


class Network(str):
    """An IP address or network (CIDR)."""


class NameServer(str):
    """'192.0.2.53', '192.0.2.53:5353', '2001:db8::53' or '[2001:db8::53]:5353'."""


class Probe(str):
    """'A|AAAA|TXT NAME @server[:port] ...' (the dial-in's external address by DNS)."""


class PortSpec(str):
    """'5060', '8088-8089', '8001,8003' (a bare number too)."""


class HighRange(str):
    """One port range above 1023, e.g. '10000-20000'."""


class OptionalHighRange(str):
    """One port range above 1023, or "" for none."""


class NetnsName(str):
    """A network namespace name, or "" for the host's."""


class ServiceName(str):
    """One or more service names or TM3 codes ("sip-udp", "1 3")."""


class ServiceKey(str):
    """The name of a [services.NAME] table: lower case letters, digits, '-' and '_'."""


class ZoneKey(str):
    """A zone name ([zones.NAME], [interfaces] values): lower case letters, digits, '-', '_'."""


class AutoBool(str):
    """"auto", true or false (held as "auto", "true", "false")."""


class JailName(str):
    """A fail2ban jail's name, as in jail.conf's [sections]."""


class IfName(str):
    """A network interface name as `ip link` shows it (at most 15 characters)."""


Port = Annotated[int, msgspec.Meta(ge=1, le=65535)]
Count = Annotated[int, msgspec.Meta(ge=1, le=1_000_000)]
Argv = Annotated[list[Annotated[str, msgspec.Meta(min_length=1)]], msgspec.Meta(max_length=64)]


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

class Bad(Exception):
    """One key's problem, before the file's name is put in front."""

    def __init__(self, where: str, problem: str):
        # keys and section names come from the file: a control character in one must not
        # split or overwrite the admin's one line
        super().__init__(escape_control(f"{where}: {problem}" if where else problem))


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
                                       f"got {_shown(cfg.dns.refresh_max)}")


def _sip_admission(cfg: Config) -> None:
    sa = cfg.sip_admission
    if sa.domains and cfg.firewall.backend != "nft":
        raise Bad("[sip_admission] domains", 'needs [firewall] backend = "nft" (the REGISTER is matched on '
                  "the first bytes of the UDP payload, which the iptables backend does not translate)")
    for i, name in enumerate(sa.domains):
        labels = name.rstrip(".").split(".")
        if _ip(name) or len(labels) < 2 or not all(
                re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?", x) for x in labels):
            raise Bad(f"[sip_admission] domains[{i}]", "must be a DNS name such as \"xq356jq.dyndns.org\" "
                      f"(an address is no secret: scanners use it), got {_shown(name)}")
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
            raise Bad(f"[interfaces] {iface}", f"no zone named {_shown(zone)} (zones: {', '.join(known)})")


def _fail2ban(cfg: Config) -> None:
    d = parse_duration(cfg.fail2ban.debounce)
    if not timedelta(seconds=1) <= d <= timedelta(minutes=10):
        raise Bad("[fail2ban] debounce", f"must be 1s to 10m, got {_shown(cfg.fail2ban.debounce)}")
    if len(set(cfg.fail2ban.jails)) != len(cfg.fail2ban.jails):
        raise Bad("[fail2ban] jails", f"names a jail twice, got {_shown(list(cfg.fail2ban.jails))}")


CHECKS: list[Callable[[Config], None]] = [_known_services, _refresh_bounds, _sip_admission, _zones, _fail2ban]


# -- the checks of the value types ----------------------------------------------------------

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_HOSTNAME = re.compile(r"(?=.{1,253}$)[A-Za-z0-9_]([A-Za-z0-9_-]{0,62})(\.[A-Za-z0-9_]([A-Za-z0-9_-]{0,62}))*\.?")


def _text(v: Any) -> str:
    if not isinstance(v, str):
        raise TypeError(f"must be a string, got {_shown(v)}")
    return v


def _duration(v: Any) -> str:
    if not isinstance(v, str):
        raise TypeError(f'must be a duration such as "90s", "15m", "2h", "1d", got {_shown(v)}')
    try:
        parse_duration(v)
    except Tm4Error as exc:
        raise ValueError(str(exc)) from None
    return v


def _abs_path(v: Any) -> str:
    s = _text(v)
    if not s.startswith("/") or "\x00" in s:
        raise ValueError(f"must be an absolute path, got {_shown(v)}")
    return s


def _word(v: Any) -> str:
    s = _text(v)
    if not s or any(c.isspace() for c in s) or _CONTROL.search(s):
        raise ValueError(f"must be a name without spaces, got {_shown(v)}")
    return s


def _line(v: Any) -> str:
    s = _text(v)
    if _CONTROL.search(s):
        raise ValueError(f"must not hold control characters (line breaks, tabs...), got {_shown(v)}")
    return s


def _ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _host(v: Any) -> str:
    s = _text(v)
    if not (_ip(s) or _HOSTNAME.fullmatch(s)):
        raise ValueError(f"must be a host name or IP address, got {_shown(v)}")
    return s


def split_host_port(text: str, default_port: int | None = None) -> tuple[str, int]:
    """'h:p', '[v6]:p', or (with a default port) 'h', '2001:db8::1', '[v6]' -> (host, port)."""
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\](?::(\d{1,5}))?|([^\s:\[\]]+)(?::(\d{1,5}))?|([0-9A-Fa-f:.]+)", text)
    if not m:
        raise ValueError("not HOST:PORT")
    host = m.group(1) or m.group(3) or m.group(5)
    port_text = m.group(2) or m.group(4)
    if m.group(5) and not _ip(host):
        raise ValueError("not HOST:PORT")
    if port_text is None:
        if default_port is None:
            raise ValueError("the port is missing")
        return host, default_port
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise ValueError(f"port {port} is outside 1-65535")
    return host, port


def _host_port(v: Any) -> str:
    s = _text(v)
    if s:
        try:
            host, _ = split_host_port(s)
        except ValueError as exc:
            raise ValueError(f'must be HOST:PORT such as "127.0.0.1:4573" ({exc}), got {_shown(v)}') from None
        _host(host)
    return s


def _optional_host(v: Any) -> str:
    return _host(v) if _text(v) else ""


def _network(v: Any) -> str:
    from tm4.core.model import parse_network  # the very check the dial-in makes at run time

    s = _text(v)
    try:
        parse_network(s, force=True)
    except Tm4Error as exc:
        raise ValueError(str(exc)) from None
    return s


def _nameserver(v: Any) -> str:
    s = _text(v)
    try:
        host, _ = split_host_port(s.strip(), 53)
    except ValueError:
        host = ""
    if not _ip(host):
        raise ValueError(f'must be an IP address, optionally with ":port", got {_shown(v)}')
    return s


def _probe(v: Any) -> str:
    s = _text(v)
    words = s.split()
    ok = len(words) >= 3 and words[0].upper() in ("A", "AAAA", "TXT") and bool(_HOSTNAME.fullmatch(words[1]))
    for w in words[2:] if ok else ():
        try:
            host, _ = split_host_port(w[1:], 53) if w.startswith("@") else ("", 0)
        except ValueError:
            host = ""
        ok = ok and _ip(host)
    if not ok:
        raise ValueError(f'must be "A|AAAA|TXT NAME @server[:port] ...", got {_shown(v)}')
    return s


def _port_spec(v: Any) -> str:
    if isinstance(v, bool) or not isinstance(v, str | int):
        raise TypeError(f'must be ports such as "5060", "8088-8089" or "8001,8003", got {_shown(v)}')
    if v == "":
        return v
    try:
        parse_ports(v)
    except Tm4Error:
        raise ValueError(f'must be ports between 1 and 65535 such as "5060", "8088-8089" or "8001,8003", '
                         f"got {_shown(v)}") from None
    return str(v)


def _high_range(v: Any, *, empty_ok: bool = False) -> str:
    s = _text(v)
    if empty_ok and not s:
        return s
    try:
        ranges = parse_ports(s)
    except Tm4Error:
        ranges = ()
    if len(ranges) != 1 or ranges[0][0] < 1024:
        raise ValueError(f'must be one range of ports above 1023 such as "10000-20000", got {_shown(v)}')
    return s


def _netns(v: Any) -> str:
    s = _text(v)
    if s and (s in (".", "..") or not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", s)):
        raise ValueError(f"must be a network namespace name, got {_shown(v)}")
    return s


def _service_name(v: Any) -> str:
    s = _text(v)
    # digits are Travelin' Man 3 codes; "," and spaces separate several in one string
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_, -]{0,63}", s):
        raise ValueError(f"must be a service name such as \"sip-udp\", got {_shown(v)}")
    return s


def _service_key(v: Any) -> str:
    s = _text(v)
    if not re.fullmatch(r"[a-z][a-z0-9_-]{0,31}", s):
        raise ValueError(f"a service name must be lower case letters, digits, '-' or '_', got {_shown(v)}")
    return s


_CHECKS: dict[type, Callable[[Any], Any]] = {
    Duration: _duration,
    AbsPath: _abs_path,
    OptionalAbsPath: lambda v: _abs_path(v) if _text(v) else "",
    Word: _word,
    Line: _line,
    Host: _host,
    HostPort: _host_port,
    OptionalHost: _optional_host,
    Network: _network,
    NameServer: _nameserver,
    Probe: _probe,
    PortSpec: _port_spec,
    HighRange: _high_range,
    OptionalHighRange: lambda v: _high_range(v, empty_ok=True),
    NetnsName: _netns,
    ServiceName: _service_name,
    ServiceKey: _service_key,
    ZoneKey: lambda v: _pattern(v, r"[a-z][a-z0-9_-]{0,31}", "a zone name must be lower case letters, digits, "
                                "'-' or '_'"),
    AutoBool: lambda v: _auto_bool(v),
    JailName: lambda v: _pattern(v, r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", "a jail name must be letters, digits, "
                                 "'_', '.' or '-' (at most 64)"),
    IfName: lambda v: _pattern(v, r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,14}", "an interface name must be 1-15 "
                               "letters, digits, '_', '.', '@' or '-'"),
}


def _auto_bool(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if v == "auto":
        return v
    raise ValueError(f'must be "auto", true or false, got {_shown(v)}')


def _pattern(v: Any, pattern: str, what: str) -> str:
    s = _text(v)
    if not re.fullmatch(pattern, s):
        raise ValueError(f"{what}, got {_shown(v)}")
    return s


def _dec_hook(tp: type, value: Any) -> Any:
    check = _CHECKS.get(tp)
    if check is None:
        raise NotImplementedError(tp)
    return tp(check(value))  # a str as the file has it (msgspec wants an instance of `tp`)


# -- reading a file -----------------------------------------------------------------------

def _shown(value: Any) -> str:
    """A value as an error message shows it: TOML-like, short, control characters escaped."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, dict):
        text = "a table"
    else:
        try:
            text = json.dumps(value, ensure_ascii=True, default=str)
        except ValueError:  # nan
            text = str(value)
    return text if len(text) <= 60 else text[:57] + "..."


_WORDS = {"int": "a whole number", "str": "a string", "bool": "true or false", "array": "a list",
          "object": "a table", "float": "a number", "null": "a value", "datetime": "a string",
          "date": "a string", "time": "a string"}


@cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, include_extras=True)


def _strip(tp: Any) -> Any:
    while typing.get_origin(tp) is Annotated:
        tp = typing.get_args(tp)[0]
    return tp


def _type_at(tp: Any, path: list[str | int]) -> Any:
    for step in path:
        tp = _strip(tp)
        if isinstance(tp, type) and is_dataclass(tp):
            tp = _hints(tp).get(str(step))
        elif typing.get_origin(tp) in (list, dict):
            tp = typing.get_args(tp)[-1]
        else:
            return None
    return tp


def _bounds(tp: Any) -> tuple[Any, Any]:
    """The ge/le of an Annotated[int, Meta(...)]."""
    lo = hi = None
    for meta in typing.get_args(tp)[1:] if typing.get_origin(tp) is Annotated else ():
        if isinstance(meta, msgspec.Meta):
            lo, hi = meta.ge if meta.ge is not None else lo, meta.le if meta.le is not None else hi
    return lo, hi


def _value_at(value: Any, path: list[str | int]) -> Any:
    for step in path:
        value = value[step]
    return value


def _explain(message: str, tp: Any) -> str:
    """msgspec's words for an admin: 'Expected `int` >= 1' -> 'must be at least 1'."""
    lo, hi = _bounds(tp)
    if lo is not None and hi is not None and hi - lo <= 1000 and re.fullmatch(r"Expected `int` [<>]= \S+", message):
        return f"must be {lo} to {hi}"  # a narrow range is told whole
    if m := re.fullmatch(r"Expected `\w+` >= (\S+)", message):
        return f"must be at least {m.group(1)}"
    if m := re.fullmatch(r"Expected `\w+` <= (\S+)", message):
        return f"must be at most {m.group(1)}"
    if m := re.fullmatch(r"Expected `str` of length >= 1", message):
        return "must not be empty"
    if m := re.fullmatch(r"Expected `\w+` of length >= (\d+)", message):
        return f"must hold at least {m.group(1)}"
    if m := re.fullmatch(r"Expected `\w+` of length <= (\d+)", message):
        return f"must hold at most {m.group(1)}"
    if m := re.fullmatch(r"Expected `([\w |]+)`, got `\w+`", message):
        return "must be " + " or ".join(_WORDS.get(w, w) for w in m.group(1).split(" | "))
    if message.startswith("Invalid enum value") and typing.get_origin(_strip(tp)) is Literal:
        words = [f"'{a}'" for a in typing.get_args(_strip(tp))]
        return "must be " + (" or ".join(words) if len(words) < 3 else ", ".join(words[:-1]) + " or " + words[-1])
    return message


def _convert(tp: Any, value: Any, where: str) -> Any:
    """`value` checked against `tp`; Bad names the key and says what is wrong with it."""
    try:
        return msgspec.convert(value, tp, strict=True, dec_hook=_dec_hook)
    except msgspec.ValidationError as exc:
        message, sep, at = str(exc).rpartition(" - at `")
        if not sep:
            message, at = str(exc), ""
        path: list[str | int] = [int(p[1:-1]) if p.startswith("[") else p[1:]
                                 for p in re.findall(r"\.[^.\[`]+|\[\d+\]", at.rstrip("`").removeprefix("$"))]
        try:
            got = _value_at(value, path)
        except (LookupError, TypeError):
            got = None
        problem = _explain(message, _type_at(tp, path))
        if problem != message or message.startswith("Expected"):  # the value, as msgspec does not say it
            problem += f", got {_shown(got)}"
        key = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".")
        raise Bad(f"{where} {key}".strip() if key else where, problem) from None


def _close(word: str, known: list[str]) -> list[str]:
    import difflib  # only when a file has a typo

    return difflib.get_close_matches(word, known, n=1)


def _unknown_keys(tp: Any, value: Any, where: str) -> None:
    """A key the schema does not know is refused (a typo must not silently mean the default)."""
    tp = _strip(tp)
    if not (isinstance(tp, type) and is_dataclass(tp)) or not isinstance(value, dict):
        return
    known = [f.name for f in fields(tp)]
    for key in value:
        if key not in known:
            near = _close(str(key), known)
            hint = f" (did you mean {near[0]}?)" if near else f" (known: {', '.join(known)})"
            raise Bad(f"{where} {key}", f"unknown key{hint}")


def _read_key(name: str, tp: Any, value: Any) -> Any:
    """One top-level key of the file: a [section], a map of [name.KEY] tables or a value."""
    if typing.get_origin(tp) is dict:
        key_tp, item_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            raise Bad(f"[{name}]", f"must hold tables like [{name}.NAME], got {_shown(value)}")
        out = {}
        for key, item in value.items():
            table = isinstance(_strip(item_tp), type) and is_dataclass(_strip(item_tp))
            where = f"[{name}.{key}]" if table else f"[{name}] {key}"
            _convert(key_tp, key, f"[{name}] {key}")
            _unknown_keys(item_tp, item, where)
            out[key] = _convert(item_tp, item, where)
        return out
    if isinstance(tp, type) and is_dataclass(tp):
        if not isinstance(value, dict):
            raise Bad(f"[{name}]", f"must be a table, got {_shown(value)}")
        _unknown_keys(tp, value, f"[{name}]")
        return _convert(tp, value, f"[{name}]")
    return _convert(tp, value, name)


def _build(data: dict[str, Any], path: Path | None) -> Config:
    cfg = Config(path=path, raw=data)
    for key in data:
        if key not in SECTIONS:
            near = _close(str(key), list(SECTIONS))
            raise Bad(str(key), "unknown section or key" + (f" (did you mean {near[0]}?)" if near else ""))
    for name, tp in SECTIONS.items():
        if name not in data:
            continue
        value = _read_key(name, tp, data[name])
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
