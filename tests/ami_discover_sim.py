"""A tiny AMI peer answering what trunk discovery asks: Login, PJSIPShowEndpoints,
PJSIPShowEndpoint, PJSIPShowRegistrationsOutbound, Logoff, for endpoints a test describes.

Every message is rendered from its real counterpart in
tests/fixtures/asterisk-22/real2/ami/pjsip_show.raw (Asterisk 22.10.1): the same event
types, field names and order, the same framing; only the values that describe the test's
endpoints are put in (ObjectName, Transport, Contacts, URI, Match, Protocol, counts).
Login answers as fixtures/discover/ami/ show (a failed one: `Message: Authentication
failed`; `Events: off`: no FullyBooted). For the real answers themselves, byte for byte,
see tests/ami_replay_sim.py.
"""

from __future__ import annotations

import asyncio
import re
import threading
from dataclasses import dataclass, field

import ami_capture

BANNER = b"Asterisk Call Manager/11.0.0\r\n"


def _captured() -> dict[str, list[tuple[str, str]]]:
    """Captured examples of each message kind, as (field, value) pairs in wire order, under
    `kind`, `kind@name` (its ObjectName or EndpointName) and `Action:kind`."""
    out: dict[str, list[tuple[str, str]]] = {}
    cap = ami_capture.load("pjsip_show")
    for sent, got in cap.conns["tm4"].turns():
        action = ami_capture.action_of(sent).get("action", "")
        for m in ami_capture.messages(got):
            if not m.endswith(b"\r\n\r\n"):
                continue
            pairs = [(k, v) for k, _, v in (ln.partition(": ") for ln in m[:-4].decode().split("\r\n"))]
            kind = pairs[0][1] if pairs[0][0] == "Event" else f"{action}:{pairs[0][1]}"
            d = dict(pairs)
            for key in (kind, f"{action}:{kind}", f"{kind}@{d.get('EndpointName') or d.get('ObjectName', '')}"):
                if key not in out or key == kind and "prov-b" in d.get("EndpointName", d.get("ObjectName", "")):
                    out[key] = pairs
    return out


TEMPLATES = _captured()


def render(kind: str, *, drop: tuple[str, ...] = (), **values: str | int) -> bytes:
    """The captured message `kind` with `values` put into its fields (names as captured);
    `drop`: fields Asterisk leaves out in this case (as captured elsewhere)."""
    pairs = TEMPLATES[kind]
    unknown = set(values) - {k for k, _ in pairs}
    if unknown:
        raise KeyError(f"{kind} has no field {sorted(unknown)} in the capture")
    return "".join(f"{k}: {values.get(k, v)}\r\n" for k, v in pairs if k not in drop).encode() + b"\r\n"


@dataclass
class SimEndpoint:
    name: str
    transport: str = ""  # transport object name ("" : none set)
    protocol: str = "udp"
    aor_contacts: str = ""  # static contacts, comma separated URIs
    identifies: list[tuple[str, str]] = field(default_factory=list)  # (object name, Match value)
    outbound_proxy: str = ""
    registration: str = ""  # an outbound registration's server_uri ("" : none)
    auth: str = ""  # inbound auth object ("": none)
    outbound_auth: str = ""
    registered_contact: str = ""  # a phone's REGISTERed contact URI ("": none)
    aors: bool = True  # False: an endpoint without AOR (anonymous)


def _msg(*pairs: tuple[str, str | int]) -> bytes:
    return "".join(f"{k}: {v}\r\n" for k, v in pairs).encode() + b"\r\n"


