"""Asterisk's manager interface (AMI), simulated: its answers, its security events in the
captures' framing and field order, and AmiServer, the lab's threaded AMI endpoint.

The field order of the 6 event types in the captures (tests/fixtures/ami/, real
Asterisk 22.10.1) is taken from them; the 9 types they lack are SYNTHESIZED from
sec_events[] in main/security_events.c (required, then optional fields), which is
how the captured ones are ordered too; real2/ami/ has since shown RequestNotAllowed
and RequestBadFormat in that very order (without their optional fields).
tests/asterisk/test_sim_replay.py replays every capture through the simulators.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterable
from datetime import UTC, datetime

from tm4.asterisk.events import INFORMATIONAL
from tm4.firewall.netns import in_netns

# -- answers -------------------------------------------------------------------------------

BANNER = b"Asterisk Call Manager/11.0.0\r\n"  # as captured
LOGIN_OK = b"Response: Success\r\nActionID: %s\r\nMessage: Authentication accepted\r\n\r\n"
LOGIN_FAILED = b"Response: Error\r\nActionID: %s\r\nMessage: Authentication failed\r\n\r\n"
GOODBYE = b"Response: Goodbye\r\nActionID: %s\r\nMessage: Thanks for all the fish.\r\n\r\n"
FULLY_BOOTED = (b"Event: FullyBooted\r\nPrivilege: system,all\r\nUptime: 30\r\nLastReload: 30\r\n"
                b"Status: Fully Booted\r\n\r\n")
RELOADED = b"Response: Success\r\nActionID: %s\r\nMessage: Module Reloaded\r\n\r\n"
# real2/ami/command_denied: right behind the answer, in the same segment (read=system)
RELOAD_EVENT = b"Event: Reload\r\nPrivilege: system,all\r\nModule: %s\r\nStatus: 0\r\n\r\n"
# real2/ami/command_denied: an action the user's write classes do not allow (then a
# RequestNotAllowed security event); real2/ami/pjsip_show: an action that does not exist
# (then RequestBadFormat)
PERMISSION_DENIED = b"Response: Error\r\nActionID: %s\r\nMessage: Permission denied\r\n\r\n"
UNKNOWN_ACTION = (b"Response: Error\r\nActionID: %s\r\nMessage: Invalid/unknown command: %s. "
                  b"Use Action: ListCommands to show available commands.\r\n\r\n")
# real2/ami/restart*: Asterisk stopping
SHUTDOWN = b"Event: Shutdown\r\nPrivilege: system,all\r\nShutdown: Cleanly\r\nRestart: %s\r\n\r\n"
SHUTTING_DOWN = b"Response: Error\r\nActionID: %s\r\nMessage: Asterisk is shutting down\r\n\r\n"
# SYNTHESIZED (in no capture; manager.c action_ping):
PONG = b"Response: Success\r\nActionID: %s\r\nPing: Pong\r\nTimestamp: %s\r\n\r\n"
# Actions and the write classes that allow them (manager.c / res_pjsip registrations, as
# real2/ami/pjsip_show's ListCommands lists them); None: any user.
# Only the actions the simulators answer are here; any other is answered as unknown.
WRITE_CLASS: dict[str, set[str] | None] = {
    "login": None, "logoff": None, "ping": None, "reload": {"system", "config"}, "command": {"command"},
}

# -- security events -----------------------------------------------------------------------

CAPTURED_ORDER: dict[tuple[str, str], tuple[str, ...]] = {
    # (event, service) -> field order after Event and Privilege, as captured from Asterisk 22.
    ("SuccessfulAuth", "AMI"): ("EventTV", "Severity", "Service", "EventVersion", "AccountID", "SessionID",
                                "LocalAddress", "RemoteAddress", "UsingPassword", "SessionTV"),
    ("SuccessfulAuth", "PJSIP"): ("EventTV", "Severity", "Service", "EventVersion", "AccountID", "SessionID",
                                  "LocalAddress", "RemoteAddress", "UsingPassword"),
    ("InvalidAccountID", "PJSIP"): ("EventTV", "Severity", "Service", "EventVersion", "AccountID",
                                    "SessionID", "LocalAddress", "RemoteAddress"),
    ("InvalidAccountID", "AMI"): ("EventTV", "Severity", "Service", "EventVersion", "AccountID", "SessionID",
                                  "LocalAddress", "RemoteAddress", "SessionTV"),
    ("ChallengeSent", "PJSIP"): ("EventTV", "Severity", "Service", "EventVersion", "AccountID", "SessionID",
                                 "LocalAddress", "RemoteAddress", "Challenge"),
    ("ChallengeResponseFailed", "PJSIP"): ("EventTV", "Severity", "Service", "EventVersion", "AccountID",
                                           "SessionID", "LocalAddress", "RemoteAddress", "Challenge",
                                           "Response", "ExpectedResponse"),
    ("InvalidPassword", "AMI"): ("EventTV", "Severity", "Service", "EventVersion", "AccountID", "SessionID",
                                 "LocalAddress", "RemoteAddress", "SessionTV"),
    ("FailedACL", "AMI"): ("EventTV", "Severity", "Service", "EventVersion", "AccountID", "SessionID",
                           "LocalAddress", "RemoteAddress", "SessionTV"),
    ("FailedACL", "PJSIP"): ("EventTV", "Severity", "Service", "EventVersion", "AccountID", "SessionID",
                             "LocalAddress", "RemoteAddress", "ACLName"),
}

_COMMON = ("EventTV", "Severity", "Service", "EventVersion", "AccountID", "SessionID",
           "LocalAddress", "RemoteAddress")
# SYNTHESIZED: the types the captures lack; required then optional fields of
# sec_events[] (main/security_events.c), which is how the 6 captured ones are ordered too.
SYNTHESIZED_ORDER: dict[str, tuple[str, ...]] = {
    "SessionLimit": _COMMON + ("Module", "SessionTV"),
    "MemoryLimit": _COMMON + ("Module", "SessionTV"),
    "LoadAverageLimit": _COMMON + ("Module", "SessionTV"),
    "RequestNotSupported": _COMMON + ("RequestType", "Module", "SessionTV"),
    "RequestNotAllowed": _COMMON + ("RequestType", "Module", "SessionTV", "RequestParams"),
    "AuthMethodNotAllowed": _COMMON + ("AuthMethod", "Module", "SessionTV"),
    "RequestBadFormat": ("EventTV", "Severity", "Service", "EventVersion", "SessionID", "LocalAddress",
                         "RemoteAddress", "RequestType", "Module", "SessionTV", "AccountID", "RequestParams"),
    "UnexpectedAddress": _COMMON + ("ExpectedAddress", "Module", "SessionTV"),
    "InvalidTransport": _COMMON + ("AttemptedTransport", "Module", "SessionTV"),
}
EVENT_VERSION = {"InvalidPassword": "2"}


def event_tv(t: float | None = None) -> str:
    """Asterisk's EventTV: 2026-11-21T04:49:21.873+0000."""
    d = datetime.fromtimestamp(time.time() if t is None else t, UTC)
    return d.strftime("%Y-%m-%dT%H:%M:%S.") + f"{d.microsecond // 1000:03d}+0000"


