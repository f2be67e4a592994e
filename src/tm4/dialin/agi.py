"""AGI transports for the dial-in conversation: classic AGI (stdin/stdout) here,
FastAGI (panoramisk, TCP) in tm4.dialin.fastagi; the AGI commands for each
action and the reading of Asterisk's replies are shared.

What real Asterisk 22 does, and how it is handled (see tests/fixtures/agi/):
- Replies are one line, `200 result=<r>[ (<data>)][ endpos=<n>]`; only a 520
  usage error spans lines (`520-...` up to `520 End of proper usage.`).
- GET DATA returns the digits without the `#`; `200 result= (timeout)` when
  nothing came, `200 result=12 (timeout)` when the caller stopped typing.
- Hang-up, classic AGI: SIGHUP arrives, the running command answers
  `200 result=-1`, later channel commands `511 Command Not Permitted on a dead
  channel`; end of input and a broken pipe are hang-ups too.
- Hang-up, FastAGI: an unsolicited `HANGUP` line arrives after the interrupted
  command's `200 result=-1`, i.e. as the first line read for the NEXT command;
  it is skipped so replies stay in step (tm4.dialin.fastagi).
- A missing sound file answers STREAM FILE with `200 result=-1 endpos=0`; that
  is not a hang-up (the next command would tell).
- A key pressed during STREAM FILE or SAY ALPHA without escape digits is read
  and dropped (real2 capture); with escape digits the first one stops the
  prompt and `result=` is its character code (`200 result=49 endpos=4000` for
  1; res_agi.c, file.c). WAIT FOR DIGIT answers the same way, 0 for no key.
- Anything else (a line with no code, a cut or huge line, bytes that are not
  text, a result that is no key) is a protocol error: the call ends as a hang-up.

pyst2 is not used: its reader raises ValueError on a line without a code and
loops forever on a cut usage block, and it costs import time before ANSWER.
"""

from __future__ import annotations

import contextlib
import logging
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


_REPLY_RE = re.compile(r"(\d{3})(?:[ -](.*))?")
_RESULT_RE = re.compile(r"result=(\S*)(?:\s+\((.*)\))?(?:\s+endpos=(-?\d+))?")


def parse_reply(line: str) -> AgiReply:
    text = line.rstrip("\r\n")
    m = _REPLY_RE.fullmatch(text)
    if not m:
        return AgiReply(0, line=text)
    code, rest = int(m.group(1)), m.group(2) or ""
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


KEYPAD = "0123456789*#ABCD"  # DTMF keys; GET DATA hands over any of them


def _key(reply: AgiReply, keys: str) -> str:
    """The key a STREAM FILE / SAY ALPHA / WAIT FOR DIGIT reply names: '' for none (result=0)."""
    _check(reply)
    if reply.result == "0":
        return ""
    if not reply.result.isdigit() or not 0 < int(reply.result) < 128 or chr(int(reply.result)) not in keys:
        raise AgiProtocolError(f"no key in {reply.line!r}")
    return chr(int(reply.result))


def _escape(keys: str) -> str:
    if any(k not in KEYPAD for k in keys):
        raise AgiProtocolError(f"refusing escape digits {keys!r}")
    return f'"{keys}"'


def _stream(name: str, keys: str = "") -> Generator[str, AgiReply, str]:
    """Play one sound; the escape digit that stopped it, if any."""
    reply = yield f"STREAM FILE {_safe_name(name)} {_escape(keys)}"
    if reply.code == 200 and reply.result == "-1" and reply.endpos == 0:
        log.warning("event=sound_missing file=%s", name)
        return ""
    if keys:
        return _key(reply, keys)
    _check(reply)
    return ""


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
            key = yield from _stream(p, action.keys)
            if key:
                return Done(key)
        return Done()
    if isinstance(action, Ask):
        if action.first:
            reply = yield from _rest_of(action)
            return reply
        r = _check((yield f"GET DATA {_safe_name(action.prompt)} {int(action.timeout_ms)} {int(action.max_digits)}"))
        keys = r.result
        if any(k not in KEYPAD for k in keys):
            raise AgiProtocolError(f"GET DATA answered {r.line!r}")
        if not keys:
            return NoInput()
        return Digits(keys, timed_out=r.data == "timeout")
    if isinstance(action, SayAddress):
        path = None
        if speech is not None and speech.enabled:
            path = speech.render(speech.sentence(action.prefix, action.address))
        if path:
            key = yield from _stream(path, action.keys)
        else:
            key = yield from _stream(action.prefix, action.keys)
            if not key:
                r = yield f"SAY ALPHA {_say_text(action.address)} {_escape(action.keys)}"
                key = _key(r, action.keys) if action.keys else ""
                _check(r)
        return Done(key)
    if isinstance(action, Pause):
        yield from _pause(action.seconds)
        return Done()
    raise AgiProtocolError(f"not a channel action: {action!r}")


