"""Asterisk's side, simulated for `tm4 lab` (no Asterisk package in Debian 12).

Each speaks the real wire protocol the way Asterisk 22 (chan_pjsip) did in the
captures tm4's tests replay (framing, field names and order, line endings):

- AmiServer: the manager interface on 127.0.0.1:5038 — banner, Login, Ping,
  Reload, Logoff, `\\r\\n` framing — pushing security events to logged-in clients.
- SipRegistrar: a registrar on UDP 5060 answering REGISTER/INVITE as chan_pjsip
  does (401 challenge, 401 after a wrong digest, 200 after a right one) and
  raising the matching AMI events only for packets that really reached it; plus
  a TCP listener on 5060 (connects are what the lab probes for sip-tcp).
- agi_call: a caller on FastAGI — the environment block, then one reply per
  command, the keys typed at each GET DATA.

They run on threads of the lab process, on sockets opened inside a network
namespace (a socket keeps the namespace it was made in).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import hashlib
import os
import re
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

T = TypeVar("T")
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def in_netns(ns: str, fn: Callable[[], T]) -> T:
    """Run fn on a thread that entered network namespace `ns` (setns moves one thread only)."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns {ns}")
            finally:
                os.close(fd)
            box["value"] = fn()
        except BaseException as exc:  # handed to the caller
            box["error"] = exc

    t = threading.Thread(target=target)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


# -- AMI ---------------------------------------------------------------------------------

BANNER = b"Asterisk Call Manager/11.0.0\r\n"
LOGIN_OK = b"Response: Success\r\nActionID: %s\r\nMessage: Authentication accepted\r\n\r\n"
LOGIN_FAILED = b"Response: Error\r\nActionID: %s\r\nMessage: Authentication failed\r\n\r\n"
GOODBYE = b"Response: Goodbye\r\nActionID: %s\r\nMessage: Thanks for all the fish.\r\n\r\n"
FULLY_BOOTED = (b"Event: FullyBooted\r\nPrivilege: system,all\r\nUptime: 30\r\nLastReload: 30\r\n"
                b"Status: Fully Booted\r\n\r\n")
PONG = b"Response: Success\r\nActionID: %s\r\nPing: Pong\r\nTimestamp: %s\r\n\r\n"
RELOADED = b"Response: Success\r\nActionID: %s\r\nMessage: Module Reloaded\r\n\r\n"
UNKNOWN_ACTION = (b"Response: Error\r\nActionID: %s\r\nMessage: Invalid/unknown command: %s. "
                  b"Use Action: ListCommands to show available commands.\r\n\r\n")

# Field order of each security event as Asterisk 22 sends it (from the captures).
FIELDS = {
    "InvalidAccountID": ("AccountID", "SessionID", "LocalAddress", "RemoteAddress"),
    "ChallengeSent": ("AccountID", "SessionID", "LocalAddress", "RemoteAddress", "Challenge"),
    "ChallengeResponseFailed": ("AccountID", "SessionID", "LocalAddress", "RemoteAddress", "Challenge",
                                "Response", "ExpectedResponse"),
    "SuccessfulAuth": ("AccountID", "SessionID", "LocalAddress", "RemoteAddress", "UsingPassword"),
}
SEVERITY = {"InvalidAccountID": "Error", "ChallengeResponseFailed": "Error", "ChallengeSent": "Informational",
            "SuccessfulAuth": "Informational"}


def event_tv(t: float | None = None) -> str:
    d = datetime.fromtimestamp(t if t is not None else time.time(), UTC)
    return d.strftime("%Y-%m-%dT%H:%M:%S.") + f"{d.microsecond // 1000:03d}+0000"


def address(ip: str, port: int, transport: str = "UDP") -> str:
    """`IPV4/UDP/203.0.113.9/5060`, `IPV6/UDP/2001:db8::5/5060` (no brackets)."""
    return f"{'IPV6' if ':' in ip else 'IPV4'}/{transport}/{ip}/{port}"


def render_event(event: str, service: str = "PJSIP", **values: str) -> bytes:
    head = [("Event", event), ("Privilege", "security,all"), ("EventTV", event_tv()),
            ("Severity", SEVERITY[event]), ("Service", service), ("EventVersion", "1")]
    body = [(k, values.get(k, "")) for k in FIELDS[event]]
    return b"".join(f"{k}: {v}\r\n".encode() for k, v in head + body) + b"\r\n"


