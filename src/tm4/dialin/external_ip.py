"""The server's external address, spoken to a dial-in caller for their softphone.

Where it comes from, first hit wins:
1. `[dialin] external_address` in tm4.toml;
2. Asterisk's own setting: `external_signaling_address` of a pjsip transport
   (pjsip.conf and the files it #includes);
3. DNS, asking servers that echo the asker's address (`[dialin] discover`):
   OpenDNS `myip.opendns.com` A/AAAA at its resolvers, Google
   `o-o.myaddr.l.google.com` TXT at ns1.google.com; each query with
   `discover_timeout`, all of them within twice that.

A discovered address is cached in the store for `discover_cache` (a failure
for one minute, so a dead DNS does not cost every caller the wait).
"""

from __future__ import annotations

import ipaddress
import json
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

from tm4.core.config import Config
from tm4.core.durations import parse_duration
from tm4.core.errors import ConfigError, ValidationError
from tm4.core.model import format_time, parse_time, utcnow
from tm4.core.store import Store

CACHE_KEY = "dialin_external_address"
NEGATIVE_TTL = timedelta(minutes=1)
_RDTYPES = ("A", "AAAA", "TXT")


@dataclass(frozen=True)
class Probe:
    rdtype: str
    name: str
    servers: tuple[tuple[str, int], ...]

    def __str__(self) -> str:
        return f"{self.rdtype} {self.name} " + " ".join(f"@{_hostport(h, p)}" for h, p in self.servers)


def _hostport(host: str, port: int) -> str:
    h = f"[{host}]" if ":" in host else host
    return h if port == 53 else f"{h}:{port}"


def parse_probe(text: str) -> Probe:
    """'A myip.opendns.com @208.67.222.222 @[2620:119:35::35]:53' -> Probe."""
    words = text.split()
    if len(words) < 3 or words[0].upper() not in _RDTYPES:
        raise ConfigError(f"[dialin] discover: {text!r} is not 'A|AAAA|TXT NAME @server ...'")
    servers: list[tuple[str, int]] = []
    for w in words[2:]:
        if not w.startswith("@"):
            raise ConfigError(f"[dialin] discover: {w!r} in {text!r} must start with @")
        servers.append(_server(w[1:], text))
    return Probe(words[0].upper(), words[1].rstrip(".") + ".", tuple(servers))


def _server(text: str, whole: str) -> tuple[str, int]:
    m = re.fullmatch(r"\[([0-9a-fA-F:.]+)\](?::(\d+))?", text)
    if m:
        host, port = m.group(1), m.group(2)
    elif text.count(":") == 1:
        host, port = text.split(":")
    else:
        host, port = text, None
    try:
        ipaddress.ip_address(host)
        n = int(port) if port else 53
    except ValueError:
        raise ConfigError(f"[dialin] discover: bad server {text!r} in {whole!r} (give an IP address)") from None
    if not 0 < n < 65536:
        raise ConfigError(f"[dialin] discover: bad port in {text!r}")
    return host, n


def usable(text: str) -> str | None:
    """An address worth telling a caller, normalised; None for junk."""
    try:
        a = ipaddress.ip_address(text.strip().strip('"'))
    except ValueError:
        return None
    if a.is_loopback or a.is_unspecified or a.is_multicast or a.is_link_local:
        return None
    return str(a)


# -- Asterisk's own setting --------------------------------------------------------

def from_asterisk(config_dir: str | Path, filename: str = "pjsip.conf") -> str | None:
    """`external_signaling_address` of any pjsip transport, following #include/#tryinclude."""
    seen: set[Path] = set()
    return _scan(Path(config_dir), Path(config_dir) / filename, seen, depth=0)