def _rest_of(action: Ask) -> Generator[str, AgiReply, Reply]:
    """The question whose first key came during the prompt before: the rest, key by key, as
    GET DATA would (up to max digits, `#` ends, the timeout runs between keys), no prompt."""
    got = action.first
    if got.endswith("#"):
        got = got[:-1]
        return Digits(got) if got else NoInput()
    while len(got) < action.max_digits:
        key = _key((yield f"WAIT FOR DIGIT {int(action.timeout_ms)}"), KEYPAD)
        if key == "":
            return Digits(got, timed_out=True)
        if key == "#":
            return Digits(got)
        got += key
    return Digits(got)


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
        r = _check((yield f"WAIT FOR DIGIT {min(left, 5000)}"))  # a key pressed now is dropped
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


def outcome_line(out: Outcome, why: str = "") -> str:
    """One line for the logs; `why` (how the line ended) is escaped, as it may quote Asterisk."""
    return (f"tm4 dial-in: {out.status} tries={out.passcode_tries}"
            + (f" entry={out.entry} address={out.address}" if out.entry else "")
            + (f" typed_ahead={out.typed_ahead}" if out.typed_ahead else "")
            + (f" ({why.encode('unicode_escape').decode('ascii')})" if why else ""))


# -- reading Asterisk's replies (both transports) ----------------------------------------

MAX_LINE = 65536  # longer than any reply tm4's commands get; longer is a protocol error
MAX_EXTRA_LINES = 64  # "100 Trying" lines and a 520 usage block


class LineState:
    """What a transport has learnt about the channel between commands."""

    def __init__(self) -> None:
        self.hangup_seen = False  # FastAGI's unsolicited HANGUP line, classic AGI's SIGHUP
        self.ended = ""  # why the call ended on the AGI side (for the outcome line)


def read_reply(state: LineState, dead_ok: bool = False) -> Generator[None, str, AgiReply]:
    """The reply to one command from the lines sent in: skips HANGUP lines and "100 Trying",
    swallows a 520 usage block; raises AgiHangup for a dead channel, AgiProtocolError for
    anything that is not a reply."""
    extra = 0

    def more() -> Generator[None, str, str]:
        nonlocal extra
        while True:
            line = yield
            if line != "HANGUP":  # unsolicited, around the reply to the interrupted command
                return line
            state.hangup_seen = True
            extra += 1
            if extra > MAX_EXTRA_LINES:
                raise AgiProtocolError("too many HANGUP lines")

    reply = parse_reply((yield from more()))
    while reply.code == 100:  # "100 result=0 Trying..."
        extra += 1
        if extra > MAX_EXTRA_LINES:
            raise AgiProtocolError("too many interim replies")
        reply = parse_reply((yield from more()))
    if reply.code == 520 and reply.line.startswith("520-"):
        while not (yield from more()).startswith("520 "):
            extra += 1
            if extra > MAX_EXTRA_LINES:
                raise AgiProtocolError("a usage block that does not end")
    if reply.code == 0:
        raise AgiProtocolError(f"not an AGI reply: {reply.line[:200]!r}")
    if reply.code == 511 or (state.hangup_seen and not dead_ok):
        raise AgiHangup("dead channel")
    if reply.code in (510, 520):
        raise AgiProtocolError(f"Asterisk refused the command: {reply.line[:200]!r}")
    return reply


def decode_line(raw: bytes) -> str:
    """One line as read (with its newline); end of input or a cut line is a hang-up."""
    if not raw:
        raise AgiHangup("end of input")
    if not raw.endswith(b"\n"):
        if len(raw) >= MAX_LINE:
            raise AgiProtocolError(f"a line over {MAX_LINE} bytes")
        raise AgiHangup("input ended inside a line")
    return raw.decode("utf-8", "replace").rstrip("\r\n")


def env_entry(text: str) -> tuple[str, str] | None:
    """`agi_key: value` -> (key, value); None for anything else."""
    key, sep, value = text.partition(":")
    if not sep or not key.startswith("agi_"):
        return None
    return key.strip(), value[1:] if value.startswith(" ") else value


MAX_ENV_LINES = 128


# -- classic AGI ------------------------------------------------------------------------

def _unbuffered_stdout() -> IO[bytes]:
    """fd 1 without a buffer: a command Asterisk no longer reads is not left to fail again at exit."""
    try:
        return open(sys.stdout.fileno(), "wb", buffering=0, closefd=False)  # noqa: SIM115
    except (OSError, ValueError):  # no file descriptor (stdout replaced in-process)
        return sys.stdout.buffer


