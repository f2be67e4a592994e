"""Hostile AMI streams through the real guard: GuardRuntime and its AmiClient, logged in to
the AMI simulator over a real TCP socket, fed random bytes, forged security events with
every RemoteAddress form, bursts from addresses that can never be a source, and frames
without end. After each example a canary event must still arrive (the client lives, in
order), no handler failed, and no ban names an address that can never be a source or the
server itself.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from ami_strategies import HEADERS, NEVER_SOURCE, remote_addresses
from amisim import AmiSimulator, LoopThread, address, render_event
from fakes import MemoryKernel
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tm4.asterisk.events import MAX_MESSAGE, SECURITY_EVENTS, EventType, Frame, SecurityEvent
from tm4.core.config import parse_config
from tm4.core.model import never_source_reason
from tm4.guard.runtime import GuardRuntime
from tm4.ops.engine import Core

OWN = "192.0.2.1"
PING = {"ping_interval": 0.5, "ping_timeout": 1.0, "connect_timeout": 1.0}


class RecordingRuntime(GuardRuntime):
    """The real runtime; it also notes the SessionID of each event it handles."""

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.sessions: dict[str, SecurityEvent] = {}

    def handle(self, ev: SecurityEvent, received: float) -> None:
        self.sessions[ev.session] = ev
        super().handle(ev, received)


@dataclass
class Rig:
    lt: LoopThread
    sim: AmiSimulator
    rt: RecordingRuntime
    task: Any
    canaries: int = 0
    seen_bans: set[str] = field(default_factory=set)

    def send(self, data: bytes, timeout: float = 8.0) -> None:
        """Emit `data`, then close any message it left open, then a canary; wait for it."""
        self.canaries += 1
        sid = f"canary-{self.canaries}"
        canary = render_event("SuccessfulAuth", Service="PJSIP", AccountID="1001", SessionID=sid,
                              RemoteAddress=address("192.0.2.50", 5060), LocalAddress=address(OWN, 5060),
                              UsingPassword="0")
        end = time.monotonic() + timeout
        self.wait_connected(end)
        self.lt.call(self.sim.emit, data + b"\r\n\r\n" + canary)
        while sid not in self.rt.sessions:
            assert not self.task.done(), f"the guard's run() ended: {self.task.exception()!r}"
            if time.monotonic() > end:
                raise AssertionError("the canary never reached the guard")
            if not self.lt.call(self._connected):  # the stream was refused: reconnected, resend
                self.wait_connected(end)
                self.lt.call(self.sim.emit, canary)
            time.sleep(0.005)

    def _connected(self) -> bool:
        c = self.rt.client
        return c is not None and c.connected and any(x.logged_in for x in self.sim.conns)

    def wait_connected(self, end: float) -> None:
        while not self.lt.call(self._connected):
            assert time.monotonic() < end, "the guard did not log in again"
            time.sleep(0.01)

    def check(self) -> None:
        client = self.rt.client
        assert client is not None and client.handler_errors == 0, client and client.last_error
        assert not self.task.done()
        bans = self.lt.call(self.rt.core.bans)  # every stored ban parses back
        for b in bans:
            assert never_source_reason(b.network) is None, f"banned {b.address}, which is never a source"
            for never in ("127.0.0.0/8", "::1/128", f"{OWN}/32"):  # loopback, the server itself
                n = ipaddress.ip_network(never)
                assert n.version != b.network.version or not b.network.overlaps(n), b.address
        errors = [a.error for a in self.rt.applied if a.error]
        assert not errors, errors


@pytest.fixture(scope="module")
def rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    tmp = tmp_path_factory.mktemp("hostile")
    lt = LoopThread()

    async def start() -> tuple[AmiSimulator, RecordingRuntime, Any]:
        import asyncio
        sim = AmiSimulator(local_address=OWN)
        await sim.start()
        cfg = parse_config({"state_dir": str(tmp), "ami": {"port": sim.port, "secret": "tm4secret"},
                            "guard": {"security_log": ""}})
        core = Core(cfg, backend=MemoryKernel(), protect=[])  # type: ignore[arg-type]
        rt = RecordingRuntime(core, own={ipaddress.ip_address(OWN)}, client_options=PING)
        task = asyncio.ensure_future(rt.run())
        return sim, rt, task

    sim, rt, task = lt.run(start())
    r = Rig(lt, sim, rt, task)
    try:
        r.wait_connected(time.monotonic() + 5)
        yield r
    finally:
        async def stop() -> None:
            await rt.close()
            await sim.stop(shutdown_event=False)
        lt.run(stop())
        lt.close()


# -- what an example sends -----------------------------------------------------------------

def failure(ip_text: str, n: int) -> bytes:
    """A ChallengeResponseFailed with its own proof (each one counts) from a raw host text."""
    fam = "IPV6" if ":" in ip_text else "IPV4"
    return render_event("ChallengeResponseFailed", AccountID="1001", SessionID=f"burst-{ip_text}-{n}",
                        LocalAddress=address(OWN, 5060), RemoteAddress=f"{fam}/UDP/{ip_text}/5060",
                        Challenge=f"1/{n:08x}", Response=f"{n:032x}", ExpectedResponse="")


@st.composite
def forged_events(draw: st.DrawFn) -> bytes:
    name = draw(st.sampled_from(sorted(SECURITY_EVENTS)))
    hs = [("Event", name), ("Severity", draw(st.sampled_from(["Error", "Informational", ""]))),
          ("Service", draw(st.sampled_from(["PJSIP", "SIP", "AMI", "IAX2", "HTTP", ""]))),
          ("SessionID", draw(st.text(max_size=10).filter(lambda s: "\r\n" not in s))),
          ("RemoteAddress", draw(remote_addresses())), ("LocalAddress", draw(remote_addresses())),
          *draw(HEADERS)]
    return Frame(tuple(hs)).to_bytes()


@st.composite
def bursts(draw: st.DrawFn) -> bytes:
    host = draw(st.sampled_from([*NEVER_SOURCE, "127.0.0.1", "::1", OWN, "::ffff:127.0.0.1",
                                 "203.0.113.77", "2001:db8:77::5"]))
    base = draw(st.integers(0, 10**6))
    return b"".join(failure(host, base + i) for i in range(8))


@st.composite
def protocol_confusion(draw: st.DrawFn) -> bytes:
    """Frames that look like answers to the client's own actions, or Asterisk going away."""
    n = draw(st.integers(0, 60))
    kind = draw(st.sampled_from(["ping", "login", "logoff", "action"]))
    return draw(st.sampled_from([
        f"Response: Success\r\nActionID: tm4-{kind}-{n}\r\nPing: Pong\r\n\r\n".encode(),
        f"Response: Error\r\nActionID: tm4-{kind}-{n}\r\nMessage: Authentication failed\r\n\r\n".encode(),
        f"Event: InvalidPassword\r\nActionID: tm4-{kind}-{n}\r\nService: AMI\r\n\r\n".encode(),
        b"Response: Follows\r\nPrivilege: Command\r\n--END COMMAND--\r\n\r\n",
        b"Event: Shutdown\r\nPrivilege: system,all\r\nShutdown: Cleanly\r\nRestart: True\r\n\r\n",
        b"Asterisk Call Manager/11.0.0\r\n",
    ]))


