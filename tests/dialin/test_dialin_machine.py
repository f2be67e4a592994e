"""The conversation alone: scripted replies in, actions out. No AGI, no firewall."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from tm4.dialin import call as d
from tm4.dialin.call import (
    Action,
    Answer,
    Ask,
    CallInfo,
    CheckAddress,
    Checked,
    Digits,
    Done,
    ExternalAddress,
    Failed,
    Found,
    Grant,
    Granted,
    HungUp,
    Identify,
    NoInput,
    Pause,
    Play,
    Reply,
    SayAddress,
    Session,
    Verify,
    conversation,
    run,
)

CODE = "48213977"


@dataclass
class Script:
    """The caller (keys per question) and the backend, as plain data."""

    keys: list[str | None]  # ">1": typed during the prompt before the question (if it listens)
    own: str = ""
    delay: float = 0.0
    refuse: dict[str, str] = field(default_factory=dict)  # address -> reason from the server
    verify_fails: bool = False
    grant_fails: bool = False
    external: str = "198.51.100.1"
    hangup_at: int | None = None
    actions: list[Action] = field(default_factory=list)

    def __call__(self, action: Action) -> Reply:
        self.actions.append(action)
        if self.hangup_at is not None and len(self.actions) - 1 == self.hangup_at:
            return HungUp()
        if isinstance(action, Identify):
            return CallInfo(callerid="5551234")
        if isinstance(action, Play | SayAddress):
            if self.keys and (self.keys[0] or "").startswith(">"):
                k = self.keys.pop(0)[1:]  # type: ignore[index]
                return Done(k[0]) if k[0] in action.keys else Done()  # else the key is lost
            return Done()
        if isinstance(action, Ask):
            if action.first and action.max_digits == 1:
                return Digits(action.first)
            if not self.keys:
                return HungUp()
            k = self.keys.pop(0)
            k = action.first + (k or "")
            return NoInput() if not k else Digits(k)
        if isinstance(action, Verify):
            if self.verify_fails:
                return Failed("tm4d down")
            return Session(ok=action.passcode == CODE, token="tok" if action.passcode == CODE else "",
                           delay=self.delay, own_address=self.own)
        if isinstance(action, CheckAddress):
            reason = self.refuse.get(action.address, "")
            return Checked(ok=not reason, reason=reason)
        if isinstance(action, Grant):
            return Failed("nft refused") if self.grant_fails else Granted("dialin-alice", action.address)
        if isinstance(action, ExternalAddress):
            return Found(self.external)
        return Done()

    def played(self) -> list[str]:
        out: list[str] = []
        for a in self.actions:
            if isinstance(a, Play):
                out.extend(a.prompts)
            elif isinstance(a, Ask):
                out.append(a.prompt)
            elif isinstance(a, SayAddress):
                out.append(f"{a.prefix}+{a.address}")
        return out

    def of(self, kind: type) -> list[Action]:
        return [a for a in self.actions if isinstance(a, kind)]


def call(script: Script) -> d.Outcome:
    return run(conversation(), script)


def test_the_whole_call() -> None:
    s = Script([CODE, "203*0*113*7", "1"])
    out = call(s)
    assert out.status == "granted" and out.entry == "dialin-alice" and out.address == "203.0.113.7"
    assert isinstance(s.actions[0], Answer)
    assert s.played() == [
        d.ENTER_PASSCODE, d.ENTER_ADDRESS, f"{d.YOU_ENTERED}+203.0.113.7", d.CONFIRM,
        d.ACCESS_GRANTED, f"{d.SERVER_ADDRESS}+198.51.100.1", d.GOODBYE,
    ]
    grant = s.of(Grant)[0]
    assert grant == Grant("tok", "203.0.113.7", "5551234")
    # "access granted" only after the grant came back
    assert s.actions.index(grant) < s.actions.index(Play((d.ACCESS_GRANTED,)))
    assert s.of(SayAddress)[0].keys == d.CHOICE_KEYS, "the read-back listens for the confirmation"
    assert all(not a.keys for a in s.of(Play)), "no question follows these prompts"
    assert s.of(CheckAddress) == [CheckAddress("tok", "203.0.113.7")]


def test_three_wrong_passcodes_say_goodbye() -> None:
    s = Script(["11111111", "", "22222222", CODE])
    out = call(s)
    assert out.status == "rejected" and out.passcode_tries == 3
    assert [a.passcode for a in s.of(Verify)] == ["11111111", "22222222"]  # empty is not sent
    assert s.played() == [d.ENTER_PASSCODE, d.NOT_ACCEPTED] * 3 + [d.GOODBYE]
    assert not s.of(Grant) and not s.of(CheckAddress)


def test_right_passcode_on_the_third_try() -> None:
    s = Script([None, "1", CODE, "1*2*3*4", "1"])
    assert call(s).status == "granted"


@pytest.mark.parametrize(("keys", "prompts"), [
    ("999*1*1*1", ("tm4/addr-invalid", "tm4/addr-range")),
    ("1**2*3*4", ("tm4/addr-invalid", "tm4/addr-empty-part")),
    ("1*2*3", ("tm4/addr-invalid", "tm4/addr-parts")),
    ("1*2*3*4*5", ("tm4/addr-invalid", "tm4/addr-parts")),
    ("*1*2*3*4", ("tm4/addr-invalid", "tm4/addr-empty-part")),
    ("", ("tm4/addr-invalid", "tm4/addr-empty")),
    (None, ("tm4/addr-invalid", "tm4/addr-empty")),
    ("1" * 300, ("tm4/addr-invalid", "tm4/addr-too-long")),
    ("127*0*0*1", ("tm4/addr-loopback",)),
    ("224*1*1*1", ("tm4/addr-multicast",)),
    ("255*255*255*255", ("tm4/addr-broadcast",)),
    ("0*0*0*0", ("tm4/addr-unspecified",)),
])
def test_each_bad_address_says_why_three_times_then_goodbye(keys: str | None, prompts: tuple[str, ...]) -> None:
    s = Script([CODE, keys, keys, keys])
    out = call(s)
    assert out.status == "no-address"
    assert s.played() == [d.ENTER_PASSCODE] + [d.ENTER_ADDRESS, *prompts] * 3 + [d.GOODBYE]
    assert not s.of(Grant)
    assert not s.of(CheckAddress)  # refused before asking the server


def test_server_side_refusal_is_spoken() -> None:
    s = Script([CODE, "198*51*100*1", "203*0*113*9", "1"], refuse={"198.51.100.1": "own"})
    out = call(s)
    assert out.status == "granted" and out.address == "203.0.113.9"
    assert "tm4/addr-own" in s.played()


def test_unknown_server_reason_still_refuses() -> None:
    s = Script([CODE, "1*2*3*4", None], refuse={"1.2.3.4": "something-new"})
    call(s)
    assert "tm4/addr-forbidden" in s.played() and not s.of(Grant)


def test_confirm_2_re_enters_and_bad_choices_repeat() -> None:
    s = Script([CODE, "1*2*3*4", "2", "5*6*7*8", "9", None, "1"])
    out = call(s)
    assert out.address == "5.6.7.8"
    assert s.played().count(d.CONFIRM) == 4 and s.played().count(d.INVALID_CHOICE) == 2


def test_no_confirmation_ends_the_call() -> None:
    s = Script([CODE, "1*2*3*4", None, None, None, "1"])
    out = call(s)
    assert out.status == "no-address" and not s.of(Grant)
    assert s.played()[-1] == d.GOODBYE


def test_menu_is_offered_only_with_an_own_address() -> None:
    s = Script([CODE, "1", "1"], own="203.0.113.50")
    out = call(s)
    assert out.address == "203.0.113.50"
    assert s.played()[:3] == [d.ENTER_PASSCODE, d.MENU, f"{d.YOUR_ADDRESS}+203.0.113.50"]
    assert not s.of(CheckAddress)
    s2 = Script([CODE, "1*2*3*4", "1"])
    call(s2)
    assert d.MENU not in s2.played()


def test_menu_2_enters_an_address_and_bad_menu_keys_repeat() -> None:
    s = Script([CODE, "7", "2", "1*2*3*4", "1"], own="203.0.113.50")
    out = call(s)
    assert out.address == "1.2.3.4"
    assert s.played()[:4] == [d.ENTER_PASSCODE, d.MENU, d.INVALID_CHOICE, d.MENU]


def test_global_delay_is_waited_on_the_line() -> None:
    s = Script(["11111111", CODE, "1*2*3*4", "1"], delay=4.0)
    call(s)
    pauses = s.of(Pause)
    assert pauses == [Pause(4.0), Pause(4.0)]
    # the wait comes before the caller learns the verdict
    first = s.actions.index(pauses[0])
    assert isinstance(s.actions[first - 1], Verify) and s.actions[first + 1] == Play((d.NOT_ACCEPTED,), d.ENTRY_KEYS)


def test_backend_down_is_unavailable() -> None:
    s = Script([CODE], verify_fails=True)
    out = call(s)
    assert out.status == "unavailable" and s.played()[-2:] == [d.UNAVAILABLE, d.GOODBYE]


def test_failed_grant_is_said() -> None:
    s = Script([CODE, "1*2*3*4", "1"], grant_fails=True)
    out = call(s)
    assert out.status == "error" and d.ACCESS_GRANTED not in s.played()
    assert s.played()[-2:] == [d.GRANT_FAILED, d.GOODBYE]


def test_unknown_external_address_is_not_said() -> None:
    s = Script([CODE, "1*2*3*4", "1"], external="")
    call(s)
    assert not any(p.startswith(d.SERVER_ADDRESS) for p in s.played())


def _happy_length() -> int:
    s = Script([CODE, "203*0*113*7", "1"])
    call(s)
    return len(s.actions)


@pytest.mark.parametrize("at", range(_happy_length()))
def test_hangup_at_every_step_stops_at_once(at: int) -> None:
    s = Script([CODE, "203*0*113*7", "1"], hangup_at=at)
    out = call(s)
    assert len(s.actions) == at + 1, "nothing is done after the hang-up"
    grant_index = next(i for i, a in enumerate(s.actions) if isinstance(a, Grant)) if s.of(Grant) else None
    if grant_index is None or grant_index == at:
        assert out.status in ("hangup", "started"), out
    else:
        assert out.status == "granted"


def test_prompt_list_matches_prompts_txt() -> None:
    from pathlib import Path

    names = {ln.split("|")[0].strip() for ln in
             (Path(__file__).parent.parent.parent / "sounds" / "prompts.txt").read_text().splitlines()
             if ln.strip() and not ln.startswith("#")}
    assert {p.removeprefix("tm4/") for p in d.PROMPTS} == names


# -- keys typed ahead (Asterisk drops a key pressed during a prompt that does not listen) ----

def test_confirm_typed_during_the_read_back_is_carried_on() -> None:
    s = Script([CODE, "203*0*113*7", ">1"])
    out = call(s)
    assert out.status == "granted" and out.typed_ahead == 1
    asks = s.of(Ask)
    assert asks[-1] == Ask(d.CONFIRM, 1, 10000, first="1")
    assert d.CONFIRM not in out.heard, "the confirmation prompt is not played over the caller"


def test_re_enter_typed_during_the_read_back() -> None:
    s = Script([CODE, "1*2*3*4", ">2", "5*6*7*8", "1"])
    assert call(s).address == "5.6.7.8"


def test_a_key_no_question_wants_is_not_carried() -> None:
    s = Script([CODE, "203*0*113*7", ">7", "1"])
    out = call(s)
    assert out.status == "granted" and out.typed_ahead == 0
    assert s.of(Ask)[-1] == Ask(d.CONFIRM, 1, 10000)


def test_passcode_typed_during_not_accepted() -> None:
    s = Script(["11111111", ">4", "8213977", "203*0*113*7", "1"])
    out = call(s)
    assert out.status == "granted" and out.passcode_tries == 2
    assert [v.passcode for v in s.of(Verify)] == ["11111111", CODE]
    assert s.of(Ask)[1] == Ask(d.ENTER_PASSCODE, 20, 10000, first="4")


def test_address_typed_during_a_refusal_and_choices_during_invalid_choice() -> None:
    s = Script([CODE, "1*2*3", ">2", "03*0*113*7", "9", ">1"])
    out = call(s)
    assert out.status == "granted" and out.address == "203.0.113.7" and out.typed_ahead == 2
    s = Script([CODE, "7", ">2", "1*2*3*4", "1"], own="203.0.113.50")
    assert call(s).address == "1.2.3.4"


def test_prompts_before_goodbye_do_not_listen() -> None:
    s = Script(["1", "2", "3"])
    call(s)
    nots = [a for a in s.of(Play) if a.prompts == (d.NOT_ACCEPTED,)]
    assert [a.keys for a in nots] == [d.ENTRY_KEYS, d.ENTRY_KEYS, ""]
    s = Script([CODE, "1*2", "1*2", "1*2"])
    call(s)
    refusals = [a for a in s.of(Play) if a.prompts[0] == "tm4/addr-invalid"]
    assert [a.keys for a in refusals] == [d.ENTRY_KEYS, d.ENTRY_KEYS, ""]
