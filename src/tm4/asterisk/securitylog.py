"""Asterisk's `security` log (res_security_log through a logger.conf channel): the same
security events as AMI, as lines of a file. The guard reads it to catch up on what it
missed while it was logged out of AMI (an Asterisk restart, a dead connection).

A line, as captured from Asterisk 22 (tests/fixtures/asterisk-22/real2/logs/):

    [2026-12-05 02:02:40.086] SECURITY[27752] res_security_log.c: SecurityEvent="RequestNotAllowed",
    EventTV="2026-12-05T02:02:40.086+0000",Severity="Error",Service="AMI",...

(one line; `key="value"` pairs in the AMI event's order, values NOT escaped). The date
prefix follows logger.conf's `dateformat` (local time, maybe without year or ms), so
times are taken from EventTV, which carries its UTC offset.

Hostile input: an attacker chooses AccountID, SessionID (a SIP Call-ID), Response, ...
Since values are not escaped, a value holding `",RemoteAddress="...` would forge a field
and a value holding a line break would forge a whole line. A line whose keys repeat,
whose pairs do not cover it exactly, or which follows a line that is not a whole record,
is therefore dropped, never acted on.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from tm4.asterisk.conffile import ConfParseError, atomic_write, parse_conf
from tm4.asterisk.events import SECURITY_EVENTS, Frame

DEFAULT_PATH = "/var/log/asterisk/security"
CHANNEL_LINE = "security => security"
MARKER = "res_security_log.c: "
# Bounds for a catch-up: a flooded log must not stall the guard.
MAX_SCAN_BYTES = 64 * 1024 * 1024
MAX_LINE = 64 * 1024

_PAIR = re.compile(r'([A-Za-z][A-Za-z0-9]*)="([^"\r\n]*)"')
_RECORD = re.compile(r"^\[[^\]\r\n]{1,64}\] ")  # any log record: `[date] ...`
_PREFIX = re.compile(r"^\[[^\]\r\n]{1,64}\] SECURITY\[\d{1,10}\] ")

EventKey = tuple[str, ...]


@dataclass(frozen=True)
class LogEvent:
    frame: Frame  # Event: <SecurityEvent>, then the line's fields in order
    when: float  # EventTV as a Unix time


def parse_line(line: str) -> Frame | None:
    """One security log line as an AMI-like Frame; None for other lines and forgeries."""
    if len(line) > MAX_LINE or not _PREFIX.match(line):
        return None
    at = line.find(MARKER)
    if at < 0:
        return None
    body = line[at + len(MARKER):].rstrip("\r\n")
    pairs: list[tuple[str, str]] = []
    pos = 0
    for m in _PAIR.finditer(body):
        if m.start() != pos:
            return None  # something between the pairs: a quote inside a value
        pairs.append((m.group(1), m.group(2)))
        pos = m.end() + 1  # the comma
        if m.end() < len(body) and body[m.end()] != ",":
            return None
    if pos != len(body) + 1 or not pairs or pairs[0][0] != "SecurityEvent":
        return None
    names = [k for k, _ in pairs]
    if len(set(names)) != len(names):
        return None  # a forged field
    if pairs[0][1] not in SECURITY_EVENTS:
        return None
    return Frame((("Event", pairs[0][1]), *pairs[1:]))


def event_time(frame: Frame) -> float | None:
    """EventTV (`2026-12-05T02:02:40.086+0000`) as a Unix time."""
    tv = frame.get("EventTV")
    if not tv:
        return None
    try:
        return datetime.strptime(tv, "%Y-%m-%dT%H:%M:%S.%f%z").timestamp()
    except ValueError:
        return None


def event_key(frame: Frame) -> EventKey:
    """What makes one security event itself, the same from AMI and from the log: its type
    and every field but Privilege (AMI-only), in order."""
    out = [frame.event or ""]
    for k, v in frame.headers:
        if k in ("Event", "Privilege", "SecurityEvent", "ActionID"):
            continue
        out += (k, v)
    return tuple(out)


def parse_lines(lines: Iterable[str]) -> list[LogEvent]:
    """Whole, trustworthy records: a line after one that is not a whole record is dropped
    (a line break inside a value would have made the next line up)."""
    out: list[LogEvent] = []
    prev_ok = True
    for line in lines:
        frame = parse_line(line)
        if frame is None:
            broken = bool(_PREFIX.match(line)) and MARKER in line  # a security record cut short
            prev_ok = not line.strip() or (bool(_RECORD.match(line)) and not broken)
            continue
        ok, prev_ok = prev_ok, True
        if not ok:
            continue
        when = event_time(frame)
        if when is not None:
            out.append(LogEvent(frame, when))
    return out


def read_since(path: str | Path, since: float, *, max_bytes: int = MAX_SCAN_BYTES) -> list[LogEvent]:
    """Events with EventTV >= `since` (Unix time), oldest first, read backwards from the
    end of the file (the log may be large) until a record older than `since`."""
    p = Path(path)
    with p.open("rb") as f:
        size = f.seek(0, os.SEEK_END)
        pos, tail, chunk = size, b"", 256 * 1024
        while pos > 0 and size - pos < max_bytes:
            step = min(chunk, pos)
            pos -= step
            f.seek(pos)
            tail = f.read(step) + tail
            first_nl = tail.find(b"\n")
            if first_nl < 0 or pos == 0:
                continue
            head = parse_lines([tail[first_nl + 1:].split(b"\n", 1)[0].decode("utf-8", "replace")])
            if head and head[0].when < since:
                break
    text = tail.decode("utf-8", "replace")
    lines = text.split("\n")
    if pos > 0:
        lines = lines[1:]  # cut mid-line
    return [e for e in parse_lines(lines) if e.when >= since]


@dataclass
class CatchUp:
    """What a catch-up found: the events not yet seen live, in log order."""

    missed: list[LogEvent] = field(default_factory=list)
    read: int = 0
    already_seen: int = 0
    error: str = ""


def missed_events(logged: list[LogEvent], seen: Counter[EventKey]) -> CatchUp:
    """The logged events not among those seen live; each counted once: an event seen live
    n times cancels n identical log lines."""
    left = Counter(seen)
    res = CatchUp(read=len(logged))
    for ev in logged:
        k = event_key(ev.frame)
        if left[k] > 0:
            left[k] -= 1
            res.already_seen += 1
        else:
            res.missed.append(ev)
    return res


# -- logger.conf -------------------------------------------------------------------

@dataclass
class LoggerChannel:
    """Where Asterisk writes security events; `changed` when tm4 added the channel."""

    path: str | None
    changed: bool = False
    note: str = ""


def security_channel(text: str, log_dir: str = "/var/log/asterisk") -> str | None:
    """The file of the first [logfiles] channel carrying the `security` level, else None."""
    conf = parse_conf(text, "logger.conf")
    for name, value in conf.settings.get("logfiles", []):
        levels = {v.strip().lower() for v in value.split(",")}
        if "security" in levels or "*" in levels:
            if name in ("console", "syslog") or name.startswith("syslog."):
                continue
            return name if name.startswith("/") else f"{log_dir.rstrip('/')}/{name}"
    return None


def ensure_security_channel(config_dir: Path, log_dir: str = "/var/log/asterisk") -> LoggerChannel:
    """Make sure logger.conf writes security events to a file; add `security => security`
    under [logfiles] when none does. Asterisk needs `logger reload` afterwards."""
    path = config_dir / "logger.conf"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        text = ""
    except (OSError, UnicodeDecodeError) as exc:
        return LoggerChannel(None, note=f"cannot read {path}: {exc}")
    try:
        found = security_channel(text, log_dir)
    except ConfParseError as exc:
        return LoggerChannel(None, note=f"{path} left alone: {exc}")
    if found is not None:
        return LoggerChannel(found)
    nl = "\r\n" if "\r\n" in text else "\n"
    lines = text.splitlines()
    at = next((i for i, ln in enumerate(lines) if ln.strip().lower().startswith("[logfiles]")), None)
    add = ["; security events for tm4's guard to catch up after an AMI gap (tm4 asterisk install)",
           CHANNEL_LINE]
    if at is None:
        lines += ([""] if lines and lines[-1].strip() else []) + ["[logfiles]"] + add
    else:
        lines[at + 1:at + 1] = add
    atomic_write(path, nl.join(lines) + nl, mode=0o644)
    return LoggerChannel(f"{log_dir.rstrip('/')}/security", changed=True,
                         note="added `security => security` to logger.conf")


def install_warnings(config_dir: Path, configured: str, rx: Callable[[str], str | None],
                     log_dir: str = "/var/log/asterisk") -> list[str]:
    """`tm4 asterisk install`'s part: the security channel exists, Asterisk uses it, and
    it is the file the guard reads ([guard] security_log). Lines for the report."""
    ch = ensure_security_channel(config_dir, log_dir)
    out: list[str] = []
    if ch.path is None:
        return [f"{ch.note}: the guard cannot catch up on events it misses while AMI is down"]
    if ch.changed:
        done = rx("logger reload") is not None
        out.append(f"{config_dir / 'logger.conf'}: added `{CHANNEL_LINE}` for the guard's catch-up; "
                   + ("logger reloaded" if done else "run  asterisk -rx \"logger reload\""))
    if not configured:
        out.append("[guard] security_log is empty: events missed while AMI is down are not caught up")
    elif os.path.normpath(configured) != os.path.normpath(ch.path):
        out.append(f"Asterisk writes security events to {ch.path} but [guard] security_log is "
                   f"{configured}: set it to {ch.path}")
    return out
