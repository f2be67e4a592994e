"""Durations as admins write them: 90s, 15m, 2h, 1d, 1w (also combined: 1h30m)."""

from __future__ import annotations

import re
from datetime import timedelta

from tm4.core.errors import ValidationError

MAX_DAYS = 1000
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
_PART = re.compile(r"(\d+)([smhdw])")


def parse_duration(text: str | int | float) -> timedelta:
    """Parse '2h', '1d12h', '90s' or a bare number of seconds; refuse zero and garbage."""
    if isinstance(text, bool):
        raise ValidationError(f"not a duration: {text!r}")
    if isinstance(text, int | float):
        seconds = float(text)
    else:
        s = text.strip().lower()
        if s.isdigit():
            seconds = float(s)
        else:
            parts = _PART.findall(s)
            if not parts or "".join(n + u for n, u in parts) != s:
                raise ValidationError(
                    f"not a duration: {text!r} (use e.g. 90s, 15m, 2h, 1d, 1w)"
                )
            seconds = float(sum(int(n) * _UNITS[u] for n, u in parts))
    if seconds <= 0:
        raise ValidationError(f"duration must be positive: {text!r}")
    if seconds > MAX_DAYS * 86400:
        # the kernel's set-element timeouts stop a little above this
        raise ValidationError(f"duration longer than {MAX_DAYS} days: {text!r} (make it permanent instead)")
    return timedelta(seconds=seconds)


def format_duration(delta: timedelta) -> str:
    """Shortest exact spelling: 3600s -> '1h', 5400s -> '1h30m'."""
    total = int(delta.total_seconds())
    if total <= 0:
        return "0s"
    out = []
    for unit, size in (("w", 604800), ("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        n, total = divmod(total, size)
        if n:
            out.append(f"{n}{unit}")
    return "".join(out)