class ClassicTransport:
    """AGI on stdin/stdout: reads the environment, notes SIGHUP, sends commands."""

    def __init__(self, stdin: IO[bytes] | None = None, stdout: IO[bytes] | None = None, *,
                 sighup: bool = True):
        self._in = stdin if stdin is not None else sys.stdin.buffer
        self._out = stdout if stdout is not None else _unbuffered_stdout()
        self.state = LineState()
        if sighup:
            import signal

            signal.signal(signal.SIGHUP, self._on_sighup)
        self.env = self._read_env()

    def _on_sighup(self, signum: int, frame: Any) -> None:
        self.state.hangup_seen = True

    def _line(self) -> str:
        try:
            raw = self._in.readline(MAX_LINE)
        except (OSError, ValueError) as exc:
            raise AgiHangup(f"AGI input closed: {exc}") from None
        return decode_line(raw)

    def _read_env(self) -> dict[str, str]:
        env: dict[str, str] = {}
        for _ in range(MAX_ENV_LINES):
            text = self._line()
            if text == "":
                return env
            entry = env_entry(text)
            if entry is None:
                raise AgiProtocolError(f"not an AGI environment line: {text[:200]!r}")
            env[entry[0]] = entry[1]
        raise AgiProtocolError("the AGI environment does not end")

    def command(self, text: str, dead_ok: bool = False) -> AgiReply:
        if self.state.hangup_seen and not dead_ok:
            raise AgiHangup("SIGHUP: the caller hung up")
        try:
            data = memoryview(text.encode() + b"\n")
            while data:
                n = self._out.write(data)
                if not n:
                    raise AgiHangup("the AGI pipe takes nothing more")
                data = data[n:]
            self._out.flush()
        except (OSError, ValueError) as exc:  # broken pipe: Asterisk is gone
            raise AgiHangup(f"AGI pipe closed: {exc}") from None
        return run(read_reply(self.state, dead_ok), lambda _: self._line())

    def close(self) -> None:
        pass


def pump(steps: Steps, command: Callable[[str], AgiReply], state: LineState | None = None) -> Reply:
    try:
        return run(steps, command)
    except AgiHangup as exc:
        if state is not None:
            state.ended = state.ended or str(exc)
        return HungUp()
    except AgiProtocolError as exc:  # end the call rather than talk out of step
        log.debug("event=agi_protocol_error reason=%r", str(exc))  # the outcome line says it
        if state is not None:
            state.ended = state.ended or f"protocol error: {exc}"
        return HungUp()


def drive(conv: Conversation, transport: Any, backend: Any) -> Outcome:
    """Run a whole call over a synchronous transport (command(text[, dead_ok]) -> AgiReply)."""
    speech = SpeechHolder()
    state: LineState | None = getattr(transport, "state", None)

    def perform(action: Action) -> Reply:
        if is_backend(action):
            reply = guarded(backend_call(backend, action))
            speech.update(reply)
            return reply
        return pump(channel_steps(action, transport.env, speech.speech), transport.command, state)

    out = run(conv, perform)
    with contextlib.suppress(Tm4Error):
        if state is not None:
            transport.command(f"VERBOSE {quote(outcome_line(out))} 1", dead_ok=True)
        else:
            transport.command(f"VERBOSE {quote(outcome_line(out))} 1")
    return out


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever sys.stderr is when a line is logged."""

    @property  # type: ignore[override]
    def stream(self) -> IO[str]:
        return sys.stderr

    @stream.setter
    def stream(self, value: IO[str]) -> None:
        pass


def _stderr_log() -> None:
    """One line per event on stderr, which a classic AGI shares with Asterisk: caller ID
    and AGI text are escaped, so they cannot forge a line in Asterisk's log."""
    from tm4.core.text import install_log_escaping

    install_log_escaping()
    if not log.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("tm4-dialin.agi[%(process)d]: %(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False


def main_classic(argv: list[str] | None = None) -> int:
    """agi-bin/tm4-dialin.agi: AGI(tm4-dialin.agi[,/run/tm4/tm4.sock]).

    A hang-up, end of input or anything Asterisk sends that is not AGI ends the call
    cleanly (exit 0) with one line on stderr; 1 only when the grant itself failed."""
    _stderr_log()
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        transport = ClassicTransport()
    except (AgiHangup, AgiProtocolError) as exc:
        log.info("tm4 dial-in: hangup tries=0 (%s)", str(exc).encode("unicode_escape").decode("ascii"))
        return 0
    from tm4.dialin.client import LazyBackend, connect

    socket_path = args[0] if args else transport.env.get("agi_arg_1", "")
    backend = LazyBackend(lambda: connect(socket_path))
    try:
        out = drive(conversation(), transport, backend)
    except Exception as exc:  # a bug: still one line, and the call ends
        log.error("tm4 dial-in: error (internal: %r)", exc)
        return 1
    finally:
        transport.close()
    log.info("%s", outcome_line(out, transport.state.ended))
    return 0 if out.status != "error" else 1
