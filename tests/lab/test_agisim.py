"""The AGI simulator replays the real Asterisk 22 captures byte for byte.

The captured scripts sent a fixed list of commands; sending the same ones to
the simulator must give exactly the lines Asterisk sent (and the SIGHUP, and
FastAGI's inline HANGUP line, at the same places) - in-process, over a child
process's stdin/stdout, and over TCP.
"""

from __future__ import annotations

import socket
import sys
import textwrap
import threading
from pathlib import Path

import pytest
from agisim import (
    Caller,
    Channel,
    Line,
    channel_for_capture,
    load_capture,
    python,
    replay,
    run_fastagi,
    run_stdio,
)

FIX = Path(__file__).parent.parent / "fixtures" / "agi"
KEYS = ["1234#", "203*0*113*7#"]  # what dtmf-sender's SendDTMF() typed (etc/extensions.conf)


def _caller(name: str) -> Caller:
    if name == "local_045147_13730.log":  # dtmf-sender-long: hangs up during the second tt-monkeys
        cap = load_capture(FIX / name)
        second = [i for i, (c, _) in enumerate(cap.exchanges) if c.startswith("STREAM FILE tt-monkeys")][1]
        return Caller(keys=list(KEYS), hangup_at=second)
    return Caller(keys=list(KEYS), hangup_on="SAY ALPHA")  # dtmf-sender: hangs up during SAY ALPHA


CAPTURES = ["local_045107_13574.log", "local_045147_13730.log", "fastagi_045148_13433.log"]


@pytest.mark.parametrize("name", CAPTURES)
def test_replay_in_process(name: str) -> None:
    cap = load_capture(FIX / name)
    ch = channel_for_capture(cap, _caller(name))
    assert ch.env_lines() == cap.env
    got = replay(cap, ch)
    assert len(got) == len(cap.exchanges) > 20
    for (cmd, expected), (_, lines) in zip(cap.exchanges, got, strict=True):
        assert lines == expected, cmd


def test_the_captures_show_what_the_simulator_claims() -> None:
    fast = load_capture(FIX / "fastagi_045148_13433.log")
    local = load_capture(FIX / "local_045107_13574.log")
    after = [got for _, got in fast.exchanges]
    i = next(i for i, (c, _) in enumerate(fast.exchanges) if c.startswith("SAY ALPHA"))
    assert after[i] == ["200 result=-1"] and after[i + 1][0] == "HANGUP"
    assert ["SIGHUP", "200 result=-1"] in [got for _, got in local.exchanges]
    assert fast.env[:2] == ["agi_network: yes", "agi_network_script: capture?x=1"]
    assert local.env[-1] == "" and fast.env[-1] == ""


CHILD = textwrap.dedent('''
    import re, signal, sys
    got = []
    signal.signal(signal.SIGHUP, lambda *a: got.append("SIGHUP"))
    while sys.stdin.readline().strip():
        pass
    out = []
    for cmd in sys.argv[1:]:
        sys.stdout.write(cmd + "\\n"); sys.stdout.flush()
        lines = []
        while True:
            line = sys.stdin.readline().rstrip("\\n")
            got.append(line)
            if re.match(r"\\d{3} ", line):
                break
        out.append(got[:]); got.clear()
    import json; sys.stderr.write(json.dumps(out))
''')


@pytest.mark.parametrize("name", ["local_045107_13574.log", "local_045147_13730.log"])
def test_replay_over_stdio_with_sighup(name: str) -> None:
    cap = load_capture(FIX / name)
    ch = channel_for_capture(cap, _caller(name))
    cmds = [c for c, _ in cap.exchanges]
    run = run_stdio([python(), "-c", CHILD, *cmds], ch)
    import json

    got = json.loads(run.stderr)
    assert run.returncode == 0
    assert [g for g in got] == [exp for _, exp in cap.exchanges]


def test_replay_over_tcp_with_inline_hangup() -> None:
    cap = load_capture(FIX / "fastagi_045148_13433.log")
    ch = channel_for_capture(cap, _caller("fastagi_045148_13433.log"))
    cmds = [c for c, _ in cap.exchanges]
    got: list[list[str]] = []
    env: list[str] = []
    srv = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = srv.accept()
        f = conn.makefile("rwb")
        while True:
            line = f.readline().decode().rstrip("\n")
            env.append(line)
            if not line:
                break
        for cmd in cmds:
            f.write(cmd.encode() + b"\n")
            f.flush()
            lines = []
            while True:
                line = f.readline().decode().rstrip("\n")
                lines.append(line)
                if line[:4].rstrip().isdigit() and line[3:4] == " ":
                    break
            got.append(lines)
        f.close()
        conn.close()

    t = threading.Thread(target=serve)
    t.start()
    run_fastagi("127.0.0.1", srv.getsockname()[1], ch, script="capture?x=1")
    t.join(10)
    srv.close()
    assert env[3:] == cap.env[3:]  # the first three name the host and port, which differ
    assert env[:2] == cap.env[:2]
    assert got == [exp for _, exp in cap.exchanges]


def test_get_data_edges_follow_res_agi() -> None:
    ch = Channel(Line(), Caller(keys=["12", None, "#", "1" * 16, "99#"]))  # keys after max digits: test_agisim_typeahead.py
    assert ch.handle("GET DATA beep 3000 20") == ["200 result=12 (timeout)"]
    assert ch.handle("GET DATA beep 3000 20") == ["200 result= (timeout)"]
    assert ch.handle("GET DATA beep 3000 20") == ["200 result="]
    assert ch.handle("GET DATA beep 3000 16") == ["200 result=" + "1" * 16]
    assert ch.handle('STREAM FILE no-such-file ""') == ["200 result=-1 endpos=0"]
    assert ch.handle("STREAM FILE beep") == ["520-Invalid command syntax.  Proper usage follows:",
                                            "Usage: STREAM FILE", "520 End of proper usage."]
    assert ch.handle("GET DATA beep 3000 20") == ["200 result=99"]
    # out of keys: the caller hangs up
    assert ch.handle("GET DATA beep 3000 20") == ["200 result=-1"]
    assert ch.handle('SAY ALPHA 1.2.3.4 ""') == ["511 Command Not Permitted on a dead channel or intercept routine"]
    assert ch.handle("VERBOSE \"still here\" 1") == ["200 result=1"]


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__]))
