"""AMI framing and security event parsing, against the real Asterisk 22 captures."""

from __future__ import annotations

import ipaddress
import re
from collections import Counter

import pytest
from amisim import FIXTURES, security_capture
from panoramisk.message import Message

from tm4.asterisk.events import (
    EventType,
    FrameParser,
    parse_endpoint,
    parse_events,
    parse_frame,
    to_security_event,
)
from tm4.core.errors import ValidationError

RAW = FIXTURES / "ami_security_events.raw"


def _txt_event_counts(session_index: int = 0) -> Counter[str]:
    """Independent oracle: count `Event:` lines of RECV chunks in the readable transcript."""
    text = (FIXTURES / "ami_security_events.txt").read_text()
    body = text.split("=== Full readable transcript", 1)[1]
    sessions = re.split(r"^#### \S+ \S+ connected from", body, flags=re.M)[1:]
    return Counter(re.findall(r"^Event: (\w+)\\r\\n$", sessions[session_index], flags=re.M))


def test_every_event_of_the_capture_is_parsed_and_typed() -> None:
    data = security_capture()[0].server_bytes()
    parser = FrameParser()
    frames = parser.feed(data)
    assert parser.banner == "Asterisk Call Manager/11.0.0"
    assert parser.pending == 0
    events = Counter(f.event for f in frames if f.event)
    assert events == _txt_event_counts(0)
    typed = Counter(e.type.value for e in parse_events(data))
    security = {k: v for k, v in events.items() if k in {t.value for t in EventType}}
    assert typed == security
    assert set(typed) == {"SuccessfulAuth", "InvalidAccountID", "ChallengeSent",
                          "ChallengeResponseFailed", "InvalidPassword", "FailedACL"}


@pytest.mark.parametrize("step", [1, 2, 3, 7, 64, 1000])
def test_framing_does_not_depend_on_how_tcp_cuts_the_stream(step: int) -> None:
    data = RAW.read_bytes()
    whole = FrameParser().feed(data)
    parser = FrameParser()
    pieces = []
    for i in range(0, len(data), step):
        pieces.extend(parser.feed(data[i:i + step]))
    assert pieces == whole
    assert len(whole) > 170


def test_trailing_empty_header_is_kept_where_panoramisk_drops_it() -> None:
    data = RAW.read_bytes()
    crf = next(e for e in parse_events(data) if e.type is EventType.CHALLENGE_RESPONSE_FAILED)
    assert crf.frame.headers[-1] == ("ExpectedResponse", "")
    assert crf.field("ExpectedResponse") == ""
    sent = next(e for e in parse_events(data) if e.type is EventType.CHALLENGE_SENT)
    assert sent.frame.headers[-1] == ("Challenge", "")
    # The pitfall this guards against: panoramisk 1.4's own parser loses both.
    raw_crf = crf.frame.to_bytes().decode().strip("\r\n")
    assert "ExpectedResponse" not in Message.from_line(raw_crf.strip())
    assert "ExpectedResponse" in dict(crf.frame.headers)


def test_frame_round_trips_byte_for_byte() -> None:
    data = RAW.read_bytes()
    body = data.split(b"\r\n", 1)[1]  # after the banner
    frames = FrameParser().feed(data)
    assert b"".join(f.to_bytes() for f in frames) == body


def test_a_message_cut_by_a_dying_connection_is_never_parsed() -> None:
    frame = (b"Event: InvalidAccountID\r\nPrivilege: security,all\r\nSeverity: Error\r\n"
             b"Service: PJSIP\r\nRemoteAddress: IPV4/UDP/203.0.113.50/5060\r\n\r\n")
    p = FrameParser()
    assert p.feed(b"Asterisk Call Manager/11.0.0\r\n" + frame[:-3]) == []
    assert p.pending > 0  # buffered, not half-parsed


def test_repeated_headers_and_colons_in_values_are_kept() -> None:
    f = parse_frame(b"Event: X\r\nVariable: a=1\r\nVariable: b=2\r\nMessage: a: b")
    assert f.headers == (("Event", "X"), ("Variable", "a=1"), ("Variable", "b=2"), ("Message", "a: b"))


def test_unbounded_message_is_refused() -> None:
    p = FrameParser()
    with pytest.raises(ValidationError):
        p.feed(b"Asterisk Call Manager/11.0.0\r\nEvent: X\r\n" + b"A: " + b"x" * 300_000)


@pytest.mark.parametrize("text,addr,port,transport", [
    ("IPV4/UDP/203.0.113.9/5060", "203.0.113.9", 5060, "UDP"),
    ("IPV6/UDP/2001:db8::5/5060", "2001:db8::5", 5060, "UDP"),
    ("IPV4/TCP/127.0.0.1/44512", "127.0.0.1", 44512, "TCP"),
    ("IPV4/203.0.113.9/5060", "203.0.113.9", 5060, None),
    ("IPV6/2001:db8::5/5060", "2001:db8::5", 5060, None),
    ("IPV6/UDP/[2001:db8::5]/5060", "2001:db8::5", 5060, "UDP"),
    ("IPV6/UDP/::ffff:203.0.113.9/5060", "203.0.113.9", 5060, "UDP"),
    ("IPV4/TLS/198.51.100.7/5061", "198.51.100.7", 5061, "TLS"),
    ("IPV4/UDP/203.0.113.9", "203.0.113.9", None, "UDP"),
])
def test_remote_address_forms(text: str, addr: str, port: int | None, transport: str | None) -> None:
    ep = parse_endpoint(text)
    assert ep.address == ipaddress.ip_address(addr)
    assert ep.port == port
    assert ep.transport == transport


@pytest.mark.parametrize("text", ["", "UDP/1.2.3.4/5060", "IPV4/UDP/not-an-ip/5060",
                                  "IPV4/UDP/1.2.3.4/99999", "IPV4/A/B/1.2.3.4/5060"])
def test_bad_addresses_are_refused(text: str) -> None:
    with pytest.raises(ValidationError):
        parse_endpoint(text)


def test_event_with_unparseable_address_is_typed_but_has_no_remote() -> None:
    f = parse_frame(b"Event: InvalidAccountID\r\nSeverity: Error\r\nService: PJSIP\r\nRemoteAddress: garbage")
    ev = to_security_event(f)
    assert ev is not None and ev.remote is None and ev.is_failure


def test_non_security_frames_are_not_events() -> None:
    assert to_security_event(parse_frame(b"Event: FullyBooted\r\nPrivilege: system,all")) is None
    assert to_security_event(parse_frame(b"Response: Success\r\nActionID: x")) is None
