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

Keys typed ahead: Asterisk drops a key pressed while a prompt plays without
escape digits (tests/fixtures/dialin/real2/). So every prompt that comes right
before a question listens for that question's keys; the first key pressed stops
it and is carried into the question (Ask.first), which then asks for the rest
without replaying its prompt. The penalty wait (Pause) listens to nothing.
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


ENTRY_KEYS = "0123456789*#"  # what a passcode or an address is typed with
CHOICE_KEYS = "12"  # the menu and the confirmation


@dataclass(frozen=True)
class Play:
    prompts: tuple[str, ...]
    keys: str = ""  # escape digits: the first one pressed stops the prompts (reply Done(key))


@dataclass(frozen=True)
class Ask:
    prompt: str
    max_digits: int
    timeout_ms: int
    first: str = ""  # a key already typed during the prompt before: the prompt is not played


@dataclass(frozen=True)
class SayAddress:
    prefix: str  # a prompt ("you entered"), then the address symbol by symbol
    address: str
    keys: str = ""  # escape digits, as for Play


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
    key: str = ""  # the escape digit that stopped a Play or SayAddress


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
    typed_ahead: int = 0  # keys that stopped a prompt and were carried into the next question
    heard: list[str] = field(default_factory=list)  # prompts played, in order


Conversation = Generator[Action, Reply, Outcome]


class _Ended(Exception):
    """The caller hung up."""


class _Call:
    """The outcome so far, and the key typed ahead during the last prompt (if it listened)."""

    def __init__(self) -> None:
        self.out = Outcome()
        self.ahead = ""


def conversation(settings: Settings | None = None) -> Conversation:
    s = settings or Settings()
    c = _Call()
    out = c.out
    try:
        yield from _do(Answer(), c)
        call = yield from _do(Identify(), c)
        if not isinstance(call, CallInfo):
            call = CallInfo()
        session = yield from _passcode(call, s, c)
        if session is None:
            yield from _play(c, GOODBYE)
            return out
        out.owner_verified = True
        address = yield from _address(session, s, c)
        if address is None:
            out.status = "no-address"
            yield from _play(c, GOODBYE)
            return out
        granted = yield from _do(Grant(session.token, address, call.callerid), c)
        if not isinstance(granted, Granted):
            out.status = "error"
            yield from _play(c, GRANT_FAILED, GOODBYE)
            return out
        out.status, out.address, out.entry = "granted", granted.address, granted.name
        yield from _play(c, ACCESS_GRANTED)
        found = yield from _do(ExternalAddress(), c)
        if isinstance(found, Found) and found.address:
            yield from _do(SayAddress(SERVER_ADDRESS, found.address), c)
        yield from _play(c, GOODBYE)
        return out
    except _Ended:
        if out.status != "granted":
            out.status = "hangup"
        return out


def _do(action: Action, c: _Call) -> Generator[Action, Reply, Reply]:
    reply = yield action
    if isinstance(reply, HungUp):
        raise _Ended
    out = c.out
    c.ahead = ""  # a key carries over only from the action right before the question
    if isinstance(action, Play | SayAddress):
        key = reply.key if isinstance(reply, Done) else ""
        if key and len(key) == 1 and key in action.keys:
            c.ahead = key
            out.typed_ahead += 1
    if isinstance(action, Play):
        out.heard.extend(action.prompts)
    elif isinstance(action, Ask):
        if not action.first:
            out.heard.append(action.prompt)
    elif isinstance(action, SayAddress):
        out.heard.append(action.prefix)
    return reply


def _play(c: _Call, *prompts: str, keys: str = "") -> Generator[Action, Reply, None]:
    """Prompts; with `keys`, the next question may find a key typed ahead (c.ahead)."""
    yield from _do(Play(tuple(prompts), keys), c)


def _ask(c: _Call, prompt: str, max_digits: int, timeout_ms: int) -> Generator[Action, Reply, str]:
    reply = yield from _do(Ask(prompt, max_digits, timeout_ms, first=c.ahead), c)
    return reply.text if isinstance(reply, Digits) else ""


def _listen(last: bool, keys: str) -> str:
    """The keys a prompt listens for: those of the question after it, none if goodbye follows."""
    return "" if last else keys


def _passcode(call: CallInfo, s: Settings, c: _Call) -> Generator[Action, Reply, Session | None]:
    out = c.out
    out.status = "rejected"
    for i in range(s.tries):
        out.passcode_tries += 1
        again = _listen(i == s.tries - 1, ENTRY_KEYS)
        digits = yield from _ask(c, ENTER_PASSCODE, s.passcode_digits, s.timeout_ms)
        if not digits:
            yield from _play(c, NOT_ACCEPTED, keys=again)
            continue
        verdict = yield from _do(Verify(digits, call), c)
        if not isinstance(verdict, Session):
            out.status = "unavailable"
            yield from _play(c, UNAVAILABLE)
            return None
        if verdict.delay > 0:
            yield from _do(Pause(verdict.delay), c)
        if verdict.ok:
            out.status = "verified"
            return verdict
        yield from _play(c, NOT_ACCEPTED, keys=again)
    return None


def _address(session: Session, s: Settings, c: _Call) -> Generator[Action, Reply, str | None]:
    next_keys = CHOICE_KEYS if session.own_address else ENTRY_KEYS  # what each round starts with
    for i in range(s.tries):
        again = _listen(i == s.tries - 1, next_keys)
        if session.own_address:
            choice = yield from _ask(c, MENU, 1, s.timeout_ms)
            if choice == "1":
                candidate, prefix = session.own_address, YOUR_ADDRESS
            elif choice == "2":
                candidate = yield from _typed(session, s, c, again)
                prefix = YOU_ENTERED
            else:
                yield from _play(c, INVALID_CHOICE, keys=again)
                continue
        else:
            candidate = yield from _typed(session, s, c, again)
            prefix = YOU_ENTERED
        if candidate is None:
            continue
        yield from _do(SayAddress(prefix, candidate, CHOICE_KEYS), c)
        confirmed = yield from _confirm(s, c)
        if confirmed is None:
            return None
        if confirmed:
            return candidate
    return None


def _typed(session: Session, s: Settings, c: _Call, again: str) -> Generator[Action, Reply, str | None]:
    """One address typed on the keypad, checked; None (after saying why) if refused."""
    keys = yield from _ask(c, ENTER_ADDRESS, s.address_digits, s.timeout_ms)
    try:
        addr = parse_keys_checked(keys)  # syntax and address classes; the server checks the rest
    except DtmfError as exc:
        yield from _play(c, *address_prompts(exc.reason), keys=again)
        return None
    checked = yield from _do(CheckAddress(session.token, str(addr)), c)
    if not isinstance(checked, Checked):
        yield from _play(c, UNAVAILABLE, keys=again)
        return None
    if not checked.ok:
        try:
            prompts = address_prompts(checked.reason)
        except ValueError:
            prompts = address_prompts(Reason.FORBIDDEN)
        yield from _play(c, *prompts, keys=again)
        return None
    return str(addr)


def _confirm(s: Settings, c: _Call) -> Generator[Action, Reply, bool | None]:
    """True: 1 (confirm); False: 2 (enter again); None: no answer after all tries."""
    for i in range(s.tries):
        choice = yield from _ask(c, CONFIRM, 1, s.timeout_ms)
        if choice == "1":
            return True
        if choice == "2":
            return False
        yield from _play(c, INVALID_CHOICE, keys=_listen(i == s.tries - 1, CHOICE_KEYS))
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
