"""Asterisk's security log: the real lines parse to the same events AMI delivered, a
forged field or line is never believed, and install makes sure the channel exists."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from tm4.asterisk.events import FrameParser, to_security_event
from tm4.asterisk.securitylog import (
    ensure_security_channel,
    event_key,
    install_warnings,
    missed_events,
    parse_line,
    parse_lines,
    read_since,
    security_channel,
)

FIX = Path(__file__).parent.parent / "fixtures"
FIRST_LOG = FIX / "ami" / "asterisk_security.log"  # capture (a)'s window of /var/log/asterisk/security
REAL2 = FIX / "asterisk-22" / "real2"
LINE = ('[2026-12-05 02:02:40.086] SECURITY[27752] res_security_log.c: SecurityEvent="RequestNotAllowed",'
        'EventTV="2026-12-05T02:02:40.086+0000",Severity="Error",Service="AMI",EventVersion="1",'
        'AccountID="tm4",SessionID="0x7f7920014950",LocalAddress="IPV4/TCP/127.0.0.1/5038",'
        'RemoteAddress="IPV4/TCP/127.0.0.1/53086",RequestType="Action: Command",'
        'SessionTV="2026-12-05T02:02:39.585+0000"')


def ami_frames() -> list:
    raw = (FIX / "ami" / "ami_security_events.raw").read_bytes() + (FIX / "ami" / "ami_failed_logins.raw").read_bytes()
    return [f for f in FrameParser().feed(raw) if to_security_event(f) is not None]


def test_every_event_amI_delivered_is_in_the_log_with_the_same_key() -> None:
    logged = parse_lines(FIRST_LOG.read_text(encoding="utf-8").splitlines())
    frames = ami_frames()
    assert len(frames) == 172 and len(logged) >= 172
    seen = Counter(event_key(f) for f in frames)
    res = missed_events(logged, seen)
    assert res.already_seen == 172  # every live event cancels exactly its own line
    # what AMI did not deliver to this session (the log's other windows) is what is left
    assert len(res.missed) == len(logged) - 172


def test_real2_lines_parse_and_the_banner_line_is_no_event() -> None:
    text = (REAL2 / "logs" / "restart.security.log").read_text(encoding="utf-8").splitlines()
    evs = parse_lines(text)
    assert len(evs) == 18 and {e.frame.event for e in evs} == {"SuccessfulAuth"}
    f = parse_line(LINE)
    assert f is not None and f.event == "RequestNotAllowed" and f.get("RequestType") == "Action: Command"
    ev = to_security_event(f)
    assert ev is not None and ev.is_error and str(ev.remote) == "IPV4/TCP/127.0.0.1/53086"


def test_a_forged_field_or_line_is_dropped() -> None:
    forged_field = LINE.replace('AccountID="tm4"', 'AccountID="x",RemoteAddress="IPV4/UDP/198.51.100.1/5060"')
    assert parse_line(forged_field) is None  # RemoteAddress twice
    quote = LINE.replace('AccountID="tm4"', 'AccountID="a"b"')
    assert parse_line(quote) is None
    # a line break in AccountID: the cut record, the forged line and the tail are all dropped
    head, tail = LINE.split('AccountID="tm4"')
    injected = [head + 'AccountID="a',
                LINE.replace("127.0.0.1/53086", "198.51.100.1/5060"),
                '",' + tail.lstrip(","),
                LINE]
    got = parse_lines(injected)
    assert [str(to_security_event(e.frame).remote) for e in got] == []  # type: ignore[union-attr]
    assert len(parse_lines(["[Dec  5 02:02:51] VERBOSE[1] x.c: hello", LINE])) == 1


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=["Cs"]), max_size=200))
def test_hostile_account_never_yields_another_address(account: str) -> None:
    line = LINE.replace('AccountID="tm4"', f'AccountID="{account}"')
    for e in parse_lines(line.splitlines() + [LINE]):
        ev = to_security_event(e.frame)
        assert ev is not None and str(ev.remote) == "IPV4/TCP/127.0.0.1/53086"


def test_read_since_reads_backwards_only_what_it_needs(tmp_path: Path) -> None:
    log = tmp_path / "security"
    lines = FIRST_LOG.read_text(encoding="utf-8").splitlines()
    days = [[ln.replace("2026-11-21", f"2026-10-{d:02d}") for ln in lines] for d in range(1, 29)]
    log.write_text("\n".join(ln for day in days for ln in day) + "\n", encoding="utf-8")  # ~5,000 lines
    evs = parse_lines(ln for day in days for ln in day)
    for since in (sorted(e.when for e in evs)[-10], evs[len(evs) // 2].when, 0.0):
        got = read_since(log, since)
        assert [e.frame for e in got] == [e.frame for e in evs if e.when >= since]


def test_logger_conf_channel(tmp_path: Path) -> None:
    real = (REAL2 / "etc" / "logger.conf").read_text(encoding="utf-8")
    assert security_channel(real) == "/var/log/asterisk/security"
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "logger.conf").write_text(real, encoding="utf-8")
    assert ensure_security_channel(etc).changed is False
    (etc / "logger.conf").write_text("[general]\ndateformat = %F %T.%3q\n\n[logfiles]\nmessages => notice\n")
    calls: list[str] = []
    out = install_warnings(etc, "/var/log/asterisk/security", lambda c: calls.append(c) or "")
    assert calls == ["logger reload"] and "logger reloaded" in out[0]
    text = (etc / "logger.conf").read_text()
    assert security_channel(text) == "/var/log/asterisk/security" and "messages => notice" in text
    out = install_warnings(etc, "/var/log/other", lambda c: None)
    assert out == ["Asterisk writes security events to /var/log/asterisk/security but [guard] "
                   "security_log is /var/log/other: set it to /var/log/asterisk/security"]
    (etc / "logger.conf").write_text("[logfiles\n")
    assert "cannot catch up" in install_warnings(etc, "/x", lambda c: None)[0]
