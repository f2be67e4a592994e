"""The test registrar writes Asterisk's `messages` lines as captured, and stock fail2ban reads them
(what the fail2ban side of bench/guard_vs_fail2ban.py relies on)."""

from __future__ import annotations

import hashlib
import re
import socket
import subprocess
import time
from pathlib import Path

from amisim import FIXTURES
from conftest import need_root_tools
from sipsim import SipResponder

LINE = re.compile(
    r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}\] NOTICE\[\d+\] res_pjsip/pjsip_distributor\.c: "
    r"Request '(?:REGISTER|INVITE)' from '(?:\"[^\"]*\" )?<sip:[^>]+>' failed for '[\d.]+:\d+' \(callid: [^)]+\) - "
    r"(No matching endpoint found|Failed to authenticate|Not match Endpoint ACL)$"
)


def register(user: str, callid: str, auth: str = "") -> bytes:
    return (f"REGISTER sip:192.0.2.1:5060 SIP/2.0\r\nVia: SIP/2.0/UDP 203.0.113.9:5071;branch=z9hG4bK-1\r\n"
            f"From: <sip:{user}@192.0.2.1>;tag=1\r\nTo: <sip:{user}@192.0.2.1>\r\nCall-ID: {callid}\r\n"
            f"CSeq: 1 REGISTER\r\n{auth}Content-Length: 0\r\n\r\n").encode()


def digest(user: str, password: str, nonce: str) -> str:
    h = lambda s: hashlib.md5(s.encode()).hexdigest()  # noqa: E731
    resp = h(f"{h(f'{user}:asterisk:{password}')}:{nonce}:{h('REGISTER:sip:192.0.2.1:5060')}")
    return (f'Authorization: Digest username="{user}",realm="asterisk",nonce="{nonce}",'
            f'uri="sip:192.0.2.1:5060",response="{resp}",algorithm=MD5\r\n')


def test_registrar_log_lines_match_the_capture_and_the_stock_fail2ban_filter(tmp_path: Path) -> None:
    need_root_tools("fail2ban-regex")
    captured = [ln for ln in (FIXTURES / "asterisk_messages.log").read_text().splitlines()
                if "pjsip_distributor" in ln]
    assert captured and all(LINE.match(ln) for ln in captured)  # the shape is the capture's

    log = tmp_path / "messages"
    r = SipResponder(socket.socket, emit=None, port=0, log_path=log)
    try:
        peer = ("203.0.113.9", 5071)
        now = time.monotonic()
        r.handle(register("9999", "1-1@x"), peer, now)  # unknown user
        r.handle(register("9999", "1-1@x", digest("9999", "x", "1/a")), peer, now)  # ... and its retry
        r.handle(register("1001", "2-1@x"), peer, now)  # known user: challenge only, no line
        r.handle(register("1001", "2-1@x", digest("1001", "wrong", "1/b")), peer, now)
        assert r.handle(register("1001", "3-1@x", digest("1001", "secret1001", "1/c")), peer, now
                        ).startswith(b"SIP/2.0 200 OK")
    finally:
        r.close()
    lines = log.read_text().splitlines()
    assert [LINE.match(ln).group(1) for ln in lines] == [  # type: ignore[union-attr]
        "No matching endpoint found", "No matching endpoint found", "Failed to authenticate",
        "Failed to authenticate"]
    out = subprocess.run(["fail2ban-regex", str(log), "/etc/fail2ban/filter.d/asterisk.conf"],
                         capture_output=True, text=True, check=True).stdout
    assert "Lines: 4 lines, 0 ignored, 4 matched, 0 missed" in out
