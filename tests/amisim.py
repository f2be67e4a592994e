"""An AMI simulator: a real asyncio TCP server speaking Asterisk 22's manager protocol.

Built from the captures in tests/fixtures/ami/ (real Asterisk 22.10.1):
banner, Login (1 s delay then `Response: Error` and close on a bad login, plus
the InvalidPassword / InvalidAccountID / FailedACL event that Asterisk raises
for it), `\\r\\n` framing, events, Logoff (`Goodbye`, close). Two modes:

- replay: after a login, send the server side of a captured session byte for
  byte (the faithfulness test feeds the captured client bytes and compares);
- live: tests push events (`emit`, `emit_event`) rendered in the captures'
  framing and field order.

Not in the captures, hence synthesized from Asterisk's manager.c and marked so:
the Ping answer and the field order of the security event types the captures lack
(from sec_events[] in main/security_events.c). The Shutdown event, Reload, a refused
action (Permission denied + RequestNotAllowed) and an unknown one (+ RequestBadFormat)
are as real2/ami/ captured them (tests/asterisk/test_sim_replay.py checks).

Fault injection for reconnect tests: `restart()`, `kill_mid_frame()`,
`freeze()` / `thaw()` (a silent peer: nothing read, nothing written, no banner
for new connections - what a half-open connection looks like from the client).
"""

from __future__ import annotations

import asyncio
import re
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from tm4.lab.sim.ami import (
    BANNER,
    FULLY_BOOTED,
    GOODBYE,
    LOGIN_FAILED,
    LOGIN_OK,
    PERMISSION_DENIED,
    PONG,
    RELOAD_EVENT,
    RELOADED,
    UNKNOWN_ACTION,
    WRITE_CLASS,
    address,
    event_tv,
    render_event,
)
from tm4.lab.sim.ami import SHUTDOWN as _SHUTDOWN

FIXTURES = Path(__file__).parent / "fixtures" / "ami"
EOL = b"\r\n"
T = TypeVar("T")

# ---------------------------------------------------------------------------------------------
# Transcripts: the .txt index tells which bytes of the .raw went which way.

_HEAD = re.compile(
    r"^#### (?P<ts>\S+ \S+) (?:(?P<conn>connected from (?P<peer>\S+) to (?P<local>\S+))"
    r"|<<< (?P<banner>BANNER)|<<< RECV (?P<recv>\d+) bytes|>>> SENT (?P<sent>\d+) bytes"
    r"|<<< (?P<closed>connection closed by peer))"
)


@dataclass
class Chunk:
    direction: str  # "server" (Asterisk -> client) or "client"
    data: bytes
    ts: str


@dataclass
class Session:
    peer: str
    local: str
    chunks: list[Chunk] = field(default_factory=list)
    closed_by_server: bool = False

    def server_bytes(self) -> bytes:
        return b"".join(c.data for c in self.chunks if c.direction == "server")

    def client_bytes(self) -> bytes:
        return b"".join(c.data for c in self.chunks if c.direction == "client")

    def client_messages(self) -> list[bytes]:
        return [c.data for c in self.chunks if c.direction == "client"]


def load_transcript(txt: str | Path, raws: Sequence[str | Path]) -> list[Session]:
    """Split the raw bytes of a capture into sessions and directions using its .txt index.

    Raises ValueError if the index and the raw bytes disagree (the capture would not
    be replayed faithfully)."""
    data = b"".join(Path(FIXTURES / r if not Path(r).is_absolute() else r).read_bytes() for r in raws)
    text = Path(FIXTURES / txt if not Path(txt).is_absolute() else txt).read_text(encoding="utf-8")
    sessions: list[Session] = []
    pos = 0
    for line in text.splitlines():
        m = _HEAD.match(line)
        if not m:
            continue
        if m["conn"]:
            sessions.append(Session(m["peer"], m["local"]))
            continue
        if not sessions:
            raise ValueError(f"{txt}: traffic before any connection")
        s = sessions[-1]
        if m["banner"]:
            end = data.index(EOL, pos) + 2
            s.chunks.append(Chunk("server", data[pos:end], m["ts"]))
            pos = end
        elif m["recv"] or m["sent"]:
            n = int(m["recv"] or m["sent"])
            s.chunks.append(Chunk("server" if m["recv"] else "client", data[pos:pos + n], m["ts"]))
            if len(s.chunks[-1].data) != n:
                raise ValueError(f"{txt}: raw bytes end early at {pos}")
            pos += n
        elif m["closed"]:
            s.closed_by_server = True
    if pos != len(data):
        raise ValueError(f"{txt}: index covers {pos} bytes, raw files hold {len(data)}")
    return sessions


