"""Every real SIP exchange captured from Asterisk 22 (SIPp message logs in
tests/fixtures/asterisk-22/sip/ and real2/sip/), replayed through the lab's chan_pjsip
simulator (tm4.lab.sim.sip.ChanPjsip): each request SIPp sent is handed to it, and its
answer must have the real status line, the header names in order, the same Via (rport,
received), Call-ID, CSeq and To tag, and a WWW-Authenticate with the same parameters.
Values that change from run to run (nonce, opaque, Date, the Contact's remaining
seconds) are checked for their form only. The logs show LF line ends, so CRLF is not
checked here (the AMI replay checks it there)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tm4.lab.sim.sip import ChanPjsip

FIX = Path(__file__).parent.parent / "fixtures" / "asterisk-22"
LOGS = sorted((FIX / "sip").glob("*.msg.log")) + sorted((FIX / "real2" / "sip").glob("*.msg.log"))
USERS = {"1001": "secret1001", "1002": "secret1002"}  # etc/pjsip.conf of both capture sets
SEP = re.compile(r"^-{20,} \S+ \S+$", re.M)


def exchanges(path: Path) -> list[tuple[str, str | None]]:
    """(request sent, the response received right after it, if any)."""
    blocks = []
    for block in SEP.split(path.read_text(encoding="utf-8")):
        head, _, body = block.strip("\n").partition("\n\n")
        if "message sent" in head:
            blocks.append(("sent", body.strip("\n") + "\n"))
        elif "message received" in head:
            blocks.append(("recv", body.strip("\n") + "\n"))
    out: list[tuple[str, str | None]] = []
    for i, (kind, body) in enumerate(blocks):
        if kind == "sent" and not body.startswith("SIP/2.0"):
            nxt = blocks[i + 1] if i + 1 < len(blocks) and blocks[i + 1][0] == "recv" else None
            out.append((body, nxt[1] if nxt else None))
    return out


def headers(msg: str) -> tuple[str, list[tuple[str, str]]]:
    lines = msg.rstrip("\n").split("\n")
    return lines[0], [(k, v.strip()) for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)]


def peer_of(request: str) -> tuple[str, int]:
    m = re.search(r"^Via: SIP/2.0/UDP ([0-9.]+):(\d+)", request, re.M)
    assert m
    return m.group(1), int(m.group(2))


FORM = {
    "nonce": re.compile(r"\d+/[0-9a-f]{32}"), "opaque": re.compile(r"[0-9a-f]{16}"),
    "Date": re.compile(r"[A-Z][a-z]{2}, \d{2} [A-Z][a-z]{2} \d{4} \d{2}:\d{2}:\d{2} GMT"),
}


def same(real: str, mine: str) -> list[str]:
    diffs = []
    rs, rh = headers(real)
    ms, mh = headers(mine)
    if rs != ms:
        diffs.append(f"status {rs!r} != {ms!r}")
    if [k for k, _ in rh] != [k for k, _ in mh]:
        diffs.append(f"headers {[k for k, _ in rh]} != {[k for k, _ in mh]}")
    for (k, rv), (_, mv) in zip(rh, mh, strict=False):
        if k in ("Via", "Call-ID", "CSeq", "Content-Length") and rv != mv:
            diffs.append(f"{k}: {rv!r} != {mv!r}")
        elif k in ("To", "From") and rv.rpartition(";tag=")[2] != mv.rpartition(";tag=")[2]:
            diffs.append(f"{k} tag: {rv!r} != {mv!r}")
        elif k == "WWW-Authenticate":
            rp = re.findall(r'(\w+)="?([^",]*)"?', rv)
            mp = re.findall(r'(\w+)="?([^",]*)"?', mv)
            if [n for n, _ in rp] != [n for n, _ in mp]:
                diffs.append(f"{k} params {rp} != {mp}")
            for (n, v), (_, w) in zip(rp, mp, strict=False):
                if n in FORM and not FORM[n].fullmatch(w):
                    diffs.append(f"{k} {n}={w!r} is not shaped like {v!r}")
                elif n not in FORM and v != w:
                    diffs.append(f"{k} {n}: {v!r} != {w!r}")
        elif k == "Date" and not FORM["Date"].fullmatch(mv):
            diffs.append(f"Date {mv!r}")
        elif k == "Contact" and re.sub(r"expires=\d+", "", rv) != re.sub(r"expires=\d+", "", mv):
            diffs.append(f"Contact {rv!r} != {mv!r}")
    return diffs


@pytest.mark.parametrize("log", LOGS, ids=lambda p: p.name)
def test_chan_pjsip_simulator_answers_as_asterisk(log: Path) -> None:
    pairs = exchanges(log)
    assert pairs
    checked = 0
    for request, real in pairs:
        if request.startswith("ACK"):
            continue
        peer = peer_of(request)
        server = "Asterisk PBX 22.10.1" if "Server: Asterisk PBX" in (real or "") else "Asterisk-lab"
        sim = ChanPjsip(USERS, "127.0.0.1", 5060, None, server=server)
        # bindings made before the log began show in the real 200: give the simulator the same
        for uri, left in re.findall(r"^Contact: (<[^>]*>);expires=(\d+)$", real or "", re.M)[:-1]:
            sim.bindings.setdefault("1001", {})[uri] = int(left) + 1.5
        mine = sim.handle(request.replace("\n", "\r\n").encode(), peer, 0.0)
        if real is None:
            assert mine is not None  # SIPp logged no answer in time; the simulator still answers
            continue
        assert mine is not None, request
        diffs = same(real, mine.decode().replace("\r\n", "\n"))
        assert not diffs, f"{log.name}: {request.splitlines()[0]}\n" + "\n".join(diffs)
        checked += 1
    assert checked
