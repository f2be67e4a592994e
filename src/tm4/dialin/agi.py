"""AGI transports for the dial-in conversation: classic AGI (pyst2, stdin/stdout)
here, FastAGI (panoramisk, TCP) in tm4.dialin.fastagi; the AGI commands for each
action are shared.

What real Asterisk 22 does, and how it is handled (see tests/fixtures/agi/):
- Replies are one line, `200 result=<r>[ (<data>)][ endpos=<n>]`; only a 520
  usage error spans lines (`520-...` up to `520 End of proper usage.`).
- GET DATA returns the digits without the `#`; `200 result= (timeout)` when
  nothing came, `200 result=12 (timeout)` when the caller stopped typing.
- Hang-up, classic AGI: SIGHUP arrives, the running command answers
  `200 result=-1`, later channel commands `511 Command Not Permitted on a dead
  channel`. pyst2 raises AGIUnknownError for that 511, not a hang-up: it is
  treated as one, and so is end of input and a broken pipe.
- Hang-up, FastAGI: an unsolicited `HANGUP` line arrives after the interrupted
  command's `200 result=-1`, i.e. as the first line read for the NEXT command;
  it is skipped so replies stay in step (tm4.dialin.fastagi).
- A missing sound file answers STREAM FILE with `200 result=-1 endpos=0`; that
  is not a hang-up (the next command would tell).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import IO, Any, Protocol

from tm4.core.errors import Tm4Error
from tm4.dialin.call import (
    Action,
    Answer,
    Ask,
    CallInfo,
    CheckAddress,
    Conversation,
    Digits,
    Done,
    ExternalAddress,
    Failed,
    Grant,
    HungUp,
    Identify,
    NoInput,
    Outcome,
    Pause,
    Play,
    Reply,
    SayAddress,
    Session,
    Verify,
    conversation,
    run,
)

log = logging.getLogger("tm4.agi")


class AgiHangup(Tm4Error):
    """The channel is gone (SIGHUP, 511, HANGUP line, -1 result, end of input)."""


class AgiProtocolError(Tm4Error):
    """Asterisk refused a command as unknown or malformed (a bug in tm4)."""


@dataclass(frozen=True)
class AgiReply:
    code: int
    result: str = ""
    data: str = ""
    endpos: int | None = None
    line: str = ""


_REPLY_RE = re.compile(r"(\d{3})[ -]?(.*)")
_RESULT_RE = re.compile(r"result=(\S*)(?:\s+\((.*)\))?(?:\s+endpos=(-?\d+))?")


def parse_reply(line: str) -> AgiReply:
    text = line.rstrip("\r\n")
    m = _REPLY_RE.fullmatch(text)
    if not m:
        return AgiReply(0, line=text)
    code, rest = int(m.group(1)), m.group(2)
    r = _RESULT_RE.match(rest)
    if not r:
        return AgiReply(code, line=text)
    endpos = int(r.group(3)) if r.group(3) is not None else None
    return AgiReply(code, r.group(1), r.group(2) or "", endpos, text)


def quote(text: str) -> str:
    """An AGI argument: Asterisk splits on blanks and honours double quotes and backslashes."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _safe_name(name: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_/.\-]+", name):
        raise AgiProtocolError(f"refusing to send sound name {name!r}")
    return name


# -- the AGI commands for each channel action ----------------------------------------

Steps = Generator[str, AgiReply, Reply]


class SpeechLike(Protocol):
    @property
    def enabled(self) -> bool: ...

    def sentence(self, prefix: str, address: str) -> str: ...

    def render(self, text: str) -> str | None: ...


def _check(reply: AgiReply) -> AgiReply:
    if reply.code != 200:
        raise AgiProtocolError(f"Asterisk answered {reply.line!r}")
    if reply.result == "-1":
        raise AgiHangup("the command was interrupted (-1)")
    return reply


def _stream(name: str) -> Generator[str, AgiReply, None]:
    reply = yield f'STREAM FILE {_safe_name(name)} ""'
    if reply.code == 200 and reply.result == "-1" and reply.endpos == 0:
        log.warning("event=sound_missing file=%s", name)
        return
    _check(reply)