def _scan(base: Path, path: Path, seen: set[Path], depth: int) -> str | None:
    if depth > 8 or path in seen:
        return None
    seen.add(path)
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    for raw in text.splitlines():
        line = raw.split(";", 1)[0].strip()
        m = re.match(r"#\s*(?:try)?include\s+\"?([^\"]+?)\"?\s*$", line, re.IGNORECASE)
        if m:
            target = Path(m.group(1))
            for p in sorted((target if target.is_absolute() else base / target).parent.glob(target.name)):
                found = _scan(base, p, seen, depth + 1)
                if found:
                    return found
            continue
        kv = re.match(r"external_signaling_address\s*=>?\s*(\S+)", line, re.IGNORECASE)
        if kv:
            value = kv.group(1)
            return usable(value) or (value if re.fullmatch(r"[A-Za-z0-9.-]+\.[A-Za-z]{2,}", value) else None)
    return None


# -- DNS --------------------------------------------------------------------------

def query(probe: Probe, timeout: float, deadline: float | None = None) -> str | None:
    """Ask the probe's servers in turn; the first usable address in an answer."""
    import dns.exception
    import dns.message
    import dns.query
    import dns.rdatatype

    rdtype = dns.rdatatype.from_text(probe.rdtype)
    for host, port in probe.servers:
        left = timeout if deadline is None else min(timeout, deadline - time.monotonic())
        if left <= 0:
            return None
        msg = dns.message.make_query(probe.name, rdtype)
        try:
            resp = dns.query.udp(msg, host, port=port, timeout=left)
        except (dns.exception.DNSException, OSError, ValueError):
            continue
        for rrset in resp.answer:
            for rdata in rrset:
                if rrset.rdtype != rdtype:
                    continue
                texts = ([s.decode(errors="replace") for s in rdata.strings] if probe.rdtype == "TXT"
                         else [rdata.to_text()])
                for t in texts:
                    addr = usable(t)
                    if addr:
                        return addr
    return None


def by_dns(probes: Sequence[Probe], timeout: float) -> str | None:
    deadline = time.monotonic() + 2 * timeout
    for probe in probes:
        if time.monotonic() >= deadline:
            break
        addr = query(probe, timeout, deadline)
        if addr:
            return addr
    return None


# -- all together -----------------------------------------------------------------

class ExternalAddress:
    def __init__(self, config: Config, store: Store | None = None,
                 clock: Callable[[], datetime] = utcnow):
        self.config = config
        self.store = store
        self.clock = clock
        d = config.dialin
        try:
            self.timeout = parse_duration(d.discover_timeout).total_seconds()
            self.cache_for = parse_duration(d.discover_cache)
        except ValidationError as exc:
            raise ConfigError(f"[dialin]: {exc}") from None
        self.probes = [parse_probe(p) for p in d.discover]

    def get(self, *, refresh: bool = False) -> tuple[str | None, str]:
        """(address or None, where it came from)."""
        configured = self.config.dialin.external_address.strip()
        if configured:
            return configured, "config"
        from_ast = from_asterisk(self.config.asterisk.config_dir)
        if from_ast:
            return from_ast, "asterisk"
        if not refresh:
            cached = self._cached()
            if cached is not None:
                return cached[0] or None, "cache"
        addr = by_dns(self.probes, self.timeout)
        self._remember(addr)
        return addr, "dns"

    def _cached(self) -> tuple[str, str] | None:
        if self.store is None:
            return None
        raw = self.store.get_meta(CACHE_KEY)
        if not raw:
            return None
        try:
            data = json.loads(raw)
            at = parse_time(data["at"])
            addr = str(data.get("address") or "")
        except (ValueError, KeyError, TypeError):
            return None
        if at is None:
            return None
        ttl = self.cache_for if addr else NEGATIVE_TTL
        if self.clock() - at >= ttl:
            return None
        return addr, "cache"

    def _remember(self, addr: str | None) -> None:
        if self.store is None:
            return
        self.store.set_meta(CACHE_KEY, json.dumps({"address": addr or "", "at": format_time(self.clock())}))
