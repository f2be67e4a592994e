"""AMI connection on panoramisk, with its 1.4 pitfalls fixed or wrapped.

panoramisk gives the protocol object, Action serialisation and response
matching (action futures). What it gets wrong for a guard, and what this module
does instead:

- Framing: `Message.from_line` strips the message, so a trailing empty header
  (`ExpectedResponse: `, `Challenge: `) vanishes. Frames are parsed here by
  `FrameParser`, which keeps every header in order; a message cut in half by a
  dying connection is never parsed.
- Liveness: its pinger never looks at the replies, so a half-open connection
  goes unnoticed for ever. Here each Ping must be answered within
  `ping_timeout`, else the connection is aborted and re-opened.
- Reconnects: it retries every 2 s for ever, and each retry with a bad secret is
  itself an InvalidPassword security event. Here connection failures back off
  from `retry_min` to `retry_max` (jittered; at most 0.6 s, so the guard is back
  within a second of Asterisk accepting logins), and only a refused secret
  (`Message: Authentication failed`) backs off from `auth_retry_min` to
  `auth_retry_max`. A stopping Asterisk answers Login with `Message: Asterisk is
  shutting down` (tests/fixtures/asterisk-22/real2/ami/restart.probe.*) and
  keeps the socket open: that is transient, so the socket is closed here and the
  login retried at the connection pace.
- Callbacks: it fires coroutine callbacks as tasks nobody keeps, so their
  exceptions vanish. Here every task is kept until done and every handler
  failure is logged and counted (`handler_errors`).

Least privilege: the manager user needs `read=system,security` and
`write=system` (Ping, Logoff), nothing more.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import ipaddress
import logging
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from panoramisk.actions import Action
from panoramisk.ami_protocol import AMIProtocol
from panoramisk.message import Message

from tm4.asterisk.events import Frame, FrameParser, SecurityEvent, to_security_event
from tm4.core.errors import Tm4Error, ValidationError
from tm4.core.model import IPAddress, normalise_address

log = logging.getLogger("tm4.ami")

EventHandler = Callable[[SecurityEvent, float], object]


class AmiError(Tm4Error):
    """The AMI connection failed or Asterisk answered something unexpected."""


class AmiAuthError(AmiError):
    """Asterisk refused the manager login (secret, user or source ACL)."""


class AmiLoginRefused(AmiError):
    """Asterisk refused the login for a passing reason (it is shutting down)."""


# The one answer that means the credentials (or the source) are refused: manager.c's
# authenticate() failing. Anything else is Asterisk's state, not ours.
AUTH_FAILED = "Authentication failed"


class _Protocol(AMIProtocol):  # type: ignore[misc]
    """panoramisk's protocol with tm4's framing; events go straight to the client."""

    def __init__(self, client: AmiClient) -> None:
        super().__init__()
        self.client = client
        self.parser = FrameParser()
        self.banner: asyncio.Future[str] = client.loop.create_future()
        self.lost: asyncio.Future[None] = client.loop.create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.factory = self.client  # panoramisk's close() reads its action queues
        self.encoding = "utf-8"

    def data_received(self, data: bytes) -> None:
        now = self.client.clock()
        try:
            frames = self.parser.feed(data)
        except ValidationError as exc:
            log.error("AMI stream broken (%s); reconnecting", exc)
            self.transport.abort()
            return
        if self.parser.banner is not None and not self.banner.done():
            self.banner.set_result(self.parser.banner)
        for frame in frames:
            self.client._frame(self, frame, now)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.banner.done():
            self.banner.set_exception(AmiError("connection closed before the AMI banner"))
        if not self.lost.done():
            self.lost.set_result(None)
        for action in list(self.responses.values()):
            if not action.future.done():
                action.future.set_exception(AmiError("AMI connection lost"))
        self.responses.clear()


def _message(frame: Frame) -> Message:
    headers: dict[str, Any] = {}
    for k, v in frame.headers:
        if k in headers:
            old = headers[k]
            headers[k] = (old if isinstance(old, list) else [old]) + [v]
        else:
            headers[k] = v
    return Message(headers)


class AmiClient:
    """Keeps one logged-in AMI session alive and hands security events to `on_event`.

    `on_event(event, received_at)` may be a function or a coroutine function;
    `received_at` is `clock()` when the bytes arrived.
    """

    forgetable_actions = ("ping", "login", "logoff")

    def __init__(
        self,
        host: str,
        port: int,
        username: str,
        secret: str,
        *,
        on_event: EventHandler,
        on_frame: Callable[[Frame], object] | None = None,
        on_login: Callable[[], object] | None = None,
        on_logout: Callable[[], object] | None = None,
        events: str = "system,security",
        ping_interval: float = 5.0,
        ping_timeout: float = 3.0,
        connect_timeout: float = 3.0,
        banner_timeout: float = 0.5,
        retry_min: float = 0.1,
        retry_max: float = 0.5,
        auth_retry_min: float = 10.0,
        auth_retry_max: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        if not username or "\r" in username or "\n" in username or "\r" in secret or "\n" in secret:
            raise ValidationError("AMI username/secret must be non-empty single lines")
        self.host = host
        self.port = port
        self.username = username
        self.secret = secret
        self.on_event = on_event
        self.on_frame = on_frame
        self.on_login = on_login
        self.on_logout = on_logout
        self.events = events
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.connect_timeout = connect_timeout
        self.banner_timeout = banner_timeout
        self._banner_wait = banner_timeout
        self.retry_min = retry_min
        self.retry_max = retry_max
        self.auth_retry_min = auth_retry_min
        self.auth_retry_max = auth_retry_max
        self.clock = clock
        self.wall = wall
        self.loop = loop or asyncio.get_event_loop()
        self.awaiting_actions: deque[Action] = deque()  # panoramisk's close() wants it
        self.ready = asyncio.Event()
        self.stopping = asyncio.Event()
        self.logins = 0
        self.failed_logins = 0
        self.connects = 0
        self.half_open = 0
        self.handler_errors = 0
        self.last_error: BaseException | None = None
        self.transient_refusals = 0
        self.logged_in_since: float | None = None  # wall time of the current session's login
        self.logged_out_since: float | None = None  # wall time the last session ended
        self.last_frame_at: float | None = None  # clock() of the last message (answers too)
        self.last_event_at: float | None = None  # clock() of the last event
        self.local_address: IPAddress | None = None
        self.banner: str | None = None
        self._protocol: _Protocol | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._ids = 0

    # -- public --------------------------------------------------------------------
    async def run(self) -> None:
        """Connect, log in, stay connected; reconnect with backoff until `close()`."""
        delay = self.retry_min
        auth_delay = self.auth_retry_min
        while not self.stopping.is_set():
            was_ready = False
            try:
                await self._session()
            except AmiLoginRefused as exc:
                self.transient_refusals += 1
                self.last_error = exc
                log.warning("%s; retry in %.2f s", exc, delay)
            except AmiAuthError as exc:
                self.failed_logins += 1
                self.last_error = exc
                log.error("%s; next login attempt in %.0f s", exc, auth_delay)
                await self._sleep(auth_delay)
                auth_delay = min(auth_delay * 2, self.auth_retry_max)
                continue
            except (OSError, TimeoutError, AmiError) as exc:
                self.last_error = exc
                log.warning("AMI %s:%s unavailable (%s); retry in %.2f s",
                            self.host, self.port, exc or type(exc).__name__, delay)
            finally:
                was_ready = self.ready.is_set()
                self._disconnected()
            if was_ready:
                delay = self.retry_min
                auth_delay = self.auth_retry_min
                if self.stopping.is_set():
                    break
                continue  # the session ended: try again at once
            await self._sleep(delay * random.uniform(0.8, 1.2))
            delay = min(delay * 2, self.retry_max)

    async def close(self) -> None:
        """Log off (politely, briefly) and stop reconnecting."""
        self.stopping.set()
        proto = self._protocol
        if proto is not None and not proto.closed:
            with contextlib.suppress(Exception):
                fut = proto.send(Action({"Action": "Logoff", "ActionID": self._next_id("logoff")}))
                await asyncio.wait_for(asyncio.shield(fut), 1.0)
            proto.transport.close()
        if self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def send(self, action: dict[str, str], timeout: float = 5.0) -> Message:
        """Send one action on the live session and wait for its response."""
        proto = self._protocol
        if proto is None or proto.closed or not self.ready.is_set():
            raise AmiError("AMI is not connected")
        for k, v in action.items():
            if "\r" in str(v) or "\n" in str(v):
                raise ValidationError(f"AMI action field {k} must be a single line")
        act = Action(dict(action))
        if "ActionID" not in action:
            act["ActionID"] = self._next_id(str(action.get("Action", "action")).lower())
        fut = proto.send(act)
        return await self._wait(fut, timeout, proto)

    @property
    def connected(self) -> bool:
        return self.ready.is_set()

    def state(self) -> dict[str, Any]:
        """For `tm4 daemon status`: logged in or not, since when, how lively."""
        now = self.clock()
        return {
            "logged_in": self.connected,
            "logged_in_since": self.logged_in_since,
            "logged_out_since": None if self.connected else self.logged_out_since,
            "last_event_age": None if self.last_event_at is None else round(now - self.last_event_at, 3),
            "logins": self.logins,
            "reconnects": max(0, self.logins - 1),
            "connects": self.connects,
            "refused_logins": self.failed_logins,
            "transient_refusals": self.transient_refusals,
            "half_open": self.half_open,
            "last_error": None if self.last_error is None else (str(self.last_error)
                                                                or type(self.last_error).__name__),
        }

    # -- one session -----------------------------------------------------------------
    async def _session(self) -> None:
        """One connection: banner, login, then pings until it dies."""
        self.connects += 1
        transport, proto = await asyncio.wait_for(
            self.loop.create_connection(lambda: _Protocol(self), self.host, self.port),
            self.connect_timeout,
        )
        assert isinstance(proto, _Protocol)
        self._protocol = proto
        sock = transport.get_extra_info("sockname")
        if sock:
            with contextlib.suppress(ValueError):
                self.local_address = normalise_address(ipaddress.ip_address(sock[0].split("%")[0]))
        # Asterisk greets at once. A restarting one may accept a connection it never greets
        # (seen with `core restart now`: 3 s lost); wait briefly, longer after each miss.
        waited = self._banner_wait
        try:
            self.banner = await self._wait(proto.banner, waited, proto)
        except TimeoutError:
            self._banner_wait = min(waited * 2, max(self.banner_timeout, self.connect_timeout))
            raise TimeoutError(f"no AMI banner within {waited:.1f} s") from None
        self._banner_wait = self.banner_timeout
        login = Action({
            "Action": "Login",
            "ActionID": self._next_id("login"),
            "Username": self.username,
            "Secret": self.secret,
            "Events": self.events,
        })
        resp = await self._wait(proto.send(login), self.connect_timeout + 2.0, proto)
        if not resp.success:
            why = str(resp.get("Message", "no reason given"))
            if why.lower() != AUTH_FAILED.lower() and "shutting down" in why.lower():
                raise AmiLoginRefused(f"AMI login as {self.username!r} refused for now: {why}")
            raise AmiAuthError(f"AMI login as {self.username!r} refused: {why}")
        self.logins += 1
        self.logged_in_since = self.wall()
        self.ready.set()
        if self.on_login is not None:
            self._call(self.on_login)
        log.info("AMI logged in to %s:%s as %s (%s)", self.host, self.port, self.username, self.banner)
        stop = asyncio.ensure_future(self.stopping.wait())
        try:
            while not self.stopping.is_set():
                await asyncio.wait([proto.lost, stop], timeout=self.ping_interval,
                                   return_when=asyncio.FIRST_COMPLETED)
                if proto.lost.done() or self.stopping.is_set():
                    break
                ping = Action({"Action": "Ping", "ActionID": self._next_id("ping")})
                try:
                    await self._wait(proto.send(ping), self.ping_timeout, proto)
                except TimeoutError:
                    self.half_open += 1
                    log.warning("AMI ping unanswered for %.1f s: connection is dead, reconnecting",
                                self.ping_timeout)
                    proto.transport.abort()
                    break
        finally:
            stop.cancel()

    async def _wait(self, fut: Awaitable[Any], timeout: float, proto: _Protocol) -> Any:
        """Await `fut`, but give up at `timeout` or when the connection dies."""
        task = asyncio.ensure_future(fut)
        done, _ = await asyncio.wait([task, proto.lost], timeout=timeout,
                                     return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        task.cancel()
        if proto.lost.done():
            raise AmiError("AMI connection closed")
        raise TimeoutError(f"no AMI answer within {timeout:.1f} s")

    def _disconnected(self) -> None:
        if self.ready.is_set():
            log.warning("AMI connection to %s:%s lost", self.host, self.port)
            self.logged_out_since = self.wall()
            self.logged_in_since = None
            self.ready.clear()
            if self.on_logout is not None:
                self._call(self.on_logout)
        self.ready.clear()
        proto = self._protocol
        if proto is not None and not proto.closed:
            proto.transport.abort()
        self._protocol = None

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stopping.wait(), seconds)

    def _next_id(self, what: str) -> str:
        self._ids += 1
        return f"tm4-{what}-{self._ids}"

    # -- incoming ------------------------------------------------------------------
    def _frame(self, proto: _Protocol, frame: Frame, now: float) -> None:
        self.last_frame_at = now
        event = frame.event
        if event is not None:
            self.last_event_at = now
        if event is None or frame.has("ActionID"):
            msg = _message(frame)
            if msg.id is not None and msg.id in proto.responses:
                proto.handle_message(msg)
                return
        if event is None:
            return
        if event == "Shutdown":
            log.warning("Asterisk is shutting down (%s); will reconnect",
                        frame.get("Shutdown", "?"))
            proto.transport.close()
            return
        if self.on_frame is not None:
            self._call(self.on_frame, frame)
        ev = to_security_event(frame)
        if ev is not None:
            self._call(self.on_event, ev, now)

    def _call(self, fn: Callable[..., object], *args: Any) -> None:
        """Run a handler; keep its task if it is a coroutine; never lose its exception."""
        try:
            ret = fn(*args)
        except Exception as exc:
            self._handler_failed(exc)
            return
        if inspect.isawaitable(ret):
            task = asyncio.ensure_future(ret)
            self._tasks.add(task)
            task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            self._handler_failed(exc)

    def _handler_failed(self, exc: BaseException) -> None:
        self.handler_errors += 1
        self.last_error = exc
        log.error("AMI event handler failed: %r", exc, exc_info=exc)

    # panoramisk's protocol calls these on its factory.
    def dispatch(self, message: Message) -> None:  # pragma: no cover - events bypass it
        pass

    def connection_lost(self, exc: Exception | None) -> None:  # pragma: no cover
        pass
