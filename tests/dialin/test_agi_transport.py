"""The AGI plumbing on its own: reply parsing, FastAGI's inline HANGUP, commands per action."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tm4.dialin.agi import AgiHangup, AgiProtocolError, channel_steps, parse_reply, quote
from tm4.dialin.call import Answer, Ask, Digits, Done, NoInput, Pause, Play, SayAddress
from tm4.dialin.fastagi import FastAgiTransport, read_env


@pytest.mark.parametrize(("line", "code", "result", "data", "endpos"), [
    ("200 result=0", 200, "0", "", None),
    ("200 result=1234", 200, "1234", "", None),
    ("200 result=203*0*113*7", 200, "203*0*113*7", "", None),
    ("200 result= (timeout)", 200, "", "timeout", None),
    ("200 result=12 (timeout)", 200, "12", "timeout", None),
    ("200 result=1 (203011307)", 200, "1", "203011307", None),
    ('200 result=1 ("Lab Caller" <203011307>)', 200, "1", '"Lab Caller" <203011307>', None),
    ("200 result=0 endpos=11360", 200, "0", "", 11360),
    ("200 result=-1 endpos=0", 200, "-1", "", 0),
    ("200 result=", 200, "", "", None),
    ("511 Command Not Permitted on a dead channel or intercept routine", 511, "", "", None),
    ("510 Invalid or unknown command", 510, "", "", None),
    ("HANGUP", 0, "", "", None),
])
def test_parse_reply(line: str, code: int, result: str, data: str, endpos: int | None) -> None:
    r = parse_reply(line + "\n")
    assert (r.code, r.result, r.data, r.endpos) == (code, result, data, endpos)


def test_quote() -> None:
    assert quote('tm4 dial-in: "x" \\ y') == '"tm4 dial-in: \\"x\\" \\\\ y"'


def _transport(data: bytes) -> tuple[FastAgiTransport, list[bytes]]:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    sent: list[bytes] = []

    class Writer:
        def write(self, b: bytes) -> None:
            sent.append(b)

        async def drain(self) -> None:
            pass

    return FastAgiTransport(reader, Writer(), {}, reply_timeout=1.0), sent  # type: ignore[arg-type]


def test_inline_hangup_line_is_skipped_and_ends_the_call() -> None:
    async def go() -> None:
        t, sent = _transport(b"200 result=-1\nHANGUP\n511 Command Not Permitted on a dead channel\n")
        assert (await t.command('SAY ALPHA 1.2.3.4 ""')).result == "-1"
        with pytest.raises(AgiHangup):
            await t.command('STREAM FILE x ""')
        assert t.hangup_seen
        with pytest.raises(AgiHangup):  # nothing more is sent once the caller is gone
            await t.command("VERBOSE x 1")
        assert sent == [b'SAY ALPHA 1.2.3.4 ""\n', b'STREAM FILE x ""\n']

    asyncio.run(go())


def test_hangup_line_before_a_200_still_keeps_step() -> None:
    """panoramisk's one-line-per-command would take HANGUP as GET VARIABLE's reply; the 200 that
    follows would then answer the next command. Here both lines belong to this command."""
    async def go() -> None:
        t, _ = _transport(b"HANGUP\n200 result=1 (203011307)\n")
        with pytest.raises(AgiHangup):
            await t.command("GET VARIABLE CALLERID(num)")
        assert t.reader.at_eof()

    asyncio.run(go())


def test_usage_block_and_trying_and_eof() -> None:
    async def go() -> None:
        t, _ = _transport(b"100 result=0 Trying...\n200 result=0\n"
                          b"520-Invalid command syntax.  Proper usage follows:\nUsage\n520 End of proper usage.\n"
                          b"200 result=1\n")
        assert (await t.command("EXEC Wait 1")).code == 200
        with pytest.raises(AgiProtocolError):
            await t.command("GET DATA")
        assert (await t.command("VERBOSE x 1")).result == "1", "still in step after the usage block"
        with pytest.raises(AgiHangup):
            await t.command("ANSWER")  # end of stream

    asyncio.run(go())


def test_read_env_limits() -> None:
    async def env(data: bytes) -> dict[str, str] | None:
        r = asyncio.StreamReader()
        r.feed_data(data)
        r.feed_eof()
        return await read_env(r)

    assert asyncio.run(env(b"agi_network: yes\nagi_accountcode: \nagi_arg_1: a: b\n\n")) == {
        "agi_network": "yes", "agi_accountcode": "", "agi_arg_1": "a: b"}
    assert asyncio.run(env(b"")) is None
    assert asyncio.run(env(b"agi_network: yes\n")) is None
    assert asyncio.run(env(b"agi_network: ye")) is None
    assert asyncio.run(env(b"GET / HTTP/1.0\r\n\r\n")) is None
    assert asyncio.run(env(b"agi_x: y\n" * 200 + b"\n")) is None


def _steps(action: Any, replies: list[str], speech: Any = None) -> tuple[list[str], Any]:
    gen = channel_steps(action, {"agi_type": "Local"}, speech)
    sent = []
    try:
        cmd = next(gen)
        for line in replies:
            sent.append(cmd)
            cmd = gen.send(parse_reply(line))
        raise AssertionError(f"more commands than replies: {cmd}")
    except StopIteration as stop:
        return sent, stop.value


def test_commands_per_action() -> None:
    assert _steps(Answer(), ["200 result=0"]) == (["ANSWER"], Done())
    assert _steps(Ask("tm4/confirm", 1, 5000), ["200 result=1"]) == (["GET DATA tm4/confirm 5000 1"], Digits("1"))
    assert _steps(Ask("tm4/confirm", 1, 5000), ["200 result= (timeout)"])[1] == NoInput()
    assert _steps(Ask("tm4/x", 9, 5000), ["200 result=12 (timeout)"])[1] == Digits("12", timed_out=True)
    sent, reply = _steps(Play(("tm4/a", "tm4/b")), ["200 result=-1 endpos=0", "200 result=0 endpos=9"])
    assert sent == ['STREAM FILE tm4/a ""', 'STREAM FILE tm4/b ""'] and reply == Done(), "a missing file is skipped"
    sent, _ = _steps(SayAddress("tm4/you-entered", "203.0.113.7"), ["200 result=0 endpos=9", "200 result=0"])
    assert sent == ['STREAM FILE tm4/you-entered ""', 'SAY ALPHA 203.0.113.7 ""']
    sent, _ = _steps(Pause(12.0), ["200 result=0"] * 3)
    assert sent == ["WAIT FOR DIGIT 5000", "WAIT FOR DIGIT 5000", "WAIT FOR DIGIT 2000"]


def test_prompts_that_listen_carry_the_key() -> None:
    """STREAM FILE / SAY ALPHA with escape digits: `result=` is the key's character code."""
    sent, reply = _steps(Play(("tm4/a", "tm4/b"), "0123456789*#"), ["200 result=52 endpos=4000"])
    assert sent == ['STREAM FILE tm4/a "0123456789*#"'] and reply == Done("4"), "the rest is not played"
    sent, reply = _steps(Play(("tm4/a",), "12"), ["200 result=0 endpos=9158"])
    assert reply == Done()
    sent, reply = _steps(SayAddress("tm4/you-entered", "203.0.113.7", "12"),
                         ["200 result=0 endpos=9158", "200 result=50"])
    assert sent == ['STREAM FILE tm4/you-entered "12"', 'SAY ALPHA 203.0.113.7 "12"'] and reply == Done("2")
    sent, reply = _steps(SayAddress("tm4/you-entered", "203.0.113.7", "12"), ["200 result=49 endpos=100"])
    assert len(sent) == 1 and reply == Done("1"), "a key during the prefix skips the address"


