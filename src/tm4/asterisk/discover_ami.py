"""Trunk discovery through AMI, as Asterisk 22 really answers
(tests/fixtures/asterisk-22/real2/ami/pjsip_show.*):

- `PJSIPShowEndpoints`: one `EndpointList` per endpoint (`Contacts: aor/uri,` with a
  trailing comma; absent for an endpoint without AORs);
- `PJSIPShowEndpoint`: `EndpointDetail`, `AuthDetail`, `TransportDetail` (`Protocol`),
  `AorDetail` (`Contacts: aor/uri,aor/uri`), one `ContactStatusDetail` per contact
  (`URI`; `ViaAddress`/`CallID` and a non-zero `RegExpire` only for a registered,
  dynamic contact), `IdentifyDetail` (`Match: 198.51.100.200/255.255.255.255`);
- `PJSIPShowRegistrationsOutbound`: `OutboundRegistrationDetail` (`ServerUri`,
  `Transport`, `OutboundProxy`, `Endpoint` often empty) then an `AuthDetail`.

`PJSIPShowContacts` lists only registered contacts and `PJSIPShowIdentifies` does not
exist, so neither is asked. A trunk is an endpoint with an identify match, a static
contact, an outbound proxy or an outbound registration; a phone has only registered
contacts. Its protocol is its transport's.

The answers carry passwords in clear (`AuthDetail` `Password`, an outbound auth's):
only the fields named here are ever kept; no message is logged or stored whole.

Framing is tm4.asterisk.events' FrameParser: messages end in CRLF CRLF, values are
split on CRLF only (Asterisk's `Message: Unable to retrieve endpoint nosuch\\n` keeps its
bare LF inside the value).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections import deque
from dataclasses import dataclass, field

from tm4.asterisk.discover import TRANSPORT_SERVICE, Discovery, Trunk, add_hosts
from tm4.asterisk.events import Frame, FrameParser
from tm4.core.errors import Tm4Error, ValidationError

READ_SIZE = 65536


class DiscoveryError(Tm4Error):
    """AMI could not be reached, refused the login, or broke off mid-list."""


@dataclass
class EndpointInfo:
    name: str
    transport: str = ""  # the transport object's name
    matches: list[tuple[str, str]] = field(default_factory=list)  # (value, where)
    contacts: list[tuple[str, str]] = field(default_factory=list)  # static contacts, outbound proxy
    protocols: list[str] = field(default_factory=list)


@dataclass
class Registration:
    name: str
    server_uri: str
    transport: str = ""
    endpoint: str = ""
    outbound_proxy: str = ""


class AmiLink:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, timeout: float):
        self.reader = reader
        self.writer = writer
        self.timeout = timeout
        self.parser = FrameParser()
        self._frames: deque[Frame] = deque()
        self._ids = itertools.count(1)

    async def banner(self) -> str:
        while self.parser.banner is None:
            await self._fill()
            if self.parser.banner is None and (self._frames or self.parser.pending > 64):
                raise DiscoveryError("not AMI: no `Asterisk Call Manager/` banner")
        return self.parser.banner

    async def _fill(self) -> None:
        try:
            data = await asyncio.wait_for(self.reader.read(READ_SIZE), self.timeout)
        except TimeoutError:
            raise DiscoveryError("AMI did not answer in time") from None
        except ConnectionResetError:
            # a peer that closes with our request unread resets instead of closing: the same
            # dropped session for the admin
            raise DiscoveryError("AMI closed the connection (reset)") from None
        except OSError as exc:
            raise DiscoveryError(f"AMI connection broke: {exc}") from None
        if not data:
            raise DiscoveryError("AMI closed the connection")
        try:
            self._frames.extend(self.parser.feed(data))
        except ValidationError as exc:
            raise DiscoveryError(f"AMI stream broken: {exc}") from None

    async def read_message(self) -> Frame:
        while not self._frames:
            await self._fill()
        return self._frames.popleft()

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

    async def response(self, aid: str) -> Frame:
        while True:
            msg = await self.read_message()
            if msg.get("ActionID") == aid and msg.response is not None:
                return msg

    async def list_action(self, action: str, **fields: str) -> list[Frame]:
        """Send a list action; return its events (without the final Complete event)."""
        aid = await self.send(action, **fields)
        resp = await self.response(aid)
        if (resp.response or "").lower() != "success":
            raise DiscoveryError(f"{action}: {(resp.get('Message') or 'refused').strip()}")
        if (resp.get("EventList") or "").lower() != "start":
            return []
        events: list[Frame] = []
        while True:
            msg = await self.read_message()
            if msg.get("ActionID") != aid or not msg.event:
                continue  # unsolicited events (ContactStatus, ...) come between answers
            if (msg.get("EventList") or "").lower() == "complete":
                return events
            events.append(msg)


async def fetch_endpoints(host: str, port: int, username: str, secret: str,
                          timeout: float = 10.0) -> tuple[list[EndpointInfo], list[Registration], list[str]]:
    """Endpoints, outbound registrations and notes, over one AMI session."""
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except (OSError, TimeoutError) as exc:
        raise DiscoveryError(f"cannot reach AMI at {host}:{port}: {exc}") from None
    link = AmiLink(reader, writer, timeout)
    notes: list[str] = []
    try:
        await link.banner()
        aid = await link.send("Login", Username=username, Secret=secret, Events="off")
        resp = await link.response(aid)
        if (resp.response or "").lower() != "success":
            raise DiscoveryError(f"AMI login as {username!r} refused: {resp.get('Message')}")
        out: list[EndpointInfo] = []
        for ev in await link.list_action("PJSIPShowEndpoints"):
            name = ev.get("ObjectName")
            if ev.event != "EndpointList" or not name:
                continue
            out.append(await _endpoint(link, name, ev.get("Transport") or ""))
        regs: list[Registration] = []
        try:
            regs = _registrations(await link.list_action("PJSIPShowRegistrationsOutbound"))
        except DiscoveryError as exc:  # no outbound registrations module, or not permitted
            notes.append(f"outbound registrations not read: {exc}")
        with contextlib.suppress(DiscoveryError):  # the answers are in; a failed goodbye changes nothing
            await link.send("Logoff")
        return out, regs, notes
    finally:
        writer.close()
        with contextlib.suppress(OSError, ConnectionError):
            await writer.wait_closed()


def _uris(contacts: str) -> list[str]:
    """`aor/uri,aor/uri,` (a trailing comma in EndpointList) -> the URIs."""
    out = []
    for item in contacts.split(","):
        item = item.strip()
        if not item:
            continue
        _, sep, uri = item.partition("/")
        out.append(uri if sep else item)
    return out


async def _endpoint(link: AmiLink, name: str, transport: str) -> EndpointInfo:
    info = EndpointInfo(name, transport)
    aor_uris: list[tuple[str, str]] = []
    dynamic: set[str] = set()
    for ev in await link.list_action("PJSIPShowEndpoint", Endpoint=name):
        kind = ev.event or ""
        where = f"AMI {kind} {ev.get('ObjectName') or ''}".rstrip()
        if kind == "IdentifyDetail" and ev.get("Match"):
            info.matches.append((ev.get("Match") or "", where))
        elif kind == "AorDetail":
            aor_uris += [(u, where) for u in _uris(ev.get("Contacts") or "")]
        elif kind == "ContactStatusDetail":
            # a registered contact: where a phone happens to be, not a trunk's address
            if ev.get("ViaAddress") or ev.get("CallID") or (ev.get("RegExpire") or "0") != "0":
                dynamic.add(ev.get("URI") or "")
        elif kind == "EndpointDetail":
            info.transport = ev.get("Transport") or info.transport
            if ev.get("OutboundProxy"):
                info.contacts.append((ev.get("OutboundProxy") or "", where))
        elif kind == "TransportDetail":
            proto = (ev.get("Protocol") or "").lower()
            if proto and proto not in info.protocols:
                info.protocols.append(proto)
    info.contacts += [(u, w) for u, w in aor_uris if u not in dynamic]
    return info


def _registrations(events: list[Frame]) -> list[Registration]:
    out = []
    for ev in events:
        if ev.event == "OutboundRegistrationDetail" and ev.get("ServerUri"):
            out.append(Registration(ev.get("ObjectName") or "", ev.get("ServerUri") or "",
                                    ev.get("Transport") or "", ev.get("Endpoint") or "",
                                    ev.get("OutboundProxy") or ""))
    return out  # AuthDetail (with its password) is never looked at


def discovery_from_endpoints(endpoints: list[EndpointInfo],
                             registrations: list[Registration] | None = None,
                             notes: list[str] | None = None) -> Discovery:
    """Endpoints with a match, a static contact or a registration are trunks."""
    disc = Discovery()
    disc.notes += notes or []
    by_name = {e.name: e for e in endpoints}
    protocols_of = {e.transport: e.protocols for e in endpoints if e.transport and e.protocols}
    regs_of: dict[str, list[Registration]] = {}
    for r in registrations or []:
        owner = r.endpoint if r.endpoint in by_name else r.name if r.name in by_name else ""
        regs_of.setdefault(owner, []).append(r)
    for ep in endpoints:
        regs = regs_of.get(ep.name, [])
        if not ep.matches and not ep.contacts and not regs:
            continue
        t = disc.trunk("pjsip", ep.name)
        hints = add_hosts(disc, t, ep.matches, "identify match")
        hints += add_hosts(disc, t, ep.contacts, "contact")
        for r in regs:
            where = f"AMI OutboundRegistrationDetail {r.name}"
            hints += add_hosts(disc, t, [(r.outbound_proxy or r.server_uri, where)], "registration")
        _protocols(disc, t, ep.protocols + hints)
    for r in regs_of.get("", []):  # a registration of no endpoint tm4 knows
        t = disc.trunk("pjsip", r.name)
        hints = add_hosts(disc, t, [(r.outbound_proxy or r.server_uri, f"AMI OutboundRegistrationDetail {r.name}")],
                          "registration")
        _protocols(disc, t, protocols_of.get(r.transport, []) + hints)
    return disc.finish()


def _protocols(disc: Discovery, t: Trunk, protos: list[str]) -> None:
    for p in protos:
        if p in TRANSPORT_SERVICE:
            t.add_protocol(p)
        else:
            disc.notes.append(f"pjsip {t.name}: unknown transport protocol {p!r}")


def discover_ami(host: str, port: int, username: str, secret: str, timeout: float = 10.0) -> Discovery:
    """Blocking wrapper for the CLI."""
    endpoints, regs, notes = asyncio.run(fetch_endpoints(host, port, username, secret, timeout))
    return discovery_from_endpoints(endpoints, regs, notes)
