"""The guard across a real Asterisk restart, replayed from real2/ami/*.probe (see
tests/ami_restart_sim.py): back within 1 s of Asterisk accepting logins, no refused-secret
back-off for `Asterisk is shutting down`, and every failure Asterisk raised while the
guard was away counted once, from Asterisk's security log.
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from ami_restart_sim import RestartSim, until
from amisim import address, render_event
from fakes import MemoryKernel

from tm4.asterisk.events import SecurityEvent
from tm4.asterisk.securitylog import event_key
from tm4.core.config import parse_config
from tm4.daemon.components import Component
from tm4.guard.runtime import GuardRuntime
from tm4.ops.engine import Core

OWN = "192.0.2.1"
ATTACKER = "203.0.113.77"
SECRET = "8KZoqDRbfvAjtJSWSCirVNEFAvEiy6rj"  # the lab secret of the captures
PING = {"ping_interval": 0.5, "ping_timeout": 0.5, "connect_timeout": 1.0}


class CountingGuard(GuardRuntime):
    """Records each event handed to the policy (live or caught up)."""

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.decided: Counter[tuple[str, ...]] = Counter()

    def _decide(self, ev: SecurityEvent, received: float) -> None:
        self.decided[event_key(ev.frame)] += 1
        super()._decide(ev, received)


def guess(n: int) -> bytes:
    """A wrong password from the attacker (ChallengeResponseFailed in the captured order)."""
    return render_event("ChallengeResponseFailed", AccountID="1001", SessionID=f"guess-{n}@{ATTACKER}",
                        LocalAddress=address(OWN, 5060), RemoteAddress=address(ATTACKER, 5060),
                        Challenge=f"1795236590/{n:032x}", Response=f"{n:032x}", ExpectedResponse="")


def key_of(frame: bytes) -> tuple[str, ...]:
    from tm4.asterisk.events import FrameParser

    (f,) = FrameParser().feed(frame)
    return event_key(f)


def make(tmp_path: Path, sim: RestartSim, failures: int) -> tuple[Core, CountingGuard]:
    cfg = parse_config({"state_dir": str(tmp_path),
                        "ami": {"port": sim.port, "secret": SECRET},
                        "guard": {"failures": failures, "security_log": str(sim.security_log)}})
    core = Core(cfg, backend=MemoryKernel(), protect=[])  # type: ignore[arg-type]
    rt = CountingGuard(core, own={ipaddress.ip_address(OWN)}, client_options=PING, catchup_delay=0.2)
    return core, rt


@pytest.mark.parametrize("capture", ["restart", "restart_gracefully", "stop_start"])
def test_back_within_1s_of_logins_accepted_and_every_failure_counted_once(tmp_path: Path,
                                                                         capture: str) -> None:
    async def main() -> dict[str, Any]:
        sim = RestartSim(capture, "tm4", SECRET, tmp_path / "security")
        await sim.start()
        core, rt = make(tmp_path, sim, failures=10_000)  # count, do not ban
        task = asyncio.ensure_future(rt.run())
        sent: list[bytes] = []
        stop = asyncio.Event()

        async def attacker() -> None:
            n = 0
            while not stop.is_set():
                frame = guess(n)
                logged, delivered = sim.attack(frame)
                if logged or delivered:
                    sent.append(frame)
                n += 1
                await asyncio.sleep(0.01)

        try:
            assert await until(lambda: rt.client is not None and rt.client.connected)
            atk = asyncio.ensure_future(attacker())
            await asyncio.sleep(0.2)
            await sim.restart()
            assert await until(lambda: any(k == "new" for _, k in sim.logins), 5.0)
            back = next(t for t, k in sim.logins if k == "new") - (sim.new_since or 0)
            await asyncio.sleep(0.5)
            stop.set()
            await atk
            assert await until(lambda: rt.gaps and rt.gaps[-1]["recovered"] is not None, 3.0)
            await asyncio.sleep(0.3)
            return {"back": back, "sent": sent, "rt": rt, "core": core, "status": rt.status()}
        finally:
            await rt.close()
            await asyncio.wait_for(task, 5)
            await sim.stop()

    r = asyncio.run(main())
    rt: CountingGuard = r["rt"]
    assert rt.client is not None
    print(f"{capture}: logged in {r['back'] * 1000:.0f} ms after the new Asterisk accepted logins; "
          f"{len(r['sent'])} guesses raised, {rt.recovered} from the security log; gaps {list(rt.gaps)}")
    assert r["back"] <= 1.0
    assert rt.client.failed_logins == 0  # `shutting down` is no refused secret: no 10 s back-off
    want = Counter(key_of(f) for f in r["sent"])
    got = Counter({k: n for k, n in rt.decided.items() if k in want})
    assert got == want  # each failure Asterisk raised, counted exactly once
    assert r["status"]["ami"]["logged_in"] is True
    assert r["status"]["ami"]["reconnects"] >= 1


def test_a_slow_boot_loses_nothing_the_log_recovers_and_status_shows_the_gap(tmp_path: Path) -> None:
    """Six guesses land while the new Asterisk runs and the guard is still waiting for its
    next attempt: only the security log has them; the guard counts them once and bans."""

    async def main() -> dict[str, Any]:
        sim = RestartSim("restart", "tm4", SECRET, tmp_path / "security", hold_refused=True)
        await sim.start()
        core, rt = make(tmp_path, sim, failures=5)
        component = Component("guard", "tm4.guard.runtime", lambda d, m: asyncio.sleep(0), state="running",
                              detail=rt.status)
        task = asyncio.ensure_future(rt.run())
        try:
            assert await until(lambda: rt.client is not None and rt.client.connected)
            assert component.to_json()["state"] == "running"
            client = rt.client
            assert client is not None
            before = [guess(i) for i in range(2)]  # seen live, also in the log: not counted twice
            for f in before:
                assert sim.attack(f) == (True, 1)
            await asyncio.sleep(0.1)
            await sim.restart()
            assert await until(lambda: sim.phase() == "refused", 2.0)
            # the guard retries at its slowest pace (0.4-0.6 s) once a few attempts failed
            assert await until(lambda: client.connects >= 8, 6.0)
            n = client.connects
            assert await until(lambda: client.connects > n, 2.0)
            away = component.to_json()  # what `tm4 daemon status --json` shows now
            asked = time.monotonic()
            sim.boot()
            assert await until(lambda: sim.new_since is not None, 1.0)
            await asyncio.sleep(0.03)  # res_security_log loads 13 ms after the first login
            missed = [guess(100 + i) for i in range(6)]
            for f in missed:
                assert sim.attack(f) == (True, 0)  # in the log only: the guard is not back yet
            assert time.monotonic() - asked < 0.35  # all before the guard's next attempt
            assert await until(lambda: client.connected, 2.0)
            back = time.monotonic() - (sim.new_since or 0)
            assert await until(lambda: ATTACKER in {b.address for b in core.bans()}, 3.0)
            assert await until(lambda: rt.gaps and rt.gaps[-1]["recovered"] is not None, 3.0)
            return {"rt": rt, "missed": missed, "before": before, "back": back,
                    "logged": [x for x in sim.raised], "status": rt.status(), "away": away,
                    "back_json": component.to_json()}
        finally:
            await rt.close()
            await asyncio.wait_for(task, 5)
            await sim.stop()

    r = asyncio.run(main())
    rt: CountingGuard = r["rt"]
    for f in r["missed"] + r["before"]:
        assert rt.decided[key_of(f)] == 1
    assert r["back"] <= 1.0
    st = r["status"]
    gap = st["gaps"][-1]
    print(f"gap {gap}")
    assert gap["recovered"] == 6 and gap["error"] is None
    assert 0 < gap["seconds"] < 5 and gap["from"] < gap["to"]
    assert st["recovered"] == 6
    assert st["ami"]["logged_in"] and st["ami"]["refused_logins"] == 0
    away = r["away"]  # never `running` while logged out
    assert away["state"] == "logged out" and away["ami"]["logged_in"] is False
    assert "Connect call failed" in away["error"] or "refused" in away["error"].lower()
    assert away["summary"].startswith("AMI LOGGED OUT since ")
    back = r["back_json"]
    assert back["state"] == "running" and back["ami"]["reconnects"] >= 1
    assert "6 event(s) caught up from the security log" in back["summary"]
    print(back["summary"])


def test_a_restarted_guard_catches_up_from_where_the_last_one_stopped(tmp_path: Path) -> None:
    """tm4d itself away (stopped, upgraded): the next guard counts what Asterisk raised
    meanwhile, once, and nothing the previous guard had already counted."""

    async def main() -> dict[str, Any]:
        sim = RestartSim("restart", "tm4", SECRET, tmp_path / "security")
        await sim.start()
        core, first = make(tmp_path, sim, failures=5)
        task = asyncio.ensure_future(first.run())
        seen_live = [guess(i) for i in range(3)]
        try:
            assert await until(lambda: first.client is not None and first.client.connected)
            for f in seen_live:
                assert sim.attack(f) == (True, 1)
            assert await until(lambda: all(first.decided[key_of(f)] == 1 for f in seen_live), 2.0)
        finally:
            await first.close()
            await asyncio.wait_for(task, 5)
        await asyncio.sleep(0.05)
        while_down = [guess(50 + i) for i in range(4)]
        for f in while_down:
            assert sim.attack(f) == (True, 0)  # Asterisk logs them; no guard listens
        second = CountingGuard(core, own={ipaddress.ip_address(OWN)}, client_options=PING, catchup_delay=0.2)
        task = asyncio.ensure_future(second.run())
        try:
            assert await until(lambda: second.gaps and second.gaps[-1]["recovered"] is not None, 5.0)
            return {"second": second, "seen_live": seen_live, "while_down": while_down}
        finally:
            await second.close()
            await asyncio.wait_for(task, 5)
            await sim.stop()

    r = asyncio.run(main())
    second: CountingGuard = r["second"]
    assert [second.decided[key_of(f)] for f in r["while_down"]] == [1, 1, 1, 1]
    assert all(key_of(f) not in second.decided for f in r["seen_live"])  # the first guard's
    assert second.gaps[-1]["recovered"] == 4


def test_daemon_status_prints_the_ami_state_under_the_guard(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`tm4 daemon status` text: the guard's state (never `running` while logged out) and
    its summary line, from the component JSON tm4d sends."""
    from click.testing import CliRunner

    import tm4.ops.control as control
    from tm4.cli import cli

    rt = CountingGuard(Core(parse_config({"state_dir": str(tmp_path), "ami": {"secret": "x"}}),
                            backend=MemoryKernel(), protect=[]),  # type: ignore[arg-type]
                       own=set())
    comp = Component("guard", "tm4.guard.runtime", lambda d, m: asyncio.sleep(0), state="running",
                     detail=rt.status)
    st = {"pid": 1, "uptime": 5.0, "config": None, "safe_mode": {"active": False, "until": None},
          "disabled": False, "components": {"guard": comp.to_json()},
          "drift": {"repairs": 0, "last": None}, "other_firewalls": []}
    monkeypatch.setattr(control, "request", lambda *a, **k: st)
    cfg = tmp_path / "tm4.toml"
    cfg.write_text(f'state_dir = "{tmp_path}"\n')
    r = CliRunner().invoke(cli, ["--config", str(cfg), "daemon", "status"])
    assert r.exit_code == 0, r.output
    line = next(ln for ln in r.output.splitlines() if ln.strip().startswith("guard"))
    assert "logged out" in line and "running" not in line
    assert "AMI LOGGED OUT since start: not connected yet" in r.output
