"""Hostile AMI input, property-based: the frame parser and the security-event parser.

Whatever bytes arrive (random, cut anywhere, mid-CRLF, huge, control characters, lone CR
or LF inside values, every RemoteAddress form Asterisk or an attacker could put there),
parsing ends in frames, in None, or in one typed ValidationError (a stream too long without
an end: the client drops the connection) - never in another exception, and what is
buffered stays bounded.
"""

from __future__ import annotations

import ipaddress
import time

from ami_strategies import HEADERS, KEYS, VALUES, remote_addresses
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tm4.asterisk.events import (
    BANNER_PREFIX,
    EOM,
    MAX_BANNER,
    MAX_MESSAGE,
    SECURITY_EVENTS,
    Frame,
    FrameParser,
    parse_endpoint,
    to_security_event,
)
from tm4.core.errors import ValidationError

FAST = settings(max_examples=80, deadline=2000, suppress_health_check=[HealthCheck.too_slow])

# -- strategies (tests/ami_strategies.py) ---------------------------------------------------

keys, values, headers = KEYS, VALUES, HEADERS


def render(hs: list[tuple[str, str]]) -> bytes:
    return Frame(tuple(hs)).to_bytes()


def cut(data: bytes, points: list[int]) -> list[bytes]:
    edges = sorted({0, len(data), *(p % (len(data) + 1) for p in points)})
    return [data[a:b] for a, b in zip(edges, edges[1:], strict=False)]


def feed_all(parser: FrameParser, chunks: list[bytes]) -> list[Frame]:
    out: list[Frame] = []
    for c in chunks:
        out += parser.feed(c)
        assert parser.pending <= MAX_MESSAGE
    return out


# -- the frame parser ---------------------------------------------------------------------

@FAST
@given(st.lists(headers, min_size=1, max_size=6), st.lists(st.integers(0, 10_000), max_size=12),
       st.booleans())
def test_frames_cut_anywhere_parse_the_same_as_whole(frames: list[list[tuple[str, str]]], points: list[int],
                                                     banner: bool) -> None:
    stream = (b"Asterisk Call Manager/11.0.0\r\n" if banner else b"") + b"".join(render(h) for h in frames)
    whole = FrameParser(expect_banner=banner)
    got_whole = whole.feed(stream)
    pieces = FrameParser(expect_banner=banner)
    got_pieces = feed_all(pieces, cut(stream, points))
    expected = [Frame(tuple(h)) for h in frames]
    assert got_whole == expected  # lone CR / LF stay inside their value; no header is invented
    assert got_pieces == expected
    assert pieces.pending == 0 and whole.pending == 0
    if banner:
        assert pieces.banner == whole.banner == "Asterisk Call Manager/11.0.0"


@FAST
@given(st.lists(headers, min_size=1, max_size=4))
def test_every_cut_inside_the_closing_crlf_keeps_the_frame_whole(frames: list[list[tuple[str, str]]]) -> None:
    stream = b"".join(render(h) for h in frames)
    expected = [Frame(tuple(h)) for h in frames]
    last_end = len(stream) - len(EOM)
    for k in range(last_end, len(stream)):  # before and between \r \n \r \n
        p = FrameParser(expect_banner=False)
        first = p.feed(stream[:k])
        assert first == expected[:-1]
        assert first + p.feed(stream[k:]) == expected


@settings(max_examples=200, deadline=2000)
@given(st.lists(st.binary(max_size=300), max_size=20), st.booleans())
def test_random_bytes_never_raise_anything_but_a_validation_error(chunks: list[bytes], banner: bool) -> None:
    p = FrameParser(expect_banner=banner)
    try:
        for f in feed_all(p, chunks):
            assert isinstance(f, Frame)
            to_security_event(f)  # never raises
    except ValidationError:
        pass


@settings(max_examples=100, deadline=2000)
@given(st.lists(st.sampled_from([b"\r", b"\n", b"\r\n", b"\r\n\r\n", b"Event: FailedACL", b": ", b":",
                                 b"RemoteAddress: IPV4/UDP/203.0.113.5/5060", b"\x00", b"\x1b[2J",
                                 "\u2028".encode(), b"\xff\xfe", b"Severity: Error", b"Service: PJSIP"]),
                max_size=60))
def test_fragments_of_real_frames_in_any_order_parse_without_error(pieces: list[bytes]) -> None:
    p = FrameParser(expect_banner=False)
    for frame in p.feed(b"".join(pieces)):
        ev = to_security_event(frame)
        if ev is not None and ev.remote is not None:
            assert isinstance(ev.remote.address, ipaddress.IPv4Address | ipaddress.IPv6Address)


def test_a_message_that_never_ends_is_refused_before_it_outgrows_the_bound() -> None:
    for start in (b"", b"Event: FailedACL\r\nAccountID: ", b"X" * 10):
        p = FrameParser(expect_banner=False)
        p.feed(start)
        chunk = b"A" * 65536
        fed = 0
        try:
            while fed < 10 * MAX_MESSAGE:
                p.feed(chunk)
                fed += len(chunk)
                assert p.pending <= MAX_MESSAGE
        except ValidationError as exc:
            assert "without an end" in str(exc)
        else:
            raise AssertionError("an endless message was buffered without limit")
        assert fed <= MAX_MESSAGE


