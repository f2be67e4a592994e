"""tm4.toml: every key optional, each with the default documented in DESIGN.md."""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, fields
from datetime import timedelta
from pathlib import Path
from typing import Any

from tm4.core.durations import parse_duration
from tm4.core.errors import ConfigError, Tm4Error
from tm4.core.services import Service, build_catalogue, parse_ports, resolve_services

DEFAULT_PATH = "/etc/tm4/tm4.toml"


def config_path(explicit: str | None = None) -> Path:
    return Path(explicit or os.environ.get("TM4_CONFIG") or DEFAULT_PATH)


@dataclass
class FirewallConfig:
    backend: str = "nft"
    public_services: list[str] = field(default_factory=list)
    rtp: str = "10000-20000"
    # Run nft inside this network namespace (tests, `tm4 lab`); empty: the host's.
    netns: str = ""
    # Responsive mode for public SIP: per-source limits before the guard sees events.
    rate_packets: int = 50  # packets per 10 s
    rate_flows: int = 10  # signalling flows one unknown source may hold open at once (conntrack count)
    clamp: str = "60s"


@dataclass
class AmiConfig:
    host: str = "127.0.0.1"
    port: int = 5038
    username: str = "tm4"
    secret: str = ""
    # A half-open connection is found by a Ping unanswered within ping_timeout.
    ping_interval: str = "5s"
    ping_timeout: str = "3s"
    connect_timeout: str = "3s"


@dataclass
class GuardConfig:
    failures: int = 5
    window: str = "60s"
    challenges: int = 30
    bans: list[str] = field(default_factory=lambda: ["1h", "1d", "1w"])
    promote: bool = False
    promote_ttl: str = "1h"
    ipv6_prefix: int = 64
    max_sources: int = 50_000  # sources remembered at once; the furthest from a ban go first
    # Asterisk's security log (logger.conf `security => security`): after an AMI gap the
    # guard catches up from it; "" turns the catch-up off.
    security_log: str = "/var/log/asterisk/security"


@dataclass
class DialinConfig:
    external_address: str = ""
    tts: str = ""
    grant_services: list[str] = field(default_factory=lambda: ["sip-udp", "sip-tcp", "sip-tls"])
    grant_ttl: str = "24h"
    direct_endpoints: list[str] = field(default_factory=lambda: ["anonymous"])
    caller_failures: int = 5
    caller_window: str = "1h"
    global_failures: int = 20
    forbidden: list[str] = field(default_factory=list)
    global_window: str = "1h"  # window of `global_failures`
    delay_max: str = "30s"  # longest wait per try while failures run past global_failures
    discover: list[str] = field(default_factory=lambda: [
        "A myip.opendns.com @208.67.222.222 @208.67.220.220",
        "TXT o-o.myaddr.l.google.com @216.239.32.10",
        "AAAA myip.opendns.com @2620:119:35::35",
    ])  # external address by DNS: "TYPE NAME @server[:port] ...", tried in order
    discover_timeout: str = "2s"
    discover_cache: str = "10m"
    tts_cache: str = "/var/cache/tm4/tts"  # read-back files synthesized at call time
    fastagi_secret: str = ""  # accept FastAGI from any local uid that knows it (?secret=...)


@dataclass
class DnsConfig:
    nameservers: list[str] = field(default_factory=list)
    refresh_min: str = "60s"
    refresh_max: str = "10m"
    timeout: str = "3s"
    max_addresses: int = 16
    stale_after: str = "7d"


@dataclass
class AsteriskConfig:
    config_dir: str = "/etc/asterisk"


@dataclass
class DaemonConfig:
    socket: str = "/run/tm4/tm4.sock"
    fastagi: str = "127.0.0.1:4573"
    asterisk_group: str = "asterisk"
    notify_command: list[str] = field(default_factory=list)
    notify_timeout: str = "10s"
    # While this file exists, `tm4 disable` refuses to open the firewall.
    lock_file: str = "/etc/tm4/locked"
    # How often tm4d compares the kernel's table with what it applied.
    drift_interval: str = "2s"
    sweep_interval: str = "30s"
    # Safe mode: after a boot that ended within `safe_mode_short_boot` of starting,
    # ssh is open to everyone until `safe_mode_uptime` of uptime.
    safe_mode: bool = True
    safe_mode_short_boot: str = "10m"
    safe_mode_uptime: str = "5m"