chunks = st.one_of(st.binary(max_size=400), forged_events(), bursts(), protocol_confusion(),
                   st.sampled_from([b"\r", b"\n", b"\r\n", b"\x00\x1b[2J", "\u2028".encode(), b"\xff"]))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(st.lists(chunks, min_size=1, max_size=12))
def test_hostile_streams_never_break_the_guard_nor_ban_what_cannot_be_a_source(rig: Rig,
                                                                               items: list[bytes]) -> None:
    rig.send(b"".join(items))
    rig.check()


def test_floods_from_addresses_that_are_never_a_source_are_dropped_quietly(rig: Rig) -> None:
    before = rig.lt.call(lambda: {b.address for b in rig.rt.core.bans()})
    for i, host in enumerate([*NEVER_SOURCE, "127.0.0.1", OWN]):
        rig.send(b"".join(failure(host, 10_000 * (i + 1) + n) for n in range(20)))
    rig.send(b"".join(failure("203.0.113.78", n) for n in range(6)))  # the control: this one is banned
    rig.check()
    after = rig.lt.call(lambda: {b.address for b in rig.rt.core.bans()})
    assert after - before == {"203.0.113.78"}
    assert not [a for a in rig.rt.applied if a.error]  # never even tried: no error logged per event


def test_a_frame_without_end_is_dropped_with_its_connection_and_the_guard_logs_in_again(rig: Rig) -> None:
    client = rig.rt.client
    assert client is not None
    connects = client.connects
    # Chunks the size a socket delivers; the parser refuses the stream past MAX_MESSAGE.
    head = b"Event: InvalidAccountID\r\nAccountID: "
    for _ in range(8):  # 8 x 64 kB, never an end
        rig.lt.call(rig.sim.emit, head + b"A" * 65536)
        head = b""
        time.sleep(0.02)
    end = time.monotonic() + 5
    while client.connects == connects and time.monotonic() < end:
        time.sleep(0.01)
    assert client.connects > connects, "the endless message did not cost the connection"
    rig.send(b"")  # logged in again, events flow
    assert client._protocol is None or client._protocol.parser.pending <= MAX_MESSAGE
    rig.check()


def test_lone_cr_and_lf_in_a_value_stay_inside_it(rig: Rig) -> None:
    forged = render_event("InvalidAccountID", AccountID="1001\nMar  5 04:00:00 pbx sshd: Accepted\rX",
                          SessionID="crlf-1", RemoteAddress=address("203.0.113.79", 5060),
                          LocalAddress=address(OWN, 5060))
    rig.send(forged)
    ev = rig.rt.sessions["crlf-1"]
    assert ev.type is EventType.INVALID_ACCOUNT_ID
    assert ev.account == "1001\nMar  5 04:00:00 pbx sshd: Accepted\rX"  # one value, not a new header
    assert ev.frame.get("Mar  5 04") is None
    rig.check()
