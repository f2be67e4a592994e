"""A test SIP registrar that answers like Asterisk 22's chan_pjsip and reports like it.

It runs on UDP sockets inside the PBX namespace, so it sees exactly the packets
the kernel let through: no packet, no event, no ban. The answers and the AMI
security events they raise are tm4.lab.sim.sip.ChanPjsip's (the lab's registrar is
the same code), handed to an `emit(frame_bytes)` callable (the AMI simulator's,
handed over thread-safely); this one counts per source what arrived and failed.

Optionally it writes Asterisk's `messages` log lines for the failures, in the
captured format, for log readers such as fail2ban.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from tm4.lab.sim.ami import address
from tm4.lab.sim.sip import ChanPjsip, Peer, register_scenario

USERS = {"1001": "secret1001", "1002": "secret1002"}


def from_uri(value: str) -> str:
    """The From header as Asterisk logs it: display name and URI, no parameters."""
    if ">" in value:
        return value.split(">", 1)[0].strip() + ">"
    return value.split(";")[0].strip()


class SipResponder(ChanPjsip):
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
        super().__init__(users if users is not None else dict(USERS), local_ip, port, emit)
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

    # -- what chan_pjsip saw ---------------------------------------------------------------
    def local_address(self, src: str) -> str:
        return address(self.local_ip if ":" not in src else "2001:db8::1", self.port)

    def event(self, event: str, **values: str) -> None:
        with self._lock:
            self.events[event] += 1
        super().event(event, **values)

    def unknown_user(self, method: str, h: dict[str, str], peer: Peer, now: float) -> None:
        self._log_failure(method, h, peer[0], peer[1], "No matching endpoint found")

    def digest_failed(self, method: str, h: dict[str, str], peer: Peer, now: float, known: bool) -> None:
        with self._lock:
            self.failures.setdefault(peer[0], []).append(now)
            self.failed_sessions.setdefault(peer[0], Counter())[h.get("call-id", "")] += 1
        self._log_failure(method, h, peer[0], peer[1], "Failed to authenticate")

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


REGISTER_SCENARIO = register_scenario("REGISTER with digest authentication (as in the captures)",
                                      accept_200=True)


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
