"""Failed dial-in tries, counted per caller ID and for everyone.

- Per caller ID: `caller_failures` within `caller_window` (default 5 per hour)
  and that caller ID is refused until its oldest failure leaves the window.
- Globally: past `global_failures` within `global_window` (default 20 per hour)
  dial-in stays on for everyone, but every try waits 1 s, 2 s, 4 s, ... up to
  `delay_max`, and the admin is alerted once per window (tm4.core.notify, kind
  dialin_lockout; a caller ID's lock-out is alerted by tm4d from the audit log).

One caller can therefore lock out only its own caller ID, never dial-in as a
whole. Every failure, refusal, lock-out and alert goes to the audit log.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta

from tm4.core.durations import format_duration, parse_duration
from tm4.core.errors import ConfigError, ValidationError
from tm4.core.model import Origin, format_time, parse_time
from tm4.dialin import store as dialin_store
from tm4.ops.engine import Core

ANONYMOUS = "anonymous"
_CALLERID_RE = re.compile(r"[^0-9A-Za-z+*#@._-]")


def normalise_callerid(text: str | None) -> str:
    """Caller IDs as a counting key: printable, short; withheld ones share one key."""
    cid = _CALLERID_RE.sub("", (text or "").strip())[:64]
    if cid.lower() in ("", "unknown", "anonymous", "restricted", "private", "unavailable"):
        return ANONYMOUS
    return cid


@dataclass(frozen=True)
class Verdict:
    allowed: bool  # False: this caller ID is cooling down
    delay: float  # seconds every try waits now (0 unless failures run past the global limit)
    caller_failures: int
    global_failures: int
    until: datetime | None = None  # end of the cool-down when not allowed


class DialinLimits:
    def __init__(self, core: Core):
        self.core = core
        d = core.config.dialin
        try:
            self.caller_window = parse_duration(d.caller_window)
            self.global_window = parse_duration(d.global_window)
            self.delay_max = parse_duration(d.delay_max).total_seconds()
        except ValidationError as exc:
            raise ConfigError(f"[dialin]: {exc}") from None
        self.caller_limit = max(1, d.caller_failures)
        self.global_limit = max(1, d.global_failures)

    def check(self, callerid: str) -> Verdict:
        now = self.core.clock()
        store = self.core.store
        mine = dialin_store.failure_times(store, now - self.caller_window, callerid)
        everyone = dialin_store.failure_times(store, now - self.global_window)
        allowed = len(mine) < self.caller_limit
        until = None
        if not allowed:
            oldest = parse_time(mine[-self.caller_limit])
            until = oldest + self.caller_window if oldest else None
        return Verdict(allowed, self._delay(len(everyone)), len(mine), len(everyone), until)

    def _delay(self, failures: int) -> float:
        excess = failures - self.global_limit
        if excess <= 0:
            return 0.0
        return float(min(self.delay_max, 2.0 ** min(excess - 1, 30)))

    def record_failure(self, callerid: str, reason: str, before: Verdict) -> Verdict:
        """Count one failed try; audit it, and the lock-out / alert it may cause."""
        now = self.core.clock()
        store = self.core.store
        with store.transaction():
            dialin_store.add_failure(store, callerid, now)
            dialin_store.prune_failures(store, now - max(self.caller_window, self.global_window, timedelta(days=1)))
        after = self.check(callerid)
        actor = f"callerid={callerid}"
        self.core.audit("dialin-fail", callerid, Origin.DIALIN, actor, reason=reason,
                        caller_failures=after.caller_failures, global_failures=after.global_failures,
                        delay=after.delay)
        if before.allowed and not after.allowed:
            # tm4d's audit watcher alerts on this record (kind dialin_lockout)
            self.core.audit("dialin-lockout", callerid, Origin.DIALIN, actor,
                            failures=after.caller_failures, until=format_time(after.until))
        if after.global_failures > self.global_limit and self._alert_due(now):
            self.core.store.set_meta("dialin_alerted", format_time(now))
            self.core.audit("dialin-alert", "dialin", Origin.DIALIN, actor,
                            failures=after.global_failures, window=d_text(self.global_window),
                            delay=after.delay)
            _alert(f"{after.global_failures} failed dial-in tries within {d_text(self.global_window)};"
                   f" every try now waits up to {self.delay_max:.0f}s",
                   scope="global", failures=after.global_failures)
        return after

    def _alert_due(self, now: datetime) -> bool:
        last = parse_time(self.core.store.get_meta("dialin_alerted"))
        return last is None or last <= now - self.global_window

    def record_success(self, callerid: str) -> None:
        dialin_store.clear_failures(self.core.store, callerid)


def d_text(delta: timedelta) -> str:
    return format_duration(delta)


def _alert(message: str, **fields: object) -> None:
    try:
        from tm4.core.notify import alert
    except ImportError:  # pragma: no cover - notify is part of tm4
        return
    alert("dialin_lockout", message, **fields)
