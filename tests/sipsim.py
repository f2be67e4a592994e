"""A test SIP registrar that answers like Asterisk 22's chan_pjsip and reports like it.

It runs on a UDP socket inside the PBX namespace, so it sees exactly the packets
the kernel let through: no packet, no event, no ban. For each REGISTER (or
INVITE) it answers as the captures in tests/fixtures/ami/ show Asterisk doing
(401 challenges with `nonce="<epoch>/<md5>"`, 401 again after a wrong digest,
200 after a right one) and raises the matching AMI security events through an
`emit(frame_bytes)` callable (the AMI simulator's, handed over thread-safely):

- unknown user, no credentials:  InvalidAccountID + ChallengeSent
- unknown user, credentials:     InvalidAccountID + ChallengeResponseFailed
- known user, no credentials:    ChallengeSent
- known user, wrong digest:      ChallengeResponseFailed
- known user, right digest:      SuccessfulAuth (UsingPassword: 1)

Optionally it writes Asterisk's `messages` log lines for the failures, in the
captured format, for log readers such as fail2ban.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from amisim import address, event_tv, render_event

REALM = "asterisk"
USERS = {"1001": "secret1001", "1002": "secret1002"}
_AUTH_KV = re.compile(r'(\w+)=(?:"([^"]*)"|([^,\s]+))')


def md5(text: str) -> str:
    return hashlib.md5(text.encode()).hexdigest()


def parse_request(data: bytes) -> tuple[str, str, dict[str, str]] | None:
    text = data.decode("utf-8", "replace")
    head = text.split("\r\n\r\n", 1)[0]
    lines = head.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("SIP/2.0"):
        return None
    compact = {"i": "call-id", "f": "from", "t": "to", "v": "via", "m": "contact", "l": "content-length"}
    headers: dict[str, str] = {}
    for line in lines[1:]:
        k, sep, v = line.partition(":")
        if not sep:
            continue
        k = k.strip().lower()
        headers.setdefault(compact.get(k, k), v.strip())
    return parts[0], parts[1], headers


def from_user(value: str) -> str:
    m = re.search(r"sips?:([^@;>]+)@", value)
    return m.group(1) if m else ""


def from_uri(value: str) -> str:
    """The From header as Asterisk logs it: display name and URI, no parameters."""
    if ">" in value:
        return value.split(">", 1)[0].strip() + ">"
    return value.split(";")[0].strip()


class SipResponder:
    def __init__(
        self,
        sock_factory: Callable[[int, int], socket.socket],
        *,
        emit: Callable[[bytes], Any] | None,
        local_ip: str = "192.0.2.1",
        port: int = 5060,
        users: dict[str, str] | None = None,
        log_path: Path | None = None,
        ipv6: bool = True,
    ) -> None:
        self.emit = emit
        self.local_ip = local_ip
        self.port = port
        self.users = users if users is not None else dict(USERS)
        self.received: Counter[str] = Counter()
        self.first_seen: dict[str, float] = {}
        self.last_seen: dict[str, float] = {}
        self.arrivals: dict[str, list[float]] = {}
        self.failures: dict[str, list[float]] = {}  # monotonic time of each failed attempt, per source
        self.failed_sessions: dict[str, Counter[str]] = {}  # Call-IDs of those failures, per source
        self.events: Counter[str] = Counter()
        self.record_arrivals = False
        self._stop = False
        self._lock = threading.Lock()
        self._log = open(log_path, "a", buffering=1, encoding="utf-8") if log_path else None  # noqa: SIM115
        self.socks: list[socket.socket] = []
        families = [(socket.AF_INET, "0.0.0.0")] + ([(socket.AF_INET6, "::")] if ipv6 else [])
        for fam, bind in families:
            s = sock_factory(fam, socket.SOCK_DGRAM)
            if fam == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
            s.bind((bind, port))
            s.settimeout(0.2)
            self.socks.append(s)
        self.threads = [threading.Thread(target=self._loop, args=(s,), daemon=True) for s in self.socks]
        for t in self.threads:
            t.start()

    def close(self) -> None:
        self._stop = True
        for t in self.threads:
            t.join(2)
        for s in self.socks:
            s.close()
        if self._log:
            self._log.close()

    # -- receive ---------------------------------------------------------------------
    def _loop(self, s: socket.socket) -> None:
        while not self._stop:
            try:
                data, peer = s.recvfrom(65535)
            except (TimeoutError, OSError):
                continue
            now = time.monotonic()
            src = peer[0]
            with self._lock:
                self.received[src] += 1
                self.first_seen.setdefault(src, now)
                self.last_seen[src] = now
                if self.record_arrivals:
                    self.arrivals.setdefault(src, []).append(now)
            try:
                reply = self.handle(data, peer, now)
            except Exception:  # a malformed packet must not kill the responder
                reply = None
            if reply:
                with contextlib.suppress(OSError):
                    s.sendto(reply, peer)

    def count(self, src: str) -> int:
        with self._lock:
            return self.received[src]

    # -- answer like Asterisk ------------------------------------------------------------
    def handle(self, data: bytes, peer: tuple[Any, ...], now: float) -> bytes | None:
        req = parse_request(data)
        if req is None:
            return None
        method, uri, h = req
        if method == "ACK":
            return None
        if method == "OPTIONS":
            return self._reply(h, peer, "200 OK")
        if method not in ("REGISTER", "INVITE"):
            return self._reply(h, peer, "405 Method Not Allowed")
        src, sport = peer[0], peer[1]
        user = from_user(h.get("from", ""))
        callid = h.get("call-id", "")
        auth = h.get("authorization", "")
        remote = address(src, sport)
        local = address(self.local_ip if ":" not in src else "2001:db8::1", self.port)
        common = {"SessionID": callid, "LocalAddress": local, "RemoteAddress": remote}
        known = user in self.users
        if not known:
            self._event("InvalidAccountID", src, now, AccountID=user, **common)
            self._log_failure(method, h, src, sport, "No matching endpoint found")
        if not auth:
            self._event("ChallengeSent", src, now, AccountID=user if known else "<unknown>",
                        Challenge="", **common)
            return self._challenge(h, peer)
        kv = {m.group(1).lower(): m.group(2) if m.group(2) is not None else m.group(3)
              for m in _AUTH_KV.finditer(auth)}
        nonce, response = kv.get("nonce", ""), kv.get("response", "")
        if known and response == self._expected(method, kv, self.users[user]):
            self._event("SuccessfulAuth", src, now, AccountID=user, UsingPassword="1", **common)
            return self._reply(h, peer, "200 OK", extra=f"Expires: {h.get('expires', '60')}\r\n")
        with self._lock:
            self.failures.setdefault(src, []).append(now)
            self.failed_sessions.setdefault(src, Counter())[callid] += 1
        self._event("ChallengeResponseFailed", src, now, AccountID=user if known else "<unknown>",
                    Challenge=nonce, Response=response, ExpectedResponse="", **common)
        self._log_failure(method, h, src, sport, "Failed to authenticate")
        return self._challenge(h, peer)

    @staticmethod
    def _expected(method: str, kv: dict[str, str], password: str) -> str:
        ha1 = md5(f"{kv.get('username', '')}:{kv.get('realm', REALM)}:{password}")
        ha2 = md5(f"{method}:{kv.get('uri', '')}")
        if kv.get("qop"):
            return md5(f"{ha1}:{kv.get('nonce', '')}:{kv.get('nc', '')}:{kv.get('cnonce', '')}:{kv['qop']}:{ha2}")
        return md5(f"{ha1}:{kv.get('nonce', '')}:{ha2}")

    def _event(self, event: str, src: str, now: float, **values: str) -> None:
        with self._lock:
            self.events[event] += 1
        if self.emit is not None:
            self.emit(render_event(event, Service="PJSIP", EventTV=event_tv(), **values))

    def _challenge(self, h: dict[str, str], peer: tuple[Any, ...]) -> bytes:
        stamp = int(time.time())
        nonce = f"{stamp}/{md5(f'{stamp}{os.getpid()}')}"
        www = (f'WWW-Authenticate: Digest realm="{REALM}",nonce="{nonce}",'
               f'opaque="{os.urandom(8).hex()}",algorithm=MD5,qop="auth"\r\n')
        return self._reply(h, peer, "401 Unauthorized", extra=www)

    def _reply(self, h: dict[str, str], peer: tuple[Any, ...], status: str, extra: str = "") -> bytes:
        via = h.get("via", "")
        if via:
            via = via.replace(";rport", "", 1)
            via = f"{via.split(';', 1)[0]};rport={peer[1]};received={peer[0]}" + (
                ";" + via.split(";", 1)[1] if ";" in via else "")
        to = h.get("to", "")
        if ";tag=" not in to:
            to += f";tag=z9hG4bK-{os.getpid()}"
        msg = (f"SIP/2.0 {status}\r\nVia: {via}\r\nCall-ID: {h.get('call-id', '')}\r\n"
               f"From: {h.get('from', '')}\r\nTo: {to}\r\nCSeq: {h.get('cseq', '')}\r\n"
               f"{extra}Server: Asterisk-lab\r\nContent-Length:  0\r\n\r\n")
        return msg.encode()

    def _log_failure(self, method: str, h: dict[str, str], src: str, sport: int, why: str) -> None:
        if self._log is None:
            return
        stamp = datetime.now().strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
        host = f"[{src}]" if ":" in src else src
        self._log.write(
            f"[{stamp}] NOTICE[12808] res_pjsip/pjsip_distributor.c: Request '{method}' from "
            f"'{from_uri(h.get('from', ''))}' failed for '{host}:{sport}' "
            f"(callid: {h.get('call-id', '')}) - {why}\n"
        )


REGISTER_SCENARIO = """<?xml version="1.0" encoding="ISO-8859-1" ?>
<!DOCTYPE scenario SYSTEM "sipp.dtd">
<scenario name="REGISTER with digest authentication (as in the captures)">
  <send retrans="500">
    <![CDATA[
REGISTER sip:[remote_ip]:[remote_port] SIP/2.0
Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
From: <sip:[service]@[remote_ip]>;tag=[pid]SIPpTag[call_number]
To: <sip:[service]@[remote_ip]>
Call-ID: [call_id]
CSeq: 1 REGISTER
Contact: <sip:[service]@[local_ip]:[local_port]>
Max-Forwards: 70
Expires: 60
User-Agent: sipp-lab
Content-Length: 0

    ]]>
  </send>
  <recv response="401" auth="true"/>
  <send retrans="500">
    <![CDATA[
REGISTER sip:[remote_ip]:[remote_port] SIP/2.0
Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
From: <sip:[service]@[remote_ip]>;tag=[pid]SIPpTag[call_number]
To: <sip:[service]@[remote_ip]>
Call-ID: [call_id]
CSeq: 2 REGISTER
Contact: <sip:[service]@[local_ip]:[local_port]>
[authentication]
Max-Forwards: 70
Expires: 60
User-Agent: sipp-lab
Content-Length: 0

    ]]>
  </send>
  <recv response="200" optional="true" next="done"/>
  <recv response="401"/>
  <label id="done"/>
</scenario>
"""


def sipp_argv(scenario: Path, target: str, *, user: str, password: str, local_ip: str,
              local_port: int, rate: float, calls: int, rate_period_ms: int = 1000,
              timeout: str = "20s") -> list[str]:
    """SIPp (Debian's sip-tester) sending REGISTERs with a digest for `user`/`password`."""
    return [
        "sipp", target, "-sf", str(scenario), "-s", user, "-au", user, "-ap", password,
        "-i", local_ip, "-p", str(local_port), "-r", str(rate), "-rp", str(rate_period_ms),
        "-m", str(calls), "-timeout", timeout, "-timeout_error", "-nostdin", "-nd",
        "-default_behaviors", "-all",
    ]
