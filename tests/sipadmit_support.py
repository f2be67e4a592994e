"""SIP requests for the admission tests, shaped after a real REGISTER that SIPp sent to
Asterisk 22 (tests/fixtures/admission/register_a4_1001_ok.msg.log): only the
Request-URI's host (and the addresses) change."""

from __future__ import annotations

from pathlib import Path

FIXTURE = Path(__file__).parent / "fixtures" / "admission" / "register_a4_1001_ok.msg.log"


def _template() -> str:
    lines = FIXTURE.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("REGISTER "))
    body = [line for line in lines[start:] if line]
    return "\r\n".join(body) + "\r\n\r\n"


TEMPLATE = _template()  # REGISTER sip:127.0.0.1:5060 SIP/2.0 ... Content-Length: 0


def register(uri_host: str, *, header_host: str = "127.0.0.1", method: str = "REGISTER") -> bytes:
    """A REGISTER (or another method) whose Request-URI is sip:<uri_host> (the text after
    `sip:` up to the first space, taken as given: `x.example.org:5060`, `x;transport=udp`)."""
    first, rest = TEMPLATE.split("\r\n", 1)
    rest = rest.replace("127.0.0.1", header_host)
    return f"{method} sip:{uri_host} SIP/2.0\r\n{rest}".replace("CSeq: 1 REGISTER", f"CSeq: 1 {method}").encode()


def invite(host: str) -> bytes:
    return register(host, method="INVITE")
