"""Safe mode at boot: FreePBX's rescue for cloud servers without a console, done safely.

If the previous boot ended less than `short_boot` (10 min) after it began, and this
boot is younger than `window` (5 min), ssh is admitted from anywhere until `window`
of uptime. Unlike FreePBX (which drops ALL rules then), everything else stays
enforced (bans included): safe mode is one element, 0.0.0.0/0 and ::/0, in two
sets that only an ssh rule references, with a kernel timeout at the end of the
window, so the kernel closes it on time even if tm4d is dead. A reboot loop never
opens the PBX. It is not a whitelist entry on purpose: the guard must go on
banning attackers, and the whitelist always wins over a ban.

The decision is pure (`decide`), with the clock, uptime and boot history passed in.
The history is kept by tm4 itself in the store: each boot's id, start and the last
time tm4 saw it alive (tm4d refreshes that every `HEARTBEAT`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tm4.core.model import Origin, format_time, parse_time, utcnow
from tm4.core.rules import Element, NftSet, Ruleset, port_match

if TYPE_CHECKING:
    from tm4.core.config import Config
    from tm4.core.store import Store
    from tm4.ops.engine import Core

log = logging.getLogger("tm4.safemode")

UNTIL_KEY = "safe_mode_until"
HISTORY_KEY = "boot_history"
OFF_KEY = "safe_mode_off_boot"
HEARTBEAT = timedelta(seconds=30)
KEEP_BOOTS = 10
MAX_WINDOW = timedelta(days=1)


@dataclass(frozen=True)
class Boot:
    id: str
    started: datetime
    last_seen: datetime

    @property
    def length(self) -> timedelta:
        return self.last_seen - self.started

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "started": format_time(self.started), "last_seen": format_time(self.last_seen)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Boot:
        return cls(str(d["id"]), parse_time(d["started"]), parse_time(d["last_seen"]))  # type: ignore[arg-type]


@dataclass(frozen=True)
class Decision:
    active: bool
    until: datetime | None
    reason: str


def decide(
    history: Sequence[Boot],
    current_boot: str,
    uptime: timedelta,
    now: datetime,
    *,
    short_boot: timedelta = timedelta(minutes=10),
    window: timedelta = timedelta(minutes=5),
    enabled: bool = True,
    turned_off: bool = False,
) -> Decision:
    """Should ssh be open to everyone now, and until when?"""
    if not enabled:
        return Decision(False, None, "safe mode is disabled in the config")
    if turned_off:
        return Decision(False, None, "turned off for this boot (`tm4 safe-mode off`)")
    previous = [b for b in history if b.id != current_boot]
    if not previous:
        return Decision(False, None, "no previous boot on record")
    prev = max(previous, key=lambda b: b.started)
    if prev.length >= short_boot:
        return Decision(False, None, f"the previous boot lasted {_mins(prev.length)}")
    if uptime >= window:
        return Decision(False, None, f"this boot is {_mins(uptime)} old")
    return Decision(
        True, now + (window - uptime),
        f"the previous boot lasted only {_mins(prev.length)} and this one is {_mins(uptime)} old",
    )


def _mins(d: timedelta) -> str:
    s = int(d.total_seconds())
    return f"{s // 60}m{s % 60:02d}s"


# -- the running system ----------------------------------------------------------

def boot_id(proc: Path = Path("/proc")) -> str:
    try:
        return (proc / "sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


def uptime(proc: Path = Path("/proc")) -> timedelta:
    try:
        return timedelta(seconds=float((proc / "uptime").read_text().split()[0]))
    except (OSError, ValueError, IndexError):
        return timedelta(days=365)  # unknown: never "young"


def load_history(core: Core) -> list[Boot]:
    raw = core.store.get_meta(HISTORY_KEY)
    try:
        return [Boot.from_json(d) for d in json.loads(raw or "[]")]
    except (ValueError, KeyError, TypeError):
        log.warning("event=boot_history_unreadable reason=bad json; starting afresh")
        return []


def record_boot(core: Core, current: str, up: timedelta, now: datetime) -> list[Boot]:
    """Mark this boot alive at `now` (the heartbeat); returns the history before this call."""
    with core.store.transaction():
        history = load_history(core)
        others = [b for b in history if b.id != current]
        mine = next((b for b in history if b.id == current), None)
        started = mine.started if mine else now - up
        new = [*others, Boot(current, started, now)][-KEEP_BOOTS:]
        core.store.set_meta(HISTORY_KEY, json.dumps([b.to_json() for b in new]))
    return history


def until(store: Store, now: datetime | None = None) -> datetime | None:
    """When safe mode ends, if it is on now."""
    t = parse_time(store.get_meta(UNTIL_KEY))
    if t is None or t <= (now or utcnow()):
        return None
    return t


def ruleset_extra(config: Config, store: Store) -> Ruleset:
    """Two sets and two rules, always there; safe mode is one element with a kernel timeout
    in each set (so the kernel closes it on time even if tm4d is not running). The rules
    come after the ban rules: a banned source stays banned in safe mode."""
    # No clock here: an element past its expiry is left out by the renderer (and the
    # kernel has already dropped it); tm4d's sweeper clears the stored deadline.
    end = parse_time(store.get_meta(UNTIL_KEY))
    ports = port_match(config.services["ssh"])
    rs = Ruleset()
    for v, ipf, top in ((4, "ip", 2**32 - 1), (6, "ip6", 2**128 - 1)):
        name = f"safemode{v}"
        elems = (Element(0, top, end),) if end else ()
        rs.sets[name] = NftSet(name, v, elems)
        rs.input_rules.append(f"{ipf} saddr @{name} {ports} accept")
    return rs


def evaluate(core: Core, *, current: str | None = None, up: timedelta | None = None,
             now: datetime | None = None) -> Decision:
    """At start-up (tm4-boot, tm4d), before the full apply: record this boot, and decide.
    An active decision is stored; the apply that follows puts it in the kernel."""
    cfg = core.config.daemon
    current = current or boot_id()
    up = up if up is not None else uptime()
    now = now or utcnow()
    history = record_boot(core, current, up, now)
    window = core.config.duration(cfg.safe_mode_uptime)
    if window > MAX_WINDOW:  # nft timeouts are bounded; one bad value must not stop the boot apply
        log.warning("event=safe_mode_window_capped configured=%s used=%s", window, MAX_WINDOW)
        window = MAX_WINDOW
    d = decide(
        history, current, up, now,
        short_boot=core.config.duration(cfg.safe_mode_short_boot),
        window=window,
        enabled=cfg.safe_mode,
        turned_off=core.store.get_meta(OFF_KEY) == current,
    )
    if d.active and d.until is not None and until(core.store, now) is None:
        core.store.set_meta(UNTIL_KEY, format_time(d.until))
        core.audit("safe-mode", "ssh", Origin.ADMIN, "safe-mode", until=format_time(d.until), reason=d.reason)
        from tm4.core.notify import alert

        alert("safe_mode", f"SAFE MODE: ssh open to everyone until {format_time(d.until)} ({d.reason}); "
              "all other rules stay enforced; `tm4 safe-mode off` ends it", until=format_time(d.until))
    log.info("event=safe_mode_decision active=%s until=%s reason=%r", d.active, format_time(d.until), d.reason)
    return d


def expire(core: Core) -> bool:
    """Forget a deadline that has passed (the kernel closed ssh by itself). True if it did."""
    end = parse_time(core.store.get_meta(UNTIL_KEY))
    if end is None or end > core.clock():
        return False
    core.store.set_meta(UNTIL_KEY, None)
    core.audit("safe-mode-end", "ssh", Origin.ADMIN, "safe-mode", until=format_time(end))
    from tm4.core.notify import alert

    alert("safe_mode", f"safe mode ended at {format_time(end)}; ssh is back to the whitelist")
    return True


def turn_off(core: Core, actor: str = "", current: str | None = None) -> bool:
    """End safe mode now and keep it off for the rest of this boot. False if it was off.
    The caller re-applies (one transaction) so the kernel follows."""
    was_on = until(core.store, core.clock()) is not None
    core.store.set_meta(OFF_KEY, current or boot_id())
    core.store.set_meta(UNTIL_KEY, None)
    if was_on:
        core.audit("safe-mode-off", "ssh", Origin.ADMIN, actor or "unknown")
        from tm4.core.notify import alert

        alert("safe_mode", "safe mode turned off; ssh is back to the whitelist", actor=actor)
    return was_on
