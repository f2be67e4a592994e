"""`tm4 guard` in the foreground against the AMI simulator; bans show in `tm4 bans` / `tm4 log`."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from amisim import AmiSimulator, LoopThread, address, render_event
from click.testing import CliRunner
from netlab import Lab

from tm4.cli import cli
from tm4.core.config import load_config
from tm4.ops.engine import Core

SAMPLES = Path(__file__).parent.parent / "samples" / "ami"


def test_tm4_guard_runs_bans_and_stops_cleanly(lab: Lab, tmp_path: Path) -> None:
    lt = LoopThread()
    sim = AmiSimulator(local_address="192.0.2.1")
    lt.run(sim.start())
    cfg_path = tmp_path / "tm4.toml"
    cfg_path.write_text(
        f'state_dir = "{tmp_path / "state"}"\n'
        f'[firewall]\nnetns = "{lab.pbx.ns}"\npublic_services = ["sip-udp"]\n'
        f'[ami]\nport = {sim.port}\nsecret = "tm4secret"\n'
    )
    Core(load_config(cfg_path), protect=[]).apply()
    proc = subprocess.Popen([sys.executable, "-m", "tm4.cli", "--config", str(cfg_path), "guard", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 10
        while sim.logins == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sim.logins == 1
        for i in range(5):
            frame = render_event("InvalidAccountID", AccountID="admin", SessionID=f"{i}-77@x",
                                 RemoteAddress=address("203.0.113.9", 5060))
            lt.soon(sim.emit, frame)
        line = json.loads(proc.stdout.readline())  # type: ignore[union-attr]
        assert line["action"] == "ban" and line["address"] == "203.0.113.9"
        assert line["event"] == "InvalidAccountID" and line["count"] == 5 and line["ttl"] == "1h"
        assert line["error"] is None and line["ms"] < 100
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(5) == 0
        # It logged off politely.
        assert any(a.get("action") == "Logoff" for a in sim.actions_seen)
    finally:
        if proc.poll() is None:
            proc.kill()
        lt.run(sim.stop(shutdown_event=False))
        lt.close()
    out = lab.pbx.run("nft", "list", "set", "inet", "tm4", "ban4").stdout
    assert "203.0.113.9" in out

    runner = CliRunner()
    bans = runner.invoke(cli, ["--config", str(cfg_path), "bans"])
    assert bans.exit_code == 0, bans.output
    assert "203.0.113.9" in bans.output and "InvalidAccountID: 5 failed attempts" in bans.output
    bans_json = json.loads(runner.invoke(cli, ["--config", str(cfg_path), "bans", "--json"]).output)
    assert bans_json[0]["address"] == "203.0.113.9" and bans_json[0]["expires"]
    log = runner.invoke(cli, ["--config", str(cfg_path), "log", "--subject", "203.0.113.9"])
    assert log.exit_code == 0
    assert "block" in log.output and "guard" in log.output and "ami:InvalidAccountID x5" in log.output


def test_replay_prints_verdicts_and_decisions(tmp_path: Path) -> None:
    cfg = tmp_path / "tm4.toml"
    cfg.write_text(f'state_dir = "{tmp_path}"\n[guard]\nfailures = 2\n')
    r = CliRunner().invoke(cli, ["--config", str(cfg), "guard", "replay", "--json",
                                 str(SAMPLES / "InvalidTransport.ami")])
    assert r.exit_code == 0, r.output
    (rec,) = [json.loads(ln) for ln in r.output.splitlines()]
    assert rec["event"] == "InvalidTransport" and rec["verdict"] == "failure"
    assert rec["remote"] == "IPV6/UDP/2001:db8::5/5060"
    two = tmp_path / "two.ami"
    data = (SAMPLES / "MemoryLimit.ami").read_bytes()
    two.write_bytes(data + data.replace(b"IAX2/203.0.113.21:4569-1", b"IAX2/203.0.113.21:4569-2"))
    r = CliRunner().invoke(cli, ["--config", str(cfg), "guard", "replay", str(two)])
    assert r.exit_code == 0, r.output
    assert "-> ban 203.0.113.21 1h MemoryLimit: 2 failed attempts" in r.output