def test_a_question_whose_first_key_came_early_reads_the_rest_key_by_key() -> None:
    assert _steps(Ask("tm4/confirm", 1, 5000, first="1"), []) == ([], Digits("1"))
    assert _steps(Ask("tm4/confirm", 1, 5000, first="#"), []) == ([], NoInput())
    sent, reply = _steps(Ask("tm4/enter-address", 16, 7000, first="2"),
                         ["200 result=48", "200 result=51", "200 result=35"])
    assert sent == ["WAIT FOR DIGIT 7000"] * 3 and reply == Digits("203")
    sent, reply = _steps(Ask("tm4/enter-passcode", 20, 7000, first="4"), ["200 result=56", "200 result=0"])
    assert reply == Digits("48", timed_out=True), "the timeout between keys ends it, as in GET DATA"
    sent, reply = _steps(Ask("tm4/x", 3, 7000, first="1"), ["200 result=50", "200 result=51"])
    assert reply == Digits("123") and len(sent) == 2, "stops at max digits"


def test_replies_that_are_no_key_are_protocol_errors() -> None:
    for line in ("200 result=7", "200 result=4294967345", "200 result=abc", "200 result=-49"):
        with pytest.raises((AgiProtocolError, AgiHangup)):
            _steps(Play(("tm4/a",), "12"), [line])
    with pytest.raises(AgiProtocolError):
        _steps(Ask("tm4/x", 9, 5000), ["200 result=12;rm"])


def test_hangup_and_refusals_raise() -> None:
    with pytest.raises(AgiHangup):
        _steps(Ask("tm4/confirm", 1, 5000), ["200 result=-1"])
    with pytest.raises(AgiHangup):
        _steps(Play(("tm4/a",)), ["200 result=-1 endpos=4000"])
    with pytest.raises(AgiProtocolError):
        _steps(Answer(), ["510 Invalid or unknown command"])
    with pytest.raises(AgiProtocolError):
        _steps(Play(("tm4/a b",)), [])
    with pytest.raises(AgiProtocolError):
        _steps(SayAddress("tm4/you-entered", '1" ; x'), ["200 result=0 endpos=9"])



def test_the_classic_agi_answers_before_heavy_imports() -> None:
    """Cold start: what `agi-bin/tm4-dialin.agi` imports before ANSWER stays small."""
    import subprocess
    import sys

    heavy = ("asyncio", "panoramisk", "asterisk", "tm4.ops.engine", "tm4.ops.control", "tm4.core.store", "sqlite3", "dns", "click")
    code = ("import sys, tm4.dialin.agi, tm4.dialin.client; "
            f"print(','.join(m for m in {heavy!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == ""
