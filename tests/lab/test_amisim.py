"""The AMI simulator is faithful to the real Asterisk 22 captures, byte for byte."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest
from amisim import (
    FIXTURES,
    AmiSimulator,
    Session,
    load_transcript,
    render_event,
    security_capture,
)

from tm4.asterisk.events import FrameParser, to_security_event
from tm4.lab.sim.ami import CAPTURED_ORDER

CAPTURES = {
    "security": ("ami_security_events.txt", ["ami_security_events.raw", "ami_failed_logins.raw"]),
    "tm4_acl": ("ami_tm4_acl.txt", ["ami_tm4_acl.raw"]),
    "manager_acl": ("ami_manager_acl.txt", ["ami_manager_acl.raw"]),
}


@pytest.mark.parametrize("name", sorted(CAPTURES))
def test_transcript_index_covers_the_raw_bytes_exactly(name: str) -> None:
    txt, raws = CAPTURES[name]
    sessions = load_transcript(txt, raws)
    total = sum(len((FIXTURES / r).read_bytes()) for r in raws)
    assert sum(len(c.data) for s in sessions for c in s.chunks) == total
    for s in sessions:
        assert s.chunks[0].data == b"Asterisk Call Manager/11.0.0\r\n"


def test_captured_field_order_table_matches_every_captured_event() -> None:
    seen: set[tuple[str, str]] = set()
    for txt, raws in CAPTURES.values():
        for s in load_transcript(txt, raws):
            for f in FrameParser().feed(s.server_bytes()):
                ev = to_security_event(f)
                if ev is None:
                    continue
                key = (ev.type.value, ev.service)
                names = tuple(k for k, _ in f.headers[2:])
                assert CAPTURED_ORDER[key] == names, key
                seen.add(key)
    assert seen == set(CAPTURED_ORDER)


async def _client(port: int, session: Session, bind: str | None = None,
                  wait_for_events: bool = True) -> tuple[bytes, float]:
    """Play the client's side of a captured session; return every byte the server sent."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if bind:
        sock.bind((bind, 0))
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock)
    got = b""
    t0 = time.monotonic()
    server = [c.data for c in session.chunks if c.direction == "server"]
    client = session.client_messages()
    # Banner first, then each client message once the server bytes before it arrived.
    expected_before: list[int] = []
    n = 0
    for c in session.chunks:
        if c.direction == "client":
            expected_before.append(n)
        else:
            n += len(c.data)
    for msg, need in zip(client, expected_before, strict=True):
        while len(got) < need:
            got += await asyncio.wait_for(reader.read(65536), 5)
        writer.write(msg)
        await writer.drain()
    while True:
        chunk = await asyncio.wait_for(reader.read(65536), 5)
        if not chunk:
            break
        got += chunk
    writer.close()
    assert server  # the capture has server bytes at all
    return got, time.monotonic() - t0


def test_replay_of_the_attack_session_is_byte_for_byte() -> None:
    session = security_capture()[0]

    async def main() -> bytes:
        sim = AmiSimulator(replay=session)
        await sim.start()
        try:
            got, _ = await _client(sim.port, session)
        finally:
            await sim.stop(shutdown_event=False)
        return got

    got = asyncio.run(main())
    assert got == session.server_bytes()
    assert len(got) > 40_000


def test_failed_logins_are_byte_for_byte_with_delay_and_events() -> None:
    """The three failed logins of the capture (wrong secret, unknown user, denied source),
    run at once while a logged-in session watches: same bytes, ~1 s delay, close, and
    the security event Asterisk raises for each."""
    sessions = security_capture()[1:]
    assert len(sessions) == 3

    async def main() -> tuple[list[tuple[bytes, float]], bytes]:
        sim = AmiSimulator(permit=lambda ip: ip != "127.0.0.2")
        await sim.start()
        try:
            r, w = await asyncio.open_connection("127.0.0.1", sim.port)
            await r.readuntil(b"\r\n")
            w.write(b"Action: Login\r\nActionID: w\r\nUsername: tm4\r\nSecret: tm4secret\r\n\r\n")
            watched = await r.readuntil(b"UsingPassword: 0\r\n")
            watched += await r.readuntil(b"\r\n\r\n")
            results = await asyncio.gather(
                _client(sim.port, sessions[0]), _client(sim.port, sessions[1]),
                _client(sim.port, sessions[2], bind="127.0.0.2"))
            events = b""
            while events.count(b"Event: ") < 3:
                events += await asyncio.wait_for(r.read(65536), 2)
            w.close()
            assert b"Response: Success" in watched
        finally:
            await sim.stop(shutdown_event=False)
        return list(results), events

    results, events = asyncio.run(main())
    for (got, took), s in zip(results, sessions, strict=True):
        assert got == s.server_bytes()
        assert 0.9 <= took < 3.0
    typed = [to_security_event(f) for f in FrameParser().feed(events)]
    kinds = sorted((e.type.value, e.account, str(e.remote.address)) for e in typed if e and e.remote)
    assert kinds == [("FailedACL", "tm4", "127.0.0.2"), ("InvalidAccountID", "nosuchuser", "127.0.0.1"),
                     ("InvalidPassword", "tm4", "127.0.0.1")]
    for f in FrameParser().feed(events):
        ev = to_security_event(f)
        assert ev is not None
        assert tuple(k for k, _ in f.headers[2:]) == CAPTURED_ORDER[(ev.type.value, "AMI")]


def test_rendered_events_match_captured_bytes_when_given_the_same_values() -> None:
    data = (FIXTURES / "ami_security_events.raw").read_bytes()
    for f in FrameParser().feed(data):
        ev = to_security_event(f)
        if ev is None:
            continue
        values = dict(f.headers[2:])
        assert render_event(ev.type.value, **values) == f.to_bytes()


def test_ping_logoff_and_unknown_actions() -> None:
    async def main() -> bytes:
        sim = AmiSimulator()
        await sim.start()
        try:
            r, w = await asyncio.open_connection("127.0.0.1", sim.port)
            await r.readuntil(b"\r\n")
            w.write(b"Action: Ping\r\nActionID: p0\r\n\r\n")  # before login: refused
            w.write(b"Action: Login\r\nActionID: l\r\nUsername: tm4\r\nSecret: tm4secret\r\n\r\n")
            w.write(b"Action: Ping\r\nActionID: p1\r\n\r\nAction: Frobnicate\r\nActionID: f\r\n\r\n")
            w.write(b"Action: Logoff\r\nActionID: bye\r\n\r\n")
            out = b""
            while chunk := await asyncio.wait_for(r.read(65536), 5):
                out += chunk
            return out
        finally:
            await sim.stop(shutdown_event=False)

    out = asyncio.run(main())
    assert b"ActionID: p0\r\nMessage: Permission denied" in out
    assert b"Response: Success\r\nActionID: p1\r\nPing: Pong\r\nTimestamp: " in out
    assert b"ActionID: f\r\nMessage: Invalid/unknown command: Frobnicate" in out
    assert out.endswith(b"Response: Goodbye\r\nActionID: bye\r\nMessage: Thanks for all the fish.\r\n\r\n")
