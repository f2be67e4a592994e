"""Asterisk's side of AGI, for tests: classic (a child process on stdin/stdout) and FastAGI (TCP).

Built from real Asterisk 22.10.1 captures (tests/fixtures/agi/) and kept
faithful to them, which test_agisim.py checks by replaying them byte for byte:
- the environment block: `agi_key: value` lines in Asterisk's order, `\\n`
  line ends, a blank line; FastAGI adds `agi_network: yes` and
  `agi_network_script` first;
- one reply line per command, `200 result=...`, `510 Invalid or unknown
  command`, the multi-line `520-` usage block;
- GET DATA: the digits without the `#`; `(timeout)` when the caller stops
  (from res_agi.c handle_getdata; the captures only hold completed entries);
  at most `max digits` keys, as ast_readstring stops there;
- a hang-up during a command: that command answers `200 result=-1` (STREAM
  FILE with `endpos=`); classic AGI gets SIGHUP just before that line, FastAGI
  an unsolicited `HANGUP` line just after it; afterwards channel commands get
  `511 Command Not Permitted on a dead channel or intercept routine`, while
  VERBOSE and GET VARIABLE still answer 200;
- STREAM FILE of a missing file: `200 result=-1 endpos=0`.
- keys typed ahead (real2 capture, tests/fixtures/dialin/real2/): GET DATA
  stops at `#` (or max digits) and the keys after it fall into the next
  command; STREAM FILE / SAY ALPHA without escape digits read them and drop
  them (`200 result=0 endpos=<full>`). With escape digits the first escape key
  stops the prompt and `result=` is its character code (res_agi.c
  handle_streamfile/handle_sayalpha, file.c waitstream_core; no capture has
  that reply, so endpos is only "inside the sound"); WAIT FOR DIGIT takes one
  key the same way (0: none).

The caller is scripted: the keys typed at each GET DATA (anything after a `#`
is typed on into the next command), and the command during which they hang up.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
import wave
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SOUNDS = REPO / "sounds" / "en"
DEAD = "511 Command Not Permitted on a dead channel or intercept routine"
# Core sounds the captures played, with the endpos Asterisk reported for a full play.
CORE_SOUNDS = {"hello-world": 11360, "tt-monkeys": 129440, "beep": 1600}
USAGE = {
    "GET DATA": [
        "Stream the given <replaceable>file</replaceable>, and receive DTMF data.",
        "Returns the digits received from the channel at the other end.",
    ],
}
# Commands res_agi still runs on a dead channel (the rest get 511).
DEAD_OK = {"VERBOSE", "GET VARIABLE", "GET FULL VARIABLE", "SET VARIABLE", "NOOP"}
COMMANDS = ("ANSWER", "VERBOSE", "GET FULL VARIABLE", "GET VARIABLE", "SET VARIABLE", "CHANNEL STATUS",
            "STREAM FILE", "GET DATA", "SAY DIGITS", "SAY ALPHA", "WAIT FOR DIGIT", "HANGUP", "NOOP")


@dataclass
class Line:
    """The calling channel."""

    callerid: str = "203011307"
    calleridname: str = "Lab Caller"
    channel: str = "Local/s@dtmf-sender-00000000;1"
    type: str = "Local"
    uniqueid: str = "1795236667.0"
    context: str = "agi-test"
    extension: str = "s"
    priority: str = "2"
    threadid: str = "140105614493376"
    endpoint: str = ""  # CHANNEL(endpoint) (PJSIP only)
    remote_addr: str = ""  # CHANNEL(pjsip,remote_addr) (PJSIP only)

    @classmethod
    def pjsip(cls, endpoint: str, remote_addr: str, callerid: str = "1001") -> Line:
        return cls(callerid=callerid, calleridname=endpoint, channel=f"PJSIP/{endpoint}-0000001a",
                   type="PJSIP", uniqueid="1795236800.7", context="from-internal", extension="*86",
                   priority="3", endpoint=endpoint, remote_addr=remote_addr)


@dataclass
class Caller:
    """What the person on the phone does.

    keys: what they type at each GET DATA, in order: "1234#" (ended with #),
    "12" (no # -> they stop, the timeout ends it), None (nothing -> timeout),
    "#" (just the pound key). Keys after the `#` ("203*0*113*7#1") are typed
    ahead: they fall into the next command. When the list runs out they hang up.
    hangup_at: hang up during the command with this index (0 = first command),
    or hangup_on: during the first command starting with this text.
    """

    keys: list[str | None] = field(default_factory=list)
    hangup_at: int | None = None
    hangup_on: str | None = None
    hangup_endpos: int = 73120  # where in a sound file the hang-up catches it
    sighup: bool = True  # classic AGI: False as with Set(AGISIGHUP=no): only -1 and 511 tell


def split_args(text: str) -> list[str]:
    """Asterisk's parse_args: blanks separate, double quotes group, backslash escapes."""
    out: list[str] = []
    cur: list[str] = []
    quoted = escaped = False
    started = False
    for c in text:
        if escaped:
            cur.append(c)
            escaped = False
        elif c == "\\":
            escaped = True
            started = True
        elif c == '"':
            quoted = not quoted
            started = True
        elif c in " \t" and not quoted:
            if started:
                out.append("".join(cur))
                cur, started = [], False
        else:
            cur.append(c)
            started = True
    if started:
        out.append("".join(cur))
    return out


class Channel:
    """One simulated call: turns each AGI command into Asterisk's reply lines."""

    def __init__(self, line: Line | None = None, caller: Caller | None = None, *, network: bool = False,
                 script: str | None = None, args: Sequence[str] = (), sounds: Path = SOUNDS):
        self.line = line or Line()
        self.caller = caller or Caller()
        self.network = network
        self.script = script or ("tm4-dialin" if network else "tm4-dialin.agi")
        self.args = list(args)
        self.sounds = sounds
        self.alive = True
        self.hung_up_now = False
        self.commands: list[str] = []
        self.transcript: list[tuple[str, str]] = []  # ("RECV"=to the script / "SEND"=from it, line)
        self.played: list[str] = []
        self.asked: list[str] = []
        self.said: list[str] = []
        self.missing: list[str] = []
        self.waited_ms = 0
        self.variables: dict[str, str] = {}
        self.dropped: list[str] = []  # keys typed during a prompt that did not listen for them
        self.escaped: list[str] = []  # keys that stopped a prompt
        self._keys = list(self.caller.keys)
        self._ahead = ""  # keys typed during whatever command comes next

    # -- environment ---------------------------------------------------------------
    def env_lines(self, host: str = "127.0.0.1", port: int = 4573) -> list[str]:
        ln = self.line
        out = []
        if self.network:
            out += ["agi_network: yes", f"agi_network_script: {self.script}",
                    f"agi_request: agi://{host}:{port}/{self.script}"]
        else:
            out += [f"agi_request: {self.script}"]
        out += [
            f"agi_channel: {ln.channel}", "agi_language: en", f"agi_type: {ln.type}",
            f"agi_uniqueid: {ln.uniqueid}", "agi_version: 22.10.1", f"agi_callerid: {ln.callerid}",
            f"agi_calleridname: {ln.calleridname}", "agi_callingpres: 0", "agi_callingani2: 0",
            "agi_callington: 0", "agi_callingtns: 0", "agi_dnid: unknown", "agi_rdnis: unknown",
            f"agi_context: {ln.context}", f"agi_extension: {ln.extension}", f"agi_priority: {ln.priority}",
            "agi_enhanced: 0.0", "agi_accountcode: ", f"agi_threadid: {ln.threadid}",
        ]
        out += [f"agi_arg_{i}: {a}" for i, a in enumerate(self.args, 1)]
        return [*out, ""]

    # -- commands ------------------------------------------------------------------
    def _hangs_up_now(self, cmd: str) -> bool:
        c = self.caller
        idx = len(self.commands) - 1
        if c.hangup_at is not None and idx == c.hangup_at:
            return True
        return c.hangup_on is not None and cmd.startswith(c.hangup_on)

    def handle(self, cmd: str) -> list[str]:
        """Reply lines for one command line (without its newline)."""
        self.commands.append(cmd)
        self.transcript.append(("SEND", cmd))
        self.hung_up_now = False
        name = next((n for n in COMMANDS if cmd == n or cmd.startswith(n + " ")), None)
        args = split_args(cmd[len(name):]) if name else []
        if name is None:
            lines = ["510 Invalid or unknown command"]
        elif not self.alive and name not in DEAD_OK:
            lines = [DEAD]
        else:
            if self.alive and self._hangs_up_now(cmd) and name not in DEAD_OK:
                self.alive = False
                self.hung_up_now = True
            lines = self._run(name, args)
        for ln in lines:
            self.transcript.append(("RECV", ln))
        return lines

    def _usage(self, name: str) -> list[str]:
        return ["520-Invalid command syntax.  Proper usage follows:", *USAGE.get(name, [f"Usage: {name}"]),
                "520 End of proper usage."]

    def _sound_endpos(self, name: str) -> int | None:
        if name in CORE_SOUNDS:
            return CORE_SOUNDS[name]
        if name.startswith(("digits/", "letters/")):
            return 4000
        for path in ((Path(name + ".wav"),) if name.startswith("/")
                     else (self.sounds / (name.split("/", 1)[1] + ".wav"),) if name.startswith("tm4/") else ()):
            if path.exists():
                with wave.open(str(path)) as w:
                    return w.getnframes()
        return None

    def _run(self, name: str, a: list[str]) -> list[str]:
        cut = self.hung_up_now
        if name == "ANSWER":
            return ["200 result=-1"] if cut else ["200 result=0"]
        if name == "VERBOSE":
            return ["200 result=1"] if a else self._usage(name)
        if name == "NOOP":
            return ["200 result=0"]
        if name == "GET VARIABLE":
            if len(a) != 1:
                return self._usage(name)
            value = self._variable(a[0])
            return ["200 result=0"] if value is None else [f"200 result=1 ({value})"]
        if name == "GET FULL VARIABLE":
            if len(a) not in (1, 2):
                return self._usage(name)
            if a[0] == "${CALLERID(all)}":
                return [f'200 result=1 ("{self.line.calleridname}" <{self.line.callerid}>)']
            value = self._variable(a[0].removeprefix("${").removesuffix("}"))
            return ["200 result=0"] if value is None else [f"200 result=1 ({value})"]
        if name == "SET VARIABLE":
            if len(a) != 2:
                return self._usage(name)
            self.variables[a[0]] = a[1]
            return ["200 result=1"]
        if name == "CHANNEL STATUS":
            return ["200 result=6"]
        if name == "HANGUP":
            self.alive = False
            return ["200 result=1"]
        if name == "STREAM FILE":
            if len(a) not in (2, 3):
                return self._usage(name)
            self.played.append(a[0])
            endpos = self._sound_endpos(a[0])
            if endpos is None:
                self.missing.append(a[0])
                return ["200 result=-1 endpos=0"]
            if cut:
                return [f"200 result=-1 endpos={min(self.caller.hangup_endpos, endpos)}"]
            key = self._escape(a[1])
            if key:
                return [f"200 result={ord(key)} endpos={endpos // 2}"]
            return [f"200 result=0 endpos={endpos}"]
        if name in ("SAY DIGITS", "SAY ALPHA"):
            if len(a) != 2:
                return self._usage(name)
            self.said.append(a[0])
            if cut:
                return ["200 result=-1"]
            key = self._escape(a[1])
            return [f"200 result={ord(key)}" if key else "200 result=0"]
        if name == "WAIT FOR DIGIT":
            if len(a) != 1:
                return self._usage(name)
            if cut:
                return ["200 result=-1"]
            if self._ahead:
                key, self._ahead = self._ahead[0], self._ahead[1:]
                self.escaped.append(key)
                return [f"200 result={ord(key)}"]
            self.waited_ms += max(0, int(a[0]))
            return ["200 result=0"]
        if name == "GET DATA":
            return self._get_data(a)
        return ["510 Invalid or unknown command"]

    def _escape(self, digits: str) -> str:
        """Keys typed during a prompt: up to the first escape digit they are read and dropped;
        that one stops the prompt (returned); the rest come later."""
        while self._ahead:
            key, self._ahead = self._ahead[0], self._ahead[1:]
            if key in digits:
                self.escaped.append(key)
                return key
            self.dropped.append(key)
        return ""

    def _variable(self, name: str) -> str | None:
        ln = self.line
        if name == "CALLERID(num)":
            return ln.callerid
        if name == "CALLERID(name)":
            return ln.calleridname
        if name == "CHANNEL(endpoint)" and ln.type == "PJSIP":
            return ln.endpoint
        if name == "CHANNEL(pjsip,remote_addr)" and ln.type == "PJSIP":
            return ln.remote_addr
        return self.variables.get(name)

    def _get_data(self, a: list[str]) -> list[str]:
        if len(a) < 1:
            return self._usage("GET DATA")
        self.asked.append(a[0])
        if self._sound_endpos(a[0]) is None:
            self.missing.append(a[0])  # app.c skips a missing prompt and still reads keys
        if self.hung_up_now:
            return ["200 result=-1"]
        maxd = int(a[2]) if len(a) >= 3 else 1024
        if self._ahead:
            typed: str | None = self._ahead
            self._ahead = ""
        elif not self._keys:  # the caller has nothing more to say: they hang up
            self.alive = False
            self.hung_up_now = True
            return ["200 result=-1"]
        else:
            typed = self._keys.pop(0)
        if typed is None:
            return ["200 result= (timeout)"]
        got = ""
        for i, k in enumerate(typed):
            if k == "#":
                self._ahead = typed[i + 1:]
                return [f"200 result={got}"]
            got += k
            if len(got) >= maxd:
                self._ahead = typed[i + 1:]
                return [f"200 result={got}"]
        return [f"200 result={got} (timeout)"]


# -- classic AGI: a child process on stdin/stdout ----------------------------------------

@dataclass
class Run:
    channel: Channel
    returncode: int | None = None
    seconds: float = 0.0
    first_command_s: float | None = None  # from start to the first command received
    stderr: str = ""
    closed_s: float | None = None  # FastAGI: from the last reply to the server's close


def run_stdio(argv: Sequence[str], channel: Channel, *, env: dict[str, str] | None = None,
              timeout: float = 30.0) -> Run:
    """Start the AGI script as Asterisk does and play the call; SIGHUP on a hang-up."""
    started = time.monotonic()
    proc = subprocess.Popen(list(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, bufsize=1)
    run = Run(channel)
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    err: list[str] = []
    reader = threading.Thread(target=lambda: err.append(proc.stderr.read()), daemon=True)  # type: ignore[union-attr]
    reader.start()
    try:
        assert proc.stdin is not None and proc.stdout is not None
        try:
            proc.stdin.write("".join(line + "\n" for line in channel.env_lines()))
            proc.stdin.flush()
            while True:
                line = proc.stdout.readline()
                if not line:
                    break
                if run.first_command_s is None:
                    run.first_command_s = time.monotonic() - started
                replies = channel.handle(line.rstrip("\n"))
                if channel.hung_up_now and channel.caller.sighup:
                    proc.send_signal(signal.SIGHUP)
                proc.stdin.write("".join(r + "\n" for r in replies))
                proc.stdin.flush()
        except BrokenPipeError:
            pass
        run.returncode = proc.wait(timeout=timeout)
    finally:
        timer.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        reader.join(timeout=5)
    run.seconds = time.monotonic() - started
    run.stderr = "".join(err)
    return run


# -- FastAGI: Asterisk connects over TCP -----------------------------------------------

def run_fastagi(host: str, port: int, channel: Channel, *, timeout: float = 30.0,
                script: str | None = None) -> Run:
    """Connect like res_agi, send the environment, answer every command until the server closes."""
    if script is not None:
        channel.script = script
    started = time.monotonic()
    run = Run(channel)
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(fam, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect((host, port))
        s.sendall("".join(line + "\n" for line in channel.env_lines(host, port)).encode())
        f = s.makefile("rb")
        last = time.monotonic()
        while True:
            try:
                raw = f.readline()
            except (ConnectionResetError, TimeoutError):
                break
            if not raw:
                run.closed_s = time.monotonic() - last
                break
            if run.first_command_s is None:
                run.first_command_s = time.monotonic() - started
            replies = channel.handle(raw.decode().rstrip("\n"))
            if channel.hung_up_now:
                replies = [*replies, "HANGUP"]  # written inline, after the -1 (see the capture)
            try:
                s.sendall("".join(r + "\n" for r in replies).encode())
            except (BrokenPipeError, ConnectionResetError):
                break
            last = time.monotonic()
        f.close()
    run.seconds = time.monotonic() - started
    return run


# -- the captures ---------------------------------------------------------------------

@dataclass
class Capture:
    env: list[str]
    exchanges: list[tuple[str, list[str]]]  # (command sent, lines/signals received after it)
    network: bool


def load_capture(path: Path) -> Capture:
    """A per-run transcript (RECV/SEND/SIGNAL lines with Python reprs of the exact bytes)."""
    import ast

    env: list[str] = []
    exchanges: list[tuple[str, list[str]]] = []
    for raw in path.read_text().splitlines():
        parts = raw.split(None, 2)
        if len(parts) < 3:
            continue
        kind, payload = parts[1], parts[2]
        if kind == "SIGNAL":
            exchanges[-1][1].append("SIGHUP")
            continue
        if kind not in ("RECV", "SEND"):
            continue
        data = ast.literal_eval(payload).decode()
        assert data.endswith("\n"), raw
        text = data[:-1]
        if kind == "SEND":
            exchanges.append((text, []))
        elif exchanges:
            exchanges[-1][1].append(text)
        else:
            env.append(text)
    return Capture(env, exchanges, network=any(e.startswith("agi_network:") for e in env))


def load_streams(asterisk_to_agi: bytes, agi_to_asterisk: bytes) -> Capture:
    """A FastAGI call from its two raw byte streams (no timing): each command gets the lines up
    to and including the next coded reply; HANGUP lines after the last reply go with it."""
    lines = asterisk_to_agi.decode().split("\n")
    assert lines[-1] == "", "the stream ends with a newline"
    lines = lines[:-1]
    blank = lines.index("")
    env, replies = lines[:blank + 1], lines[blank + 1:]
    commands = agi_to_asterisk.decode().split("\n")[:-1]
    exchanges: list[tuple[str, list[str]]] = []
    i = 0
    for cmd in commands:
        got: list[str] = []
        while i < len(replies):
            got.append(replies[i])
            i += 1
            if got[-1][:3].isdigit():
                break
        exchanges.append((cmd, got))
    exchanges[-1][1].extend(replies[i:])
    return Capture(env, exchanges, network=True)


def channel_for_capture(cap: Capture, caller: Caller) -> Channel:
    env = dict(e.split(": ", 1) if ": " in e else (e.rstrip(":"), "") for e in cap.env if e)
    line = Line(callerid=env["agi_callerid"], calleridname=env["agi_calleridname"],
                channel=env["agi_channel"], type=env["agi_type"], uniqueid=env["agi_uniqueid"],
                context=env["agi_context"], extension=env["agi_extension"], priority=env["agi_priority"],
                threadid=env["agi_threadid"])
    args = [env[k] for k in sorted(k for k in env if k.startswith("agi_arg_"))]
    script = env.get("agi_network_script", env["agi_request"])
    return Channel(line, caller, network=cap.network, script=script, args=args)


def replay(cap: Capture, channel: Channel) -> list[tuple[str, list[str]]]:
    """Feed the capture's commands to the simulator; what the script would read after each,
    signals included (FastAGI's HANGUP line is read as the first line of the NEXT exchange)."""
    out = []
    pending = False
    for cmd, _ in cap.exchanges:
        lines = channel.handle(cmd)
        got = ["HANGUP"] if pending else []
        pending = False
        if channel.hung_up_now:
            if channel.network:
                pending = True
            else:
                got.append("SIGHUP")
        out.append((cmd, got + lines))
    return out


def wait_until(pred: Callable[[], bool], timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.01)
    return pred()


def python() -> str:
    return os.environ.get("TM4_PYTHON", str(REPO / ".venv" / "bin" / "python"))
