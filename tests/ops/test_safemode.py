"""Safe mode: the timing decision with an injected clock, and the kernel side in a namespace."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner
from netlab import Echo, Lab, wait_for

from tm4.cli import cli
from tm4.core.config import load_config
from tm4.firewall.nft import NftBackend
from tm4.ops import safemode
from tm4.ops.engine import Core
from tm4.ops.safemode import Boot, decide

T0 = datetime(2026, 11, 21, 4, 0, tzinfo=UTC)
M = timedelta(minutes=1)


def boot(bid: str, start_min: float, length_min: float) -> Boot:
    s = T0 + timedelta(minutes=start_min)
    return Boot(bid, s, s + timedelta(minutes=length_min))


@pytest.mark.parametrize(
    ("prev_len", "uptime", "active"),
    [
        (3, 1, True),  # a reboot loop: previous boot 3 min, this one 1 min old
        (9.9, 4.9, True),  # both just inside the limits
        (10, 1, False),  # previous boot lasted exactly 10 min: not short
        (60, 1, False),  # a normal previous boot
        (3, 5, False),  # this boot is 5 min old: the window is over
        (3, 30, False),
        (0, 0, True),
    ],
)
def test_decision_boundaries(prev_len: float, uptime: float, active: bool) -> None:
    now = T0 + timedelta(hours=1)
    d = decide([boot("a", 0, prev_len)], "b", timedelta(minutes=uptime), now)
    assert d.active is active, d.reason
    if active:
        assert d.until == now + (5 * M - timedelta(minutes=uptime))
    else:
        assert d.until is None


def test_decision_uses_the_latest_other_boot_and_honours_switches() -> None:
    now = T0 + timedelta(days=1)
    hist = [boot("old", 0, 2), boot("prev", 100, 600), boot("cur", 800, 1)]
    assert not decide(hist, "cur", M, now).active  # the previous boot (not the oldest) was long
    hist = [boot("old", 0, 600), boot("prev", 700, 2), boot("cur", 800, 1)]
    assert decide(hist, "cur", M, now).active
    assert not decide(hist, "cur", M, now, enabled=False).active
    assert "turned off" in decide(hist, "cur", M, now, turned_off=True).reason
    assert not decide([boot("cur", 0, 1)], "cur", M, now).active  # first boot on record
    assert decide(hist, "cur", M, now, short_boot=timedelta(minutes=3), window=timedelta(minutes=2)).active
    assert not decide(hist, "cur", 2 * M, now, window=timedelta(minutes=2)).active


class _NoKernel:
    def apply(self, rs: object, now: object = None) -> None: ...
    def apply_changes(self, ch: object, now: object = None) -> None: ...
    def present(self) -> bool: return False
    def listing(self) -> str | None: return None
    def remove(self) -> None: ...


def _core(tmp_path: Path, clock: list[datetime], extra: str = "") -> Core:
    cfg = tmp_path / "tm4.toml"
    cfg.write_text(f'state_dir = "{tmp_path / "state"}"\n{extra}')
    return Core(load_config(cfg), backend=_NoKernel(), clock=lambda: clock[0], protect=[])  # type: ignore[arg-type]


def test_boot_history_is_recorded_and_drives_the_next_boot(tmp_path: Path) -> None:
    clock = [T0]
    core = _core(tmp_path, clock)
    # boot A: tm4 starts 20 s into it, heartbeats until 3 minutes in, then the box reboots
    assert not safemode.evaluate(core, current="A", up=timedelta(seconds=20), now=T0).active
    safemode.record_boot(core, "A", timedelta(minutes=3), T0 + timedelta(minutes=2, seconds=40))
    hist = safemode.load_history(core)
    assert [(b.id, b.length) for b in hist] == [("A", timedelta(minutes=3))]
    # boot B, 40 s old: safe mode, until 5 min of uptime
    t = T0 + timedelta(minutes=4)
    clock[0] = t
    d = safemode.evaluate(core, current="B", up=timedelta(seconds=40), now=t)
    assert d.active and d.until == t + timedelta(minutes=4, seconds=20)
    assert safemode.until(core.store, t) == d.until
    assert safemode.until(core.store, d.until) is None  # over by itself at the deadline
    rs = safemode.ruleset_extra(core.config, core.store)
    el = rs.sets["safemode4"].elements
    assert [(e.lo, e.hi, e.expires) for e in el] == [(0, 2**32 - 1, d.until)]
    assert rs.input_rules == ["ip saddr @safemode4 tcp dport 22 accept", "ip6 saddr @safemode6 tcp dport 22 accept"]
    # the whole rule set: the ban rules come before safe mode's ssh rule
    rules = core.render().input_rules
    assert rules.index("ip saddr @ban4 counter drop") < rules.index("ip saddr @safemode4 tcp dport 22 accept")
    assert any(r.action == "safe-mode" for r in core.store.audit_log(10))
    # `safe-mode off` ends it, and a restart of tm4d in the same boot does not bring it back
    assert safemode.turn_off(core, actor="test", current="B")
    assert safemode.until(core.store, t) is None
    assert not safemode.evaluate(core, current="B", up=timedelta(seconds=50), now=t).active
    assert not safemode.turn_off(core, actor="test", current="B")
    # many boots: the history stays bounded
    for i in range(30):
        safemode.record_boot(core, f"x{i}", M, t + i * M)
    assert len(safemode.load_history(core)) == safemode.KEEP_BOOTS


def test_configurable_and_switchable(tmp_path: Path) -> None:
    clock = [T0]
    core = _core(tmp_path, clock, "[daemon]\nsafe_mode = false\n")
    safemode.record_boot(core, "A", M, T0)
    assert "disabled" in safemode.evaluate(core, current="B", up=M, now=T0 + 2 * M).reason


@pytest.fixture
def ns(lab: Lab) -> Iterator[tuple[Lab, Echo]]:
    lab.client("admin", ["203.0.113.50/24"])
    lab.client("attacker", ["203.0.113.66/24"])
    echo = Echo(lab.pbx, udp=[5060], tcp=[22])
    try:
        yield lab, echo
    finally:
        echo.close()


def test_kernel_opens_ssh_only_and_closes_it_by_itself(ns: tuple[Lab, Echo], tmp_path: Path) -> None:
    lab, _ = ns
    admin, attacker = lab.hosts[1], lab.hosts[2]
    cfg = tmp_path / "tm4.toml"
    cfg.write_text(f'state_dir = "{tmp_path / "state"}"\n[daemon]\nsafe_mode_uptime = "5m"\n'
                   f'socket = "{tmp_path / "none.sock"}"\n')
    core = Core(load_config(cfg), backend=NftBackend(netns=lab.pbx.ns), protect=[])
    core.block("203.0.113.66", reason="banned before the reboot")
    safemode.record_boot(core, "prev", timedelta(seconds=100), safemode.utcnow())
    # this boot is 4 min 57 s old: safe mode for the last 3 seconds of the window
    d = safemode.evaluate(core, current="this", up=timedelta(minutes=4, seconds=57))
    assert d.active
    core.apply()
    assert admin.tcp_probe("203.0.113.1", 22)  # ssh from anywhere
    assert not admin.udp_probe("203.0.113.1", 5060)  # everything else still closed
    assert not attacker.tcp_probe("203.0.113.1", 22, timeout=0.3)  # and bans still hold
    # no daemon runs: the kernel's timeout closes it on time
    t = time.monotonic()
    assert wait_for(lambda: not admin.tcp_probe("203.0.113.1", 22, timeout=0.2), timeout=8)
    print(f"safe mode closed by the kernel {time.monotonic() - t:.1f}s after the check")


def test_safe_mode_off_from_the_cli_without_tm4d(ns: tuple[Lab, Echo], tmp_path: Path) -> None:
    lab, _ = ns
    admin = lab.hosts[1]
    cfg = tmp_path / "tm4.toml"
    cfg.write_text(f'state_dir = "{tmp_path / "state"}"\n[firewall]\nnetns = "{lab.pbx.ns}"\n'
                   f'[daemon]\nsocket = "{tmp_path / "none.sock"}"\n')
    core = Core(load_config(cfg), protect=[])
    safemode.record_boot(core, "prev", timedelta(seconds=100), safemode.utcnow())
    assert safemode.evaluate(core, current=safemode.boot_id(), up=timedelta(seconds=10)).active
    core.apply()
    assert admin.tcp_probe("203.0.113.1", 22)
    r = CliRunner().invoke(cli, ["--config", str(cfg), "safe-mode"])
    assert r.exit_code == 0 and "ON until" in r.output, r.output
    r = CliRunner().invoke(cli, ["--config", str(cfg), "safe-mode", "off"])
    assert r.exit_code == 0 and "safe mode ended" in r.output, r.output
    assert not admin.tcp_probe("203.0.113.1", 22, timeout=0.3)
    r = CliRunner().invoke(cli, ["--config", str(cfg), "safe-mode", "--json"])
    assert '"active": false' in r.output


def test_boot_unit_loads_the_store_and_decides_safe_mode(ns: tuple[Lab, Echo], tmp_path: Path) -> None:
    """What tm4-boot.service runs: `tm4d --boot`, before the network, then exits."""
    import subprocess
    import sys

    lab, _ = ns
    admin, attacker = lab.hosts[1], lab.hosts[2]
    cfg = tmp_path / "tm4.toml"
    # a window wide enough that this machine's real uptime counts as "young"
    up = safemode.uptime()
    window = f"{int(up.total_seconds()) + 600}s"
    cfg.write_text(f'state_dir = "{tmp_path / "state"}"\n[daemon]\nsafe_mode_uptime = "{window}"\n'
                   f'socket = "{tmp_path / "none.sock"}"\n')
    core = Core(load_config(cfg), backend=NftBackend(netns=lab.pbx.ns), protect=[])
    core.allow("office", ["203.0.113.50"], ["sip-udp"])
    core.block("203.0.113.66", reason="old ban")
    safemode.record_boot(core, "an-earlier-boot", timedelta(seconds=90), safemode.utcnow() - timedelta(days=1))
    argv = ["ip", "netns", "exec", lab.pbx.ns, sys.executable, "-m", "tm4.daemon", "--boot", "--config", str(cfg)]
    p = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert p.returncode == 0, p.stderr
    assert "event=boot_applied safe_mode=True" in p.stderr
    assert admin.udp_probe("203.0.113.1", 5060)  # the stored whitelist is in force
    assert admin.tcp_probe("203.0.113.1", 22)  # safe mode: ssh from anywhere...
    assert not attacker.tcp_probe("203.0.113.1", 22, timeout=0.3)  # ...but bans still hold
    # disabled: the boot unit leaves the firewall off
    from tm4.ops.root import disable

    disable(core, actor="test")
    p = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    assert p.returncode == 0 and "boot_apply_skipped reason=disabled" in p.stderr
    assert "tm4" not in subprocess.run(["ip", "netns", "exec", lab.pbx.ns, "nft", "list", "tables"],
                                       capture_output=True, text=True).stdout
