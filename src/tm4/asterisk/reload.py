"""A one-shot AMI session for tm4's own upkeep of Asterisk: log in, send an action,
read its answer, log off. Enough for `Action: Reload` and `Action: Command`.

The framing is the one captured from Asterisk 22 (tests/fixtures/ami_acl/): a
banner line `Asterisk Call Manager/11.0.0`, then messages of `Key: Value` lines
ending in CRLF, a blank line ending each message; the answer to an action
carries the action's ActionID; `Action: Command` answers `Response: Success`,
`Message: Command output follows` and one `Output:` line per line of output.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import re
import secrets
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType

from tm4.asterisk.events import Frame, FrameParser
from tm4.core.config import AmiConfig
from tm4.core.errors import Tm4Error, ValidationError

_KEY_RE = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")
_MODULE_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_ids = itertools.count(1)


class AmiError(Tm4Error):
    """Talking to Asterisk's manager interface failed."""


class AmiUnavailable(AmiError):
    """AMI is not reachable (Asterisk down, wrong port) or dropped the connection."""


class AmiAuthError(AmiError):
    """AMI refused tm4's login (wrong secret, or the source is not permitted)."""


class AmiActionError(AmiError):
    """AMI answered an action with `Response: Error`."""

    def __init__(self, message: str, reply: AmiMessage):
        super().__init__(message)
        self.reply = reply


class AmiNotPermitted(AmiActionError):
    """The manager user may not send the action (ListCommands does not list it), so it was
    not sent: Asterisk would refuse it AND raise an Error-severity RequestNotAllowed
    security event (tests/fixtures/asterisk-22/real2/ami/command_denied.*)."""


@dataclass(frozen=True)
class AmiMessage:
    fields: tuple[tuple[str, str], ...]

    def get(self, key: str, default: str = "") -> str:
        k = key.lower()
        return next((v for f, v in self.fields if f.lower() == k), default)

    @property
    def response(self) -> str:
        return self.get("Response")

    @property
    def message(self) -> str:
        return self.get("Message")

    @property
    def outputs(self) -> list[str]:
        """The `Output:` lines of a Command answer, leading spaces kept."""
        return [v for f, v in self.fields if f.lower() == "output"]


def encode(action: str, action_id: str, params: Sequence[tuple[str, str]] = ()) -> bytes:
    """`Action`, `ActionID`, then the parameters, CRLF each, a blank line at the end."""
    lines = [("Action", action), ("ActionID", action_id), *params]
    out = []
    for key, value in lines:
        if not _KEY_RE.fullmatch(key):
            raise ValidationError(f"bad AMI header name {key!r}")
        if any(c in value for c in "\r\n\0"):
            raise ValidationError(f"AMI value for {key} holds a line break")
        out.append(f"{key}: {value}\r\n")
    out.append("\r\n")
    return "".join(out).encode()


def parse_lines(lines: Sequence[bytes]) -> AmiMessage:
    fields: list[tuple[str, str]] = []
    for raw in lines:
        text = raw.decode("utf-8", "replace").rstrip("\r\n")
        key, sep, value = text.partition(":")
        if not sep:
            continue
        fields.append((key.strip(), value[1:] if value.startswith(" ") else value))
    return AmiMessage(tuple(fields))


