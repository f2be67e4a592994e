"""Guard benchmark: back on AMI after an Asterisk restart, and nothing lost meanwhile.

Asterisk is the restart simulator replaying the real captures' phases
(tests/ami_restart_sim.py, from real2/ami/*.probe): `core restart now`, `core restart
gracefully`, `core stop now` + start. An attacker guesses a password every 10 ms
throughout. For each run: how long after the new Asterisk accepted logins the guard was
logged in again (target: <= 1 s), and whether every guess Asterisk raised (to AMI or to
its security log) was counted exactly once (target: all, none twice).
"""

from __future__ import annotations

import asyncio
import ipaddress
import statistics
import sys
import tempfile
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from ami_restart_sim import RestartSim, until  # noqa: E402
from amisim import address, render_event  # noqa: E402
from fakes import MemoryKernel  # noqa: E402

from tm4.asterisk.events import FrameParser, SecurityEvent  # noqa: E402
from tm4.asterisk.securitylog import event_key  # noqa: E402
from tm4.core.config import parse_config  # noqa: E402
from tm4.guard.runtime import GuardRuntime  # noqa: E402
from tm4.ops.engine import Core  # noqa: E402

RUNS = 5
SECRET = "8KZoqDRbfvAjtJSWSCirVNEFAvEiy6rj"


class Counting(GuardRuntime):
    def __init__(self, *a: object, **kw: object) -> None:
        super().__init__(*a, **kw)  # type: ignore[arg-type]
        self.decided: Counter[tuple[str, ...]] = Counter()

    def _decide(self, ev: SecurityEvent, received: float) -> None:
        self.decided[event_key(ev.frame)] += 1
        super()._decide(ev, received)


def guess(n: int) -> bytes:
    return render_event("ChallengeResponseFailed", AccountID="1001", SessionID=f"g-{n}",
                        LocalAddress=address("192.0.2.1", 5060), RemoteAddress=address("203.0.113.77", 5060),
                        Challenge=f"1/{n:032x}", Response=f"{n:032x}", ExpectedResponse="")


async def one(capture: str, tmp: Path) -> tuple[float, int, int, int]:
    sim = RestartSim(capture, "tm4", SECRET, tmp / "security")
    await sim.start()
    cfg = parse_config({"state_dir": str(tmp), "ami": {"port": sim.port, "secret": SECRET},
                        "guard": {"failures": 100_000, "security_log": str(tmp / "security")}})
    core = Core(cfg, backend=MemoryKernel(), protect=[])  # type: ignore[arg-type]
    rt = Counting(core, own={ipaddress.ip_address("192.0.2.1")}, catchup_delay=0.2)
    task = asyncio.ensure_future(rt.run())
    raised: list[bytes] = []
    stop = asyncio.Event()

    async def attacker() -> None:
        n = 0
        while not stop.is_set():
            f = guess(n)
            if any(sim.attack(f)):
                raised.append(f)
            n += 1
            await asyncio.sleep(0.01)

    try:
        await until(lambda: rt.client is not None and rt.client.connected)
        atk = asyncio.ensure_future(attacker())
        await asyncio.sleep(0.2)
        await sim.restart()
        await until(lambda: any(k == "new" for _, k in sim.logins), 5.0)
        back = next(t for t, k in sim.logins if k == "new") - (sim.new_since or 0)
        await asyncio.sleep(0.5)
        stop.set()
        await atk
        await until(lambda: rt.gaps and rt.gaps[-1]["recovered"] is not None, 3.0)
        await asyncio.sleep(0.3)
    finally:
        await rt.close()
        await asyncio.wait_for(task, 5)
        await sim.stop()
    want = Counter(event_key(f) for f in (FrameParser().feed(b"".join(raised))))
    got = Counter({k: n for k, n in rt.decided.items() if k in want})
    missing = sum((want - got).values())
    twice = sum((got - want).values())
    return back, missing, twice, rt.recovered


def main() -> int:
    ok = True
    for capture in ("restart", "restart_gracefully", "stop_start"):
        backs, lost, dup, rec = [], 0, 0, 0
        for _ in range(RUNS):
            with tempfile.TemporaryDirectory() as d:
                back, missing, twice, recovered = asyncio.run(one(capture, Path(d)))
            backs.append(back * 1000)
            lost, dup, rec = lost + missing, dup + twice, rec + recovered
        ok = ok and max(backs) <= 1000 and lost == 0 and dup == 0
        print(f"{capture:20} logged in again after logins accepted: median {statistics.median(backs):.0f} ms, "
              f"max {max(backs):.0f} ms (target <= 1000); guesses lost {lost}, counted twice {dup}, "
              f"caught up from the security log {rec} ({RUNS} runs)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
