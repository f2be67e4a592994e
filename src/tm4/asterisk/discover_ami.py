"""Trunk discovery through AMI: PJSIPShowEndpoints, then PJSIPShowEndpoint for each endpoint.

A minimal asyncio AMI reader of its own (the AMI client proper lives in
tm4.asterisk.ami): CRLF lines, a blank line ends a message, list actions answer
`Response: Success` + `EventList: start`, then events carrying the ActionID,
then a `...Complete` event with `EventList: Complete`. Messages for other
ActionIDs (or unsolicited events) are skipped.

From each endpoint's events: `IdentifyDetail` `Match:` (as Asterisk's
ast_ha_join writes it: `addr/dotted-mask`, comma separated, `!` for negation),
`AorDetail` `Contact:` (static contacts), `EndpointDetail` `OutboundProxy:`,
and the protocol from `TransportDetail` `Protocol:`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from dataclasses import dataclass, field

from tm4.asterisk.discover import TRANSPORT_SERVICE, Discovery, add_hosts
from tm4.core.errors import Tm4Error

Message = list[tuple[str, str]]


class DiscoveryError(Tm4Error):
    """AMI could not be reached, refused the login, or broke off mid-list."""


def _get(msg: Message, key: str, default: str = "") -> str:
    k = key.lower()
    for name, value in msg:
        if name.lower() == k:
            return value
    return default


@dataclass
class EndpointInfo:
    name: str
    matches: list[tuple[str, str]] = field(default_factory=list)  # (value, where)
    contacts: list[tuple[str, str]] = field(default_factory=list)
    protocols: list[str] = field(default_factory=list)


class AmiLink:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, timeout: float):
        self.reader = reader
        self.writer = writer
        self.timeout = timeout
        self._ids = itertools.count(1)

    async def read_message(self) -> Message:
        msg: Message = []
        while True:
            try:
                raw = await asyncio.wait_for(self.reader.readline(), self.timeout)
            except TimeoutError:
                raise DiscoveryError("AMI did not answer in time") from None
            except (OSError, ValueError) as exc:  # reset, or a line beyond the reader's limit
                raise DiscoveryError(f"AMI connection broke: {exc}") from None
            if not raw:
                raise DiscoveryError("AMI closed the connection")
            line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
            if not line:
                if msg:
                    return msg
                continue
            key, sep, value = line.partition(":")
            if sep:
                msg.append((key.strip(), value.strip()))

    async def send(self, action: str, **fields: str) -> str:
        aid = f"tm4-discover-{next(self._ids)}"
        lines = [f"Action: {action}", f"ActionID: {aid}"]
        for k, v in fields.items():
            if "\r" in v or "\n" in v:
                raise DiscoveryError(f"refusing to send a line break in {k}")
            lines.append(f"{k}: {v}")
        try:
            self.writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
            await self.writer.drain()
        except OSError as exc:
            raise DiscoveryError(f"AMI closed the connection ({exc})") from None
        return aid

    async def response(self, aid: str) -> Message:
        while True:
            msg = await self.read_message()
            if _get(msg, "ActionID") == aid and _get(msg, "Response"):
                return msg

    async def list_action(self, action: str, **fields: str) -> list[Message]:
        """Send a list action; return its events (without the final Complete event)."""
        aid = await self.send(action, **fields)
        resp = await self.response(aid)
        if _get(resp, "Response").lower() != "success":
            raise DiscoveryError(f"{action}: {_get(resp, 'Message') or 'refused'}")
        if _get(resp, "EventList").lower() != "start":
            return []
        events: list[Message] = []
        while True:
            msg = await self.read_message()
            if _get(msg, "ActionID") != aid or not _get(msg, "Event"):
                continue
            if _get(msg, "EventList").lower() == "complete":
                return events
            events.append(msg)


async def fetch_endpoints(host: str, port: int, username: str, secret: str,
                          timeout: float = 10.0) -> list[EndpointInfo]:
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except (OSError, TimeoutError) as exc:
        raise DiscoveryError(f"cannot reach AMI at {host}:{port}: {exc}") from None
    link = AmiLink(reader, writer, timeout)
    try:
        try:
            banner = await asyncio.wait_for(reader.readline(), timeout)
        except (TimeoutError, OSError):
            raise DiscoveryError(f"{host}:{port} sent no AMI banner") from None
        if not banner.startswith(b"Asterisk Call Manager/"):
            raise DiscoveryError(f"{host}:{port} is not AMI (banner {banner[:40]!r})")
        aid = await link.send("Login", Username=username, Secret=secret, Events="off")
        resp = await link.response(aid)
        if _get(resp, "Response").lower() != "success":
            raise DiscoveryError(f"AMI login as {username!r} refused: {_get(resp, 'Message')}")
        out: list[EndpointInfo] = []
        for ev in await link.list_action("PJSIPShowEndpoints"):
            if _get(ev, "Event") != "EndpointList" or not _get(ev, "ObjectName"):
                continue
            out.append(await _endpoint(link, _get(ev, "ObjectName")))
        with contextlib.suppress(DiscoveryError):  # the answers are in; a failed goodbye changes nothing
            await link.send("Logoff")
        return out
    finally:
        writer.close()
        with contextlib.suppress(OSError, ConnectionError):
            await writer.wait_closed()


async def _endpoint(link: AmiLink, name: str) -> EndpointInfo:
    info = EndpointInfo(name)
    for ev in await link.list_action("PJSIPShowEndpoint", Endpoint=name):
        kind = _get(ev, "Event")
        where = f"AMI {kind} {_get(ev, 'ObjectName')}"
        if kind == "IdentifyDetail" and _get(ev, "Match"):
            info.matches.append((_get(ev, "Match"), where))
        elif kind == "AorDetail" and _get(ev, "Contact"):
            info.contacts.append((_get(ev, "Contact"), where))
        elif kind == "EndpointDetail" and _get(ev, "OutboundProxy"):
            info.contacts.append((_get(ev, "OutboundProxy"), where))
        elif kind == "TransportDetail":
            proto = _get(ev, "Protocol").lower()
            if proto and proto not in info.protocols:
                info.protocols.append(proto)
    return info


def discovery_from_endpoints(endpoints: list[EndpointInfo]) -> Discovery:
    """Endpoints with a Match or a static contact are trunks; phones have neither."""
    disc = Discovery()
    for ep in endpoints:
        if not ep.matches and not ep.contacts:
            continue
        t = disc.trunk("pjsip", ep.name)
        hints = add_hosts(disc, t, ep.matches, "identify match")
        hints += add_hosts(disc, t, ep.contacts, "contact")
        for p in ep.protocols + hints:
            if p in TRANSPORT_SERVICE:
                t.add_protocol(p)
            else:
                disc.notes.append(f"pjsip {ep.name}: unknown transport protocol {p!r}")
    return disc.finish()


def discover_ami(host: str, port: int, username: str, secret: str, timeout: float = 10.0) -> Discovery:
    """Blocking wrapper for the CLI."""
    return discovery_from_endpoints(asyncio.run(fetch_endpoints(host, port, username, secret, timeout)))