class AmiSession:
    """`async with AmiSession(cfg) as ami: reply = await ami.action("Reload", [("Module", "acl")])`"""

    def __init__(self, cfg: AmiConfig, *, timeout: float = 5.0):
        self.cfg = cfg
        self.timeout = timeout
        self.banner = ""
        self._reader: asyncio.StreamReader | None = None
        self._parser = FrameParser(expect_banner=False)  # the banner line is read on its own
        self._frames: deque[Frame] = deque()
        self._writer: asyncio.StreamWriter | None = None
        self._tag = secrets.token_hex(3)

    def _next_id(self) -> str:
        return f"tm4-{self._tag}-{next(_ids)}"

    async def __aenter__(self) -> AmiSession:
        if not self.cfg.secret:
            raise AmiAuthError("no AMI secret configured ([ami] secret in tm4.toml); run `tm4 asterisk install`")
        try:
            self._reader, self._writer = await asyncio.wait_for(
                asyncio.open_connection(self.cfg.host, self.cfg.port), self.timeout)
            banner = await asyncio.wait_for(self._reader.readline(), self.timeout)
        except (OSError, TimeoutError) as exc:
            await self.close()
            raise AmiUnavailable(f"AMI at {self.cfg.host}:{self.cfg.port} unreachable: {exc or 'timeout'}") from None
        self.banner = banner.decode("utf-8", "replace").strip()
        if not self.banner.startswith("Asterisk Call Manager/"):
            await self.close()
            raise AmiUnavailable(f"{self.cfg.host}:{self.cfg.port} is not Asterisk's AMI (banner {self.banner!r})")
        try:
            reply = await self._exchange("Login", [("Username", self.cfg.username), ("Secret", self.cfg.secret),
                                                   ("Events", "off")])
        except AmiUnavailable:
            await self.close()
            raise
        if reply.response != "Success":
            await self.close()
            raise AmiAuthError(f"AMI refused the login of {self.cfg.username!r}: {reply.message or reply.response}")
        return self

    async def __aexit__(self, et: type[BaseException] | None, ev: BaseException | None,
                        tb: TracebackType | None) -> None:
        if self._writer is not None and not self._writer.is_closing():
            with contextlib.suppress(AmiError, TimeoutError):
                await asyncio.wait_for(self._exchange("Logoff", []), min(self.timeout, 1.0))
        await self.close()

    async def close(self) -> None:
        w, self._writer = self._writer, None
        if w is not None:
            w.close()
            with contextlib.suppress(OSError, ConnectionError):
                await w.wait_closed()

    async def action(self, name: str, params: Sequence[tuple[str, str]] = ()) -> AmiMessage:
        """Send one action and return its answer; `Response: Error` raises AmiActionError."""
        reply = await self._exchange(name, params)
        if reply.response == "Error":
            raise AmiActionError(f"AMI {name}: {reply.message or 'error'}"
                                 + (f" ({reply.outputs[0].strip()})" if reply.outputs else ""), reply)
        return reply

    async def _exchange(self, name: str, params: Sequence[tuple[str, str]]) -> AmiMessage:
        if self._reader is None or self._writer is None:
            raise AmiUnavailable("AMI session is closed")
        aid = self._next_id()
        try:
            self._writer.write(encode(name, aid, params))
            await self._writer.drain()
            while True:
                msg = await asyncio.wait_for(self._read_message(), self.timeout)
                if msg.get("ActionID") == aid and msg.response:
                    return msg
        except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
            raise AmiUnavailable(f"AMI connection lost during {name}: {exc or 'timeout'}") from None

    async def _read_message(self) -> AmiMessage:
        """The next whole message; strict framing: CRLF lines, CRLF CRLF ends a message (a
        bare LF stays inside its value, as in `Unable to retrieve endpoint nosuch\\n`)."""
        assert self._reader is not None
        while not self._frames:
            data = await self._reader.read(65536)
            if not data:
                raise AmiUnavailable("AMI closed the connection")
            try:
                self._frames.extend(self._parser.feed(data))
            except ValidationError as exc:
                raise AmiUnavailable(f"AMI stream broken: {exc}") from None
        return AmiMessage(self._frames.popleft().headers)


async def reload_module(cfg: AmiConfig, module: str, *, timeout: float = 5.0) -> str:
    """`Action: Reload` / `Module: <module>`; returns Asterisk's message ("Module Reloaded")."""
    if not _MODULE_RE.fullmatch(module):
        raise ValidationError(f"bad Asterisk module name {module!r}")
    async with AmiSession(cfg, timeout=timeout) as ami:
        reply = await ami.action("Reload", [("Module", module)])
    return reply.message


async def permitted_actions(ami: AmiSession) -> dict[str, set[str]]:
    """What this manager user may send, as Asterisk says: `ListCommands` lists only the
    actions the user's write classes allow (manager.c), each as `Name: synopsis (Priv: ...)`.
    ListCommands itself needs no class."""
    reply = await ami.action("ListCommands")
    out: dict[str, set[str]] = {}
    for name, value in reply.fields:
        at = value.rfind("(Priv: ")
        if at < 0 or name in ("Response", "ActionID", "Message") or not value.endswith(")"):
            continue
        privs = value[at + 7:-1]
        out[name] = set() if privs == "<none>" else set(privs.split(",")) - {"all"}
    return out


async def run_command(cfg: AmiConfig, command: str, *, timeout: float = 5.0) -> list[str]:
    """`Action: Command`: the CLI command's output lines. Needs write=command; a user
    without it is never made to send it (AmiNotPermitted): a refused Command is an
    Error-severity security event, which would look like an intrusion."""
    async with AmiSession(cfg, timeout=timeout) as ami:
        allowed = await permitted_actions(ami)
        if "Command" not in allowed:
            raise AmiNotPermitted(
                f"manager user {cfg.username!r} may not send Command (that needs write=command); "
                f"tm4 did not send it, so Asterisk logged no RequestNotAllowed. Check by hand: "
                f"asterisk -rx {command!r}", AmiMessage(()))
        reply = await ami.action("Command", [("Command", command)])
    return reply.outputs
