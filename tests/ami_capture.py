"""The real2 AMI captures (tests/fixtures/asterisk-22/real2/ami/) as data.

Each capture is `NAME.raw` (bytes the client received), `NAME.sent.raw` (bytes it
sent) and `NAME.chunks.tsv` (one row per socket event: time, connection, event,
offset/length into .raw or .sent.raw). See the README there.

`messages()` splits a stream into AMI messages; `shape()` is what the replay test
compares between a simulator and Asterisk: the framing (CRLF, blank line), the field
names in order and the values that do not change from one run to the next.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

REAL2 = Path(__file__).parent / "fixtures" / "asterisk-22" / "real2"
AMI = REAL2 / "ami"
BANNER_RE = re.compile(rb"^Asterisk Call Manager/[0-9.]+\r\n")


@dataclass
class Row:
    t: float  # ms from the capture's t0
    wall: str
    conn: str
    event: str  # connect, connected, refused, recv, send, eof, reset, close, timeout, ...
    data: bytes
    detail: str


@dataclass
class Conn:
    name: str
    rows: list[Row] = field(default_factory=list)

    @property
    def start(self) -> float:
        return self.rows[0].t

    def received(self) -> bytes:
        return b"".join(r.data for r in self.rows if r.event == "recv")

    def sent(self) -> bytes:
        return b"".join(r.data for r in self.rows if r.event == "send")

    def sends(self) -> list[Row]:
        return [r for r in self.rows if r.event == "send"]

    def ending(self) -> str:
        """How the connection ended: eof, reset, refused, close (by the client), open."""
        for r in reversed(self.rows):
            if r.event in ("eof", "reset", "refused", "close", "timeout"):
                return r.event
        return "open"

    def turns(self) -> list[tuple[bytes, bytes]]:
        """(what the client sent, the bytes received after it until the next send);
        the first turn has b"" as its send (the banner and what came unasked)."""
        out: list[tuple[bytes, bytes]] = [(b"", b"")]
        for r in self.rows:
            if r.event == "send":
                out.append((r.data, b""))
            elif r.event == "recv":
                s, got = out[-1]
                out[-1] = (s, got + r.data)
        return out


@dataclass
class Capture:
    name: str
    conns: dict[str, Conn]
    rows: list[Row]


def load(name: str) -> Capture:
    raw = (AMI / f"{name}.raw").read_bytes()
    sent = (AMI / f"{name}.sent.raw").read_bytes()
    rows: list[Row] = []
    conns: dict[str, Conn] = {}
    for line in (AMI / f"{name}.chunks.tsv").read_text(encoding="utf-8").splitlines():
        if line.startswith("#") or line.startswith("t_ms"):
            continue
        t, wall, conn, event, off, length, *detail = line.split("\t")
        o, n = int(off), int(length)
        data = b""
        if event == "recv":
            data = raw[o:o + n]
        elif event == "send":
            data = sent[o:o + n]
        if len(data) != max(n, 0) and event in ("recv", "send"):
            raise ValueError(f"{name}: row {line!r} points past the raw bytes")
        row = Row(float(t), wall, conn, event, data, "\t".join(detail))
        rows.append(row)
        if conn not in ("cli", "pbx"):
            conns.setdefault(conn, Conn(conn)).rows.append(row)
    return Capture(name, conns, rows)


def captures() -> list[str]:
    return sorted(p.name[:-len(".chunks.tsv")] for p in AMI.glob("*.chunks.tsv"))


# -- comparing ---------------------------------------------------------------------

def messages(data: bytes) -> list[bytes]:
    """The banner (if any) and each message, each with its own CRLFs."""
    out: list[bytes] = []
    m = BANNER_RE.match(data)
    if m:
        out.append(m.group(0))
        data = data[m.end():]
    while data:
        end = data.find(b"\r\n\r\n")
        if end < 0:
            out.append(data)  # an unterminated tail: compared as is
            break
        out.append(data[:end + 4])
        data = data[end + 4:]
    return out


# Values that are the same in every run (the rest are times, ids, ports, counters).
STABLE = {"Response", "Message", "Event", "Privilege", "EventList", "Shutdown", "Restart",
          "Severity", "Service", "EventVersion", "AccountID", "RequestType", "Module", "Ping",
          "ObjectType", "ObjectName", "Contacts", "Match", "ServerUri", "Protocol", "Aor", "Aors", "URI",
          "Transport", "Endpoint", "EndpointName", "AOR"}


def shape(msg: bytes) -> tuple[object, ...]:
    """A message as compared: banner text, or the field names in order with the stable
    values; a message without CRLF framing keeps its raw bytes (and so differs)."""
    if BANNER_RE.fullmatch(msg):
        return ("banner", msg)
    if not msg.endswith(b"\r\n\r\n"):
        return ("unframed", msg)
    out: list[object] = []
    for line in msg[:-4].split(b"\r\n"):
        key, sep, value = line.partition(b": ")
        if not sep:
            out.append(("line", line))
            continue
        k = key.decode("utf-8", "replace")
        out.append((k, value) if k in STABLE else (k,))
    return tuple(out)


def action_of(sent: bytes) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in sent.decode("utf-8", "replace").split("\r\n"):
        k, sep, v = line.partition(": ")
        if sep:
            out.setdefault(k.lower(), v)
    return out
