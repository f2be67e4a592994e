"""Asterisk's AMI across a restart, replayed from the real captures
(tests/fixtures/asterisk-22/real2/ami/{restart,restart_gracefully,stop_start}.probe.*).

The probe captures opened a connection every 2 ms through the restart; the outcome of
each attempt gives the phases, in the order Asterisk went through them, each starting
midway between the last attempt of the previous phase and its own first attempt:

- old: the old Asterisk still accepts a Login (the captured answer bytes);
- shutting-down: banner, then `Response: Error` / `Message: Asterisk is shutting down`;
  the socket stays open (restart now: leaked across the exec) or is closed when the
  manager unloads (restart gracefully), as captured;
- dead: the handshake completes but no banner comes (or a Login gets no answer), then
  RST or FIN, as captured, after the captured delay;
- refused: nothing listens (the listening socket is closed: a real ECONNREFUSED);
- new: the new Asterisk accepts a Login, answers with the captured bytes, and sends what
  followed (PeerStatus, ContactStatus, the late FullyBooted) with the captured delays.

Sessions logged in on the old Asterisk get what c00 got after its login (Registry,
Shutdown) at the captured times, then FIN. Every Login raises the captured
SuccessfulAuth to the logged-in sessions.

`stretch` multiplies every time; `hold_refused` keeps the refused phase until `boot()`
(a slow boot). Security events raised by `attack()` go where Asterisk sends them: to the
logged-in sessions, and to the security log file when res_security_log is loaded (the old
one until the process ends, or +7.7 ms into a graceful restart; the new one 13 ms after it
starts accepting Logins: README, logs/restart.security.log). While no Asterisk runs
(dead, refused, shutting-down) an attack raises nothing.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import ami_capture
from ami_capture import Conn

from tm4.asterisk.events import FrameParser

# Where res_security_log stops and starts (README of real2, logs/restart.*.log).
OLD_LOG_UNTIL_MS = {"restart_gracefully": 7.7}
NEW_LOG_AFTER_LOGINS_MS = 13.0
# SYNTHESIZED (the real2 captures send no Ping): manager.c action_ping.
PONG = b"Response: Success\r\nActionID: %s\r\nPing: Pong\r\nTimestamp: %s\r\n\r\n"


@dataclass
class Phase:
    kind: str  # old, shutting-down, dead, refused, new
    start: float  # ms from t0
    sample: Conn | None


def _outcome(c: Conn, seen_down: bool) -> str:
    if c.ending() == "refused":
        return "refused"
    got = c.received()
    if b"Asterisk is shutting down" in got:
        return "shutting-down"
    if b"Response: Success" in got:
        return "new" if seen_down else "old"
    return "dead"


def phases(name: str) -> list[Phase]:
    cap = ami_capture.load(f"{name}.probe")
    attempts = sorted((c for n, c in cap.conns.items() if n != "c00"), key=lambda c: c.start)
    out: list[Phase] = []
    down = False
    last_start = 0.0
    for c in attempts:
        kind = _outcome(c, down)
        down = down or kind in ("dead", "refused")
        if not out or out[-1].kind != kind:
            start = 0.0 if not out else (last_start + c.start) / 2
            out.append(Phase(kind, start, c))
        last_start = c.start
    return out


def _action_id(data: bytes, new: str) -> bytes:
    """The first `ActionID:` line of a captured answer, with the client's id."""
    head, sep, rest = data.partition(b"ActionID: ")
    if not sep:
        return data
    _, eol, tail = rest.partition(b"\r\n")
    return head + sep + new.encode() + eol + tail


def _is_security(msg: bytes) -> bool:
    return b"Privilege: security" in msg


@dataclass
class Session:
    writer: asyncio.StreamWriter
    logged_in: bool = False
    old: bool = True  # logged in on the old Asterisk
    actions: list[dict[str, str]] = field(default_factory=list)