def security_capture() -> list[Session]:
    """Capture (a): the tm4 session with all attacks, then three failed logins."""
    return load_transcript("ami_security_events.txt", ["ami_security_events.raw", "ami_failed_logins.raw"])


# ---------------------------------------------------------------------------------------------
# The server. Its answers and the security events it renders are tm4.lab.sim.ami's (the lab's AMI
# endpoint speaks the same).

SHUTDOWN = _SHUTDOWN % b"True"  # real2/ami/restart: `core restart now`


def _actionid_line(action_id: str | None) -> bytes:
    return (action_id or "").encode()


@dataclass
class Conn:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    peer: tuple[str, int]
    logged_in: bool = False
    events: bool = True
    user: str = ""
    greeted: bool = False
    task: asyncio.Task[None] | None = None
    actions: list[dict[str, str]] = field(default_factory=list)


class AmiSimulator:
    """Run inside an asyncio loop. Users: {name: secret}; `permit(ip)` is manager.conf's ACL."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        users: dict[str, str] | None = None,
        *,
        permit: Callable[[str], bool] | None = None,
        replay: Session | None = None,
        login_fail_delay: float = 1.0,
        local_address: str = "127.0.0.1",
        write: str = "system",
    ) -> None:
        self.host = host
        self.port = port
        self.users = users if users is not None else {"tm4": "tm4secret"}
        self.permit = permit or (lambda ip: True)
        self.replay = replay
        self.login_fail_delay = login_fail_delay
        self.write = set(write.split(","))  # every user's write classes (tm4's least privilege)
        self.local_address = local_address
        self.server: asyncio.AbstractServer | None = None
        self.conns: list[Conn] = []
        self.frozen = False
        self._thawed = asyncio.Event()
        self._thawed.set()
        self.logins = 0
        self.failed_logins = 0
        self.connections = 0
        self.emitted = 0
        self.login_times: list[float] = []
        self.failed_login_times: list[float] = []
        self.actions_seen: list[dict[str, str]] = []
        self._session_ids = 0x7F6CF4000000
        self._tasks: set[Any] = set()

    # -- lifecycle ---------------------------------------------------------------------
    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, self.host, self.port, reuse_address=True)
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self, shutdown_event: bool = True) -> None:
        """Asterisk stopping: Shutdown event to every session, then close everything."""
        if self.server is not None:
            self.server.close()
        for c in list(self.conns):
            if shutdown_event and c.logged_in and not c.writer.is_closing():
                c.writer.write(SHUTDOWN)
            c.writer.close()
        self.conns.clear()
        await self._settle()
        if self.server is not None:
            await self.server.wait_closed()
            self.server = None

    async def _settle(self) -> None:
        """Let the connection handlers see their closed sockets and end."""
        if self._tasks:
            if self.frozen:
                self.thaw()  # handlers waiting to be thawed end instead of being cancelled
            done, pending = await asyncio.wait(list(self._tasks), timeout=1.0)
            for t in pending:
                t.cancel()

    async def restart(self, down_for: float = 0.5) -> None:
        await self.stop()
        await asyncio.sleep(down_for)
        await self.start()

    async def kill_mid_frame(self, frame: bytes, cut: int | None = None) -> None:
        """Write the first part of `frame` to every session, then reset the connections and
        stop listening (Asterisk crashing mid-write)."""
        cut = len(frame) // 2 if cut is None else cut
        for c in list(self.conns):
            if c.logged_in:
                c.writer.write(frame[:cut])
                await c.writer.drain()
        await asyncio.sleep(0.05)
        if self.server is not None:
            self.server.close()
        for c in list(self.conns):
            c.writer.transport.abort()
        self.conns.clear()
        await self._settle()
        if self.server is not None:
            await self.server.wait_closed()
            self.server = None

    def freeze(self) -> None:
        """Go silent: read nothing, answer nothing, greet nobody (connections stay open)."""
        self.frozen = True
        self._thawed.clear()

    def thaw(self) -> None:
        self.frozen = False
        self._thawed.set()

    # -- events ----------------------------------------------------------------------
    def emit(self, frame: bytes) -> int:
        """Send raw event bytes to every logged-in session; returns how many got it."""
        n = 0
        for c in self.conns:
            if c.logged_in and not c.writer.is_closing() and not self.frozen:
                c.writer.write(frame)
                n += 1
        self.emitted += 1
        return n

    def emit_event(self, event: str, **values: str) -> int:
        return self.emit(render_event(event, **values))

    # -- one connection ----------------------------------------------------------------
    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")[:2]
        conn = Conn(reader, writer, peer, task=asyncio.current_task())  # type: ignore[arg-type]
        self.conns.append(conn)
        self._tasks.add(conn.task)
        self.connections += 1
        try:
            await self._thawed.wait()
            writer.write(BANNER)
            conn.greeted = True
            while True:
                raw = await reader.readuntil(b"\r\n\r\n")
                await self._thawed.wait()
                action = _parse_action(raw)
                conn.actions.append(action)
                self.actions_seen.append(action)
                if not await self._action(conn, action):
                    break
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            if conn in self.conns:
                self.conns.remove(conn)
            if not writer.is_closing():
                writer.close()
            self._tasks.discard(conn.task)

    async def _action(self, conn: Conn, action: dict[str, str]) -> bool:
        name = action.get("action", "").lower()
        aid = action.get("actionid")
        w = conn.writer
        if name == "login":
            return await self._login(conn, action)
        if not conn.logged_in:
            w.write(b"Response: Error\r\nActionID: %s\r\nMessage: Permission denied\r\n\r\n" % _actionid_line(aid))
            return True
        need = WRITE_CLASS.get(name, set())
        if name == "ping":
            w.write(PONG % (_actionid_line(aid), f"{time.time():.6f}".encode()))
        elif name == "logoff":
            w.write(self._captured_goodbye(aid))
            await w.drain()
            return False
        elif name not in WRITE_CLASS:
            w.write(UNKNOWN_ACTION % (_actionid_line(aid), action.get("action", "").encode()))
            self._to_security_readers(self._ami_event("RequestBadFormat", conn, conn.user,
                                                      RequestType=f"Action: {action.get('action', '')}"))
        elif need is not None and not need & self.write:
            w.write(PERMISSION_DENIED % _actionid_line(aid))
            self._to_security_readers(self._ami_event("RequestNotAllowed", conn, conn.user,
                                                      RequestType=f"Action: {action.get('action', '')}"))
        elif name == "reload":
            w.write(RELOADED % _actionid_line(aid)
                    + (RELOAD_EVENT % action.get("module", "").encode() if conn.events else b""))
        else:
            w.write(UNKNOWN_ACTION % (_actionid_line(aid), action.get("action", "").encode()))
        await w.drain()
        return True

    async def _login(self, conn: Conn, action: dict[str, str]) -> bool:
        user = action.get("username", "")
        aid = action.get("actionid")
        ip = conn.peer[0]
        ok = user in self.users and self.users[user] == action.get("secret") and self.permit(ip)
        if not ok:
            self.failed_logins += 1
            self.failed_login_times.append(time.monotonic())
            self._report_failed_login(conn, user)
            await asyncio.sleep(self.login_fail_delay)  # manager.c: 1 s before the answer
            conn.writer.write(LOGIN_FAILED % _actionid_line(aid))
            await conn.writer.drain()
            return False
        conn.logged_in, conn.user = True, user
        conn.events = action.get("events", "on").lower() != "off"
        self.logins += 1
        self.login_times.append(time.monotonic())
        if self.replay is not None:
            conn.writer.write(self._replayed_after_login(aid))
        else:
            conn.writer.write(LOGIN_OK % _actionid_line(aid))
            if conn.events:
                conn.writer.write(FULLY_BOOTED)
            self._to_security_readers(self._ami_event("SuccessfulAuth", conn, user, UsingPassword="0"))
        await conn.writer.drain()
        return True

    def _report_failed_login(self, conn: Conn, user: str) -> None:
        if user not in self.users:
            frame = self._ami_event("InvalidAccountID", conn, user)
        elif not self.permit(conn.peer[0]):
            frame = self._ami_event("FailedACL", conn, user)
        else:
            frame = self._ami_event("InvalidPassword", conn, user, SessionTV="1970-01-01T00:00:00.000+0000")
        for c in self.conns:
            if c.logged_in and c is not conn and not c.writer.is_closing():
                c.writer.write(frame)

    def _to_security_readers(self, frame: bytes) -> None:
        for c in self.conns:
            if c.logged_in and c.events and not c.writer.is_closing():
                c.writer.write(frame)

    def _ami_event(self, event: str, conn: Conn, user: str, **extra: str) -> bytes:
        self._session_ids += 0x1230
        now = event_tv()
        values = {
            "Service": "AMI", "AccountID": user, "SessionID": hex(self._session_ids),
            "LocalAddress": address(self.local_address, self.port, "TCP"),
            "RemoteAddress": address(conn.peer[0], conn.peer[1], "TCP"),
            "SessionTV": now, "EventTV": now,
        }
        values.update(extra)
        return render_event(event, **values)

    # -- replay ------------------------------------------------------------------------
    def _replayed_after_login(self, action_id: str | None) -> bytes:
        """The captured server bytes from the login answer up to (not including) the answer
        to the client's next action, with the client's ActionID in the login answer."""
        assert self.replay is not None
        out: list[bytes] = []
        seen_login = False
        for c in self.replay.chunks:
            if c.direction == "client":
                if seen_login:
                    break
                seen_login = True
                continue
            if seen_login:
                out.append(c.data)
        data = b"".join(out)
        return _with_action_id(data, b"login-1", action_id)

    def _captured_goodbye(self, action_id: str | None) -> bytes:
        if self.replay is not None:
            chunks = self.replay.chunks
            if chunks and chunks[-1].direction == "server" and chunks[-1].data.startswith(b"Response: Goodbye"):
                return _with_action_id(chunks[-1].data, b"logoff-1", action_id)
        return GOODBYE % _actionid_line(action_id)


def _with_action_id(data: bytes, captured: bytes, action_id: str | None) -> bytes:
    if action_id is None or action_id.encode() == captured:
        return data
    return data.replace(b"ActionID: " + captured + b"\r\n", b"ActionID: " + action_id.encode() + b"\r\n", 1)


def _parse_action(raw: bytes) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in raw.decode("utf-8", "replace").split("\r\n"):
        k, sep, v = line.partition(":")
        if sep:
            out.setdefault(k.strip().lower(), v[1:] if v.startswith(" ") else v)
    return out


# ---------------------------------------------------------------------------------------------
# A loop in a thread, for tests that mix blocking code (SIP tools, probes) with asyncio.

class LoopThread:
    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 10.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        async def wrap() -> T:
            return fn(*args)
        return self.run(wrap())

    def soon(self, fn: Callable[..., Any], *args: Any) -> None:
        self.loop.call_soon_threadsafe(fn, *args)

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def close(self) -> None:
        async def cancel_all() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        try:
            self.run(cancel_all(), timeout=5)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)
            self.loop.close()
