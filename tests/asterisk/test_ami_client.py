"""The AMI client against the simulator: login, typed events, and panoramisk 1.4's pitfalls."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from amisim import AmiSimulator, address, render_event, security_capture

from tm4.asterisk.ami import AmiClient
from tm4.asterisk.events import EventType, SecurityEvent, parse_events

FAST = {"ping_interval": 0.2, "ping_timeout": 0.3, "connect_timeout": 1.0, "retry_min": 0.05,
        "retry_max": 0.5}


async def _with_client(sim: AmiSimulator, on_event: Callable[[SecurityEvent, float], Any],
                       body: Callable[[AmiClient], Awaitable[None]], secret: str = "tm4secret",
                       **opts: Any) -> AmiClient:
    client = AmiClient("127.0.0.1", sim.port, "tm4", secret, on_event=on_event,
                       loop=asyncio.get_running_loop(), **{**FAST, **opts})
    runner = asyncio.ensure_future(client.run())
    try:
        await body(client)
    finally:
        await client.close()
        await asyncio.wait_for(runner, 5)
    return client


async def _until(pred: Callable[[], bool], timeout: float = 3.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        await asyncio.sleep(0.01)
    return pred()


def test_logs_in_and_delivers_every_captured_security_event_typed() -> None:
    session = security_capture()[0]
    expected = parse_events(session.server_bytes())
    got: list[SecurityEvent] = []

    async def main() -> AmiClient:
        sim = AmiSimulator(replay=session)
        await sim.start()

        async def body(c: AmiClient) -> None:
            assert await _until(lambda: len(got) >= len(expected))

        try:
            return await _with_client(sim, lambda e, t: got.append(e), body)
        finally:
            await sim.stop()

    client = asyncio.run(main())
    assert client.logins == 1 and client.banner == "Asterisk Call Manager/11.0.0"
    assert [e.frame for e in got] == [e.frame for e in expected]
    crf = next(e for e in got if e.type is EventType.CHALLENGE_RESPONSE_FAILED)
    assert crf.frame.headers[-1] == ("ExpectedResponse", "")  # the trailing empty header survived


def test_login_uses_least_privilege_event_mask() -> None:
    async def main() -> dict[str, str]:
        sim = AmiSimulator()
        await sim.start()

        async def body(c: AmiClient) -> None:
            assert await asyncio.wait_for(c.ready.wait(), 3)

        try:
            await _with_client(sim, lambda e, t: None, body)
        finally:
            await sim.stop()
        return next(a for a in sim.actions_seen if a.get("action") == "Login")

    login = asyncio.run(main())
    assert login["events"] == "system,security"
    assert login["username"] == "tm4"


def test_a_failing_handler_is_logged_counted_and_does_not_stop_delivery() -> None:
    seen: list[str] = []

    def handler(e: SecurityEvent, t: float) -> None:
        if e.service == "AMI":
            return  # our own login's SuccessfulAuth
        seen.append(e.account)
        if e.account == "boom":
            raise RuntimeError("handler bug")

    async def coro_handler(e: SecurityEvent, t: float) -> None:
        if e.service == "AMI":
            return
        await asyncio.sleep(0.01)
        seen.append("async-" + e.account)
        if e.account == "boom":
            raise RuntimeError("async handler bug")

    async def main(h: Callable[[SecurityEvent, float], Any]) -> AmiClient:
        sim = AmiSimulator()
        await sim.start()

        async def body(c: AmiClient) -> None:
            await asyncio.wait_for(c.ready.wait(), 3)
            for acct in ("a", "boom", "b"):
                sim.emit_event("InvalidAccountID", AccountID=acct, SessionID=acct,
                               RemoteAddress=address("203.0.113.9", 5060))
            assert await _until(lambda: sum(1 for s in seen if s.endswith("b") and "boom" not in s) == 1)
            assert await _until(lambda: c.handler_errors == 1)

        try:
            return await _with_client(sim, h, body)
        finally:
            await sim.stop()

    c = asyncio.run(main(handler))
    assert seen == ["a", "boom", "b"] and c.handler_errors == 1
    assert isinstance(c.last_error, RuntimeError)
    seen.clear()
    c = asyncio.run(main(coro_handler))
    assert seen == ["async-a", "async-boom", "async-b"] and c.handler_errors == 1
    assert "async handler bug" in str(c.last_error)
    assert not c._tasks  # every task was kept until it finished


def test_refused_logins_back_off_instead_of_hammering_every_2s() -> None:
    """Each refused login is an InvalidPassword event on the PBX: retries must slow down."""
    async def main() -> list[float]:
        sim = AmiSimulator(login_fail_delay=0.02)
        await sim.start()

        async def body(c: AmiClient) -> None:
            await asyncio.sleep(3.2)

        try:
            await _with_client(sim, lambda e, t: None, body, secret="wrong",
                               auth_retry_min=0.2, auth_retry_max=1.2)
        finally:
            await sim.stop()
        return sim.failed_login_times

    times = asyncio.run(main())
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert 4 <= len(times) <= 6, times
    assert all(later >= earlier * 1.5 or later >= 1.2 for earlier, later in zip(gaps, gaps[1:], strict=False)), gaps
    assert max(gaps) < 1.5  # capped


def test_unanswered_ping_detects_a_half_open_connection() -> None:
    async def main() -> tuple[AmiClient, float]:
        sim = AmiSimulator()
        await sim.start()
        took = 0.0

        async def body(c: AmiClient) -> None:
            nonlocal took
            await asyncio.wait_for(c.ready.wait(), 3)
            t0 = time.monotonic()
            sim.freeze()
            assert await _until(lambda: not c.ready.is_set(), 3)
            took = time.monotonic() - t0
            sim.thaw()
            assert await _until(lambda: c.ready.is_set(), 3)

        try:
            return await _with_client(sim, lambda e, t: None, body), took
        finally:
            await sim.stop()

    c, took = asyncio.run(main())
    assert c.half_open >= 1 and c.logins == 2
    assert took < 0.2 + 0.3 + 0.3  # one ping interval + the ping timeout (+ slack)


def test_a_frame_cut_by_a_crash_is_never_delivered_and_the_client_comes_back() -> None:
    got: list[SecurityEvent] = []
    cut = render_event("InvalidAccountID", AccountID="x", SessionID="cut",
                       RemoteAddress=address("203.0.113.50", 5060))

    async def main() -> AmiClient:
        sim = AmiSimulator()
        await sim.start()

        async def body(c: AmiClient) -> None:
            await asyncio.wait_for(c.ready.wait(), 3)
            await sim.kill_mid_frame(cut, cut.index(b"RemoteAddress") + 20)
            assert await _until(lambda: not c.ready.is_set())
            await sim.start()
            assert await _until(lambda: c.ready.is_set())
            sim.emit_event("InvalidAccountID", AccountID="after", SessionID="a",
                           RemoteAddress=address("203.0.113.51", 5060))
            assert await _until(lambda: len(got) == 1)

        try:
            return await _with_client(sim, lambda e, t: e.service == "PJSIP" and got.append(e), body)
        finally:
            await sim.stop()

    asyncio.run(main())
    assert [e.account for e in got] == ["after"]