def address(ip: str, port: int, transport: str = "UDP") -> str:
    """`IPV4/UDP/203.0.113.9/5060`, `IPV6/UDP/2001:db8::5/5060` (no brackets)."""
    fam = "IPV6" if ":" in ip else "IPV4"
    return f"{fam}/{transport}/{ip}/{port}"


def field_order(event: str, service: str) -> tuple[str, ...]:
    order = CAPTURED_ORDER.get((event, service))
    if order is not None:
        return order
    if event in SYNTHESIZED_ORDER:
        return SYNTHESIZED_ORDER[event]
    # A captured type from another service: its captured PJSIP order.
    for (ev, _svc), fields in CAPTURED_ORDER.items():
        if ev == event:
            return fields
    raise KeyError(event)


def render_event(event: str, *, omit: Iterable[str] = (), privilege: str = "security,all",
                 **values: str) -> bytes:
    """One security event frame, fields in Asterisk's order; missing optional fields left out.

    Values for the common fields default sensibly (EventTV now, Severity by type,
    EventVersion 1)."""
    service = values.get("Service", "PJSIP")
    defaults = {
        "EventTV": event_tv(),
        "Severity": "Informational" if event in INFORMATIONAL else "Error",
        "Service": service,
        "EventVersion": EVENT_VERSION.get(event, "1"),
        "AccountID": "<unknown>",
        "SessionID": "",
        "LocalAddress": "IPV4/UDP/192.0.2.1/5060",
    }
    captured = (event, service) in CAPTURED_ORDER
    skip = set(omit)
    lines = [f"Event: {event}", f"Privilege: {privilege}"]
    for name in field_order(event, service):
        if name in skip:
            continue
        if name in values:
            lines.append(f"{name}: {values[name]}")
        elif name in defaults:
            lines.append(f"{name}: {defaults[name]}")
        elif captured:
            lines.append(f"{name}: ")  # Asterisk sends required fields even when empty
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


# -- the lab's AMI endpoint ----------------------------------------------------------------

class _Session:
    def __init__(self, c: socket.socket, peer: tuple[str, int]) -> None:
        self.c, self.peer = c, peer
        self.logged_in = False
        self.events = True  # Events: off at Login turns them off
        self.session_id = f"0x7f79{id(self) & 0xFFFFFFF:08x}"
        self.session_tv = ""


