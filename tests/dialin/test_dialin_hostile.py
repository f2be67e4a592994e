"""Hostile input at the dial-in boundaries (issue 12): keypad strings, addresses, AGI replies.

None of it may end in a traceback, a dead FastAGI server, or a grant of an address that
can never be a source (unspecified, loopback, multicast, broadcast, link-local, reserved).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import ipaddress
import logging
import signal
import subprocess
import sys
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from agisim import REPO, Channel, Line, python
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tm4.core.model import never_source_reason
from tm4.dialin import agi
from tm4.dialin.call import CallInfo, Checked, Found, Granted, Outcome, Session, conversation
from tm4.dialin.dtmf import DtmfError, Reason, check_address, parse_keys, parse_keys_checked
from tm4.dialin.fastagi import DialinFastAGI, FastAgiTransport
from tm4.dialin.fastagi import drive as fast_drive

CODE = "48213977"
BOUNDED = settings(max_examples=150, deadline=timedelta(seconds=2),
                   suppress_health_check=[HealthCheck.too_slow])
STATUSES = {"rejected", "no-address", "granted", "hangup", "unavailable", "error", "verified", "started"}


# -- which addresses can never be a source ----------------------------------------------

def never_a_source(a: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """No packet from the outside ever carries these as its source (RFC 1122, 4291, 5735)."""
    if isinstance(a, ipaddress.IPv6Address) and a.ipv4_mapped is not None:
        a = a.ipv4_mapped
    return (a.is_unspecified or a.is_loopback or a.is_multicast or a.is_link_local or a.is_reserved
            or a == ipaddress.IPv4Address("255.255.255.255")
            or (a.version == 4 and a in ipaddress.IPv4Network("0.0.0.0/8"))
            or never_source_reason(ipaddress.ip_network(a)) is not None)  # tm4's rule for every way in


# -- keypad strings ------------------------------------------------------------------------

KEYPAD_AND_GARBAGE = st.text(alphabet=st.sampled_from(list("0123456789*#ABCD .:\x00\n\t-+") + ["٣", "１", "ﬀ"]),
                             max_size=40)


@BOUNDED
@given(st.one_of(KEYPAD_AND_GARBAGE, st.text(max_size=40)))
@example("255*255*255*255")
@example("0*0*0*0#")
@example("127*0*0*1")
@example("224*0*0*1")
@example("239*255*255*250")
@example("169*254*1*1")
@example("240*0*0*1")
@example("0*1*2*3")
@example("١٢٣*1*1*1")  # Arabic-Indic digits: str.isdigit() is true, int() takes them
@example("１*1*1*1")  # fullwidth 1
def test_any_keys_give_a_typed_refusal_or_a_source_address(keys: str) -> None:
    try:
        addr = parse_keys_checked(keys)
    except DtmfError as exc:
        assert isinstance(exc.reason, Reason) and exc.detail
        return
    assert isinstance(addr, ipaddress.IPv4Address)
    assert not never_a_source(addr), f"{keys!r} gave {addr}, which can never be a source"
    assert set(keys.removesuffix("#")) <= set("0123456789*"), "only keypad keys make an address"


@pytest.mark.parametrize("value", [None, 7, b"1*2*3*4", ["1"], 1.5])
def test_keys_that_are_not_text_are_a_typed_refusal(value: Any) -> None:
    with pytest.raises(DtmfError):
        parse_keys(value)


@BOUNDED
@given(st.ip_addresses())
@example(ipaddress.ip_address("255.255.255.255"))
@example(ipaddress.ip_address("ff02::1"))
@example(ipaddress.ip_address("::ffff:224.0.0.1"))
@example(ipaddress.ip_address("::"))
@example(ipaddress.ip_address("::ffff:0.0.0.0"))
def test_check_address_refuses_every_address_that_can_never_be_a_source(
        a: ipaddress.IPv4Address | ipaddress.IPv6Address) -> None:
    if never_a_source(a):
        assert check_address(a) is not None, a


# -- the dial-in operations: nothing that can never be a source is granted -------------------

@pytest.fixture
def granting(tmp_path: Path) -> Iterator[tuple[Any, str]]:
    from dialin_support import add_passcode, make_core

    from tm4.dialin.ops import DIALIN_OPS

    core = make_core(tmp_path)
    add_passcode(core, "alice", CODE)
    token = DIALIN_OPS["dialin.verify"](core, {"passcode": CODE, "callerid": "5551234"})["token"]
    yield core, token


ADDRESS_TEXT = st.one_of(
    st.ip_addresses().map(str),
    st.ip_addresses(v=4).map(lambda a: f"::ffff:{a}"),
    st.sampled_from(["255.255.255.255", "224.0.0.1", "0.0.0.0", "127.0.0.1", "ff02::1", "::", "::1",
                     "fe80::1%eth0", "0.1.2.3", "240.0.0.1", " 203.0.113.7 ", "203.0.113.7\n"]),
    st.text(max_size=30),
)


@settings(max_examples=120, deadline=timedelta(seconds=3),
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(ADDRESS_TEXT)
def test_the_grant_operation_never_lets_in_a_non_source(granting: tuple[Any, str], text: str) -> None:
    from tm4.core.errors import Tm4Error
    from tm4.dialin.ops import DIALIN_OPS

    core, token = granting
    checked = None
    with contextlib.suppress(Tm4Error):
        checked = DIALIN_OPS["dialin.check_address"](core, {"token": token, "address": text})
    try:
        DIALIN_OPS["dialin.grant"](core, {"token": token, "address": text, "callerid": "5551234"})
    except Tm4Error:
        return
    granted = ipaddress.ip_address(text.strip())
    assert not never_a_source(granted), f"{text!r} was granted"
    assert checked is not None and checked["ok"], "the check and the grant agree"


# -- AGI replies: anything Asterisk (or a broken pipe) sends ends in a clean hang-up -----------

class FakeBackend:
    def __init__(self) -> None:
        self.granted: list[str] = []

    def verify(self, passcode: str, call: CallInfo) -> Session:
        ok = passcode == CODE
        return Session(ok=ok, token="tok" if ok else "", own_address="203.0.113.50" if ok else "")

    def check_address(self, token: str, address: str) -> Checked:
        why = check_address(ipaddress.ip_address(address))
        return Checked(ok=why is None, reason=why.value if why else "")

    def grant(self, token: str, address: str, callerid: str) -> Granted:
        self.granted.append(address)
        return Granted("dialin-alice", address)

    def external_address(self) -> Found:
        return Found("198.51.100.1")


PLAUSIBLE = [
    "200 result=0", "200 result=0 endpos=9158", "200 result=-1", "200 result=-1 endpos=0", "200 result=1",
    "200 result=2", "200 result=49", "200 result=50 endpos=3", "200 result=35", f"200 result={CODE}",
    "200 result=203*0*113*7", "200 result=224*0*0*1", "200 result=255*255*255*255", "200 result= (timeout)",
    "200 result=12 (timeout)", "200 result=", "200 result=1 (hangup)", "HANGUP", "100 result=0 Trying...",
    "511 Command Not Permitted on a dead channel or intercept routine", "510 Invalid or unknown command",
    "520-Invalid command syntax.  Proper usage follows:", "Usage: x", "520 End of proper usage.",
    "200", "2000 result=0", "999 result=0", "200 result=4294967345", "200 result=-49", "", "result=0",
]
LINE = st.one_of(
    st.sampled_from(PLAUSIBLE).map(str.encode),
    st.binary(max_size=60),
    st.text(max_size=30).map(lambda t: ("200 result=" + t).encode()),
    st.from_regex(r"[0-9]{0,4}[ -]?result=[0-9*#A-Za-z -]{0,12}( endpos=-?[0-9]{1,25})?", fullmatch=True)
    .map(str.encode),
    st.just(b"2" * 70_000),
).map(lambda b: b.replace(b"\n", b""))
REPLIES = st.tuples(st.lists(LINE, max_size=30), st.booleans()).map(
    lambda t: b"\n".join(t[0]) + (b"\n" if t[1] and t[0] else b""))  # without a final \n: a cut line

ENV = "".join(ln + "\n" for ln in Channel(Line()).env_lines()).encode()


def _sent_lines(data: bytes) -> list[str]:
    return data.decode().split("\n")[:-1]


def _check_outcome(out: Outcome, backend: FakeBackend, sent: list[str]) -> None:
    assert out.status in STATUSES
    for address in backend.granted:
        assert not never_a_source(ipaddress.ip_address(address)), address
    for line in sent:  # every line tm4 wrote is one of its own commands, never echoed garbage
        assert line.split(" ")[0] in {"ANSWER", "GET", "STREAM", "SAY", "WAIT", "VERBOSE"}, line


@BOUNDED
@given(REPLIES)
@example(b"")
@example(b"200 result=0\n200 result=" + CODE.encode() + b"\nfoo\n")  # no numeric code: pyst2's ValueError
@example(b"200 result=0\n520-Invalid command syntax.  Proper usage follows:\n")  # pyst2 loops forever
@example(b"200 result=0\n\xff\xfe\x00\n")
@example(b"200 result=0\n200 res")
@example(b"200 result=0\n" + b"2" * 70_000 + b"\n")
@example(b"200 result=0\n200 result=" + CODE.encode() + b"\n200 result=203*0*113*7\n200 result=50 endpos=1\n"
         b"200 result=224*0*0*1\n200 result=49\n")
def test_classic_transport_any_replies(replies: bytes) -> None:
    out_stream = io.BytesIO()
    backend = FakeBackend()
    t = agi.ClassicTransport(io.BytesIO(ENV + replies), out_stream, sighup=False)
    out = agi.drive(conversation(), t, backend)
    _check_outcome(out, backend, _sent_lines(out_stream.getvalue()))


class _Writer:
    def __init__(self) -> None:
        self.data = bytearray()
        self.closed = False

    def write(self, b: bytes) -> None:
        if self.closed:
            raise ConnectionResetError("closed")
        self.data += b

    async def drain(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    async def wait_closed(self) -> None:
        pass

    def get_extra_info(self, name: str) -> Any:
        return ("127.0.0.1", 40000) if name in ("peername", "sockname") else None


def _reader(data: bytes) -> asyncio.StreamReader:
    r = asyncio.StreamReader()
    r.feed_data(data)
    r.feed_eof()
    return r


@BOUNDED
@given(REPLIES)
@example(b"HANGUP\nHANGUP\n" * 40)
@example(b"100 result=0 Trying...\n" * 80)
@example(b"200 result=0\nno code at all\n")
def test_fastagi_transport_any_replies(replies: bytes) -> None:
    backend = FakeBackend()
    writer = _Writer()

    async def go() -> Outcome:
        t = FastAgiTransport(_reader(replies), writer, {"agi_type": "Local"}, reply_timeout=1.0)  # type: ignore[arg-type]
        return await fast_drive(conversation(), t, backend)

    out = asyncio.run(go())
    _check_outcome(out, backend, _sent_lines(bytes(writer.data)))


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@settings(max_examples=80, deadline=timedelta(seconds=2), suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(REPLIES, st.binary(max_size=200)), st.booleans())
def test_the_fastagi_server_survives_any_stream(replies: bytes, with_env: bool) -> None:
    """The server's connection handler (what tm4d runs per call): one outcome line or a dropped
    connection, never an exception or a traceback in the log."""
    env = (b"agi_network: yes\nagi_network_script: tm4-dialin?secret=s3cret\nagi_type: Local\n"
           b"agi_callerid: 5551234\n\n")
    records = _Records()
    logger = logging.getLogger("tm4.fastagi")
    logger.addHandler(records)
    old_level = logger.level
    logger.setLevel(logging.DEBUG)
    try:
        async def go() -> DialinFastAGI:
            app = DialinFastAGI(FakeBackend(), allowed_uids=set(), secret="s3cret", reply_timeout=1.0)
            await app.handler(_reader((env if with_env else b"") + replies), _Writer())  # type: ignore[arg-type]
            return app

        app = asyncio.run(go())
    finally:
        logger.removeHandler(records)
        logger.setLevel(old_level)
    assert not any(r.exc_info for r in records.records), "no traceback"
    assert not any(r.levelno >= logging.ERROR for r in records.records)
    calls = [r for r in records.records if r.getMessage().startswith("event=dialin_call")]
    assert len(app.outcomes) == len(calls) <= 1
    assert len(calls) == 1 or app.dropped + app.refused == 1


@contextlib.contextmanager
def _stdio(data: bytes) -> Iterator[tuple[io.BytesIO, io.StringIO]]:
    stdin = io.TextIOWrapper(io.BytesIO(data))
    out = io.BytesIO()
    stdout = io.TextIOWrapper(out)
    err = io.StringIO()
    old = signal.getsignal(signal.SIGHUP)
    try:
        with mock.patch.object(sys, "stdin", stdin), mock.patch.object(sys, "stdout", stdout), \
                mock.patch.object(sys, "stderr", err):
            yield out, err
    finally:
        signal.signal(signal.SIGHUP, old)


@settings(max_examples=100, deadline=timedelta(seconds=2), suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(REPLIES.map(lambda r: ENV + r), st.binary(max_size=300), REPLIES))
@example(b"")
@example(b"agi_request: tm4-dialin.agi\n")
@example(ENV + b"200 result=0\nfoo\n")
def test_main_classic_exits_cleanly_with_one_line(data: bytes) -> None:
    backend = FakeBackend()
    with mock.patch("tm4.dialin.client.connect", lambda path: backend), _stdio(data) as (_, err):
        rc = agi.main_classic([])
    assert rc == 0
    lines = err.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tm4-dialin.agi[") and ": tm4 dial-in: " in lines[0], lines
    assert "Traceback" not in err.getvalue()


# -- the installed script itself, started as Asterisk starts it ------------------------------

SCRIPT = str(REPO / "agi-bin" / "tm4-dialin.agi")
BROKEN = {
    "closed before the environment ended": b"agi_request: tm4-dialin.agi\nagi_chan",
    "closed after ANSWER": ENV + b"200 result=0\n",
    "a reply with no code": ENV + b"200 result=0\nresult=1\n",
    "a cut usage block": ENV + b"200 result=0\n520-Invalid command syntax.  Proper usage follows:\n",
    "bytes that are not text": ENV + b"200 result=0\n\xff\xfe\xfd\n",
    "a huge line": ENV + b"200 result=0\n" + b"9" * 200_000 + b"\n",
    "a key code that is no key": ENV + b"200 result=0\n200 result=48213977\n200 result=7 endpos=100\n",
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_the_classic_script_ends_cleanly(case: str, tmp_path: Path) -> None:
    from dialin_support import write_config

    # tm4d down and root: the script falls back to the core, on this test's own config and store
    env = {"PATH": "/usr/bin:/bin", "HOME": "/root", "LANG": "C.UTF-8",
           "TM4_CONFIG": str(write_config(tmp_path)), "TM4_NO_SSH_PROTECT": "1", "TM4_NFT_SUBPROCESS": "1"}
    r = subprocess.run([python(), SCRIPT, str(tmp_path / "no-tm4d.sock")], input=BROKEN[case],
                       capture_output=True, timeout=30, env=env, cwd="/")
    err = r.stderr.decode()
    assert r.returncode == 0, err
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and "tm4 dial-in: hangup" in lines[0], lines


def test_broken_replies_over_tcp_leave_the_server_serving(tmp_path: Path) -> None:
    import socket

    from agisim import Caller, run_fastagi
    from dialin_support import add_passcode, entry_addresses, fastagi_server, make_core

    core = make_core(tmp_path)
    add_passcode(core, "alice", CODE)
    env = "".join(ln + "\n" for ln in Channel(Line(), network=True).env_lines()).encode()
    streams = [b"200 result=0\nfoo\n", b"200 result=0\n\xff\xfe\n", b"200 result=0\n200 res",
               b"200 result=0\n" + b"2" * 100_000 + b"\n", b"HANGUP\n" * 100,
               b"200 result=0\n520-Invalid command syntax.  Proper usage follows:\n" + b"x\n" * 100]
    with fastagi_server(core) as app:
        for stream in streams:
            with socket.create_connection(("127.0.0.1", app.port), timeout=5) as s:
                s.sendall(env + stream)
                s.shutdown(socket.SHUT_WR)
                while s.recv(4096):
                    pass  # the server closes the call
        assert len(app.outcomes) == len(streams)
        assert all(o.status == "hangup" for o in app.outcomes)
        ch = Channel(Line(), Caller(keys=[CODE + "#", "203*0*113*7#", "1"]), network=True)
        run_fastagi("127.0.0.1", app.port, ch)
    assert entry_addresses(core, "dialin-alice") == ["203.0.113.7"], "a good call after the broken ones"


def test_the_classic_script_ends_cleanly_when_asterisk_stops_reading(tmp_path: Path) -> None:
    """Asterisk closes its end of the script's stdout: the write fails (EPIPE); one line, exit 0,
    and nothing left buffered to fail again at exit ("Exception ignored ... BrokenPipeError")."""
    import time

    from dialin_support import write_config

    env = {"PATH": "/usr/bin:/bin", "HOME": "/root", "LANG": "C.UTF-8",
           "TM4_CONFIG": str(write_config(tmp_path)), "TM4_NO_SSH_PROTECT": "1", "TM4_NFT_SUBPROCESS": "1"}
    p = subprocess.Popen([python(), SCRIPT], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env=env, cwd="/")
    assert p.stdin is not None and p.stdout is not None and p.stderr is not None
    p.stdout.close()
    p.stdin.write(ENV)
    p.stdin.flush()
    time.sleep(0.3)
    p.stdin.close()
    assert p.wait(20) == 0
    lines = p.stderr.read().decode().splitlines()
    assert len(lines) == 1 and "tm4 dial-in: hangup" in lines[0] and "Broken pipe" in lines[0], lines