class RestartSim:
    def __init__(self, name: str, username: str, secret: str, security_log: Path, *,
                 stretch: float = 1.0, hold_refused: bool = False) -> None:
        self.name = name
        self.username, self.secret = username, secret
        self.security_log = security_log
        self.stretch = stretch
        self.hold_refused = hold_refused
        self.phases = phases(name)
        # the phases' own run: what its logged-in session got, and when
        self.c00 = ami_capture.load(f"{name}.probe").conns["c00"]
        self.port = 0
        self.server: asyncio.AbstractServer | None = None
        self.sessions: list[Session] = []
        self.t0: float | None = None  # monotonic time of the restart command
        self.new_since: float | None = None  # monotonic: the new Asterisk accepts logins
        self.first_new_login: float | None = None
        self.logins: list[tuple[float, str]] = []  # (monotonic, phase)
        self.actions: list[dict[str, str]] = []
        self.raised: list[tuple[float, str, bool, int]] = []  # (wall, key, logged, delivered)
        self._booted = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._login_answer = self._sample_login_answer()
        # a Login once the new Asterisk is fully booted: answered as the plain capture's c01
        # (FullyBooted right behind the answer); before that, as the probe's early Login
        c01 = ami_capture.load(name).conns["c01"]
        sends = c01.sends()
        self._booted_answer = [(r.t - sends[0].t, r.data) for r in c01.rows
                               if r.event == "recv" and sends[0].t <= r.t < sends[1].t]
        new = next(p for p in self.phases if p.kind == "new")
        assert new.sample is not None
        self._booted_after_ms = next(r.t for r in new.sample.rows
                                     if r.event == "recv" and b"Event: FullyBooted" in r.data) - new.start
        self._tid = 28169

    # -- the captured pieces -----------------------------------------------------------
    def _sample_login_answer(self) -> dict[str, list[tuple[float, bytes]]]:
        """Per phase kind: (ms after the Login was sent, bytes) of what followed it."""
        out: dict[str, list[tuple[float, bytes]]] = {}
        for ph in self.phases:
            if ph.sample is None or ph.kind in out:
                continue
            sends = ph.sample.sends()
            if not sends:
                continue
            at = sends[0].t
            chunks = []
            own_auth = False
            for r in ph.sample.rows:
                if r.event != "recv" or r.t < at:
                    continue
                if sends[1:] and r.t >= sends[1].t:
                    break
                # the answer and what the Login caused; not the other probes' logins nor the
                # Shutdown (which reaches every session at its own time, _old_session_end)
                keep = []
                for m in ami_capture.messages(r.data):
                    if m.startswith((b"Event: Shutdown", b"Event: Registry")):
                        continue  # to every session at its time: _old_session_end
                    if _is_security(m):
                        if own_auth:
                            continue
                        own_auth = True
                    keep.append(m)
                if keep:
                    chunks.append((r.t - at, b"".join(keep)))
            out[ph.kind] = chunks
        return out

    def _c00_after_login(self) -> list[tuple[float, bytes]]:
        """What the logged-in session got after t0, security events of others left out."""
        out = []
        for r in self.c00.rows:
            if r.event == "recv" and r.t >= 0:
                msgs = [m for m in ami_capture.messages(r.data) if not _is_security(m)]
                if msgs:
                    out.append((r.t, b"".join(msgs)))
        return out

    def _c00_eof(self) -> float:
        return next(r.t for r in self.c00.rows if r.event == "eof")

    # -- the clock -----------------------------------------------------------------------
    def elapsed_ms(self) -> float:
        if self.t0 is None:
            return -1.0
        return (time.monotonic() - self.t0) * 1000 / self.stretch

    def phase(self) -> str:
        if self.t0 is None:
            return "old"
        if self.new_since is not None:
            return "new"
        t = self.elapsed_ms()
        kind = "old"
        for ph in self.phases:
            if ph.start <= t:
                kind = ph.kind
        return kind

    def _log_loaded(self) -> bool:
        if self.t0 is None:
            return True
        if self.new_since is not None:
            return (time.monotonic() - self.new_since) * 1000 / self.stretch >= NEW_LOG_AFTER_LOGINS_MS
        limit = OLD_LOG_UNTIL_MS.get(self.name)
        return self.phase() == "old" and (limit is None or self.elapsed_ms() < limit)

    # -- lifecycle ----------------------------------------------------------------------
    async def start(self) -> None:
        await self._listen()

    async def _listen(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", self.port, reuse_address=True)
        self.port = self.server.sockets[0].getsockname()[1]

    async def restart(self) -> None:
        """The restart command: play the phases from now."""
        self.t0 = time.monotonic()
        self._spawn(self._timeline())
        for s in list(self.sessions):
            if s.logged_in:
                self._spawn(self._old_session_end(s))

    def boot(self) -> None:
        self._booted.set()

    async def _timeline(self) -> None:
        for ph in self.phases:
            if ph.kind == "refused" or ph.kind == "new":
                await self._sleep_until(ph.start)
            if ph.kind == "refused" and self.server is not None:
                self.server.close()
                self.server = None
            if ph.kind == "new":
                if self.hold_refused:
                    await self._booted.wait()
                if self.server is None:
                    await self._listen()
                self.new_since = time.monotonic()

    async def _sleep_until(self, ms: float) -> None:
        assert self.t0 is not None
        delay = self.t0 + ms * self.stretch / 1000 - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)

    async def _old_session_end(self, s: Session) -> None:
        for t, data in self._c00_after_login():
            await self._sleep_until(t)
            if not s.writer.is_closing():
                s.writer.write(data)
        await self._sleep_until(self._c00_eof())
        s.writer.close()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
        for s in list(self.sessions):
            s.writer.close()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _spawn(self, coro: object) -> None:
        task = asyncio.ensure_future(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- one connection ----------------------------------------------------------------
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._tasks.add(asyncio.current_task())  # type: ignore[arg-type]
        kind = self.phase()
        try:
            if kind == "dead":
                await self._dead(writer)
                return
            s = Session(writer, old=kind != "new")
            self.sessions.append(s)
            writer.write(b"Asterisk Call Manager/11.0.0\r\n")
            while True:
                raw = await reader.readuntil(b"\r\n\r\n")
                action = ami_capture.action_of(raw)
                s.actions.append(action)
                self.actions.append(action)
                if not await self._action(s, action, kind):
                    break
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            self.sessions = [x for x in self.sessions if x.writer is not writer]
            if not writer.is_closing():
                writer.close()
            self._tasks.discard(asyncio.current_task())  # type: ignore[arg-type]

    async def _dead(self, writer: asyncio.StreamWriter) -> None:
        ph = next(p for p in self.phases if p.kind == "dead")
        assert ph.sample is not None
        connected = next(r.t for r in ph.sample.rows if r.event == "connected")
        banner = ph.sample.received()
        if banner:
            writer.write(banner)
        await asyncio.sleep(max(0.0, ph.sample.rows[-1].t - connected) * self.stretch / 1000)
        if ph.sample.ending() == "reset":
            writer.transport.abort()
        else:
            writer.close()

    async def _action(self, s: Session, action: dict[str, str], kind: str) -> bool:
        name = action.get("action", "").lower()
        aid = action.get("actionid", "")
        if name == "login":
            kind = self.phase() if kind != "new" else kind
            if kind == "shutting-down":
                answer = self._login_answer["shutting-down"][0][1]
                s.writer.write(_action_id(answer, aid))
                return True  # the socket stays open, as captured
            if action.get("username") != self.username or action.get("secret") != self.secret:
                return False  # not what these captures show: the test must not get here
            s.logged_in, s.old = True, kind != "new"
            now = time.monotonic()
            self.logins.append((now, kind))
            if kind == "new" and self.first_new_login is None:
                self.first_new_login = now
            self._spawn(self._answer_login(s, aid, "new" if kind == "new" else "old"))
            if kind != "new" and self.t0 is not None:
                self._spawn(self._old_session_end(s))
            return True
        if name == "ping":
            s.writer.write(PONG % (aid.encode(), f"{time.time():.6f}".encode()))
        elif name == "logoff":
            s.writer.write(b"Response: Goodbye\r\nActionID: %s\r\nMessage: Thanks for all the fish.\r\n\r\n"
                           % aid.encode())
            await s.writer.drain()
            return False
        return True

    async def _answer_login(self, s: Session, aid: str, kind: str) -> None:
        start = time.monotonic()
        first = True
        answer = self._login_answer[kind]
        if kind == "new" and self.new_since is not None and \
                (start - self.new_since) * 1000 / self.stretch >= self._booted_after_ms:
            answer = self._booted_answer
        for t, data in answer:
            delay = start + t * self.stretch / 1000 - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            if s.writer.is_closing():
                return
            msgs = ami_capture.messages(_action_id(data, aid) if first else data)
            first = False
            # its own SuccessfulAuth goes to every logged-in session (here: as captured to it)
            s.writer.write(b"".join(m for m in msgs))

    # -- attacks -------------------------------------------------------------------------
    def attack(self, frame: bytes) -> tuple[bool, int]:
        """Asterisk raising a security event now: (written to the log, sessions that got it)."""
        kind = self.phase()
        if kind not in ("old", "new"):
            return False, 0
        delivered = 0
        for s in self.sessions:
            if s.logged_in and not s.writer.is_closing() and (s.old == (kind == "old")):
                s.writer.write(frame)
                delivered += 1
        logged = self._log_loaded()
        if logged:
            self._write_log(frame)
        self.raised.append((time.time(), kind, logged, delivered))
        return logged, delivered

    def _write_log(self, frame: bytes) -> None:
        (f,) = FrameParser().feed(b"Asterisk Call Manager/11.0.0\r\n" + frame) or [None]
        assert f is not None
        pairs = [("SecurityEvent", f.event or "")] + [(k, v) for k, v in f.headers
                                                     if k not in ("Event", "Privilege")]
        now = datetime.now(UTC)
        stamp = now.strftime("%Y-%m-%d %H:%M:%S.") + f"{now.microsecond // 1000:03d}"
        body = ",".join(f'{k}="{v}"' for k, v in pairs)
        with self.security_log.open("a", encoding="utf-8") as fh:
            fh.write(f"[{stamp}] SECURITY[{self._tid}] res_security_log.c: {body}\n")


async def until(pred: object, timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():  # type: ignore[operator]
            return True
        await asyncio.sleep(0.002)
    return bool(pred())  # type: ignore[operator]