def channel_steps(action: Action, env: dict[str, str], speech: SpeechLike | None) -> Steps:
    """AGI commands for one channel action; the reply for the conversation."""
    if isinstance(action, Answer):
        _check((yield "ANSWER"))
        return Done()
    if isinstance(action, Identify):
        info = yield from _identify(env)
        return info
    if isinstance(action, Play):
        for p in action.prompts:
            yield from _stream(p)
        return Done()
    if isinstance(action, Ask):
        r = _check((yield f"GET DATA {_safe_name(action.prompt)} {int(action.timeout_ms)} {int(action.max_digits)}"))
        keys = r.result
        if not keys:
            return NoInput()
        return Digits(keys, timed_out=r.data == "timeout")
    if isinstance(action, SayAddress):
        path = None
        if speech is not None and speech.enabled:
            path = speech.render(speech.sentence(action.prefix, action.address))
        if path:
            yield from _stream(path)
        else:
            yield from _stream(action.prefix)
            _check((yield f"SAY ALPHA {_say_text(action.address)} \"\""))
        return Done()
    if isinstance(action, Pause):
        yield from _pause(action.seconds)
        return Done()
    raise AgiProtocolError(f"not a channel action: {action!r}")


def _say_text(address: str) -> str:
    if not re.fullmatch(r"[0-9A-Za-z.:\-]+", address):
        raise AgiProtocolError(f"refusing to say {address!r}")
    return address


def _identify(env: dict[str, str]) -> Generator[str, AgiReply, CallInfo]:
    callerid = env.get("agi_callerid", "")
    if callerid.lower() == "unknown":
        callerid = ""
    kind = env.get("agi_type", "")
    endpoint = remote = ""
    if kind.upper() == "PJSIP":
        r = yield "GET VARIABLE CHANNEL(endpoint)"
        endpoint = r.data if r.code == 200 and r.result == "1" else _endpoint_from(env.get("agi_channel", ""))
        r = yield "GET VARIABLE CHANNEL(pjsip,remote_addr)"
        remote = r.data if r.code == 200 and r.result == "1" else ""
    return CallInfo(callerid=callerid, channel_type=kind, endpoint=endpoint, remote_addr=remote)


def _endpoint_from(channel: str) -> str:
    """'PJSIP/anonymous-0000001a' -> 'anonymous'."""
    m = re.fullmatch(r"PJSIP/(.+)-[0-9a-f]{8}", channel)
    return m.group(1) if m else ""


def _pause(seconds: float) -> Generator[str, AgiReply, None]:
    """Wait on the line (keys pressed meanwhile are ignored), noticing a hang-up."""
    left = int(seconds * 1000)
    while left > 0:
        started = time.monotonic()
        r = _check((yield f"WAIT FOR DIGIT {min(left, 5000)}"))
        # result 0: the full wait passed; a digit: it ended early, count the real time
        left -= min(left, 5000) if r.result == "0" else int((time.monotonic() - started) * 1000) + 1


# -- backend actions --------------------------------------------------------------------

def backend_call(backend: Any, action: Action) -> Callable[[], Reply]:
    """A thunk that runs one backend action (so FastAGI can run it where it likes)."""
    if isinstance(action, Verify):
        return lambda: backend.verify(action.passcode, action.call)
    if isinstance(action, CheckAddress):
        return lambda: backend.check_address(action.token, action.address)
    if isinstance(action, Grant):
        return lambda: backend.grant(action.token, action.address, action.callerid)
    if isinstance(action, ExternalAddress):
        return lambda: backend.external_address()
    raise AgiProtocolError(f"not a backend action: {action!r}")


def is_backend(action: Action) -> bool:
    return isinstance(action, Verify | CheckAddress | Grant | ExternalAddress)


def guarded(thunk: Callable[[], Reply]) -> Reply:
    """A backend call whose failure becomes a reply: the caller hears "unavailable", not silence."""
    try:
        return thunk()
    except (Tm4Error, OSError) as exc:
        log.error("event=dialin_backend_failed reason=%s", exc)
        return Failed(str(exc))
    except Exception as exc:  # a bug below us must not leave a caller in dead air
        log.exception("event=dialin_backend_crashed")
        return Failed(f"internal error: {exc!r}")


