"""A tiny AMI peer answering what trunk discovery asks: Login, PJSIPShowEndpoints,
PJSIPShowEndpoint, Logoff.

Framing as the captures in fixtures/discover/ami/ show (Asterisk 22): the banner
`Asterisk Call Manager/11.0.0`, CRLF lines, a blank line ends a message; a failed
login answers `Response: Error` / `Message: Authentication failed`; a good one
with `Events: on` is followed by FullyBooted. List actions answer as res_pjsip
does: `Response: Success` + `EventList: start` + a Message, then events that
carry the ActionID (ast_sip_create_ami_event), then `EndpointListComplete` /
`EndpointDetailComplete` with `EventList: Complete` and `ListItems`.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field

BANNER = b"Asterisk Call Manager/11.0.0\r\n"


@dataclass
class SimEndpoint:
    name: str
    transport: str = ""  # transport object name ("" : none set)
    protocol: str = "udp"
    aor_contacts: str = ""  # static contacts, comma separated, as AorDetail `Contact:` shows them
    identifies: list[tuple[str, str]] = field(default_factory=list)  # (object name, Match value)
    outbound_proxy: str = ""


def _msg(*pairs: tuple[str, str | int]) -> bytes:
    return "".join(f"{k}: {v}\r\n" for k, v in pairs).encode() + b"\r\n"


class AmiDiscoverSim:
    """Run with `with AmiDiscoverSim(endpoints) as sim:`; connect to 127.0.0.1:sim.port."""

    def __init__(self, endpoints: list[SimEndpoint], username: str = "tm4", secret: str = "tm4secret",
                 noise: bool = False, drop_after_list: bool = False):
        self.endpoints = {e.name: e for e in endpoints}
        self.username = username
        self.secret = secret
        self.noise = noise  # unrelated events in the middle of lists, as a busy Asterisk sends
        self.drop_after_list = drop_after_list  # hang up half-way (a crash, a restart)
        self.actions: list[dict[str, str]] = []
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._server: asyncio.AbstractServer | None = None

    def __enter__(self) -> AmiDiscoverSim:
        self._thread.start()
        self._ready.wait(5)
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def _run(self) -> None:
        loop = self._loop
        asyncio.set_event_loop(loop)
        self._server = loop.run_until_complete(asyncio.start_server(self._session, "127.0.0.1", 0))
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        loop.run_forever()
        # shut down whole: no session coroutine is left for the garbage collector to finish
        self._server.close()
        loop.run_until_complete(self._server.wait_closed())
        pending = asyncio.all_tasks(loop)
        for t in pending:
            t.cancel()
        loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        loop.close()

    async def _read(self, reader: asyncio.StreamReader) -> dict[str, str] | None:
        msg: dict[str, str] = {}
        while True:
            raw = await reader.readline()
            if not raw:
                return None
            line = raw.decode().rstrip("\r\n")
            if not line:
                if msg:
                    return msg
                continue
            k, _, v = line.partition(":")
            msg[k.strip().lower()] = v.strip()

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(BANNER)
        logged_in = False
        try:
            while True:
                msg = await self._read(reader)
                if msg is None:
                    return
                self.actions.append(msg)
                action = msg.get("action", "").lower()
                aid = msg.get("actionid", "")
                if action == "login":
                    if msg.get("username") == self.username and msg.get("secret") == self.secret:
                        logged_in = True
                        writer.write(_msg(("Response", "Success"), ("ActionID", aid),
                                          ("Message", "Authentication accepted")))
                        if msg.get("events", "on").lower() != "off":
                            writer.write(_msg(("Event", "FullyBooted"), ("Privilege", "system,all"),
                                              ("Uptime", 30), ("LastReload", 30), ("Status", "Fully Booted")))
                    else:
                        writer.write(_msg(("Response", "Error"), ("ActionID", aid),
                                          ("Message", "Authentication failed")))
                        await writer.drain()
                        return
                elif not logged_in:
                    writer.write(_msg(("Response", "Error"), ("ActionID", aid),
                                      ("Message", "Permission denied")))
                elif action == "pjsipshowendpoints":
                    writer.write(self._endpoints(aid))
                    if self.drop_after_list:
                        await writer.drain()
                        return
                elif action == "pjsipshowendpoint":
                    writer.write(self._endpoint(aid, msg.get("endpoint", "")))
                elif action == "logoff":
                    writer.write(_msg(("Response", "Goodbye"), ("ActionID", aid),
                                      ("Message", "Thanks for all the fish.")))
                    await writer.drain()
                    return
                else:
                    writer.write(_msg(("Response", "Error"), ("ActionID", aid),
                                      ("Message", "Invalid/unknown command")))
                await writer.drain()
        finally:
            writer.close()

    def _noise(self) -> bytes:
        if not self.noise:
            return b""
        return _msg(("Event", "ContactStatus"), ("Privilege", "system,all"),
                    ("URI", "sip:1001@192.0.2.200:5060"), ("ContactStatus", "Reachable"),
                    ("AOR", "1001"), ("EndpointName", "1001"), ("RoundtripUsec", 1234))

    def _endpoints(self, aid: str) -> bytes:
        if not self.endpoints:
            return _msg(("Response", "Error"), ("ActionID", aid), ("Message", "No endpoints found"))
        out = _msg(("Response", "Success"), ("ActionID", aid), ("EventList", "start"),
                   ("Message", "A listing of Endpoints follows, presented as EndpointList events"))
        for i, e in enumerate(self.endpoints.values()):
            out += _msg(("Event", "EndpointList"), ("ActionID", aid), ("ObjectType", "endpoint"),
                        ("ObjectName", e.name), ("Transport", e.transport), ("Aor", e.name),
                        ("Auths", ""), ("OutboundAuths", ""), ("Contacts", ""),
                        ("DeviceState", "Unavailable"), ("ActiveChannels", ""))
            if i == 0:
                out += self._noise()
        out += _msg(("Event", "EndpointListComplete"), ("ActionID", aid), ("EventList", "Complete"),
                    ("ListItems", len(self.endpoints)))
        return out

    def _endpoint(self, aid: str, name: str) -> bytes:
        e = self.endpoints.get(name)
        if e is None:
            return _msg(("Response", "Error"), ("ActionID", aid), ("Message", f"Unable to retrieve endpoint {name}"))
        events = [
            _msg(("Event", "EndpointDetail"), ("ActionID", aid), ("ObjectType", "endpoint"),
                 ("ObjectName", e.name), ("Context", "from-pstn"), ("Disallow", ""),
                 ("Allow", "(ulaw|alaw)"), ("DtmfMode", "rfc4733"), ("Transport", e.transport),
                 ("OutboundProxy", e.outbound_proxy), ("Aors", e.name), ("Auth", ""),
                 ("OutboundAuth", ""), ("DirectMedia", "false"), ("DeviceState", "Unavailable"),
                 ("ActiveChannels", "")),
            _msg(("Event", "AorDetail"), ("ActionID", aid), ("ObjectType", "aor"), ("ObjectName", e.name),
                 ("MinimumExpiration", 60), ("DefaultExpiration", 3600), ("QualifyFrequency", 0),
                 ("MaxContacts", 1), ("RemoveExisting", "false"), ("Mailboxes", ""),
                 ("Contact", e.aor_contacts), ("TotalContacts", len([c for c in e.aor_contacts.split(",") if c])),
                 ("ContactsRegistered", 0), ("EndpointName", e.name)),
        ]
        if e.transport:
            events.append(_msg(("Event", "TransportDetail"), ("ActionID", aid), ("ObjectType", "transport"),
                               ("ObjectName", e.transport), ("Protocol", e.protocol),
                               ("Bind", "0.0.0.0:5061" if e.protocol == "tls" else "0.0.0.0:5060"),
                               ("EndpointName", e.name)))
        events.append(self._noise())
        for obj, match in e.identifies:
            events.append(_msg(("Event", "IdentifyDetail"), ("ActionID", aid), ("ObjectType", "identify"),
                               ("ObjectName", obj), ("Endpoint", e.name), ("SrvLookups", "true"),
                               ("Match", match), ("MatchHeader", ""), ("MatchRequestUri", ""),
                               ("EndpointName", e.name)))
        real = [ev for ev in events if ev]
        head = _msg(("Response", "Success"), ("ActionID", aid), ("EventList", "start"),
                    ("Message", "Following are Events for each object associated with the Endpoint"))
        tail = _msg(("Event", "EndpointDetailComplete"), ("ActionID", aid), ("EventList", "Complete"),
                    ("ListItems", len([ev for ev in real if b"ContactStatus" not in ev])))
        return head + b"".join(real) + tail