class AmiDiscoverSim:
    """Run with `with AmiDiscoverSim(endpoints) as sim:`; connect to 127.0.0.1:sim.port."""

    def __init__(self, endpoints: list[SimEndpoint], username: str = "tm4", secret: str = "tm4secret",
                 noise: bool = False, drop_after_list: bool = False, read: str = "system,security"):
        self.endpoints = {e.name: e for e in endpoints}
        self.read = set(read.split(","))  # the user's read classes: which events follow a Login
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
        if not self._ready.wait(30):  # a loaded machine may be slow; never hand out port 0
            raise RuntimeError("the AMI simulator did not start")
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
                            if "security" in self.read:  # its own SuccessfulAuth (real2/ami/pjsip_show)
                                writer.write(render("SuccessfulAuth", AccountID=self.username))
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
                elif action == "pjsipshowregistrationsoutbound":
                    writer.write(self._registrations(aid))
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
        return render("ContactStatus", URI="sip:1001@192.0.2.200:5060", AOR="1001", EndpointName="1001")

    def _uris(self, e: SimEndpoint) -> list[str]:
        return [u.strip() for u in e.aor_contacts.split(",") if u.strip()]

    def _all_uris(self, e: SimEndpoint) -> list[str]:
        return ([e.registered_contact] if e.registered_contact else []) + self._uris(e)

    def _endpoints(self, aid: str) -> bytes:
        if not self.endpoints:
            # SYNTHESIZED (no capture of an empty list): res_pjsip's astman_send_error text
            return _msg(("Response", "Error"), ("ActionID", aid), ("Message", "No endpoints found"))
        out = render("PJSIPShowEndpoints:Success", ActionID=aid)
        for i, e in enumerate(self.endpoints.values()):
            out += render("EndpointList", ActionID=aid, ObjectName=e.name, Transport=e.transport,
                          Aor=e.name if e.aors else "", Auths=e.auth, OutboundAuths=e.outbound_auth,
                          DeviceState="Unavailable", drop=() if e.aors else ("Contacts",),
                          Contacts="".join(f"{e.name}/{u}," for u in self._all_uris(e)))
            if i == 0:
                out += self._noise()
        return out + render("EndpointListComplete", ActionID=aid, ListItems=len(self.endpoints))

    def _endpoint(self, aid: str, name: str) -> bytes:
        e = self.endpoints.get(name)
        if e is None:  # as captured, with its bare LF
            return render("PJSIPShowEndpoint:Error", ActionID=aid, Message=f"Unable to retrieve endpoint {name}\n")
        uris = self._all_uris(e)
        events = [render("EndpointDetail", ActionID=aid, ObjectName=e.name, Transport=e.transport,
                         OutboundProxy=e.outbound_proxy, Aors=e.name if e.aors else "", Auth=e.auth,
                         OutboundAuth=e.outbound_auth)]
        for auth in (a for a in (e.auth, e.outbound_auth) if a):  # never a real password
            events.append(render("AuthDetail", ActionID=aid, ObjectName=auth, Username=auth, Password="",
                                 EndpointName=e.name))
        if e.transport:
            events.append(render("TransportDetail", ActionID=aid, ObjectName=e.transport, Protocol=e.protocol,
                                 Bind="0.0.0.0:5061" if e.protocol == "tls" else "0.0.0.0:5060",
                                 EndpointName=e.name))
        if e.aors:
            events.append(render("AorDetail", ActionID=aid, ObjectName=e.name, EndpointName=e.name,
                                 Contacts=",".join(f"{e.name}/{u}" for u in uris), TotalContacts=len(uris),
                                 ContactsRegistered=1 if e.registered_contact else 0))
        if e.registered_contact:  # a REGISTERed contact: with ViaAddress and CallID
            events.append(render("ContactStatusDetail@1001", ActionID=aid, AOR=e.name, URI=e.registered_contact,
                                 EndpointName=e.name, ID=f"{e.name};@{len(e.name):032x}"))
        for u in self._uris(e):
            events.append(render("ContactStatusDetail", ActionID=aid, AOR=e.name, URI=u, EndpointName=e.name,
                                 Status="NonQualified", RoundtripUsec="N/A", ID=f"{e.name}@@{len(u):032x}"))
        events.append(self._noise())
        for obj, match in e.identifies:
            events.append(render("IdentifyDetail", ActionID=aid, ObjectName=obj, Endpoint=e.name, Match=match,
                                 EndpointName=e.name))
        real = [ev for ev in events if ev]
        head = render("PJSIPShowEndpoint:Success", ActionID=aid)
        tail = render("EndpointDetailComplete", ActionID=aid,
                      ListItems=len([ev for ev in real if not ev.startswith(b"Event: ContactStatus\r")]))
        return head + b"".join(real) + tail

    def _registrations(self, aid: str) -> bytes:
        regs = [e for e in self.endpoints.values() if e.registration]
        out = render("PJSIPShowRegistrationsOutbound:Success", ActionID=aid)
        for e in regs:
            host = re.sub(r"^sips?:", "", e.registration).split(";")[0]
            out += render("OutboundRegistrationDetail", ActionID=aid, ObjectName=e.name, ServerUri=e.registration,
                          ClientUri=f"sip:{e.name}@{host}", Transport=e.transport, OutboundAuth=e.outbound_auth)
            if e.outbound_auth:
                out += render("PJSIPShowRegistrationsOutbound:AuthDetail", ActionID=aid, ObjectName=e.outbound_auth,
                              Username=e.outbound_auth, Password="")
        return out + render("OutboundRegistrationDetailComplete", ActionID=aid, ListItems=len(regs),
                            Registered=len(regs), NotRegistered=0)