class AmiServer:
    """AMI on host:port inside namespace `ns` ("" : this one): one thread per connection;
    `emit` pushes an event frame to every logged-in client. One user, tm4's least
    privilege by default (read=system,security, write=system), answered as captured."""

    def __init__(self, ns: str, username: str, secret: str, host: str = "127.0.0.1", port: int = 5038,
                 *, read: str = "system,security", write: str = "system"):
        self.username, self.secret = username, secret
        self.read, self.write = set(read.split(",")), set(write.split(","))
        self.host = host

        def make() -> socket.socket:
            return socket.socket(socket.AF_INET, socket.SOCK_STREAM)

        self.sock = in_netns(ns, make) if ns else make()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.port = self.sock.getsockname()[1]
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.clients: list[socket.socket] = []
        self.sessions: list[_Session] = []
        self.actions: list[dict[str, str]] = []
        self.logins = 0
        self.sent_events = 0
        self._lock = threading.Lock()
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop:
            try:
                c, peer = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            threading.Thread(target=self._serve, args=(c, peer), daemon=True).start()

    def _serve(self, c: socket.socket, peer: tuple[str, int]) -> None:
        c.settimeout(None)
        s = _Session(c, peer)
        with contextlib.suppress(OSError):
            c.sendall(BANNER)
            buf = b""
            while not self._stop:
                data = c.recv(4096)
                if not data:
                    break
                buf += data
                while b"\r\n\r\n" in buf:
                    raw, buf = buf.split(b"\r\n\r\n", 1)
                    if not self._action(s, _fields(raw)):
                        return
        self._drop(s)

    def _drop(self, s: _Session) -> None:
        with self._lock:
            if s.c in self.clients:
                self.clients.remove(s.c)
            if s in self.sessions:
                self.sessions.remove(s)
        s.c.close()

    def _security(self, s: _Session, event: str, **values: str) -> None:
        """A security event about session `s`, to every session reading class security."""
        now = event_tv()
        frame = render_event(event, Service="AMI", AccountID=self.username, SessionID=s.session_id,
                             LocalAddress=address(self.host, self.port, "TCP"),
                             RemoteAddress=address(s.peer[0], s.peer[1], "TCP"),
                             SessionTV=s.session_tv or now, EventTV=now, **values)
        if "security" in self.read:
            with self._lock:
                targets = [x for x in self.sessions if x.events]
            for x in targets:
                with contextlib.suppress(OSError):
                    x.c.sendall(frame)

    def _action(self, s: _Session, a: dict[str, str]) -> bool:
        self.actions.append(a)
        c = s.c
        aid = a.get("actionid", "").encode()
        act = a.get("action", "").lower()
        if act == "login":
            if a.get("username") == self.username and a.get("secret") == self.secret:
                s.logged_in, s.events = True, a.get("events", "on").lower() != "off"
                s.session_tv = event_tv()
                c.sendall(LOGIN_OK % aid + (FULLY_BOOTED if s.events and "system" in self.read else b""))
                with self._lock:
                    self.clients.append(c)
                    self.sessions.append(s)
                self.logins += 1
                self._security(s, "SuccessfulAuth", UsingPassword="0")
                return True
            time.sleep(1.0)  # Asterisk delays a failed login by a second, then hangs up
            c.sendall(LOGIN_FAILED % aid)
            return False
        if act == "logoff":
            c.sendall(GOODBYE % aid)
            return False
        if act not in WRITE_CLASS:
            c.sendall(UNKNOWN_ACTION % (aid, a.get("action", "").encode()))
            self._security(s, "RequestBadFormat", RequestType=f"Action: {a.get('action', '')}")
            return True
        need = WRITE_CLASS[act]
        if need is not None and not need & self.write:
            c.sendall(PERMISSION_DENIED % aid)
            self._security(s, "RequestNotAllowed", RequestType=f"Action: {a.get('action', '')}")
        elif act == "ping":
            c.sendall(PONG % (aid, f"{time.time():.6f}".encode()))
        elif act == "reload":
            module = a.get("module", "").encode()
            c.sendall(RELOADED % aid + (RELOAD_EVENT % module if s.events and "system" in self.read else b""))
        else:
            c.sendall(UNKNOWN_ACTION % (aid, a.get("action", "").encode()))
        return True

    def emit(self, frame: bytes) -> None:
        with self._lock:
            clients = list(self.clients)
        for c in clients:
            with contextlib.suppress(OSError):
                c.sendall(frame)
        self.sent_events += 1

    def close(self) -> None:
        self._stop = True
        with self._lock:
            for c in self.clients:
                with contextlib.suppress(OSError):
                    c.shutdown(socket.SHUT_RDWR)
                    c.close()
        self.sock.close()


def _fields(raw: bytes) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in raw.decode(errors="replace").split("\r\n"):
        k, sep, v = line.partition(":")
        if sep:
            out[k.strip().lower()] = v.strip()
    return out
