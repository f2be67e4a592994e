"""Port knocking in the kernel: the sequence, its nftables stages, credentials, activation.

No daemon watches packets. The `inet tm4` table holds one timeout set per stage:
a SYN (tcp) or datagram (udp) to port N of the sequence from a source in stage
N-1 moves it to stage N; the same port again keeps it there (a retransmitted
SYN); any other port resets it; the last port puts it in `knocked4`/`knocked6`
for `knock.ttl`, which opens the configured services. Stage sets carry a
generation tag in their names, so a rotated sequence starts from empty stages
while sources that already knocked keep their grant until it times out.

The sequence is kept in the store (meta `knock_sequence`), or fixed in the
config (`knock.ports`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import secrets
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from tm4.core.config import Config
from tm4.core.durations import format_duration, parse_duration
from tm4.core.errors import ApplyError, ConfigError, Tm4Error
from tm4.core.model import Entry, Origin, parse_network, utcnow
from tm4.core.rules import NftSet, Ruleset, port_match
from tm4.core.services import ALL, parse_ports, resolve_services
from tm4.core.store import Store

if TYPE_CHECKING:
    from tm4.ops.engine import Core

META_KEY = "knock_sequence"
MIN_LENGTH = 3
MAX_LENGTH = 16
PROTOCOLS = ("tcp", "udp")
_FAMILIES = ((4, "ip", "ipv4"), (6, "ip6", "ipv6"))


@dataclass(frozen=True)
class KnockSettings:
    """`[knock]` checked once: everything the renderer and the CLI need."""

    protocol: str
    length: int
    port_range: tuple[int, int]
    step_timeout: int  # seconds
    ttl: int  # seconds
    services: tuple[str, ...]
    fixed_ports: tuple[int, ...]


@dataclass(frozen=True)
class KnockSequence:
    protocol: str
    ports: tuple[int, ...]
    generation: str  # tags the stage sets' names; changes with every new sequence


def settings(config: Config) -> KnockSettings:
    k = config.knock
    if k.protocol not in PROTOCOLS:
        raise ConfigError(f"knock.protocol must be 'tcp' or 'udp', not {k.protocol!r}")
    try:
        (lo, hi), *rest = parse_ports(k.range, "knock.range")
    except Tm4Error as exc:
        raise ConfigError(str(exc)) from None
    if rest or lo < 1024:
        raise ConfigError(f"knock.range {k.range!r} must be one range above 1023, e.g. 20000-60000")
    try:
        step = int(parse_duration(k.step_timeout).total_seconds())
        ttl = int(parse_duration(k.ttl).total_seconds())
        services = resolve_services(k.services, config.services)
    except Tm4Error as exc:
        raise ConfigError(f"[knock]: {exc}") from None
    fixed = tuple(k.ports)
    length = len(fixed) if fixed else k.length
    if not (MIN_LENGTH <= length <= MAX_LENGTH):
        raise ConfigError(f"a knock sequence needs {MIN_LENGTH} to {MAX_LENGTH} ports, not {length}")
    s = KnockSettings(k.protocol, length, (lo, hi), step, ttl, services, fixed)
    if fixed:
        problem = _sequence_problem(config, s, fixed, check_range=False)
        if problem:
            raise ConfigError(f"knock.ports: {problem}")
    elif hi - lo + 1 - len(forbidden_ports(config) & set(range(lo, hi + 1))) < length:
        raise ConfigError(f"knock.range {k.range!r} has fewer than {length} ports free of services")
    return s


def forbidden_ports(config: Config) -> set[int]:
    """Ports a knock may never use: every catalogue service (either protocol) and RTP."""
    out: set[int] = set()
    for svc in config.services.values():
        for lo, hi in svc.ports:
            out.update(range(lo, hi + 1))
    rtp = config.rtp_range()
    if rtp:
        out.update(range(rtp[0], rtp[1] + 1))
    return out


def _sequence_problem(config: Config, s: KnockSettings, ports: tuple[int, ...],
                      check_range: bool = True) -> str:
    """Why `ports` cannot be the sequence, or '' when they can."""
    if len(ports) != s.length:
        return f"has {len(ports)} ports, the config asks for {s.length}"
    if any(not isinstance(p, int) or isinstance(p, bool) or not 1 <= p <= 65535 for p in ports):
        return "every port must be a number 1-65535"
    if len(set(ports)) != len(ports):
        return "a port appears twice"
    used = sorted(set(ports) & forbidden_ports(config))
    if used:
        return f"port(s) {', '.join(map(str, used))} are used by a service or RTP"
    lo, hi = s.port_range
    if check_range and any(not lo <= p <= hi for p in ports):
        return f"a port lies outside knock.range {lo}-{hi}"
    return ""


def generate(config: Config, s: KnockSettings, avoid: tuple[int, ...] = ()) -> KnockSequence:
    """A fresh random sequence from the range, free of services, sharing no port with `avoid`."""
    lo, hi = s.port_range
    bad = forbidden_ports(config) | set(avoid)
    pool = [p for p in range(lo, hi + 1) if p not in bad]
    if len(pool) < s.length:
        pool = [p for p in range(lo, hi + 1) if p not in forbidden_ports(config)]
    rng = secrets.SystemRandom()
    ports = tuple(rng.sample(pool, s.length))
    return KnockSequence(s.protocol, ports, secrets.token_hex(3))


def _load(store: Store) -> tuple[tuple[int, ...], str] | None:
    raw = store.get_meta(META_KEY)
    if not raw:
        return None
    try:
        data = json.loads(raw)
        return tuple(int(p) for p in data["ports"]), str(data["generation"])
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def _save(store: Store, seq: KnockSequence, now: datetime) -> None:
    store.set_meta(META_KEY, json.dumps({
        "ports": list(seq.ports), "generation": seq.generation, "created": now.isoformat(),
    }))


def current(config: Config, store: Store, *, create: bool = True) -> KnockSequence | None:
    """The sequence in force. A stored one that no longer fits the config (length, range,
    a port now used by a service) is replaced, and the replacement is audit-logged."""
    s = settings(config)
    if s.fixed_ports:
        tag = hashlib.sha256(repr(s.fixed_ports).encode()).hexdigest()[:6]
        return KnockSequence(s.protocol, s.fixed_ports, tag)
    stored = _load(store)
    reason = "no sequence yet"
    if stored is not None:
        ports, gen = stored
        reason = _sequence_problem(config, s, ports)
        if not reason and re.fullmatch(r"[0-9a-f]{6}", gen):
            return KnockSequence(s.protocol, ports, gen)
        reason = f"the stored sequence {reason or 'was unreadable'}"
    if not create:
        return None
    now = utcnow()
    with store.transaction():
        seq = generate(config, s, avoid=stored[0] if stored else ())
        _save(store, seq, now)
        store.audit("knock-new", "knock", str(Origin.KNOCK), "tm4", now, reason=reason,
                    protocol=seq.protocol, length=len(seq.ports))
    return seq


def rotate(core: Core, *, actor: str = "", revoke: bool = False) -> KnockSequence:
    """Pick a new sequence and put it in force in one step: the old one dies at once.

    The new sequence is stored and the whole table re-applied in one transaction;
    if the kernel refuses, the store keeps the old sequence. Grants already given
    run their course, unless `revoke`: then the `knocked` sets are emptied right
    after (no knock can complete in between, since the old ports are dead).
    """
    config = core.config
    s = settings(config)
    if s.fixed_ports:
        raise ConfigError("knock.ports fixes the sequence in the config; change it there and run `tm4 apply`")
    store = core.store
    with store.transaction():
        old = _load(store)
        seq = generate(config, s, avoid=old[0] if old else ())
        _save(store, seq, core.clock())
        live = config.knock.enabled and core.backend.present()
        core.audit("knock-rotate", "knock", Origin.ADMIN, actor,
                   protocol=seq.protocol, length=len(seq.ports), applied=live, revoke=revoke)
        if live:
            core.apply()
    runner = getattr(core.backend, "runner", None)
    if live and revoke and runner is not None:
        runner.run("".join(f"flush set inet tm4 {knocked_set(v)}\n" for v, _i, _n in _FAMILIES))
    return seq


# -- rules -------------------------------------------------------------------------

def stage_set(version: int, generation: str, stage: int) -> str:
    return f"knock{version}_{generation}_{stage}"


def knocked_set(version: int) -> str:
    return f"knocked{version}"


def chain_name(version: int) -> str:
    return f"knock{version}"


def ruleset_extra(config: Config, store: Store) -> Ruleset | None:
    """Sets, chains and input rules of the knock stages (None when knocking is off)."""
    if not config.knock.enabled:
        return None
    if config.firewall.backend != "nft":
        raise ConfigError("port knocking needs firewall.backend = \"nft\" (stages live in nftables sets)")
    s = settings(config)
    seq = current(config, store)
    assert seq is not None
    return render_knock(config, s, seq)


def render_knock(config: Config, s: KnockSettings, seq: KnockSequence) -> Ruleset:
    """Pure: the knock fragment for one sequence."""
    rs = Ruleset()
    proto = seq.protocol
    ports = seq.ports
    n = len(ports)
    for v, ipf, _nfproto in _FAMILIES:
        stages = [stage_set(v, seq.generation, i) for i in range(1, n)]
        for name in stages:
            rs.sets[name] = NftSet(name, v, dynamic=True, timeout=f"{s.step_timeout}s",
                                   flags=("dynamic", "timeout"))
        done = knocked_set(v)
        rs.sets[done] = NftSet(done, v, dynamic=True, timeout=f"{s.ttl}s", flags=("dynamic", "timeout"))
        src = f"{ipf} saddr"
        chain: list[str] = [
            # last port from the last stage: knocked
            f"{proto} dport {ports[-1]} {src} @{stages[-1]} delete @{stages[-1]} {{ {src} }}"
            f" update @{done} {{ {src} }} counter return",
        ]
        for i in range(n - 2, 0, -1):  # port i+1 (1-based) from stage i -> stage i+1
            chain.append(
                f"{proto} dport {ports[i]} {src} @{stages[i - 1]} delete @{stages[i - 1]} {{ {src} }}"
                f" update @{stages[i]} {{ {src} }} return"
            )
        for i in range(1, n - 1):  # the port that led to a stage, again: stay (retransmission)
            chain.append(f"{proto} dport {ports[i]} {src} @{stages[i]} return")
        # the first port always (re)starts the sequence
        restart = "".join(f" delete @{st} {{ {src} }}" for st in stages[1:])
        chain.append(f"{proto} dport {ports[0]}{restart} update @{stages[0]} {{ {src} }} return")
        for st in stages:  # anything else: back to the start
            chain.append(f"{src} @{st} delete @{st} {{ {src} }} return")
        rs.chains[chain_name(v)] = chain
        for name in s.services:
            if name == ALL:
                rs.input_rules.append(f"{src} @{done} accept")
            else:
                rs.input_rules.append(f"{src} @{done} {port_match(config.services[name])} accept")
    for v, _ipf, nfproto in _FAMILIES:
        if proto == "tcp":
            rs.input_rules.append(
                f"meta nfproto {nfproto} tcp flags & (fin | syn | rst | ack) == syn jump {chain_name(v)}"
            )
        else:
            rs.input_rules.append(f"meta nfproto {nfproto} meta l4proto udp jump {chain_name(v)}")
    return rs


# -- credentials -------------------------------------------------------------------

def credentials(config: Config, seq: KnockSequence) -> dict[str, Any]:
    """What a user needs, as `tm4 knock show --json` prints it."""
    s = settings(config)
    return {
        "protocol": seq.protocol,
        "ports": list(seq.ports),
        "ttl": format_duration(parse_duration(config.knock.ttl)),
        "services": list(s.services),
    }


def instructions(config: Config, seq: KnockSequence, host: str = "") -> str:
    s = settings(config)
    host = host or config.dialin.external_address or "SERVER"
    ports = " ".join(map(str, seq.ports))
    ttl = format_duration(parse_duration(config.knock.ttl))
    udp = seq.protocol == "udp"
    state = "on" if config.knock.enabled else "OFF (set [knock] enabled = true, then `tm4 apply`)"
    nmap = "nmap -sU" if udp else "nmap"
    return "\n".join([
        f"Port knocking: {state}",
        f"Protocol:  {seq.protocol.upper()}",
        f"Sequence:  {ports}   (in this order, at most {s.step_timeout}s between two knocks)",
        f"Grants:    {', '.join(s.services)} for {ttl} to the address that knocked",
        "",
        "Knock from the device that needs access, then connect:",
        f"  knock -v{' -u' if udp else ''} {host} {ports}",
        f"  for p in {ports}; do {nmap} -Pn --max-retries 0 --host-timeout 2s -p $p {host}; done",
        "",
        "Phone apps (PortKnock on iOS, DroidKnocker / Knock on Ports on Android): add a",
        f"sequence for host {host} with these ports in this order, protocol {seq.protocol.upper()},",
        f"one packet per port and a delay under {s.step_timeout}s, and knock before opening",
        "the SIP app. A wrong port in between starts the sequence over.",
    ])


# -- activation --------------------------------------------------------------------

def _element_addresses(elems: list[Any]) -> list[str]:
    out: list[str] = []
    for e in elems:
        val = e.get("elem", {}).get("val") if isinstance(e, dict) else e
        if isinstance(val, str):
            out.append(val)
    return out


def _entry_name(core: Core, now: datetime) -> str:
    base = f"knock-{now:%Y%m%d-%H%M%S}"
    name, i = base, 1
    while core.store.get_entry(name) is not None:
        i += 1
        name = f"{base}-{i}"
    return name


def activate_knocks(core: Core) -> list[Entry]:
    """Turn completed knocks into stored entries (TM3's `iptables-knock activate`).

    Each address in the `knocked` sets becomes a permanent entry of origin knock,
    named knock-YYYYMMDD-HHMMSS (UTC), granting `knock.services`; its kernel
    element is then dropped, since the whitelist now carries it. Does nothing
    unless both `knock.enabled` and `knock.activate` are on. tm4d calls this
    from its knock watcher.
    """
    config = core.config
    if not (config.knock.enabled and config.knock.activate):
        return []
    read = getattr(core.backend, "set_elements", None)
    if read is None:
        return []
    services = settings(config).services
    made: list[Entry] = []
    for v, _ipf, _nf in _FAMILIES:
        for addr in _element_addresses(read(knocked_set(v)) or []):
            try:
                net = parse_network(addr)
            except Tm4Error:
                continue
            covered = any(
                e.origin == Origin.KNOCK and set(services) <= set(e.services)
                for e in core.whitelisted(net)
            )
            if not covered:
                now = core.clock()
                made.append(core.allow(
                    _entry_name(core, now), [addr], list(services), origin=Origin.KNOCK,
                    actor="knock", note="activated from a completed port knock",
                ))
            _forget(core, v, addr)
    return made


def _forget(core: Core, version: int, addr: str) -> None:
    runner = getattr(core.backend, "runner", None)
    if runner is None:
        return
    with contextlib.suppress(ApplyError):  # it may have timed out meanwhile
        runner.run(f"delete element inet tm4 {knocked_set(version)} {{ {addr} }}")
