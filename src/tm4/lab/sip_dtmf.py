"""A real SIP call that types keys as RFC 2833 events, with SIPp (Debian's sip-tester).

sip-tester ships one pcap per key (/usr/share/sip-tester/dtmf_2833_*.pcap) for SIPp's
play_pcap_audio. The lab and the real-Asterisk tests call the PBX's `anonymous` endpoint
from a client namespace and play them, so the dial-in sees a call straight from the
caller's device (menu option 1: the caller's own address).
"""

from __future__ import annotations

import shutil
import struct
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

DTMF_PCAPS = Path("/usr/share/sip-tester")  # Debian's sip-tester: RFC 2833 events, one key per file


def sequenced_pcaps(keys: list[str], dest: Path) -> list[Path]:
    """sip-tester's one-key pcaps, renumbered to play one after another in one RTP stream.

    Each shipped file keeps the sequence numbers and timestamp of the capture it was cut
    from (1 before 2 before #...), and SIPp sends them unchanged: played out of that order,
    Asterisk drops the keys whose numbers went backwards (measured: of 48213977# it got
    489#). Here key i gets sequence numbers and an event timestamp after key i-1's; the UDP
    checksum is cleared (0: none, for IPv4) since the payload changed."""
    names = {"#": "pound", "*": "star"}
    out = []
    seq, stamp = 1000, 160_000
    for i, key in enumerate(keys):
        data = bytearray((DTMF_PCAPS / f"dtmf_2833_{names.get(key, key)}.pcap").read_bytes())
        if struct.unpack_from("<I", data, 20)[0] != 1:
            raise ValueError(f"{DTMF_PCAPS} holds a capture that is not Ethernet: cannot renumber it")
        off = 24
        last = None
        while off < len(data):
            incl = struct.unpack_from("<I", data, off + 8)[0]
            pkt = off + 16
            ihl = (data[pkt + 14] & 0x0F) * 4
            udp = pkt + 14 + ihl
            rtp = udp + 8
            old_seq = struct.unpack_from("!H", data, rtp + 2)[0]
            if last is not None and old_seq != last:
                seq += 1  # the end packet is sent three times with one number: keep that
            last = old_seq
            struct.pack_into("!H", data, udp + 6, 0)
            struct.pack_into("!HI", data, rtp + 2, seq, stamp)
            off = pkt + incl
        seq += 1
        stamp += 16_000
        path = dest / f"key{i:02d}.pcap"
        path.write_bytes(bytes(data))
        out.append(path)
    return out


def dtmf_call_scenario(keys: list[tuple[str, float]], dest: Path) -> str:
    """A SIPp UAC: INVITE the anonymous endpoint (no auth), then after each pause play one
    RFC 2833 key (sequenced_pcaps), then wait for Asterisk's BYE."""
    plays = []
    for (_, pause), pcap in zip(keys, sequenced_pcaps([k for k, _ in keys], dest), strict=True):
        plays.append(f'  <pause milliseconds="{int(pause * 1000)}"/>\n'
                     f'  <nop><action><exec play_pcap_audio="{pcap}"/></action></nop>\n')
    return f"""<?xml version="1.0" encoding="ISO-8859-1" ?>
<scenario name="tm4 dial-in with RFC 2833 keys">
  <send retrans="500"><![CDATA[
INVITE sip:s@[remote_ip]:[remote_port] SIP/2.0
Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
From: <sip:traveller@[local_ip]:[local_port]>;tag=[pid]SIPpTag00[call_number]
To: <sip:s@[remote_ip]:[remote_port]>
Call-ID: [call_id]
CSeq: 1 INVITE
Contact: <sip:traveller@[local_ip]:[local_port]>
Max-Forwards: 70
Content-Type: application/sdp
Content-Length: [len]

v=0
o=user1 53655765 2353687637 IN IP[local_ip_type] [local_ip]
s=-
c=IN IP[media_ip_type] [media_ip]
t=0 0
m=audio [media_port] RTP/AVP 0 101
a=rtpmap:0 PCMU/8000
a=rtpmap:101 telephone-event/8000
a=fmtp:101 0-16
a=sendrecv
]]></send>
  <recv response="100" optional="true"/>
  <recv response="180" optional="true"/>
  <recv response="183" optional="true"/>
  <recv response="200" rrs="true"/>
  <send><![CDATA[
ACK [next_url] SIP/2.0
Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
From: <sip:traveller@[local_ip]:[local_port]>;tag=[pid]SIPpTag00[call_number]
[last_To:]
Call-ID: [call_id]
CSeq: 1 ACK
Contact: <sip:traveller@[local_ip]:[local_port]>
Max-Forwards: 70
Content-Length: 0

]]></send>
{''.join(plays)}  <recv request="BYE" timeout="40000"/>
  <send><![CDATA[
SIP/2.0 200 OK
[last_Via:]
[last_From:]
[last_To:]
[last_Call-ID:]
[last_CSeq:]
Content-Length: 0

]]></send>
</scenario>
"""


@dataclass
class SipCall:
    returncode: int
    seconds: float
    output: str


def available() -> str:
    """'' when SIPp and the pcaps are there, else what is missing."""
    if shutil.which("sipp") is None:
        return "sipp (Debian sip-tester)"
    if not (DTMF_PCAPS / "dtmf_2833_pound.pcap").is_file():
        return f"{DTMF_PCAPS}/dtmf_2833_*.pcap (Debian sip-tester)"
    return ""


def call_with_keys(ns: str, src: str, server: str, keys: list[tuple[str, float]], tmp: Path,
                   media_port: int = 16000, timeout: float = 90.0) -> SipCall:
    """Call sip:s@server from `src` in namespace `ns`, type `keys` (key, pause before it)."""
    scen = tmp / "dialin_dtmf.xml"
    scen.write_text(dtmf_call_scenario(keys, tmp))
    t0 = time.monotonic()
    run = subprocess.run(["ip", "netns", "exec", ns, "sipp", "-sf", str(scen), "-i", src, "-mi", src,
                          "-mp", str(media_port), "-m", "1", "-timeout", f"{int(timeout * 0.8)}s",
                          "-timeout_error", "-nostdin", f"{server}:5060"],
                         capture_output=True, text=True, timeout=timeout, cwd=tmp)
    return SipCall(run.returncode, round(time.monotonic() - t0, 2), (run.stdout + run.stderr)[-3000:])