class AmiServer:
    def __init__(self, ns: str, username: str, secret: str, host: str = "127.0.0.1", port: int = 5038):
        self.username, self.secret = username, secret
        self.sock = in_netns(ns, lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM))
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(16)
        self.sock.settimeout(0.2)
        self.clients: list[socket.socket] = []
        self.logins = 0
        self.sent_events = 0
        self._lock = threading.Lock()
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop:
            try:
                c, _ = self.sock.accept()
            except (TimeoutError, OSError):
                continue
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    def _serve(self, c: socket.socket) -> None:
        c.settimeout(None)
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
                    if not self._action(c, _fields(raw)):
                        return
        with self._lock:
            if c in self.clients:
                self.clients.remove(c)
        c.close()

    def _action(self, c: socket.socket, a: dict[str, str]) -> bool:
        aid = a.get("actionid", "").encode()
        act = a.get("action", "").lower()
        if act == "login":
            if a.get("username") == self.username and a.get("secret") == self.secret:
                c.sendall(LOGIN_OK % aid + FULLY_BOOTED)
                with self._lock:
                    self.clients.append(c)
                self.logins += 1
                return True
            time.sleep(1.0)  # Asterisk delays a failed login by a second, then hangs up
            c.sendall(LOGIN_FAILED % aid)
            return False
        if act == "ping":
            c.sendall(PONG % (aid, f"{time.time():.6f}".encode()))
        elif act == "reload":
            c.sendall(RELOADED % aid)
        elif act == "logoff":
            c.sendall(GOODBYE % aid)
            return False
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


# -- SIP ---------------------------------------------------------------------------------

REALM = "asterisk"
_AUTH_KV = re.compile(r'(\w+)=(?:"([^"]*)"|([^,\s]+))')
_COMPACT = {"i": "call-id", "f": "from", "t": "to", "v": "via", "m": "contact", "l": "content-length"}


def md5(text: str) -> str:
    return hashlib.md5(text.encode()).hexdigest()  # SIP digest: MD5 by definition


