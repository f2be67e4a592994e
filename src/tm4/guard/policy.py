"""The guard's policy: security events in, decisions out. Pure and clock-injectable.

No I/O here: what is whitelisted (or the server's own) and how often an address
offended before are asked through two injected functions, and time is the
receive time the caller passes in (never the event's EventTV, which an
attacker's clock skew or a slow Asterisk would distort).

Rules:
- Failed attempts (Error-severity events from PJSIP, SIP, IAX2, AMI) are counted
  per source in a sliding window; `failures` within `window` → ban.
- Attempts, not events: Asterisk raises InvalidAccountID (or FailedACL) for the
  first request and again for its digest retry (same SessionID, within the
  second), then ChallengeResponseFailed for the retry: that is one attempt.
  A failure that carries a proof (Response / ReceivedHash) is identified by
  that proof, never by its SessionID alone: svcrack sends every password on
  ONE Call-ID, and each guess must count.
- `ChallengeSent` that no success or failure of the same session answers:
  `challenges` within `window` → ban (scanners that never answer).
- IPv6 sources are counted and banned by their /`ipv6_prefix` network, narrowed
  (never widened) so that it covers no whitelisted source.
- Bans escalate along `bans` (1h, 1d, 1w) with the offences the store remembers.
- Whitelisted sources, loopback and the server's own addresses are never banned.
- Opt-in `promote`: a password-authenticated SIP success grants the source a
  short SIP grant, revoked at its next failure.
"""

from __future__ import annotations

import ipaddress
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from enum import StrEnum

from tm4.asterisk.events import EventType, SecurityEvent
from tm4.core.config import GuardConfig
from tm4.core.durations import format_duration, parse_duration
from tm4.core.model import IPAddress, IPNetwork

# Two events of one request arrive within this many seconds (measured: < 3 ms).
RETRY_WINDOW = 1.0
# After a ban, events already in flight for that source are not counted again.
SUPPRESS_AFTER_BAN = 5.0
# A protected source is not re-checked for this long (a flood naming it costs nothing).
EXEMPT_FOR = 10.0
PROMOTE_SERVICES = frozenset({"PJSIP", "SIP", "IAX2"})
# Events that Asterisk raises for each request of one digest exchange.
PRE_AUTH = frozenset({EventType.INVALID_ACCOUNT_ID, EventType.FAILED_ACL})

Protected = Callable[[IPNetwork], bool]


class Verdict(StrEnum):
    """What one event means to the guard, before any counting."""

    FAILURE = "failure"  # a failed attempt: counts toward a ban
    CHALLENGE = "challenge"  # a challenge sent: counts unless answered
    SUCCESS = "success"  # answers a challenge; may promote (UsingPassword 1, opt-in)
    IGNORED = "ignored"  # informational, or from a service the guard does not watch


def classify(ev: SecurityEvent) -> Verdict:
    if ev.type is EventType.SUCCESSFUL_AUTH:
        return Verdict.SUCCESS
    if ev.type is EventType.CHALLENGE_SENT:
        return Verdict.CHALLENGE if ev.service in PROMOTE_SERVICES else Verdict.IGNORED
    return Verdict.FAILURE if ev.is_failure else Verdict.IGNORED
Offences = Callable[[str], int]


@dataclass(frozen=True)
class BanDecision:
    network: IPNetwork
    source: IPAddress
    ttl: timedelta
    offences: int  # this ban's number for that address: 1 for a first offence
    event: EventType  # the event that reached the threshold
    count: int  # attempts (or unanswered challenges) in the window
    rule: str  # "failures" or "challenges"
    service: str
    reason: str

    @property
    def address(self) -> str:
        return _net_text(self.network)


@dataclass(frozen=True)
class PromoteDecision:
    name: str
    address: IPAddress
    ttl: timedelta
    account: str


@dataclass(frozen=True)
class RevokeDecision:
    name: str
    address: IPAddress
    event: EventType


Decision = BanDecision | PromoteDecision | RevokeDecision


@dataclass
class _Attempt:
    time: float
    type: EventType
    address: IPAddress


