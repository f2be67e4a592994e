"""The guard survives Asterisk: restarted, killed mid-frame, silent (half-open).

Each time it is back within 2 s of the simulator returning (default reconnect
backoff; only the ping period is shortened so the half-open case is quick),
and floods naming the server's own, loopback and whitelisted addresses never
get them banned, while an attacker in the same flood is banned.
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from pathlib import Path
from typing import Any

import pytest
from amisim import AmiSimulator, address, render_event
from fakes import MemoryKernel

from tm4.core.config import parse_config
from tm4.guard.runtime import GuardRuntime
from tm4.ops.engine import Core

OWN = "192.0.2.1"
PHONE = "198.51.100.20"
PING = {"ping_interval": 0.5, "ping_timeout": 0.5, "connect_timeout": 1.0}





def crf(ip: str, n: int, port: int = 5060) -> bytes:
    return render_event("ChallengeResponseFailed", AccountID="1001", SessionID=f"{ip}-{n}",
                        LocalAddress=address(OWN, 5060), RemoteAddress=address(ip, port),
                        Challenge=f"1795236590/{n:032x}", Response=f"{n:032x}", ExpectedResponse="")


def flood(sim: AmiSimulator, ips: list[str], n: int = 8) -> None:
    for i in range(n):
        for ip in ips:
            sim.emit(crf(ip, i))


async def until(pred: Any, timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        await asyncio.sleep(0.01)
    return bool(pred())


def banned(core: Core) -> set[str]:
    return {b.address for b in core.bans()}


@pytest.mark.parametrize("fault", ["restart", "kill_mid_frame", "half_open"])
def test_guard_comes_back_within_2s_and_never_bans_its_own(tmp_path: Path, fault: str) -> None:
    async def main() -> tuple[float, set[str], GuardRuntime]:
        sim = AmiSimulator(local_address=OWN)
        await sim.start()
        cfg = parse_config({"state_dir": str(tmp_path), "ami": {"port": sim.port, "secret": "tm4secret"}})
        core = Core(cfg, backend=MemoryKernel(), protect=[])  # type: ignore[arg-type]
        core.allow("phone", [PHONE], ["sip-udp"])
        rt = GuardRuntime(core, own={ipaddress.ip_address(OWN)}, client_options=PING)
        task = asyncio.ensure_future(rt.run())
        try:
            assert await until(lambda: rt.client is not None and rt.client.connected)
            flood(sim, [OWN, "127.0.0.1", PHONE, "203.0.113.61"])
            assert await until(lambda: "203.0.113.61" in banned(core))
            logins = sim.logins
            if fault == "restart":
                await sim.stop()  # Shutdown event, close, stop listening
                await asyncio.sleep(3.0)
                back_at = time.monotonic()
                await sim.start()
            elif fault == "kill_mid_frame":
                cut = crf("203.0.113.99", 0)
                await sim.kill_mid_frame(cut, cut.index(b"Challenge:"))
                await asyncio.sleep(3.0)
                back_at = time.monotonic()
                await sim.start()
            else:
                sim.freeze()  # connected, but nothing comes back: half-open
                assert await until(lambda: not rt.client.connected, 3.0)  # type: ignore[union-attr]
                await asyncio.sleep(2.0)
                back_at = time.monotonic()
                sim.thaw()
            assert await until(lambda: sim.logins > logins, 4.0)
            back = sim.login_times[logins] - back_at
            assert await until(lambda: rt.client.connected)  # type: ignore[union-attr]
            flood(sim, [OWN, "127.0.0.1", PHONE, "203.0.113.62"])
            assert await until(lambda: "203.0.113.62" in banned(core))
            return back, banned(core), rt
        finally:
            await rt.close()
            await asyncio.wait_for(task, 5)
            await sim.stop(shutdown_event=False)

    back, bans, rt = asyncio.run(main())
    print(f"{fault}: guard back {back * 1000:.0f} ms after the simulator returned")
    assert back <= 2.0, f"guard back {back:.2f} s after the simulator returned"
    assert bans == {"203.0.113.61", "203.0.113.62"}  # never own, loopback, phone, nor the cut frame
    assert rt.client is not None and rt.client.handler_errors == 0
    if fault == "half_open":
        assert rt.client.half_open >= 1
    assert not [a for a in rt.applied if a.error]