def parse_sip(data: bytes) -> tuple[str, dict[str, str]] | None:
    head = data.decode("utf-8", "replace").split("\r\n\r\n", 1)[0].split("\r\n")
    parts = head[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("SIP/2.0"):
        return None
    h: dict[str, str] = {}
    for line in head[1:]:
        k, sep, v = line.partition(":")
        if sep:
            key = k.strip().lower()
            h.setdefault(_COMPACT.get(key, key), v.strip())
    return parts[0], h


def from_user(value: str) -> str:
    m = re.search(r"sips?:([^@;>]+)@", value)
    return m.group(1) if m else ""


@dataclass
class Seen:
    """What reached the registrar from one source."""

    packets: list[float] = field(default_factory=list)
    failures: list[float] = field(default_factory=list)  # failed attempts (not events)
    ok: int = 0
    calls: dict[str, float] = field(default_factory=dict)  # Call-ID -> last unknown-user request


class SipRegistrar:
    def __init__(self, ns: str, emit: Callable[[bytes], None], users: dict[str, str], local_ip: str,
                 port: int = 5060):
        self.emit, self.users, self.local_ip, self.port = emit, users, local_ip, port
        self.seen: dict[str, Seen] = {}
        self._lock = threading.Lock()
        self._stop = False
        self.udp = in_netns(ns, lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
        self.udp.bind(("0.0.0.0", port))
        self.udp.settimeout(0.2)
        self.tcp = in_netns(ns, lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM))
        self.tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.tcp.bind(("0.0.0.0", port))
        self.tcp.listen(64)
        self.tcp.settimeout(0.2)
        threading.Thread(target=self._udp_loop, daemon=True).start()
        threading.Thread(target=self._tcp_loop, daemon=True).start()

    def source(self, ip: str) -> Seen:
        with self._lock:
            return self.seen.setdefault(ip, Seen())

    def _tcp_loop(self) -> None:
        while not self._stop:
            try:
                c, _ = self.tcp.accept()
                c.close()
            except (TimeoutError, OSError):
                continue

    def _udp_loop(self) -> None:
        while not self._stop:
            try:
                data, peer = self.udp.recvfrom(65535)
            except (TimeoutError, OSError):
                continue
            now = time.monotonic()
            self.source(peer[0]).packets.append(now)
            reply = self.handle(data, peer, now)
            if reply:
                with contextlib.suppress(OSError):
                    self.udp.sendto(reply, peer)

    def handle(self, data: bytes, peer: tuple[Any, ...], now: float) -> bytes | None:
        req = parse_sip(data)
        if req is None:
            return None
        method, h = req
        if method == "ACK":
            return None
        if method == "OPTIONS":
            return self._reply(h, peer, "200 OK")
        if method not in ("REGISTER", "INVITE"):
            return self._reply(h, peer, "405 Method Not Allowed")
        src = peer[0]
        user = from_user(h.get("from", ""))
        common = {"SessionID": h.get("call-id", ""), "LocalAddress": address(self.local_ip, self.port),
                  "RemoteAddress": address(src, peer[1])}
        known = user in self.users
        callid = common["SessionID"]
        if not known:
            self.emit(render_event("InvalidAccountID", AccountID=user, **common))
            # One failed ATTEMPT per request: its digest retry (same Call-ID, within a second)
            # is not another one (as the guard counts them).
            seen = self.source(src)
            if seen.calls.get(callid, -10.0) < now - 1.0:
                seen.failures.append(now)
            seen.calls[callid] = now
        auth = h.get("authorization", "")
        if not auth:
            self.emit(render_event("ChallengeSent", AccountID=user if known else "<unknown>", Challenge="",
                                   **common))
            return self._challenge(h, peer)
        kv = {m.group(1).lower(): m.group(2) if m.group(2) is not None else m.group(3)
              for m in _AUTH_KV.finditer(auth)}
        if known and kv.get("response") == _expected(method, kv, self.users[user]):
            self.emit(render_event("SuccessfulAuth", AccountID=user, UsingPassword="1", **common))
            self.source(src).ok += 1
            return self._reply(h, peer, "200 OK", f"Expires: {h.get('expires', '60')}\r\n")
        if known:
            self.source(src).failures.append(now)
        self.emit(render_event("ChallengeResponseFailed", AccountID=user if known else "<unknown>",
                               Challenge=kv.get("nonce", ""), Response=kv.get("response", ""),
                               ExpectedResponse="", **common))
        return self._challenge(h, peer)

    def _challenge(self, h: dict[str, str], peer: tuple[Any, ...]) -> bytes:
        stamp = int(time.time())
        nonce = f"{stamp}/{md5(f'{stamp}{os.getpid()}')}"
        return self._reply(h, peer, "401 Unauthorized",
                           f'WWW-Authenticate: Digest realm="{REALM}",nonce="{nonce}",'
                           f'opaque="{os.urandom(8).hex()}",algorithm=MD5,qop="auth"\r\n')

    def _reply(self, h: dict[str, str], peer: tuple[Any, ...], status: str, extra: str = "") -> bytes:
        via = h.get("via", "")
        if via:
            first, _, rest = via.replace(";rport", "", 1).partition(";")
            via = f"{first};rport={peer[1]};received={peer[0]}" + (f";{rest}" if rest else "")
        to = h.get("to", "")
        if ";tag=" not in to:
            to += f";tag=z9hG4bK-{os.getpid()}"
        return (f"SIP/2.0 {status}\r\nVia: {via}\r\nCall-ID: {h.get('call-id', '')}\r\n"
                f"From: {h.get('from', '')}\r\nTo: {to}\r\nCSeq: {h.get('cseq', '')}\r\n"
                f"{extra}Server: Asterisk-lab\r\nContent-Length:  0\r\n\r\n").encode()

    def close(self) -> None:
        self._stop = True
        self.udp.close()
        self.tcp.close()


def _expected(method: str, kv: dict[str, str], password: str) -> str:
    ha1 = md5(f"{kv.get('username', '')}:{kv.get('realm', REALM)}:{password}")
    ha2 = md5(f"{method}:{kv.get('uri', '')}")
    if kv.get("qop"):
        return md5(f"{ha1}:{kv.get('nonce', '')}:{kv.get('nc', '')}:{kv.get('cnonce', '')}:{kv['qop']}:{ha2}")
    return md5(f"{ha1}:{kv.get('nonce', '')}:{ha2}")


class SipPhone:
    """A SIP phone that registers with a digest, as a softphone would (one UDP socket)."""

    def __init__(self, ns: str, src: str, server: str, user: str, password: str, port: int = 5060):
        self.server, self.user, self.password, self.port = server, user, password, port
        self.src = src
        self.sock = in_netns(ns, lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
        self.sock.bind((src, 0))
        self.sock.settimeout(0.5)
        self.cseq = 0

    def _send(self, auth: str = "", callid: str = "") -> str | None:
        self.cseq += 1
        lport = self.sock.getsockname()[1]
        uri = f"sip:{self.server}:{self.port}"
        msg = (f"REGISTER {uri} SIP/2.0\r\nVia: SIP/2.0/UDP {self.src}:{lport};branch=z9hG4bK-{os.urandom(4).hex()}\r\n"
               f"From: <sip:{self.user}@{self.server}>;tag={os.urandom(4).hex()}\r\nTo: <sip:{self.user}@{self.server}>\r\n"
               f"Call-ID: {callid}\r\nCSeq: {self.cseq} REGISTER\r\nContact: <sip:{self.user}@{self.src}:{lport}>\r\n"
               f"{auth}Max-Forwards: 70\r\nExpires: 60\r\nContent-Length: 0\r\n\r\n")
        self.sock.sendto(msg.encode(), (self.server, self.port))
        try:
            data, _ = self.sock.recvfrom(65535)
        except (TimeoutError, OSError):
            return None
        return data.decode(errors="replace")

    def register(self, password: str | None = None) -> int | None:
        """One REGISTER with its digest retry; the final status code, or None (no answer)."""
        callid = f"{os.urandom(6).hex()}@{self.src}"
        first = self._send(callid=callid)
        if first is None:
            return None
        m = re.search(r'nonce="([^"]+)"', first)
        if not first.startswith("SIP/2.0 401") or not m:
            return int(first.split(" ", 2)[1])
        nonce, uri, cnonce = m.group(1), f"sip:{self.server}:{self.port}", os.urandom(4).hex()
        kv = {"username": self.user, "realm": REALM, "nonce": nonce, "uri": uri, "nc": "00000001",
              "cnonce": cnonce, "qop": "auth"}
        resp = _expected("REGISTER", kv, password if password is not None else self.password)
        auth = (f'Authorization: Digest username="{self.user}",realm="{REALM}",cnonce="{cnonce}",'
                f'nc=00000001,qop=auth,uri="{uri}",nonce="{nonce}",response="{resp}",algorithm=MD5\r\n')
        second = self._send(auth, callid)
        return None if second is None else int(second.split(" ", 2)[1])

    def close(self) -> None:
        self.sock.close()


# -- FastAGI -------------------------------------------------------------------------------

@dataclass
class AgiCall:
    commands: list[str] = field(default_factory=list)
    said: list[str] = field(default_factory=list)
    played: list[str] = field(default_factory=list)
    seconds: float = 0.0


def agi_call(ns: str, keys: list[str], *, host: str = "127.0.0.1", port: int = 4573,
             script: str = "tm4-dialin", callerid: str = "15550100", timeout: float = 30.0) -> AgiCall:
    """Asterisk calling the FastAGI server: environment block (Asterisk's order), then one
    reply per command; `keys` are what the caller types at each GET DATA (`#` ends one)."""
    call = AgiCall()
    env = [
        "agi_network: yes", f"agi_network_script: {script}", f"agi_request: agi://{host}:{port}/{script}",
        "agi_channel: Local/s@dtmf-sender-00000002;1", "agi_language: en", "agi_type: Local",
        "agi_uniqueid: 1795236708.4", "agi_version: 22.10.1", f"agi_callerid: {callerid}",
        "agi_calleridname: Lab Caller", "agi_callingpres: 0", "agi_callingani2: 0", "agi_callington: 0",
        "agi_callingtns: 0", "agi_dnid: unknown", "agi_rdnis: unknown", "agi_context: tm4-dialin",
        "agi_extension: s", "agi_priority: 2", "agi_enhanced: 0.0", "agi_accountcode: ",
        "agi_threadid: 140105612957376", "",
    ]
    pending = list(keys)
    t0 = time.monotonic()
    s = in_netns(ns, lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM))
    with s:
        s.settimeout(timeout)
        s.connect((host, port))
        s.sendall("".join(line + "\n" for line in env).encode())
        f = s.makefile("rb")
        while True:
            raw = f.readline()
            if not raw:
                break
            cmd = raw.decode().rstrip("\n")
            call.commands.append(cmd)
            s.sendall((_agi_reply(cmd, pending, call, callerid) + "\n").encode())
        f.close()
    call.seconds = time.monotonic() - t0
    return call


def _agi_reply(cmd: str, pending: list[str], call: AgiCall, callerid: str) -> str:
    name = cmd.split(" ", 1)[0].upper()
    if cmd.startswith("GET DATA"):
        if not pending:
            return "200 result=-1"  # nothing more to say: the caller hangs up
        typed, got = pending.pop(0), ""
        for k in typed:
            if k == "#":
                return f"200 result={got}"
            got += k
        return f"200 result={got} (timeout)"
    if cmd.startswith(("SAY ALPHA", "SAY DIGITS")):
        call.said.append(cmd.split(" ", 2)[2].rsplit(" ", 1)[0])
        return "200 result=0"
    if cmd.startswith("STREAM FILE"):
        call.played.append(cmd.split(" ")[2])
        return "200 result=0 endpos=16000"
    if cmd.startswith("GET VARIABLE"):
        return f"200 result=1 ({callerid})" if "CALLERID(num)" in cmd else "200 result=0"
    if cmd.startswith("GET FULL VARIABLE"):
        return f'200 result=1 ("Lab Caller" <{callerid}>)' if "CALLERID" in cmd else "200 result=0"
    if name in ("ANSWER", "NOOP", "WAIT"):
        return "200 result=0"
    if name in ("VERBOSE", "SET", "HANGUP"):
        return "200 result=1"
    if name == "CHANNEL":
        return "200 result=6"
    return "510 Invalid or unknown command"
