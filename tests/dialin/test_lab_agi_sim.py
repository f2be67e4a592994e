"""The lab's FastAGI caller (tm4.lab.sim.agi) treats keys as tests/agisim.py does (real2 capture)."""

from __future__ import annotations

from agisim import Caller, Channel, Line

from tm4.lab.sim.agi import AgiCall, _agi_reply

COMMANDS = [
    "ANSWER",
    "GET DATA tm4/enter-passcode 10000 20",
    "GET DATA tm4/enter-address 10000 16",
    'STREAM FILE tm4/you-entered ""',  # the typed-ahead 1 falls here and is lost
    'SAY ALPHA 192.0.2.80 ""',
    "GET DATA tm4/confirm 10000 1",
    'STREAM FILE tm4/not-accepted "0123456789*#"',
    "WAIT FOR DIGIT 10000",
    "WAIT FOR DIGIT 10000",
    'SAY ALPHA 192.0.2.80 "12"',
    "GET DATA tm4/confirm 10000 1",
]
KEYS = ["31415926#", "192*0*2*80#1", "7#492"]


def _code(line: str) -> str:
    """What tm4 reads from a reply: result and data (endpos differs: the lab has no sound files)."""
    return line.split(" endpos=")[0]


def test_lab_caller_matches_the_test_simulator() -> None:
    ch = Channel(Line(), Caller(keys=list(KEYS)))
    lab_keys, ahead, call = list(KEYS), [""], AgiCall()
    for cmd in COMMANDS:
        want = ch.handle(cmd)[0]
        got = _agi_reply(cmd, lab_keys, ahead, call, "15550100")
        assert _code(got) == _code(want), cmd
    assert [_agi_reply(c, lab_keys, ahead, call, "1")[:15] for c in COMMANDS[7:9]] == ["200 result=0"] * 2
