"""Outside text never forges a line: a lone LF, a CR or an escape sequence inside an AMI
field reaches the ban reason, but the guard's log, `tm4 bans` and `tm4 log` show it escaped,
one line per record; an admin's note with a newline too. --json keeps the text as it is."""

from __future__ import annotations

import json
import logging
import signal
import subprocess
import sys
import time
from pathlib import Path

from amisim import AmiSimulator, LoopThread, address, render_event
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st
from netlab import Lab

from tm4.cli import cli
from tm4.core.config import load_config
from tm4.core.text import EscapedLogRecord, escape_control
from tm4.ops.engine import Core

HOSTILE = {
    "203.0.113.9": "alice\n2026-12-05 03:00:00,000 tm4.guard WARNING banned 198.51.100.1 for 1:00:00: forged",
    "203.0.113.10": "bob\rWARNING all is well",
    "203.0.113.11": "eve\x1b[2J\x1b[H",
}


def test_hostile_ami_fields_stay_one_escaped_line_everywhere(lab: Lab, tmp_path: Path) -> None:
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
        for n, (ip, account) in enumerate(HOSTILE.items()):
            for i in range(5):
                lt.soon(sim.emit, render_event("InvalidAccountID", AccountID=account, SessionID=f"{n}-{i}@x",
                                               RemoteAddress=address(ip, 5060)))
            line = json.loads(proc.stdout.readline())  # type: ignore[union-attr]
            assert line["action"] == "ban" and line["address"] == ip
            assert line["reason"].endswith(f"account {account}, offence 1")  # JSON carries it as it came
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(5) == 0
        log = proc.stderr.read()  # type: ignore[union-attr]
    finally:
        if proc.poll() is None:
            proc.kill()
        lt.run(sim.stop(shutdown_event=False))
        lt.close()
    banned = [ln for ln in log.splitlines() if " banned " in ln]
    assert len(banned) == 3, log  # the forged "banned 198.51.100.1" is not a line of its own
    assert all("\r" not in ln and "\x1b" not in ln for ln in log.splitlines()), log
    for ip, account in HOSTILE.items():
        (mine,) = [ln for ln in banned if f"banned {ip} " in ln]
        assert mine.endswith(f"account {escape_control(account)}, offence 1"), mine

    runner = CliRunner()
    note = "first line\nsecond line\x1b[31m red"
    add = runner.invoke(cli, ["--config", str(cfg_path), "add", "office", "192.0.2.7", "-s", "ssh", "--note", note])
    assert add.exit_code == 0, add.output
    bans = runner.invoke(cli, ["--config", str(cfg_path), "bans"])
    assert bans.exit_code == 0, bans.output
    assert len(bans.output.splitlines()) == 3 and "\x1b" not in bans.output and "\r" not in bans.output
    for ip, account in HOSTILE.items():
        (row,) = [ln for ln in bans.output.splitlines() if ln.startswith(f"{ip} ")]
        assert row.endswith(f"account {escape_control(account)}, offence 1"), row
    recs = json.loads(runner.invoke(cli, ["--config", str(cfg_path), "log", "-n", "100", "--json"]).output)
    assert any(r["detail"].get("note") == note for r in recs)  # stored as it came
    text = runner.invoke(cli, ["--config", str(cfg_path), "log", "-n", "100"])
    assert text.exit_code == 0
    assert len(text.output.splitlines()) == len(recs)  # one line per record
    assert "\x1b" not in text.output and "\r" not in text.output
    show = runner.invoke(cli, ["--config", str(cfg_path), "show", "office"])
    assert "first line\\nsecond line\\x1b[31m red" in show.output


@given(st.text())
def test_escaped_text_is_one_line_a_terminal_cannot_act_on(s: str) -> None:
    out = escape_control(s)
    assert len(out.splitlines()) <= 1 and "\x1b" not in out and "\x00" not in out
    assert all(ord(c) >= 0x20 and not 0x7f <= ord(c) <= 0x9f for c in out)
    assert escape_control(out) == out
    if s.isprintable():
        assert out == s or any(c in s for c in "\u2028\u2029\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def test_a_log_record_is_one_line_whatever_its_arguments() -> None:
    rec = EscapedLogRecord("tm4.guard", logging.WARNING, __file__, 1, "banned %s: %s",
                           ("203.0.113.9", "x\nWARNING forged\r\x1b[2J"), None)
    line = logging.Formatter("%(levelname)s %(name)s: %(message)s").format(rec)
    assert line == "WARNING tm4.guard: banned 203.0.113.9: x\\nWARNING forged\\r\\x1b[2J"
