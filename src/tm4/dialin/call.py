"""The dial-in call as a state machine, with no AGI and no firewall in it.

`conversation()` is a generator: it yields an Action (answer, play, ask for
digits, say an address, verify a passcode, grant...) and is sent back the
Reply (digits, no input, hung up, the verdict...). A transport (tm4.dialin.agi) turns
actions into AGI commands or backend calls; tests drive it with plain lists.

The call: passcode (3 tries) -> 1: the address the caller calls from (only for
direct SIP endpoints) / 2: enter an address (3 tries) -> read back -> 1 confirm
/ 2 re-enter -> grant (live in the kernel before "access granted") -> the
server's own address -> goodbye. A hang-up ends it at once, wherever it comes.
No prompt tells which part of a refused try was wrong.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import TypeVar

from tm4.dialin.dtmf import DtmfError, Reason, address_prompts, parse_keys_checked

# Prompt files under Asterisk's sounds/<language>/ (rendered from sounds/prompts.txt).
ENTER_PASSCODE = "tm4/enter-passcode"
NOT_ACCEPTED = "tm4/not-accepted"
MENU = "tm4/menu"
INVALID_CHOICE = "tm4/invalid-choice"
ENTER_ADDRESS = "tm4/enter-address"
YOU_ENTERED = "tm4/you-entered"
YOUR_ADDRESS = "tm4/your-address"
CONFIRM = "tm4/confirm"
ACCESS_GRANTED = "tm4/access-granted"
GRANT_FAILED = "tm4/grant-failed"
SERVER_ADDRESS = "tm4/server-address"
UNAVAILABLE = "tm4/unavailable"
GOODBYE = "tm4/goodbye"

PROMPTS = (
    ENTER_PASSCODE, NOT_ACCEPTED, MENU, INVALID_CHOICE, ENTER_ADDRESS, YOU_ENTERED, YOUR_ADDRESS,
    CONFIRM, ACCESS_GRANTED, GRANT_FAILED, SERVER_ADDRESS, UNAVAILABLE, GOODBYE,
    *sorted({p for r in Reason for p in address_prompts(r)}),
)


@dataclass(frozen=True)
class Settings:
    tries: int = 3
    passcode_digits: int = 20  # GET DATA stops there (passcodes have 6-20 digits)
    address_digits: int = 16  # one more than the longest address, so too long is seen
    timeout_ms: int = 10000  # time allowed between key presses


@dataclass(frozen=True)
class CallInfo:
    callerid: str = ""
    channel_type: str = ""  # agi_type: PJSIP, Local, IAX2...
    endpoint: str = ""  # CHANNEL(endpoint) for PJSIP
    remote_addr: str = ""  # CHANNEL(pjsip,remote_addr): '203.0.113.7:5060', '[2001:db8::7]:5060'


# -- actions (what the machine wants done) ---------------------------------------------

@dataclass(frozen=True)
class Answer:
    pass


@dataclass(frozen=True)
class Identify:
    """Find out who calls and over what (reply: CallInfo)."""


@dataclass(frozen=True)
class Play:
    prompts: tuple[str, ...]


@dataclass(frozen=True)
class Ask:
    prompt: str
    max_digits: int
    timeout_ms: int


@dataclass(frozen=True)
class SayAddress:
    prefix: str  # a prompt ("you entered"), then the address symbol by symbol
    address: str


@dataclass(frozen=True)
class Pause:
    seconds: float


@dataclass(frozen=True)
class Verify:
    passcode: str
    call: CallInfo


@dataclass(frozen=True)
class CheckAddress:
    token: str
    address: str


@dataclass(frozen=True)
class Grant:
    token: str
    address: str
    callerid: str


@dataclass(frozen=True)
class ExternalAddress:
    pass


Action = (Answer | Identify | Play | Ask | SayAddress | Pause | Verify | CheckAddress | Grant
          | ExternalAddress)


# -- replies ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Done:
    pass


@dataclass(frozen=True)
class Digits:
    text: str
    timed_out: bool = False


@dataclass(frozen=True)
class NoInput:
    """Nothing typed before the timeout, or only '#'."""


@dataclass(frozen=True)
class HungUp:
    pass


@dataclass(frozen=True)
class Failed:
    """The backend could not be asked (tm4d down, error)."""

    error: str


@dataclass(frozen=True)
class Session:
    """A verdict on a passcode. `token` proves it was right, for the grant."""

    ok: bool
    token: str = ""
    delay: float = 0.0
    own_address: str = ""  # offered as menu 1 when the call is direct from the caller's device
    reason: str = ""  # for logs only: wrong / refused / ...
    tts: str = ""  # speech engine for the read-back ("" = Asterisk's SAY ALPHA)
    tts_cache: str = ""


@dataclass(frozen=True)
class Checked:
    ok: bool
    reason: str = ""


@dataclass(frozen=True)
class Granted:
    name: str
    address: str


@dataclass(frozen=True)
class Found:
    address: str  # empty: unknown


Reply = Done | Digits | NoInput | HungUp | Failed | CallInfo | Session | Checked | Granted | Found


@dataclass
class Outcome:
    """How the call ended: for the log line and for tests."""

    status: str = "started"  # rejected / no-address / granted / hangup / unavailable / error
    owner_verified: bool = False
    address: str = ""
    entry: str = ""
    passcode_tries: int = 0
    heard: list[str] = field(default_factory=list)  # prompts played, in order


Conversation = Generator[Action, Reply, Outcome]


class _Ended(Exception):
    """The caller hung up."""


def conversation(settings: Settings | None = None) -> Conversation:
    s = settings or Settings()
    out = Outcome()
    try:
        yield from _do(Answer(), out)
        call = yield from _do(Identify(), out)
        if not isinstance(call, CallInfo):
            call = CallInfo()
        session = yield from _passcode(call, s, out)
        if session is None:
            yield from _play(out, GOODBYE)
            return out
        out.owner_verified = True
        address = yield from _address(session, s, out)
        if address is None:
            out.status = "no-address"
            yield from _play(out, GOODBYE)
            return out
        granted = yield from _do(Grant(session.token, address, call.callerid), out)
        if not isinstance(granted, Granted):
            out.status = "error"
            yield from _play(out, GRANT_FAILED, GOODBYE)
            return out
        out.status, out.address, out.entry = "granted", granted.address, granted.name
        yield from _play(out, ACCESS_GRANTED)
        found = yield from _do(ExternalAddress(), out)
        if isinstance(found, Found) and found.address:
            yield from _do(SayAddress(SERVER_ADDRESS, found.address), out)
        yield from _play(out, GOODBYE)
        return out
    except _Ended:
        if out.status != "granted":
            out.status = "hangup"
        return out


def _do(action: Action, out: Outcome) -> Generator[Action, Reply, Reply]:
    reply = yield action
    if isinstance(reply, HungUp):
        raise _Ended
    if isinstance(action, Play):
        out.heard.extend(action.prompts)
    elif isinstance(action, Ask):
        out.heard.append(action.prompt)
    elif isinstance(action, SayAddress):
        out.heard.append(action.prefix)
    return reply


def _play(out: Outcome, *prompts: str) -> Generator[Action, Reply, None]:
    yield from _do(Play(tuple(prompts)), out)


def _ask(out: Outcome, prompt: str, max_digits: int, timeout_ms: int) -> Generator[Action, Reply, str]:
    reply = yield from _do(Ask(prompt, max_digits, timeout_ms), out)
    return reply.text if isinstance(reply, Digits) else ""


def _passcode(call: CallInfo, s: Settings, out: Outcome) -> Generator[Action, Reply, Session | None]:
    out.status = "rejected"
    for _ in range(s.tries):
        out.passcode_tries += 1
        digits = yield from _ask(out, ENTER_PASSCODE, s.passcode_digits, s.timeout_ms)
        if not digits:
            yield from _play(out, NOT_ACCEPTED)
            continue
        verdict = yield from _do(Verify(digits, call), out)
        if not isinstance(verdict, Session):
            out.status = "unavailable"
            yield from _play(out, UNAVAILABLE)
            return None
        if verdict.delay > 0:
            yield from _do(Pause(verdict.delay), out)
        if verdict.ok:
            out.status = "verified"
            return verdict
        yield from _play(out, NOT_ACCEPTED)
    return None


def _address(session: Session, s: Settings, out: Outcome) -> Generator[Action, Reply, str | None]:
    for _ in range(s.tries):
        if session.own_address:
            choice = yield from _ask(out, MENU, 1, s.timeout_ms)
            if choice == "1":
                candidate, prefix = session.own_address, YOUR_ADDRESS
            elif choice == "2":
                candidate = yield from _typed(session, s, out)
                prefix = YOU_ENTERED
            else:
                yield from _play(out, INVALID_CHOICE)
                continue
        else:
            candidate = yield from _typed(session, s, out)
            prefix = YOU_ENTERED
        if candidate is None:
            continue
        yield from _do(SayAddress(prefix, candidate), out)
        confirmed = yield from _confirm(s, out)
        if confirmed is None:
            return None
        if confirmed:
            return candidate
    return None


def _typed(session: Session, s: Settings, out: Outcome) -> Generator[Action, Reply, str | None]:
    """One address typed on the keypad, checked; None (after saying why) if refused."""
    keys = yield from _ask(out, ENTER_ADDRESS, s.address_digits, s.timeout_ms)
    try:
        addr = parse_keys_checked(keys)  # syntax and address classes; the server checks the rest
    except DtmfError as exc:
        yield from _play(out, *address_prompts(exc.reason))
        return None
    checked = yield from _do(CheckAddress(session.token, str(addr)), out)
    if not isinstance(checked, Checked):
        yield from _play(out, UNAVAILABLE)
        return None
    if not checked.ok:
        try:
            prompts = address_prompts(checked.reason)
        except ValueError:
            prompts = address_prompts(Reason.FORBIDDEN)
        yield from _play(out, *prompts)
        return None
    return str(addr)


def _confirm(s: Settings, out: Outcome) -> Generator[Action, Reply, bool | None]:
    """True: 1 (confirm); False: 2 (enter again); None: no answer after all tries."""
    for _ in range(s.tries):
        choice = yield from _ask(out, CONFIRM, 1, s.timeout_ms)
        if choice == "1":
            return True
        if choice == "2":
            return False
        yield from _play(out, INVALID_CHOICE)
    return None


_Yield = TypeVar("_Yield")
_Send = TypeVar("_Send")
_Return = TypeVar("_Return")


def run(gen: Generator[_Yield, _Send, _Return], perform: Callable[[_Yield], _Send]) -> _Return:
    """Drive a generator to its end, sending back `perform` of each value it yields: a
    conversation with a function Action -> Reply (tests, tm4.dialin.agi), or a channel action's
    AGI commands with a transport's command function (tm4.dialin.agi.pump)."""
    try:
        sent = next(gen)
        while True:
            sent = gen.send(perform(sent))
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]