def test_a_banner_that_never_ends_is_refused_too() -> None:
    p = FrameParser()
    p.feed(BANNER_PREFIX)
    try:
        for _ in range(100):
            p.feed(b"9" * 4096)
            assert p.pending <= MAX_BANNER
    except ValidationError as exc:
        assert "banner" in str(exc)
    else:
        raise AssertionError("an endless banner was buffered without limit")


def test_a_huge_message_dripped_byte_by_byte_costs_linear_time() -> None:
    p = FrameParser(expect_banner=False)
    body = b"Event: FailedACL\r\nAccountID: " + b"x" * 200_000
    t = time.perf_counter()
    for i in range(len(body)):
        p.feed(body[i:i + 1])
    frames = p.feed(b"\r\n\r\n")
    took = time.perf_counter() - t
    assert len(frames) == 1 and len(frames[0].get("AccountID") or "") == 200_000
    assert took < 3.0, f"{took:.1f} s for a 200 kB message fed byte by byte"


def test_a_huge_header_inside_the_bound_is_kept_whole() -> None:
    big = "y" * (MAX_MESSAGE // 2)
    p = FrameParser(expect_banner=False)
    (f,) = p.feed(render([("Event", "InvalidPassword"), ("AccountID", big),
                          ("RemoteAddress", "IPV4/UDP/203.0.113.5/5060")]))
    ev = to_security_event(f)
    assert ev is not None and ev.account == big and str(ev.remote) == "IPV4/UDP/203.0.113.5/5060"


# -- the security-event parser ---------------------------------------------------------------

@settings(max_examples=400, deadline=1000)
@given(remote_addresses())
def test_every_remote_address_form_parses_or_is_refused_cleanly(text: str) -> None:
    try:
        ep = parse_endpoint(text)
    except ValidationError:
        return
    assert isinstance(ep.address, ipaddress.IPv4Address | ipaddress.IPv6Address)
    assert ep.address.version == 4 or ep.address.ipv4_mapped is None  # mapped -> IPv4
    assert ep.port is None or 0 <= ep.port <= 65535
    again = parse_endpoint(str(ep))  # what tm4 shows parses back to itself
    assert again == ep


@settings(max_examples=150, deadline=1000)
@given(st.sampled_from(sorted(SECURITY_EVENTS)), remote_addresses(), remote_addresses(),
       st.lists(st.tuples(keys, values), max_size=6),
       st.sampled_from(["Error", "Informational", "", "error", "\x00"]))
def test_security_events_with_any_addresses_and_fields_never_raise(
        name: str, remote: str, local: str, extra: list[tuple[str, str]], severity: str) -> None:
    hs = [("Event", name), ("Severity", severity), ("Service", "PJSIP"), ("RemoteAddress", remote),
          ("LocalAddress", local), *extra]
    (frame,) = FrameParser(expect_banner=False).feed(render(hs))
    ev = to_security_event(frame)
    assert ev is not None and ev.type.value == name
    if ev.remote is not None:
        assert ev.remote == parse_endpoint(remote)


KNOWN = [
    ("IPV4/UDP/203.0.113.9/5060", "203.0.113.9", 5060, "UDP"),
    ("IPV6/UDP/2001:db8::5/5060", "2001:db8::5", 5060, "UDP"),
    ("IPV6/UDP/[2001:db8::5]/5060", "2001:db8::5", 5060, "UDP"),
    ("IPV4/TCP/203.0.113.9/5061", "203.0.113.9", 5061, "TCP"),
    ("IPV4/TLS/203.0.113.9/5061", "203.0.113.9", 5061, "TLS"),
    ("IPV4/WS/203.0.113.9/8088", "203.0.113.9", 8088, "WS"),
    ("IPV6/WSS/2001:db8::5/8089", "2001:db8::5", 8089, "WSS"),
    ("IPV4/203.0.113.9/5060", "203.0.113.9", 5060, None),
    ("IPV4/UDP/203.0.113.9", "203.0.113.9", None, "UDP"),
    ("IPV6/UDP/::ffff:203.0.113.7/5060", "203.0.113.7", 5060, "UDP"),
    ("IPV4/UDP/224.0.0.1/5060", "224.0.0.1", 5060, "UDP"),  # parsed; the guard never bans it
]
BAD = ["IPV4/UDP/203.0.113.9/²", "IPV4/UDP/203.0.113.9/70000", "IPV4/UDP/host.example/5060",
       "IPV4", "", "UDP/203.0.113.9/5060", "IPV4/UDP/203.0.113.9/5060/extra", "IPV4/UDP//5060"]


def test_the_known_forms_and_the_bad_ones() -> None:
    for text, addr, port, transport in KNOWN:
        ep = parse_endpoint(text)
        assert (str(ep.address), ep.port, ep.transport) == (addr, port, transport), text
    for text in BAD:
        try:
            parse_endpoint(text)
        except ValidationError:
            continue
        raise AssertionError(f"{text!r} was accepted")
