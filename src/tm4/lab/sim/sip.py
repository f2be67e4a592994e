"""SIP as Asterisk 22's chan_pjsip speaks it, simulated: digest authentication of
REGISTER/INVITE with the AMI security events it raises, the lab's registrar and phone,
and the SIPp REGISTER scenario.

For each REGISTER (or INVITE) ChanPjsip answers as the captures show Asterisk doing
(401 challenges with `nonce="<epoch>/<md5>"`, 401 again after a wrong digest, 200
after a right one) and raises the matching security events:

- unknown user, no credentials:  InvalidAccountID + ChallengeSent
- unknown user, credentials:     InvalidAccountID + ChallengeResponseFailed
- known user, no credentials:    ChallengeSent
- known user, wrong digest:      ChallengeResponseFailed
- known user, right digest:      SuccessfulAuth (UsingPassword: 1)
- known user, source refused by its endpoint ACL (`endpoint_acl(user, src)` False):
  FailedACL (ACLName: not_match_endpoint_acl) + ChallengeSent, or with credentials
  FailedACL + ChallengeResponseFailed, both for AccountID <unknown>, and 401 either
  way (res_pjsip swaps in its artificial endpoint: acl_behaviour.txt, ami_tm4_acl)
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from email.utils import formatdate
from typing import Any

from tm4.firewall.netns import in_netns
from tm4.lab.sim.ami import address, render_event

REALM = "asterisk"
SERVER = "Asterisk-lab"  # the first capture set's user_agent; real2's is Asterisk's default
_AUTH_KV = re.compile(r'(\w+)=(?:"([^"]*)"|([^,\s]+))')
_COMPACT = {"i": "call-id", "f": "from", "t": "to", "v": "via", "m": "contact", "l": "content-length"}

Peer = tuple[Any, ...]


def md5(text: str) -> str:
    return hashlib.md5(text.encode()).hexdigest()  # SIP digest: MD5 by definition


def parse_request(data: bytes) -> tuple[str, str, dict[str, str]] | None:
    """Method, URI and headers (lower-case names, compact forms expanded, first one wins)."""
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
    return parts[0], parts[1], h


def from_user(value: str) -> str:
    m = re.search(r"sips?:([^@;>]+)@", value)
    return m.group(1) if m else ""


def digest_params(authorization: str) -> dict[str, str]:
    return {m.group(1).lower(): m.group(2) if m.group(2) is not None else m.group(3)
            for m in _AUTH_KV.finditer(authorization)}


def digest_response(method: str, kv: dict[str, str], password: str) -> str:
    """The response a client knowing `password` sends for the digest parameters `kv`."""
    ha1 = md5(f"{kv.get('username', '')}:{kv.get('realm', REALM)}:{password}")
    ha2 = md5(f"{method}:{kv.get('uri', '')}")
    if kv.get("qop"):
        return md5(f"{ha1}:{kv.get('nonce', '')}:{kv.get('nc', '')}:{kv.get('cnonce', '')}:{kv['qop']}:{ha2}")
    return md5(f"{ha1}:{kv.get('nonce', '')}:{ha2}")


def sip_reply(h: dict[str, str], peer: Peer, status: str, extra: str = "", server: str = SERVER) -> bytes:
    """A response to the request with headers `h` from `peer`, as chan_pjsip words it
    (tests/fixtures/asterisk-22/sip/*.msg.log, real2/sip/: the To tag is the request's
    Via branch; tests/asterisk/test_sip_sim_replay.py checks)."""
    via = h.get("via", "")
    if via:
        first, sep, rest = via.replace(";rport", "", 1).partition(";")
        via = f"{first};rport={peer[1]};received={peer[0]}{sep}{rest}"
    to = h.get("to", "")
    if ";tag=" not in to:
        branch = re.search(r";branch=([^;,\s]+)", via)
        to += f";tag={branch.group(1) if branch else f'z9hG4bK-{os.getpid()}'}"
    return (f"SIP/2.0 {status}\r\nVia: {via}\r\nCall-ID: {h.get('call-id', '')}\r\n"
            f"From: {h.get('from', '')}\r\nTo: {to}\r\nCSeq: {h.get('cseq', '')}\r\n"
            f"{extra}Server: {server}\r\nContent-Length:  0\r\n\r\n").encode()


def challenge(h: dict[str, str], peer: Peer, server: str = SERVER) -> bytes:
    stamp = int(time.time())
    nonce = f"{stamp}/{md5(f'{stamp}{os.getpid()}')}"
    return sip_reply(h, peer, "401 Unauthorized",
                     f'WWW-Authenticate: Digest realm="{REALM}",nonce="{nonce}",'
                     f'opaque="{os.urandom(8).hex()}",algorithm=MD5,qop="auth"\r\n', server)


class ChanPjsip:
    """chan_pjsip's answers to requests, and the security events it raises for them
    (through `emit(frame)`, when given). Subclasses own the sockets and keep their own
    count of what happened through the hooks."""

    def __init__(self, users: dict[str, str], local_ip: str, port: int,
                 emit: Callable[[bytes], Any] | None, server: str = SERVER):
        self.users, self.local_ip, self.port, self.emit = users, local_ip, port, emit
        self.server = server
        # user -> contact URI -> when its binding expires (`now` of handle()), in the order bound
        self.bindings: dict[str, dict[str, float]] = {}
        # (endpoint, source address) -> may it be that endpoint? None: no endpoint ACLs
        self.endpoint_acl: Callable[[str, str], bool] | None = None

    def _bind(self, user: str, contact: str, expires: float, now: float) -> str:
        """Bind `contact` for `expires` s; the Contact lines of the 200: every live binding of
        the AOR, oldest first, with its remaining seconds (the new one: Expires - 1, as
        captured in sip/a4_1001_ok and d_probe_*)."""
        binds = self.bindings.setdefault(user, {})
        for uri in [u for u, t in binds.items() if t <= now]:
            del binds[uri]
        if contact:
            binds.pop(contact, None)
            if expires > 0:
                binds[contact] = now + expires
        return "".join(f"Contact: {uri};expires={max(0, int(t - now) - 1)}\r\n" for uri, t in binds.items())

    # -- hooks ---------------------------------------------------------------------------
    def local_address(self, src: str) -> str:
        """The LocalAddress of the events for a request from `src`."""
        return address(self.local_ip, self.port)

    def event(self, event: str, **values: str) -> None:
        if self.emit is not None:
            self.emit(render_event(event, **values))

    def unknown_user(self, method: str, h: dict[str, str], peer: Peer, now: float) -> None:
        """After InvalidAccountID: a request for a user this PBX does not have."""

    def digest_failed(self, method: str, h: dict[str, str], peer: Peer, now: float, known: bool) -> None:
        """Before ChallengeResponseFailed: credentials that do not match."""

    def accepted(self, src: str) -> None:
        """After SuccessfulAuth."""

    # -- the answer ----------------------------------------------------------------------
    def handle(self, data: bytes, peer: Peer, now: float) -> bytes | None:
        req = parse_request(data)
        if req is None:
            return None
        method, _uri, h = req
        if method == "ACK":
            return None
        if method == "OPTIONS":
            return sip_reply(h, peer, "200 OK", server=self.server)
        if method not in ("REGISTER", "INVITE"):
            return sip_reply(h, peer, "405 Method Not Allowed", server=self.server)
        src = peer[0]
        user = from_user(h.get("from", ""))
        common = {"SessionID": h.get("call-id", ""), "LocalAddress": self.local_address(src),
                  "RemoteAddress": address(src, peer[1])}
        known = user in self.users
        if not known:
            self.event("InvalidAccountID", AccountID=user, **common)
            self.unknown_user(method, h, peer, now)
        auth = h.get("authorization", "")
        if known and self.endpoint_acl is not None and not self.endpoint_acl(user, src):
            self.event("FailedACL", AccountID=user, ACLName="not_match_endpoint_acl", **common)
            if not auth:
                self.event("ChallengeSent", AccountID="<unknown>", Challenge="", **common)
            else:
                kv = digest_params(auth)
                self.digest_failed(method, h, peer, now, False)
                self.event("ChallengeResponseFailed", AccountID="<unknown>", Challenge=kv.get("nonce", ""),
                           Response=kv.get("response", ""), ExpectedResponse="", **common)
            return challenge(h, peer, self.server)
        if not auth:
            self.event("ChallengeSent", AccountID=user if known else "<unknown>", Challenge="", **common)
            return challenge(h, peer, self.server)
        kv = digest_params(auth)
        if known and kv.get("response") == digest_response(method, kv, self.users[user]):
            self.event("SuccessfulAuth", AccountID=user, UsingPassword="1", **common)
            self.accepted(src)
            expires = int(h.get("expires", "60")) if h.get("expires", "60").isdigit() else 60
            return sip_reply(h, peer, "200 OK",
                             f"Date: {formatdate(usegmt=True)}\r\n"
                             + self._bind(user, h.get("contact", "").split(";", 1)[0], expires, now)
                             + f"Expires: {expires}\r\n", self.server)
        self.digest_failed(method, h, peer, now, known)
        self.event("ChallengeResponseFailed", AccountID=user if known else "<unknown>",
                   Challenge=kv.get("nonce", ""), Response=kv.get("response", ""), ExpectedResponse="",
                   **common)
        return challenge(h, peer, self.server)


# -- the lab's registrar and phone ---------------------------------------------------------

@dataclass
class Seen:
    """What reached the registrar from one source."""

    packets: list[float] = field(default_factory=list)
    failures: list[float] = field(default_factory=list)  # failed attempts (not events)
    ok: int = 0
    calls: dict[str, float] = field(default_factory=dict)  # Call-ID -> last unknown-user request


class SipRegistrar(ChanPjsip):
    """chan_pjsip on UDP `port` in namespace `ns`, plus a TCP listener on it (connects are
    what the lab probes for sip-tcp); counts per source what reached it."""

    def __init__(self, ns: str, emit: Callable[[bytes], None], users: dict[str, str], local_ip: str,
                 port: int = 5060):
        super().__init__(users, local_ip, port, emit)
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

    def unknown_user(self, method: str, h: dict[str, str], peer: Peer, now: float) -> None:
        # One failed ATTEMPT per request: its digest retry (same Call-ID, within a second)
        # is not another one (as the guard counts them).
        seen, callid = self.source(peer[0]), h.get("call-id", "")
        if seen.calls.get(callid, -10.0) < now - 1.0:
            seen.failures.append(now)
        seen.calls[callid] = now

    def digest_failed(self, method: str, h: dict[str, str], peer: Peer, now: float, known: bool) -> None:
        if known:
            self.source(peer[0]).failures.append(now)

    def accepted(self, src: str) -> None:
        self.source(src).ok += 1

    def close(self) -> None:
        self._stop = True
        self.udp.close()
        self.tcp.close()


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
        resp = digest_response("REGISTER", kv, password if password is not None else self.password)
        auth = (f'Authorization: Digest username="{self.user}",realm="{REALM}",cnonce="{cnonce}",'
                f'nc=00000001,qop=auth,uri="{uri}",nonce="{nonce}",response="{resp}",algorithm=MD5\r\n')
        second = self._send(auth, callid)
        return None if second is None else int(second.split(" ", 2)[1])

    def close(self) -> None:
        self.sock.close()


# -- SIPp ----------------------------------------------------------------------------------

def _register_message(cseq: int, authentication: bool) -> str:
    auth = "[authentication]\n" if authentication else ""
    return f"""\
  <send retrans="500">
    <![CDATA[
REGISTER sip:[remote_ip]:[remote_port] SIP/2.0
Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
From: <sip:[service]@[remote_ip]>;tag=[pid]SIPpTag[call_number]
To: <sip:[service]@[remote_ip]>
Call-ID: [call_id]
CSeq: {cseq} REGISTER
Contact: <sip:[service]@[local_ip]:[local_port]>
{auth}Max-Forwards: 70
Expires: 60
User-Agent: sipp-lab
Content-Length: 0

    ]]>
  </send>
"""


def register_scenario(name: str, *, accept_200: bool = False) -> str:
    """A SIPp scenario: REGISTER, its digest retry after the 401 (SIPp's -s/-au/-ap give
    user and password), ending on a 401 (a wrong password) or, with `accept_200`, on
    either answer."""
    end = ('  <recv response="200" optional="true" next="done"/>\n  <recv response="401"/>\n'
           '  <label id="done"/>\n') if accept_200 else '  <recv response="401"/>\n'
    return ('<?xml version="1.0" encoding="ISO-8859-1" ?>\n<!DOCTYPE scenario SYSTEM "sipp.dtd">\n'
            f'<scenario name="{name}">\n' + _register_message(1, False)
            + '  <recv response="401" auth="true"/>\n' + _register_message(2, True) + end + "</scenario>\n")
