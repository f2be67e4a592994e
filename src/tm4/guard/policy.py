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

Memory is bounded per source (the last `failures` attempts, the last `challenges`
challenges, a few hundred hashed duplicate marks) and in total (`max_sources`).
When the cap is reached, an idle source is forgotten first, else the oldest
source among those with the fewest attempts in the window: a flood of
one-shot sources (an IPv6 /48 gives billions) pushes out its own kind, never a
source one failure short of its ban. Each event costs O(1) in the number of
sources (O(failures) at worst to find the lowest non-empty level).
"""

from __future__ import annotations

import ipaddress
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
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
# Duplicate marks kept per source (each a hash and a time: a flood of distinct proofs
# from one source costs at most this many).
MAX_MARKS = 256
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


class _Attempt:
    __slots__ = ("time", "type", "address")

    def __init__(self, time: float, type: EventType, address: IPAddress) -> None:  # noqa: A002
        self.time = time
        self.type = type
        self.address = address


class _Source:
    """What the guard remembers about one source (an IPv4 address or an IPv6 prefix).

    Slots and lazily made containers: a source seen once costs a few hundred bytes."""

    __slots__ = ("key", "last", "level", "attempts", "challenges", "marks", "suppressed_until")

    def __init__(self, key: int) -> None:
        self.key = key
        self.last = 0.0
        self.level = 0  # its bucket in Guard._levels: how close to a ban it is
        self.attempts: list[_Attempt] = []  # oldest first, at most `failures`
        self.challenges: list[tuple[float, str, IPAddress]] | None = None  # at most `challenges`
        # Hashes of duplicate keys ("p"/"n" tuples) and of merged sessions (("m", session))
        # -> when first seen: one small dict for both.
        self.marks: dict[int, float] | None = None
        self.suppressed_until = 0.0


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
        max_sources: int | None = None,
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
        self.max_sources = cfg.max_sources if max_sources is None else max_sources
        if self.max_sources < 1:
            from tm4.core.errors import ConfigError

            raise ConfigError("guard.max_sources must be at least 1")
        self._sources: dict[int, _Source] = {}
        # The same sources by level (attempts in the window, challenges scaled to the same
        # range), each least recently seen first: eviction takes the lowest level's oldest.
        # OrderedDicts: moving to the end and taking the first are O(1) (a plain dict
        # leaves holes at its front that every look at the first item walks over).
        self._levels: list[OrderedDict[int, _Source]] = [OrderedDict() for _ in range(max(1, self.failures))]
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
            merged_at = src.marks.pop(hash(("m", session)), None) if session and src.marks else None
            if merged_at is not None and t - merged_at < RETRY_WINDOW:
                self.stats.duplicates += 1  # the retry of an attempt already counted
                return out
        elif session:
            key = ("n", ev.type.value, session, ev.account)
            if self._seen(src, key, t, RETRY_WINDOW):
                self.stats.duplicates += 1
                return out
            if ev.type in PRE_AUTH:
                self._mark(src, hash(("m", session)), t)
        self.stats.attempts += 1
        attempts = src.attempts
        attempts.append(_Attempt(t, ev.type, addr))
        _trim(attempts, t - self.window, self.failures)
        if len(attempts) >= self.failures:
            ban = self._decide_ban(src, ev, addr, t, "failures")
            if ban is not None:
                out.append(ban)
        self._relevel(src)
        return out

    def _challenge(self, ev: SecurityEvent, addr: IPAddress, t: float) -> list[Decision]:
        self.stats.challenges += 1
        if addr in self._promoted or self._is_exempt(addr, t):
            return []
        src = self._source(addr, t)
        if t < src.suppressed_until:
            return []
        pending = src.challenges
        if pending is None:
            pending = src.challenges = []
        pending.append((t, ev.session, addr))
        _trim(pending, t - self.window, self.challenges)
        out: list[Decision] = []
        if len(pending) >= self.challenges:
            ban = self._decide_ban(src, ev, addr, t, "challenges")
            if ban is not None:
                out.append(ban)
        self._relevel(src)
        return out

    def _success(self, ev: SecurityEvent, addr: IPAddress, t: float) -> list[Decision]:
        key = self._key(addr)
        src = self._sources.get(key)
        if src is not None:
            self._answer(src, ev.session)
            self._relevel(src)
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
        items: list[_Attempt] | list[tuple[float, str, IPAddress]]
        items = src.attempts if rule == "failures" else (src.challenges or [])
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
        src.challenges = None
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
    def _key(self, addr: IPAddress) -> int:
        if addr.version == 4:
            return int(addr)
        return (1 << 128) | (int(addr) & self._v6_mask)  # never equal to an IPv4 key

    def _source(self, addr: IPAddress, t: float) -> _Source:
        key = self._key(addr)
        src = self._sources.get(key)
        if src is None:
            if len(self._sources) >= self.max_sources:
                self._evict(t)
            src = self._sources[key] = _Source(key)
            self._levels[0][key] = src
        else:
            self._levels[src.level].move_to_end(key)
        src.last = t
        return src

    def _relevel(self, src: _Source) -> None:
        """Move `src` to the bucket of its current distance to a ban (after it changed)."""
        level = len(src.attempts)
        if src.challenges:
            level = max(level, len(src.challenges) * self.failures // max(1, self.challenges))
        level = min(level, len(self._levels) - 1)
        if level != src.level:
            del self._levels[src.level][src.key]
            self._levels[level][src.key] = src
            src.level = level

    def _drop(self, src: _Source) -> None:
        del self._sources[src.key]
        del self._levels[src.level][src.key]

    def _evict(self, t: float) -> None:
        """Forget one source to make room: an idle one if a level's least recent is
        idle, else the least recent of the lowest level (the furthest from a ban)."""
        idle = t - self.window - SUPPRESS_AFTER_BAN
        lowest: _Source | None = None
        for bucket in self._levels:
            if bucket:
                first = next(iter(bucket.values()))
                if first.last <= idle:
                    self._drop(first)
                    return
                if lowest is None:
                    lowest = first
        if lowest is not None:
            self._drop(lowest)

    def sweep(self, now: float | None = None) -> int:
        """Forget sources idle for longer than the window (oldest first); keep at most
        `max_sources`. Returns how many were forgotten."""
        t = self.clock() if now is None else now
        idle = t - self.window - SUPPRESS_AFTER_BAN
        n = 0
        for bucket in self._levels:
            while bucket:
                src = next(iter(bucket.values()))
                if src.last > idle:
                    break
                self._drop(src)
                n += 1
        while len(self._sources) > self.max_sources:
            self._evict(t)
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
        if not session or not src.challenges:
            return
        for i, item in enumerate(src.challenges):
            if item[1] == session:
                del src.challenges[i]
                return

    def _seen(self, src: _Source, key: tuple[str, ...], t: float, horizon: float) -> bool:
        """Whether `key` was seen from `src` within `horizon` seconds; remember it if not.

        Keys are kept as their hash (a 64-bit SipHash keyed per process: an attacker
        cannot aim a collision), never the session and proof strings themselves."""
        h = hash(key)
        first = src.marks.get(h) if src.marks else None
        if first is not None and t - first < horizon:
            return True
        self._mark(src, h, t)
        return False

    def _mark(self, src: _Source, h: int, t: float) -> None:
        marks = src.marks
        if marks is None:
            marks = src.marks = {}
        marks[h] = t
        if len(marks) > MAX_MARKS:
            # Proof marks live for the window, the others for a retry: drop what is older.
            marks = src.marks = {k: v for k, v in marks.items() if t - v < self.window}
            if len(marks) > MAX_MARKS:  # a flood of distinct proofs: keep the newest
                src.marks = dict(list(marks.items())[-MAX_MARKS // 2:])

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


def _trim(items: list, horizon: float, keep: int) -> None:  # type: ignore[type-arg]
    """Drop items at or before `horizon` (oldest first), and keep at most `keep`: only
    the newest `keep` can ever reach a threshold of `keep`."""
    drop = 0
    n = len(items)
    while drop < n and _time_of(items[drop]) <= horizon:
        drop += 1
    drop = max(drop, n - max(1, keep))
    if drop:
        del items[:drop]


def _time_of(item: _Attempt | tuple[float, str, IPAddress]) -> float:
    return item.time if isinstance(item, _Attempt) else item[0]


def _addr_of(item: _Attempt | tuple[float, str, IPAddress]) -> IPAddress:
    return item.address if isinstance(item, _Attempt) else item[2]


def _host_net(addr: IPAddress) -> IPNetwork:
    return ipaddress.ip_network(addr)


def _net_text(net: IPNetwork) -> str:
    return str(net.network_address) if net.prefixlen == net.max_prefixlen else str(net)
