"""FastAGI (agi://127.0.0.1:4573/tm4-dialin) on panoramisk's Application, hardened.

panoramisk 1.4's pitfalls, and what is done about them:
- `add_route` wraps plain functions with `asyncio.coroutine`, gone in Python
  3.11: the route handler here is an `async def`.
- Routes match `agi_network_script` exactly, so `tm4-dialin?secret=...` would
  find no route: the query is split off before routing.
- `Request.send_command` reads exactly one line per command, so the unsolicited
  `HANGUP` line Asterisk writes before the next reply shifts every later reply:
  commands go through FastAgiTransport, which skips it and ends the call.
- `Application.handler` loops forever on `reader.read()` returning b"" when a
  connection closes before the blank line that ends the environment (a bare
  `nc -z 127.0.0.1 4573`): the environment is read here line by line, with a
  line, size and time limit.
- Any local user can connect to a loopback port: a call is served only when
  the peer socket belongs to an allowed uid (root and the Asterisk group's
  users; the owner uid is read from /proc/net/tcp*, as identd does) or when
  the AGI URL carries the configured secret (`?secret=...`).
- Asterisk ends the AGI() application only when the socket is really closed,
  so the handler closes the writer and waits for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import hmac
import logging
import pwd
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qs

from panoramisk.fast_agi import Application, Request

from tm4.core.errors import Tm4Error
from tm4.dialin.agi import (
    MAX_ENV_LINES,
    AgiHangup,
    AgiProtocolError,
    AgiReply,
    LineState,
    SpeechHolder,
    Steps,
    backend_call,
    channel_steps,
    decode_line,
    env_entry,
    guarded,
    is_backend,
    outcome_line,
    quote,
    read_reply,
)
from tm4.dialin.call import Conversation, HungUp, Outcome, Reply, Settings, conversation
from tm4.ops.lockout import decode_proc_addr

log = logging.getLogger("tm4.fastagi")

ROUTE = "tm4-dialin"
T = TypeVar("T")
Offload = Callable[[Callable[[], Any]], Awaitable[Any]]


async def inline(thunk: Callable[[], T]) -> T:
    """Run a backend call on the event loop itself (the default: the core is not thread-safe)."""
    return thunk()


# -- who is calling ------------------------------------------------------------------

def asterisk_uids(group: str) -> set[int]:
    """root, and every user whose primary or supplementary group is `group`."""
    uids = {0}
    try:
        g = grp.getgrnam(group)
    except KeyError:
        return uids
    for pw in pwd.getpwall():
        if pw.pw_gid == g.gr_gid or pw.pw_name in g.gr_mem:
            uids.add(pw.pw_uid)
    return uids


def tcp_peer_uid(peer: tuple[Any, ...], local: tuple[Any, ...], proc: Path = Path("/proc/net")) -> int | None:
    """Owner uid of the socket at the other end of a local TCP connection, from /proc/net/tcp*."""
    want_peer = (_norm(peer[0]), int(peer[1]))
    want_local = (_norm(local[0]), int(local[1]))
    for name, v6 in (("tcp", False), ("tcp6", True)):
        try:
            lines = (proc / name).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if len(f) < 8:
                continue
            try:
                mine = _proc_endpoint(f[1], v6)
                other = _proc_endpoint(f[2], v6)
            except ValueError:
                continue
            if mine == want_peer and other == want_local:
                return int(f[7])
    return None


def _proc_endpoint(text: str, v6: bool) -> tuple[str, int]:
    addr, port = text.split(":")
    return str(decode_proc_addr(addr, v6)), int(port, 16)


def _norm(host: str) -> str:
    import ipaddress

    a = ipaddress.ip_address(host.split("%", 1)[0])
    if isinstance(a, ipaddress.IPv6Address) and a.ipv4_mapped is not None:
        return str(a.ipv4_mapped)
    return str(a)


async def read_env(reader: asyncio.StreamReader, max_lines: int = MAX_ENV_LINES) -> dict[str, str] | None:
    """The agi_* block up to its blank line; None if the peer closed or sent junk first."""
    env: dict[str, str] = {}
    for _ in range(max_lines):
        try:
            line = await reader.readline()
        except (ValueError, ConnectionError):  # over the reader's limit, or reset
            return None
        if not line.endswith(b"\n"):
            return None  # closed before the environment ended (nc -z)
        text = line.decode("utf-8", "replace").rstrip("\r\n")
        if text == "":
            return env
        entry = env_entry(text)
        if entry is None:
            return None
        env[entry[0]] = entry[1]
    return None


# -- one call's commands --------------------------------------------------------------

class FastAgiTransport:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, env: dict[str, str],
                 reply_timeout: float = 300.0):
        self.reader = reader
        self.writer = writer
        self.env = env
        self.reply_timeout = reply_timeout
        self.state = LineState()

    @property
    def hangup_seen(self) -> bool:
        return self.state.hangup_seen

    async def _line(self) -> str:
        try:
            raw = await asyncio.wait_for(self.reader.readline(), self.reply_timeout)
        except (TimeoutError, ConnectionError, ValueError) as exc:  # ValueError: over the limit
            raise AgiHangup(f"no reply from Asterisk: {exc!r}") from None
        return decode_line(raw)

    async def command(self, text: str, dead_ok: bool = False) -> AgiReply:
        if self.state.hangup_seen and not dead_ok:
            raise AgiHangup("the caller hung up")
        try:
            self.writer.write(text.encode() + b"\n")
            await self.writer.drain()
        except (ConnectionError, RuntimeError) as exc:  # RuntimeError: the transport is closing
            raise AgiHangup(f"connection lost: {exc}") from None
        steps = read_reply(self.state, dead_ok)
        try:
            next(steps)
            while True:
                steps.send(await self._line())
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]


async def pump(steps: Steps, transport: FastAgiTransport) -> Reply:
    try:
        cmd = next(steps)
        while True:
            cmd = steps.send(await transport.command(cmd))
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]
    except AgiHangup as exc:
        transport.state.ended = transport.state.ended or str(exc)
        return HungUp()
    except AgiProtocolError as exc:
        log.debug("event=agi_protocol_error reason=%r", str(exc))  # the outcome line says it
        transport.state.ended = transport.state.ended or f"protocol error: {exc}"
        return HungUp()


async def drive(conv: Conversation, transport: FastAgiTransport, backend: Any,
                offload: Offload = inline) -> Outcome:
    speech = SpeechHolder()
    try:
        action = next(conv)
        while True:
            if is_backend(action):
                thunk = backend_call(backend, action)
                reply = await offload(lambda t=thunk: guarded(t))  # type: ignore[misc]
                speech.update(reply)
            else:
                reply = await pump(channel_steps(action, transport.env, speech.speech), transport)
            action = conv.send(reply)
    except StopIteration as stop:
        out: Outcome = stop.value
    with contextlib.suppress(Tm4Error):
        await transport.command(f"VERBOSE {quote(outcome_line(out))} 1")
    return out


# -- the server -----------------------------------------------------------------------

class DialinFastAGI(Application):  # type: ignore[misc]
    def __init__(self, backend: Any, *, allowed_uids: set[int], secret: str = "",
                 offload: Offload = inline, settings: Settings | None = None,
                 env_timeout: float = 5.0, reply_timeout: float = 300.0):
        super().__init__(loop=asyncio.get_running_loop())
        self.backend = backend
        self.allowed_uids = set(allowed_uids)
        self.secret = secret
        self.offload = offload
        self.settings = settings
        self.env_timeout = env_timeout
        self.reply_timeout = reply_timeout
        self.server: asyncio.Server | None = None
        self.outcomes: list[Outcome] = []  # last calls, newest last (for status and tests)
        self.refused = 0
        self.dropped = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self.add_route(ROUTE, self.dialin)

    async def handler(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            await self._serve(reader, writer)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("event=fastagi_failed")
        finally:
            if task is not None:
                self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        try:
            env = await asyncio.wait_for(read_env(reader), self.env_timeout)
        except TimeoutError:
            env = None
        if env is None:
            self.dropped += 1
            log.info("event=fastagi_dropped peer=%s reason=no complete AGI environment", peer)
            return
        script = env.get("agi_network_script", "")
        path, _, query = script.partition("?")
        if not self._authorised(peer, writer.get_extra_info("sockname"), query):
            self.refused += 1
            log.warning("event=fastagi_refused peer=%s reason=uid not allowed and no valid secret", peer)
            return
        route = self._route.get(path.strip("/"))
        if route is None:
            log.error("event=fastagi_no_route script=%r", path)
            return
        await route(Request(app=self, headers=env, reader=reader, writer=writer))

    def _authorised(self, peer: Any, local: Any, query: str) -> bool:
        if self.secret:
            given = (parse_qs(query).get("secret") or [""])[0]
            if given and hmac.compare_digest(given.encode(), self.secret.encode()):
                return True
        if not peer or not local:
            return False
        uid = tcp_peer_uid(peer, local)
        return uid is not None and uid in self.allowed_uids

    async def dialin(self, request: Request) -> None:
        transport = FastAgiTransport(request.reader, request.writer, dict(request.headers),
                                     self.reply_timeout)
        out = await drive(conversation(self.settings), transport, self.backend, self.offload)
        self.outcomes = (self.outcomes + [out])[-50:]
        log.info("event=dialin_call %s", outcome_line(out, transport.state.ended))

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            with contextlib.suppress(Exception):
                await self.server.wait_closed()
        for t in list(self._tasks):
            t.cancel()


async def start_fastagi(core: Any, host: str = "127.0.0.1", port: int = 4573, *,
                        allowed_uids: set[int] | None = None, secret: str | None = None,
                        offload: Offload = inline, backend: Any = None) -> DialinFastAGI:
    """Listen for FastAGI dial-in calls; `await app.close()` to stop."""
    from tm4.dialin.client import local_backend

    cfg = core.config if core is not None else None
    app = DialinFastAGI(
        backend if backend is not None else local_backend(core),
        allowed_uids=allowed_uids if allowed_uids is not None
        else asterisk_uids(cfg.daemon.asterisk_group if cfg else "asterisk"),
        secret=secret if secret is not None else (cfg.dialin.fastagi_secret if cfg else ""),
        offload=offload,
    )
    app.server = await asyncio.start_server(app.handler, host, port)
    return app
