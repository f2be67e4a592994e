"""DTMF parsing: every sample line gives its verdict; any keys give an address or a reason."""

from __future__ import annotations

import contextlib
import ipaddress
from pathlib import Path

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from tm4.core.errors import ValidationError
from tm4.dialin.dtmf import (
    DtmfError,
    Reason,
    address_prompts,
    check_address,
    parse_keys,
    parse_keys_checked,
    parse_remote_addr,
    spoken,
    to_keys,
)

SAMPLES = Path(__file__).parent.parent / "fixtures" / "dialin" / "dtmf_inputs.txt"
OWN = [ipaddress.ip_address("198.51.100.1")]
FORBIDDEN = [ipaddress.ip_network("203.0.113.128/25")]
PROMPTS = {ln.split("|")[0].strip() for ln in
           (Path(__file__).parent.parent.parent / "sounds" / "prompts.txt").read_text().splitlines()
           if ln.strip() and not ln.startswith("#")}


def _samples() -> list[tuple[str, str]]:
    out = []
    for line in SAMPLES.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        keys, expected = (p.strip() for p in line.split("|"))
        out.append((keys, expected))
    return out


@pytest.mark.parametrize(("keys", "expected"), _samples())
def test_sample_verdict(keys: str, expected: str) -> None:
    try:
        got = str(parse_keys_checked(keys, OWN, FORBIDDEN))
    except DtmfError as exc:
        got = exc.reason.value
        assert exc.detail, "a refusal always says why"
    assert got == expected


def test_every_reason_has_a_sample_and_a_prompt() -> None:
    seen = {exp for _, exp in _samples()}
    for reason in Reason:
        assert reason.value in seen, f"no sample line for {reason}"
        for prompt in address_prompts(reason):
            assert prompt.removeprefix("tm4/") in PROMPTS, f"{prompt} is not in sounds/prompts.txt"


def test_syntax_errors_say_not_valid_first_and_why() -> None:
    assert address_prompts(Reason.RANGE) == ("tm4/addr-invalid", "tm4/addr-range")
    assert address_prompts("loopback") == ("tm4/addr-loopback",)


KEYS = st.text(alphabet="0123456789*#", max_size=40)


@given(KEYS)
@example("1" * 300)
@example("1**2*3*4")
@example("*")
def test_any_keys_parse_or_give_a_reason(keys: str) -> None:
    try:
        addr = parse_keys_checked(keys, OWN, FORBIDDEN)
    except DtmfError as exc:
        assert isinstance(exc, ValidationError)
        assert isinstance(exc.reason, Reason) and str(exc)
        assert all(p.removeprefix("tm4/") in PROMPTS for p in address_prompts(exc.reason))
        return
    assert isinstance(addr, ipaddress.IPv4Address)
    assert check_address(addr, OWN, FORBIDDEN) is None
    assert not (addr.is_loopback or addr.is_multicast or addr.is_unspecified or addr in FORBIDDEN[0])


@given(st.text(max_size=30))
def test_arbitrary_text_never_raises_anything_else(text: str) -> None:
    with contextlib.suppress(DtmfError):
        parse_keys(text)
    assert parse_remote_addr(text) is None or parse_remote_addr(text).version in (4, 6)


@given(st.ip_addresses(v=4))
def test_typed_address_round_trips(addr: ipaddress.IPv4Address) -> None:
    assert parse_keys(to_keys(addr)) == addr
    assert parse_keys(to_keys(addr) + "#") == addr


@given(st.lists(st.integers(0, 999), min_size=1, max_size=6))
def test_numbers_decide_the_verdict(parts: list[int]) -> None:
    keys = "*".join(str(p) for p in parts)
    if len(keys) > 15:
        expect: object = Reason.TOO_LONG
    elif len(parts) != 4:
        expect = Reason.PARTS
    elif any(p > 255 for p in parts):
        expect = Reason.RANGE
    else:
        expect = ipaddress.IPv4Address(".".join(map(str, parts)))
    try:
        got: object = parse_keys(keys)
    except DtmfError as exc:
        got = exc.reason
    assert got == expect


@pytest.mark.parametrize(("text", "expected"), [
    ("203.0.113.7:5060", "203.0.113.7"),
    ("203.0.113.7", "203.0.113.7"),
    ("[2001:db8::7]:5060", "2001:db8::7"),
    ("[2001:db8::7]", "2001:db8::7"),
    ("2001:db8::7", "2001:db8::7"),
    ("[::ffff:192.0.2.9]:5061", "192.0.2.9"),
    ("", None),
    ("sip.example.com:5060", None),
    ("[nonsense]:5060", None),
    ("203.0.113.300:5060", None),
])
def test_remote_addr(text: str, expected: str | None) -> None:
    got = parse_remote_addr(text)
    assert (str(got) if got else None) == expected


def test_spoken_form() -> None:
    assert spoken("203.0.113.7") == "2 0 3 dot 0 dot 1 1 3 dot 7"
    assert spoken("2001:db8::1") == "2 0 0 1 colon d b 8 colon colon 1"


def test_ipv6_checks() -> None:
    assert check_address(ipaddress.ip_address("::1")) is Reason.LOOPBACK
    assert check_address(ipaddress.ip_address("ff02::1")) is Reason.MULTICAST
    assert check_address(ipaddress.ip_address("fe80::1")) is Reason.RESERVED
    assert check_address(ipaddress.ip_address("::ffff:127.0.0.1")) is Reason.LOOPBACK
    assert check_address(ipaddress.ip_address("2001:db8::7")) is None