class SpeechHolder:
    """The speech settings arrive with the verdict on the passcode."""

    def __init__(self) -> None:
        self.speech: SpeechLike | None = None

    def update(self, reply: Reply) -> None:
        if isinstance(reply, Session) and reply.ok and reply.tts:
            from tm4.dialin.tts import Speech

            self.speech = Speech(reply.tts, reply.tts_cache)


def outcome_line(out: Outcome) -> str:
    return (f"tm4 dial-in: {out.status} tries={out.passcode_tries}"
            + (f" entry={out.entry} address={out.address}" if out.entry else ""))


# -- classic AGI (pyst2) --------------------------------------------------------------

class _Recorder:
    """stdin for pyst2 that remembers the last line, so endpos and (timeout) are not lost."""

    def __init__(self, stream: IO[str]):
        self.stream = stream
        self.last = ""

    def readline(self) -> str:
        self.last = self.stream.readline()
        return self.last


class ClassicTransport:
    """pyst2's AGI: it reads the environment, installs the SIGHUP handler and sends commands."""

    def __init__(self, stdin: IO[str] | None = None, stdout: IO[str] | None = None):
        from asterisk.agi import AGI

        self._devnull = open(os.devnull, "w")  # noqa: SIM115 - pyst2 chatters on stderr
        self._in = _Recorder(stdin or sys.stdin)
        self.agi = AGI(stdin=self._in, stdout=stdout or sys.stdout, stderr=self._devnull)
        self.env: dict[str, str] = dict(self.agi.env)

    def command(self, text: str) -> AgiReply:
        from asterisk import agi as pyst

        try:
            self.agi.execute(text)
        except pyst.AGIHangup as exc:  # SIGHUP, SIGPIPE, (hangup) data
            raise AgiHangup(str(exc)) from None
        except pyst.AGIAppError:  # result=-1: a hang-up, or a missing sound file
            return parse_reply(self._in.last)
        except pyst.AGIUnknownError as exc:  # 511 on a dead channel, or end of input
            raise AgiHangup(f"dead channel: {exc}") from None
        except (pyst.AGIUsageError, pyst.AGIInvalidCommand) as exc:
            raise AgiProtocolError(f"Asterisk refused {text!r}: {exc}") from None
        except OSError as exc:
            raise AgiHangup(f"AGI pipe closed: {exc}") from None
        return parse_reply(self._in.last)

    def close(self) -> None:
        self._devnull.close()


def pump(steps: Steps, command: Callable[[str], AgiReply]) -> Reply:
    try:
        return run(steps, command)
    except AgiHangup:
        return HungUp()
    except AgiProtocolError as exc:  # a bug: end the call rather than talk out of step
        log.error("event=agi_protocol_error reason=%s", exc)
        return HungUp()


def drive(conv: Conversation, transport: ClassicTransport, backend: Any) -> Outcome:
    """Run a whole call over a synchronous transport."""
    speech = SpeechHolder()

    def perform(action: Action) -> Reply:
        if is_backend(action):
            reply = guarded(backend_call(backend, action))
            speech.update(reply)
            return reply
        return pump(channel_steps(action, transport.env, speech.speech), transport.command)

    out = run(conv, perform)
    with contextlib.suppress(Tm4Error):
        transport.command(f"VERBOSE {quote(outcome_line(out))} 1")
    return out


def main_classic(argv: list[str] | None = None) -> int:
    """agi-bin/tm4-dialin.agi: AGI(tm4-dialin.agi[,/run/tm4/tm4.sock])."""
    from tm4.dialin.client import LazyBackend, connect

    args = list(sys.argv[1:] if argv is None else argv)
    transport = ClassicTransport()
    socket_path = args[0] if args else transport.env.get("agi_arg_1", "")
    backend = LazyBackend(lambda: connect(socket_path))
    try:
        out = drive(conversation(), transport, backend)
    finally:
        transport.close()
    return 0 if out.status != "error" else 1