@dataclass
class KnockConfig:
    enabled: bool = False
    ttl: str = "1h"
    protocol: str = "tcp"
    ports: list[int] = field(default_factory=list)
    length: int = 3
    range: str = "20000-60000"
    step_timeout: str = "10s"
    services: list[str] = field(default_factory=lambda: ["sip-udp", "sip-tcp", "sip-tls"])
    activate: bool = False


_SECTIONS: dict[str, type] = {
    "firewall": FirewallConfig,
    "ami": AmiConfig,
    "guard": GuardConfig,
    "dialin": DialinConfig,
    "dns": DnsConfig,
    "asterisk": AsteriskConfig,
    "daemon": DaemonConfig,
    "knock": KnockConfig,
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


def _section(cls: type, name: str, table: Any) -> Any:
    if not isinstance(table, dict):
        raise ConfigError(f"[{name}] must be a table")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(table) - set(known))
    if unknown:
        raise ConfigError(f"[{name}]: unknown key(s) {', '.join(unknown)}")
    obj = cls()
    for key, value in table.items():
        default = getattr(obj, key)
        if isinstance(default, bool) and not isinstance(value, bool):
            raise ConfigError(f"{name}.{key} must be true or false")
        if isinstance(default, int) and not isinstance(default, bool) and (
            not isinstance(value, int) or isinstance(value, bool)
        ):
            raise ConfigError(f"{name}.{key} must be a whole number")
        if isinstance(default, str) and not isinstance(value, str):
            raise ConfigError(f"{name}.{key} must be a string")
        if isinstance(default, list) and not isinstance(value, list):
            raise ConfigError(f"{name}.{key} must be a list")
        setattr(obj, key, value)
    return obj


def parse_config(data: dict[str, Any], path: Path | None = None) -> Config:
    """Build a Config from parsed TOML; every value is checked here, once."""
    cfg = Config(path=path, raw=data)
    for key, value in data.items():
        if key == "state_dir":
            if not isinstance(value, str) or not value:
                raise ConfigError("state_dir must be a non-empty string")
            cfg.state_dir = Path(value)
        elif key == "services":
            if not isinstance(value, dict):
                raise ConfigError("[services] must hold tables like [services.sip-udp]")
            try:
                cfg.services = build_catalogue(value)
            except Tm4Error as exc:
                raise ConfigError(f"[services]: {exc}") from None
        elif key in _SECTIONS:
            setattr(cfg, key, _section(_SECTIONS[key], key, value))
        else:
            raise ConfigError(f"unknown top-level key {key!r}")
    try:
        if cfg.firewall.backend not in ("nft", "iptables"):
            raise ConfigError("firewall.backend must be 'nft' or 'iptables'")
        resolve_services(cfg.firewall.public_services or ["ssh"], cfg.services)
        if not all(isinstance(a, str) and a for a in cfg.daemon.notify_command):
            raise ConfigError("daemon.notify_command must be a list of non-empty strings (an argv)")
        rtp = cfg.rtp_range()
        if rtp and rtp[0] < 1024:
            raise ConfigError(f"firewall.rtp {cfg.firewall.rtp!r} touches ports below 1024; refused")
        for d in (cfg.guard.window, cfg.dialin.grant_ttl, cfg.dns.refresh_min, cfg.dns.refresh_max,
                  cfg.knock.ttl, cfg.firewall.clamp, *cfg.guard.bans,
                  cfg.ami.ping_interval, cfg.ami.ping_timeout, cfg.ami.connect_timeout,
                  cfg.daemon.notify_timeout, cfg.daemon.drift_interval, cfg.daemon.sweep_interval,
                  cfg.daemon.safe_mode_short_boot, cfg.daemon.safe_mode_uptime):
            parse_duration(d)
    except ConfigError:
        raise
    except Tm4Error as exc:
        raise ConfigError(str(exc)) from None
    return cfg


def load_config(path: str | Path | None = None, *, missing_ok: bool = True) -> Config:
    """Load tm4.toml; a missing file gives the defaults (unless missing_ok is False)."""
    p = config_path(str(path) if path else None)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        if missing_ok:
            return Config(path=p)
        raise ConfigError(f"config file {p} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {p}: {exc.strerror}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {p} is not valid TOML: {exc}") from None
    return parse_config(data, p)