@dataclass
class _Source:
    """What the guard remembers about one source (an IPv4 address or an IPv6 prefix)."""

    last: float = 0.0
    attempts: deque[_Attempt] = field(default_factory=deque)
    challenges: deque[tuple[float, str, IPAddress]] = field(default_factory=deque)
    seen: dict[tuple[str, ...], float] = field(default_factory=dict)
    merge: dict[str, float] = field(default_factory=dict)  # session -> counted pre-auth failure
    suppressed_until: float = 0.0


@dataclass
class GuardStats:
    events: int = 0
    failures: int = 0
    attempts: int = 0
    duplicates: int = 0
    challenges: int = 0
    bans: int = 0
    protected: int = 0


def _nothing_protected(net: IPNetwork) -> bool:
    return False


def _no_offences(address: str) -> int:
    return 0


class Guard:
    def __init__(
        self,
        cfg: GuardConfig,
        *,
        protected: Protected = _nothing_protected,
        offences: Offences = _no_offences,
        clock: Callable[[], float] = time.monotonic,
        max_sources: int = 100_000,
    ) -> None:
        self.failures = cfg.failures
        self.window = parse_duration(cfg.window).total_seconds()
        self.window_text = cfg.window if isinstance(cfg.window, str) else format_duration(
            parse_duration(cfg.window))
        self.challenges = cfg.challenges
        self.bans = [parse_duration(b) for b in cfg.bans] or [timedelta(hours=1)]
        self.promote = cfg.promote
        self.promote_ttl = parse_duration(cfg.promote_ttl)
        if not 32 <= cfg.ipv6_prefix <= 128:
            from tm4.core.errors import ConfigError

            raise ConfigError("guard.ipv6_prefix must be between 32 and 128")
        self.ipv6_prefix = cfg.ipv6_prefix
        self._v6_mask = ((1 << 128) - 1) ^ ((1 << (128 - cfg.ipv6_prefix)) - 1)
        self._protected = protected
        self._offences = offences
        self.clock = clock
        self.max_sources = max_sources
        self._sources: OrderedDict[tuple[int, int], _Source] = OrderedDict()
        self._exempt: dict[IPAddress, float] = {}
        self._promoted: dict[IPAddress, tuple[str, float]] = {}  # address -> (entry name, until)
        self.stats = GuardStats()

    # -- the one entry point -------------------------------------------------------
    def observe(self, ev: SecurityEvent, now: float | None = None) -> list[Decision]:
        """Feed one event received at `now`; return what to do (usually nothing)."""
        self.stats.events += 1
        if ev.remote is None:
            return []
        kind = classify(ev)
        if kind is Verdict.IGNORED:
            return []
        t = self.clock() if now is None else now
        addr = ev.remote.address
        if kind is Verdict.FAILURE:
            return self._failure(ev, addr, t)
        if kind is Verdict.CHALLENGE:
            return self._challenge(ev, addr, t)
        return self._success(ev, addr, t)

    # -- rules ---------------------------------------------------------------------
    def _failure(self, ev: SecurityEvent, addr: IPAddress, t: float) -> list[Decision]:
        self.stats.failures += 1
        out: list[Decision] = []
        promoted = self._promoted.pop(addr, None)
        if promoted is not None:
            out.append(RevokeDecision(promoted[0], addr, ev.type))
        if self._is_exempt(addr, t):
            return out
        src = self._source(addr, t)
        if t < src.suppressed_until:
            return out
        frame = ev.frame
        proof = frame.get("Response") or frame.get("ReceivedHash")
        session = ev.session
        if proof:
            challenge = frame.get("Challenge") or frame.get("ReceivedChallenge") or ""
            self._answer(src, session)
            key = ("p", ev.type.value, session, challenge, proof)
            if self._seen(src, key, t, self.window):
                self.stats.duplicates += 1
                return out
            merged_at = src.merge.pop(session, None) if session else None
            if merged_at is not None and t - merged_at < RETRY_WINDOW:
                self.stats.duplicates += 1  # the retry of an attempt already counted
                return out
        elif session:
            key = ("n", ev.type.value, session, ev.account)
            if self._seen(src, key, t, RETRY_WINDOW):
                self.stats.duplicates += 1
                return out
            if ev.type in PRE_AUTH:
                src.merge[session] = t
                if len(src.merge) > 64:
                    self._prune_merge(src, t)
        self.stats.attempts += 1
        attempts = src.attempts
        attempts.append(_Attempt(t, ev.type, addr))
        horizon = t - self.window
        while attempts and attempts[0].time <= horizon:
            attempts.popleft()
        if len(attempts) >= self.failures:
            ban = self._decide_ban(src, ev, addr, t, "failures")
            if ban is not None:
                out.append(ban)
        return out

    def _challenge(self, ev: SecurityEvent, addr: IPAddress, t: float) -> list[Decision]:
        self.stats.challenges += 1
        if addr in self._promoted or self._is_exempt(addr, t):
            return []
        src = self._source(addr, t)
        if t < src.suppressed_until:
            return []
        pending = src.challenges
        pending.append((t, ev.session, addr))
        horizon = t - self.window
        while pending and pending[0][0] <= horizon:
            pending.popleft()
        if len(pending) >= self.challenges:
            ban = self._decide_ban(src, ev, addr, t, "challenges")
            return [ban] if ban is not None else []
        return []

    def _success(self, ev: SecurityEvent, addr: IPAddress, t: float) -> list[Decision]:
        key = self._key(addr)
        src = self._sources.get(key)
        if src is not None:
            self._answer(src, ev.session)
        if not (self.promote and ev.using_password and ev.service in PROMOTE_SERVICES):
            return []
        if src is not None and src.attempts and src.attempts[-1].time > t - self.window:
            return []  # a success right after failures may be a guessed password: no reward
        current = self._promoted.get(addr)
        ttl = self.promote_ttl.total_seconds()
        if current is not None and current[1] - t > ttl / 2:
            return []
        if self._protected(_host_net(addr)):
            return []  # already whitelisted by someone else: nothing to add
        name = promote_name(addr)
        self._promoted[addr] = (name, t + ttl)
        return [PromoteDecision(name, addr, self.promote_ttl, ev.account)]

    # -- decisions -----------------------------------------------------------------
    def _decide_ban(self, src: _Source, ev: SecurityEvent, addr: IPAddress, t: float,
                    rule: str) -> BanDecision | None:
        items: deque[_Attempt] | deque[tuple[float, str, IPAddress]]
        items = src.attempts if rule == "failures" else src.challenges
        # Drop what protected addresses contributed (checked once per EXEMPT_FOR).
        for a in {_addr_of(i) for i in items}:
            if self._protected(_host_net(a)):
                self._exempt[a] = t + EXEMPT_FOR
                self.stats.protected += 1
        if self._exempt:
            kept = [i for i in items if not self._is_exempt(_addr_of(i), t)]
            if len(kept) != len(items):
                items.clear()
                items.extend(kept)  # type: ignore[arg-type]
        threshold = self.failures if rule == "failures" else self.challenges
        if len(items) < threshold or not items:
            return None
        trigger = _addr_of(items[-1])
        network = self._ban_network(trigger)
        if network is None:
            return None
        text = _net_text(network)
        prior = max(0, self._offences(text))
        ttl = self.bans[min(prior, len(self.bans) - 1)]
        count = len(items)
        if rule == "failures":
            kinds: dict[str, int] = {}
            for a in src.attempts:
                kinds[a.type.value] = kinds.get(a.type.value, 0) + 1
            mix = ", ".join(f"{k} x{n}" for k, n in sorted(kinds.items(), key=lambda kv: -kv[1]))
            reason = f"{ev.type.value}: {count} failed attempts in {self.window_text} ({mix}) via {ev.service}"
        else:
            reason = f"ChallengeSent: {count} unanswered challenges in {self.window_text} via {ev.service}"
        if ev.account and ev.account != "<unknown>":
            reason += f", account {ev.account}"
        reason += f", offence {prior + 1}"
        src.attempts.clear()
        src.challenges.clear()
        src.merge.clear()
        src.suppressed_until = t + SUPPRESS_AFTER_BAN
        self.stats.bans += 1
        return BanDecision(network, trigger, ttl, prior + 1, ev.type, count, rule, ev.service, reason)

    def _ban_network(self, addr: IPAddress) -> IPNetwork | None:
        """The widest network to ban for `addr` that covers nothing protected."""
        if addr.version == 4:
            net: IPNetwork = ipaddress.IPv4Network(addr)
            return None if self._protected(net) else net
        for plen in range(self.ipv6_prefix, 129):
            net = ipaddress.IPv6Network((int(addr) >> (128 - plen) << (128 - plen), plen))
            if not self._protected(net):
                return net
        return None

    # -- state ---------------------------------------------------------------------
    def _key(self, addr: IPAddress) -> tuple[int, int]:
        if addr.version == 4:
            return 4, int(addr)
        return 6, int(addr) & self._v6_mask

    def _source(self, addr: IPAddress, t: float) -> _Source:
        key = self._key(addr)
        sources = self._sources
        src = sources.get(key)
        if src is None:
            src = sources[key] = _Source()
            if len(sources) > self.max_sources:
                self.sweep(t)
        else:
            sources.move_to_end(key)
        src.last = t
        return src

    def sweep(self, now: float | None = None) -> int:
        """Forget sources idle for longer than the window (oldest first); keep at most
        `max_sources`. Returns how many were forgotten."""
        t = self.clock() if now is None else now
        idle = t - self.window - SUPPRESS_AFTER_BAN
        sources = self._sources
        n = 0
        while sources:
            key, src = next(iter(sources.items()))
            if src.last > idle and len(sources) <= self.max_sources:
                break
            del sources[key]
            n += 1
        for a in [a for a, until in self._exempt.items() if until <= t]:
            del self._exempt[a]
        for a in [a for a, (_, until) in self._promoted.items() if until <= t]:
            del self._promoted[a]
        return n

    def _is_exempt(self, addr: IPAddress, t: float) -> bool:
        until = self._exempt.get(addr)
        if until is None:
            return False
        if until > t:
            return True
        del self._exempt[addr]
        return False

    @staticmethod
    def _answer(src: _Source, session: str) -> None:
        """A response of `session` answers its oldest pending challenge."""
        if not session:
            return
        for i, item in enumerate(src.challenges):
            if item[1] == session:
                del src.challenges[i]
                return

    @staticmethod
    def _seen(src: _Source, key: tuple[str, ...], t: float, horizon: float) -> bool:
        first = src.seen.get(key)
        if first is not None and t - first < horizon:
            return True
        src.seen[key] = t
        if len(src.seen) > 256:
            src.seen = {k: v for k, v in src.seen.items() if t - v < RETRY_WINDOW * 2 or k[0] == "p"}
            if len(src.seen) > 256:  # a flood of distinct proofs: keep the newest
                src.seen = dict(list(src.seen.items())[-128:])
        return False

    @staticmethod
    def _prune_merge(src: _Source, t: float) -> None:
        src.merge = {k: v for k, v in src.merge.items() if t - v < RETRY_WINDOW}

    # -- what the runtime tells the policy ---------------------------------------------
    def remember_promoted(self, address: IPAddress, name: str, remaining: float,
                          now: float | None = None) -> None:
        """A grant this guard made before a restart (seeded from the store)."""
        t = self.clock() if now is None else now
        self._promoted[address] = (name, t + remaining)

    def forget_promoted(self, address: IPAddress) -> None:
        self._promoted.pop(address, None)

    @property
    def tracked(self) -> int:
        return len(self._sources)


def promote_name(addr: IPAddress) -> str:
    """The entry name of a promoted source: guard-203.0.113.9, guard-2001-db8--5."""
    return "guard-" + str(addr).replace(":", "-")


def _addr_of(item: _Attempt | tuple[float, str, IPAddress]) -> IPAddress:
    return item.address if isinstance(item, _Attempt) else item[2]


def _host_net(addr: IPAddress) -> IPNetwork:
    return ipaddress.ip_network(addr)


def _net_text(net: IPNetwork) -> str:
    return str(net.network_address) if net.prefixlen == net.max_prefixlen else str(net)
