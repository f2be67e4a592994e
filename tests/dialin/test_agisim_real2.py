"""The simulator against the real2 dial-in capture: keys typed ahead.

Call 2 of the capture is the bug of issue 11 item 7: the caller typed
`192*0*2*80#1` in one go; GET DATA stopped at `#`, the `1` fell into
`STREAM FILE tm4/you-entered ""` (no escape digits), was read and dropped, and
the confirm question timed out. The simulator must do exactly that with the
same commands, and must tie each key to the same command the AMI events do.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from agisim import Caller, Capture, Channel, Line, channel_for_capture, load_streams, replay

FIX = Path(__file__).parent.parent / "fixtures" / "dialin" / "real2"
CALLERS = {  # what the capture's SendDTMF() typed; None: nothing at that question (timeout)
    1: ["31415926#", "192*0*2*77#", "1"],
    2: ["31415926#", "192*0*2*80#1", None],
}


def _capture(n: int) -> Capture:
    base = FIX / f"dialin_fastagi_real.call{n}"
    return load_streams(Path(f"{base}.asterisk_to_agi.raw").read_bytes(),
                        Path(f"{base}.agi_to_asterisk.raw").read_bytes())


def _without_final_hangups(exchanges: list[tuple[str, list[str]]]) -> list[tuple[str, list[str]]]:
    """HANGUP lines after the last reply come when the caller's half hangs up after tm4 is done
    (call 1) or twice around the last reply (call 2): timing the simulator does not model."""
    *head, (cmd, lines) = exchanges
    while lines and lines[-1] == "HANGUP":
        lines = lines[:-1]
    return [*head, (cmd, lines)]


@pytest.mark.parametrize("n", [1, 2])
def test_replay_real2_calls(n: int) -> None:
    cap = _capture(n)
    ch = channel_for_capture(cap, Caller(keys=list(CALLERS[n])))
    assert ch.env_lines() == cap.env
    got = replay(cap, ch)
    assert got == _without_final_hangups(cap.exchanges)


def test_call2_shows_the_dropped_key() -> None:
    cap = _capture(2)
    ch = channel_for_capture(cap, Caller(keys=list(CALLERS[2])))
    replay(cap, ch)
    assert ch.dropped == ["1"] and ch.escaped == []
    first = {}
    for cmd, lines in cap.exchanges:
        first.setdefault(cmd, lines)
    assert first['STREAM FILE tm4/you-entered ""'] == ["200 result=0 endpos=9158"], "played to its end"
    assert first["GET DATA tm4/confirm 10000 1"] == ["200 result= (timeout)"]


def _ami_events(raw: bytes) -> list[dict[str, str]]:
    out = []
    for block in raw.decode().split("\r\n\r\n"):
        fields = dict(ln.split(": ", 1) for ln in block.split("\r\n") if ": " in ln)
        if "Event" in fields:
            out.append(fields)
    return out


def _keys_per_command(channel: str) -> list[tuple[str, str]]:
    """(command, keys that ended during it) for one AGI channel, from the AMI events' order."""
    running = ""
    out: list[tuple[str, str]] = []
    for ev in _ami_events((FIX / "dialin_fastagi_real.ami.raw").read_bytes()):
        if ev.get("Channel") != channel:
            continue
        if ev["Event"] == "AGIExecStart":
            running = ev["Command"]
            out.append((running, ""))
        elif ev["Event"] == "DTMFEnd":
            out[-1] = (out[-1][0], out[-1][1] + ev["Digit"])
    return out


def test_the_ami_events_tie_each_key_to_the_command_the_simulator_gives_it() -> None:
    """What the simulator claims about keys is what Asterisk's own event order shows."""
    real = _keys_per_command("Local/s@e2e-caller-typeahead-00000001;1")
    assert ('STREAM FILE tm4/you-entered ""', "1") in real  # the key typed ahead fell here
    assert ("GET DATA tm4/enter-address 10000 16", "192*0*2*80#") in real
    cap = _capture(2)
    ch = channel_for_capture(cap, Caller(keys=list(CALLERS[2])))
    sim: list[tuple[str, str]] = []
    for cmd, _ in cap.exchanges:
        before = len(ch.dropped) + len(ch.escaped)
        pending = ch._ahead  # keys already typed that this command will read
        lines = ch.handle(cmd)
        if cmd.startswith("GET DATA") and lines[0].startswith("200 result=") and "-1" not in lines[0]:
            typed = lines[0].removeprefix("200 result=").split(" ")[0]
            sim.append((cmd, typed + ("#" if " (timeout)" not in lines[0] else "")))
        else:
            sim.append((cmd, pending[:len(ch.dropped) + len(ch.escaped) - before]))
    assert [(c, k) for c, k in real if k] == [(c, k) for c, k in sim if k]


def test_escape_digits_stop_the_prompt_with_the_key_code() -> None:
    """res_agi.c: `200 result=%d endpos=%ld` with the key's character code (file.c returns it)."""
    ch = Channel(Line(), Caller(keys=["1#2", "#*", "#9"]))
    assert ch.handle("GET DATA beep 3000 20") == ["200 result=1"]
    assert ch.handle('STREAM FILE beep "12"') == ["200 result=50 endpos=800"]
    assert ch.handle('STREAM FILE beep "12"') == ["200 result=0 endpos=1600"], "nothing left to type"
    assert ch.handle("GET DATA beep 3000 20") == ["200 result="]
    assert ch.handle('SAY ALPHA 1.2.3.4 "12"') == ["200 result=0"], "* is not an escape digit: dropped"
    assert ch.dropped == ["*"]
    assert ch.handle("GET DATA beep 3000 20") == ["200 result="]
    assert ch.handle("WAIT FOR DIGIT 1000") == ["200 result=57"]
    assert ch.handle("WAIT FOR DIGIT 1000") == ["200 result=0"]
    assert ch.escaped == ["2", "9"]


def test_keys_after_max_digits_are_typed_ahead() -> None:
    ch = Channel(Line(), Caller(keys=["1" * 18 + "#"]))
    assert ch.handle("GET DATA beep 3000 16") == ["200 result=" + "1" * 16]
    assert ch.handle('STREAM FILE no-such-file "1"') == ["200 result=-1 endpos=0"], "nothing read"
    assert ch.handle("GET DATA beep 3000 16") == ["200 result=11"]
