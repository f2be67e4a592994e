"""A caller on FastAGI, simulated: Asterisk's environment block (in Asterisk's order), then
one reply per command, with the keys the caller types at each GET DATA.

Keys after a `#` are typed on into the next command, as in the real2 capture: a prompt
without escape digits reads and drops them; with escape digits the first one stops it and
`result=` is its character code (res_agi.c); WAIT FOR DIGIT takes one key (0: none)."""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass, field

from tm4.firewall.netns import in_netns


@dataclass
class AgiCall:
    commands: list[str] = field(default_factory=list)
    said: list[str] = field(default_factory=list)
    played: list[str] = field(default_factory=list)
    seconds: float = 0.0


def agi_call(ns: str, keys: list[str], *, host: str = "127.0.0.1", port: int = 4573,
             script: str = "tm4-dialin", callerid: str = "15550100", timeout: float = 30.0) -> AgiCall:
    """Asterisk calling the FastAGI server: environment block (Asterisk's order), then one
    reply per command; `keys` are what the caller types at each GET DATA (`#` ends one)."""
    call = AgiCall()
    env = [
        "agi_network: yes", f"agi_network_script: {script}", f"agi_request: agi://{host}:{port}/{script}",
        "agi_channel: Local/s@dtmf-sender-00000002;1", "agi_language: en", "agi_type: Local",
        "agi_uniqueid: 1795236708.4", "agi_version: 22.10.1", f"agi_callerid: {callerid}",
        "agi_calleridname: Lab Caller", "agi_callingpres: 0", "agi_callingani2: 0", "agi_callington: 0",
        "agi_callingtns: 0", "agi_dnid: unknown", "agi_rdnis: unknown", "agi_context: tm4-dialin",
        "agi_extension: s", "agi_priority: 2", "agi_enhanced: 0.0", "agi_accountcode: ",
        "agi_threadid: 140105612957376", "",
    ]
    pending = list(keys)
    ahead = [""]  # keys typed during whatever command comes next
    t0 = time.monotonic()
    s = in_netns(ns, lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM))
    with s:
        s.settimeout(timeout)
        s.connect((host, port))
        s.sendall("".join(line + "\n" for line in env).encode())
        f = s.makefile("rb")
        while True:
            raw = f.readline()
            if not raw:
                break
            cmd = raw.decode().rstrip("\n")
            call.commands.append(cmd)
            s.sendall((_agi_reply(cmd, pending, ahead, call, callerid) + "\n").encode())
        f.close()
    call.seconds = time.monotonic() - t0
    return call


def _escape(cmd: str, ahead: list[str]) -> str:
    """Keys typed during a prompt: dropped up to the first escape digit, which stops it."""
    digits = cmd.rsplit(" ", 1)[-1].strip('"')
    while ahead[0]:
        key, ahead[0] = ahead[0][0], ahead[0][1:]
        if key in digits:
            return key
    return ""


def _agi_reply(cmd: str, pending: list[str], ahead: list[str], call: AgiCall, callerid: str) -> str:
    name = cmd.split(" ", 1)[0].upper()
    if cmd.startswith("GET DATA"):
        maxd = int(cmd.split()[4]) if len(cmd.split()) > 4 else 1024
        if ahead[0]:
            typed, ahead[0] = ahead[0], ""
        elif not pending:
            return "200 result=-1"  # nothing more to say: the caller hangs up
        else:
            typed = pending.pop(0)
        got = ""
        for i, k in enumerate(typed):
            if k == "#":
                ahead[0] = typed[i + 1:]
                return f"200 result={got}"
            got += k
            if len(got) >= maxd:
                ahead[0] = typed[i + 1:]
                return f"200 result={got}"
        return f"200 result={got} (timeout)"
    if cmd.startswith(("SAY ALPHA", "SAY DIGITS")):
        call.said.append(cmd.split(" ", 2)[2].rsplit(" ", 1)[0])
        key = _escape(cmd, ahead)
        return f"200 result={ord(key)}" if key else "200 result=0"
    if cmd.startswith("STREAM FILE"):
        call.played.append(cmd.split(" ")[2])
        key = _escape(cmd, ahead)
        return f"200 result={ord(key)} endpos=8000" if key else "200 result=0 endpos=16000"
    if cmd.startswith("WAIT FOR DIGIT"):
        key, ahead[0] = ahead[0][:1], ahead[0][1:]
        return f"200 result={ord(key)}" if key else "200 result=0"
    if cmd.startswith("GET VARIABLE"):
        return f"200 result=1 ({callerid})" if "CALLERID(num)" in cmd else "200 result=0"
    if cmd.startswith("GET FULL VARIABLE"):
        return f'200 result=1 ("Lab Caller" <{callerid}>)' if "CALLERID" in cmd else "200 result=0"
    if name in ("ANSWER", "NOOP", "WAIT"):
        return "200 result=0"
    if name in ("VERBOSE", "SET", "HANGUP"):
        return "200 result=1"
    if name == "CHANNEL":
        return "200 result=6"
    return "510 Invalid or unknown command"
