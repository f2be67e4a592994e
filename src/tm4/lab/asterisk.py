"""A real Asterisk in the lab's pbx namespace (`tm4 lab --asterisk PATH`).

The lab writes a private configuration tree (its own asterisk.conf whose directories
all live in the lab's temporary folder), wired the way the README tells an admin to:
tm4's least-privilege manager user included from manager.conf, the `[tm4]` ACL
included from acl.conf, the `security` logger channel, the `[tm4-dialin]` context and
the AGI launcher rendered by the same functions `tm4 install` uses, tm4's prompts.
A second manager user, the lab's driver, originates the dial-in call (a Local channel
whose other half types the keys with SendDTMF) and watches the security events, so
the story can measure what reached Asterisk from each source.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tm4.asterisk.amiuser import render_manager_user
from tm4.daemon.deploy import AGI_NAME, render_dialplan, render_launcher
from tm4.daemon.shipped import AGI_SCRIPT, DIALPLAN, prompts, shipped_text
from tm4.firewall.netns import in_netns
from tm4.lab.timeline import StepFailed

DRIVER = "tm4lab"
CALLER_CONTEXT = "tm4lab-caller"
# Security events that mean "a wrong credential reached Asterisk" (what the guard counts).
FAILURES = {"InvalidPassword", "ChallengeResponseFailed", "InvalidAccountID", "FailedACL"}
MODULES_NOLOAD = (
    "chan_iax2", "chan_unistim", "chan_mgcp", "chan_skinny", "chan_motif", "res_xmpp",
    "cdr_radius", "cel_radius", "res_hep", "res_hep_pjsip", "res_hep_rtcp",
    "res_pjsip_phoneprov_provider", "res_phoneprov", "cdr_pgsql", "cel_pgsql",
    "res_config_pgsql", "res_snmp", "res_statsd", "res_stasis_test", "chan_console",
    "chan_alsa", "chan_ooh323", "res_config_ldap", "cdr_tds", "cel_tds", "cdr_csv",
    "cdr_manager", "res_prometheus", "res_aeap", "res_speech_aeap",
)


@dataclass
class SourceSeen:
    """What Asterisk reported about one source: every security event, and the failures."""

    packets: list[float] = field(default_factory=list)
    failures: list[float] = field(default_factory=list)


def documentation_dir(binary: str) -> Path | None:
    """Where the Asterisk built as `binary` keeps its XML documentation: without it the
    configuration framework (stasis first) refuses to start. Looked for beside the usual
    install prefixes of that binary."""
    prefix = Path(binary).resolve().parent.parent
    for d in (prefix / "var/lib/asterisk", prefix / "share/asterisk", Path("/var/lib/asterisk"),
              Path("/usr/share/asterisk")):
        if (d / "documentation" / "core-en_US.xml").is_file():
            return d / "documentation"
    return None


def render_asterisk_conf(root: Path, moddir: str | None) -> str:
    d = {"astetcdir": root / "etc", "astvarlibdir": root / "lib", "astdbdir": root / "lib",
         "astkeydir": root / "lib", "astdatadir": root / "lib", "astagidir": root / "agi-bin",
         "astspooldir": root / "spool", "astrundir": root / "run", "astlogdir": root / "log"}
    lines = ["; written by `tm4 lab --asterisk`: a private Asterisk for one lab run", "[directories]"]
    lines += [f"{k} => {v}" for k, v in d.items()]
    if moddir:
        lines.append(f"astmoddir => {moddir}")
    lines += ["", "[options]", "verbose = 2", "timestamp = yes", "documentation_language = en_US",
              "transmit_silence = yes", ""]
    return "\n".join(lines)


def render_pjsip_conf(users: dict[str, str]) -> str:
    out = ["[transport-udp]", "type = transport", "protocol = udp", "bind = 0.0.0.0:5060", "",
           "[transport-tcp]", "type = transport", "protocol = tcp", "bind = 0.0.0.0:5060", ""]
    for user, password in users.items():
        out += [f"[{user}]", "type = endpoint", "context = internal", "disallow = all", "allow = ulaw",
                f"auth = {user}", f"aors = {user}", "direct_media = no", "",
                f"[{user}]", "type = auth", "auth_type = userpass", f"username = {user}",
                f"password = {password}", "",
                f"[{user}]", "type = aor", "max_contacts = 5", "remove_existing = yes", ""]
    out += ["[anonymous]", "type = endpoint", "context = from-anonymous", "disallow = all",
            "allow = ulaw", "direct_media = no", ""]
    return "\n".join(out)


def render_extensions_conf(keys: list[str], gap: float) -> str:
    """The dial-in context include, and the caller half of the lab's call: it answers,
    then types each group of keys with `gap` seconds between them."""
    caller = [f"[{CALLER_CONTEXT}]", "exten => s,1,Answer()", " same => n,Wait(1.5)"]
    for k in keys:
        caller += [f" same => n,SendDTMF({k},150)", f" same => n,Wait({gap})"]
    caller += [" same => n,Wait(20)", " same => n,Hangup()"]
    return "\n".join([
        "[general]", "static = yes", "writeprotect = yes", "", "#include extensions_tm4.conf", "",
        "[internal]", "exten => *86,1,Goto(tm4-dialin,s,1)", "",
        "[from-anonymous]", "exten => s,1,Goto(tm4-dialin,s,1)", "exten => _X.,1,Goto(tm4-dialin,s,1)", "",
        *caller, "",
    ])


def render_manager_conf(driver_secret: str) -> str:
    return "\n".join([
        "[general]", "enabled = yes", "port = 5038", "bindaddr = 127.0.0.1", "displayconnects = no", "",
        "; the lab's driver: originates the dial-in call, watches security events, asks `acl show`",
        f"[{DRIVER}]", f"secret = {driver_secret}", "deny = 0.0.0.0/0.0.0.0",
        "permit = 127.0.0.1/255.255.255.255", "read = security,system,call,agi,dtmf",
        "write = originate,call,command,system", "",
        "; tm4's own AMI user (tm4 asterisk install writes the same)",
        '#include "manager_tm4.conf"', "",
    ])


class RealAsterisk:
    """Asterisk started for real in `ns`, with its driver AMI session."""

    def __init__(self, ns: str, tmp: Path, binary: str, *, moddir: str | None,
                 tm4_user: str, tm4_secret: str, socket_path: str, fastagi: str,
                 users: dict[str, str], keys: list[str], key_gap: float = 2.0,
                 run_as: tuple[str, str] | None = None):
        self.ns, self.binary, self.moddir = ns, binary, moddir
        self.run_as = run_as  # (user, group) for Asterisk's -U/-G, as a packaged Asterisk runs
        self.root = tmp / "ast"
        self.conf = self.root / "etc" / "asterisk.conf"
        self.driver_secret = secrets.token_hex(16)
        self.tm4_user, self.tm4_secret = tm4_user, tm4_secret
        self.socket_path, self.fastagi = socket_path, fastagi
        self.users, self.keys, self.key_gap = users, keys, key_gap
        self.proc: subprocess.Popen[Any] | None = None
        self.log_path = tmp / "asterisk.log"
        self.sources: dict[str, SourceSeen] = {}
        self.events: list[tuple[float, dict[str, str]]] = []
        self.tm4_logins = 0
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._reader: threading.Thread | None = None
        self._replies: dict[str, dict[str, str]] = {}
        self._closing = False

    # -- configuration ---------------------------------------------------------------------
    def write(self) -> None:
        etc = self.root / "etc"
        for d in ("etc", "lib", "agi-bin", "spool", "run", "log", "lib/sounds/en/tm4"):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        files = {
            "asterisk.conf": render_asterisk_conf(self.root, self.moddir),
            "modules.conf": "[modules]\nautoload = yes\n" + "".join(f"noload = {m}.so\n" for m in MODULES_NOLOAD),
            "logger.conf": ("[general]\ndateformat = %F %T.%3q\n\n[logfiles]\n"
                            "console => notice,warning,error\nmessages => notice,warning,error\n"
                            "security => security\n"),
            "pjsip.conf": render_pjsip_conf(self.users),
            "extensions.conf": render_extensions_conf(self.keys, self.key_gap),
            "extensions_tm4.conf": render_dialplan(shipped_text(DIALPLAN), self.socket_path, self.fastagi),
            "manager.conf": render_manager_conf(self.driver_secret),
            "manager_tm4.conf": render_manager_user(self.tm4_user, self.tm4_secret),
            "acl.conf": '; the lab\'s acl.conf: tm4\'s whitelist as the named ACL [tm4]\n#include "acl_tm4.conf"\n',
            "acl_tm4.conf": "[tm4]\ndeny = 0.0.0.0/0.0.0.0\ndeny = ::/0\n",
            "rtp.conf": "[general]\nrtpstart = 10000\nrtpend = 20000\n",
            "cli.conf": "[general]\n",
        }
        for name, text in files.items():
            (etc / name).write_text(text)
        launcher = self.root / "agi-bin" / AGI_NAME
        launcher.write_text(render_launcher(shipped_text(AGI_SCRIPT), sys.executable, self.socket_path))
        launcher.chmod(0o755)
        for name, data in prompts():
            (self.root / "lib" / "sounds" / "en" / "tm4" / name).write_bytes(data)
        docs = documentation_dir(self.binary)
        if docs is None:
            raise StepFailed(f"no documentation/core-en_US.xml found for {self.binary}: Asterisk will not start"
                             " without it (install Asterisk with `make install`)")
        with contextlib.suppress(FileExistsError):
            (self.root / "lib" / "documentation").symlink_to(docs)

    # -- running ---------------------------------------------------------------------------
    def start(self, timeout: float = 30.0) -> float:
        """Start Asterisk; returns the seconds until its AMI answered the driver's login
        and it reported FullyBooted."""
        out = open(self.log_path, "ab")  # noqa: SIM115 — the child owns it
        t = time.monotonic()
        argv = [self.binary, "-f", "-n", "-C", str(self.conf)]
        if self.run_as is not None:
            argv += ["-U", self.run_as[0], "-G", self.run_as[1]]
        self.proc = subprocess.Popen(["ip", "netns", "exec", self.ns, *argv],
                                     stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        out.close()
        while time.monotonic() - t < timeout:
            if self.proc.poll() is not None:
                raise StepFailed(f"Asterisk exited with {self.proc.returncode}: {self.log()[-600:]}")
            try:
                self._connect()
                break
            except OSError:
                time.sleep(0.1)
        else:
            raise StepFailed(f"Asterisk's AMI did not answer within {timeout:.0f} s: {self.log()[-600:]}")
        while time.monotonic() - t < timeout:
            if any(e.get("Event") == "FullyBooted" for _, e in self.events):
                return time.monotonic() - t
            time.sleep(0.05)
        raise StepFailed(f"Asterisk did not report FullyBooted within {timeout:.0f} s")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def _connect(self) -> None:
        s = in_netns(self.ns, lambda: socket.create_connection(("127.0.0.1", 5038), timeout=2))
        s.settimeout(None)
        self._sock = s
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        reply = self.action("Login", Username=DRIVER, Secret=self.driver_secret, Events="on")
        if reply.get("Response") != "Success":
            raise StepFailed(f"the lab's driver could not log in to AMI: {reply}")

    def _read(self) -> None:
        assert self._sock is not None
        buf = b""
        while True:
            try:
                chunk = self._sock.recv(65536)
            except OSError:
                return
            if not chunk:
                return
            buf += chunk
            while b"\r\n\r\n" in buf:
                raw, buf = buf.split(b"\r\n\r\n", 1)
                frame: dict[str, str] = {}
                for line in raw.decode(errors="replace").split("\r\n"):
                    k, sep, v = line.partition(": ")
                    if sep:  # a repeated header (Command's Output) is kept line by line
                        frame[k] = f"{frame[k]}\n{v}" if k in frame else v
                self._on_frame(frame, time.monotonic())

    def _on_frame(self, frame: dict[str, str], now: float) -> None:
        with self._lock:
            if "ActionID" in frame and ("Response" in frame or "Message" in frame) and "Event" not in frame:
                self._replies[frame["ActionID"]] = frame
                return
            if "Event" not in frame:
                return
            self.events.append((now, frame))
            ev = frame["Event"]
            remote = frame.get("RemoteAddress", "")
            m = re.match(r"IPV[46]/(?:UDP|TCP|TLS|WS|WSS)/(.+)/\d+$", remote)
            if ev == "SuccessfulAuth" and frame.get("Service") == "AMI" and frame.get("AccountID") == self.tm4_user:
                self.tm4_logins += 1
            if m:
                seen = self.sources.setdefault(m.group(1), SourceSeen())
                seen.packets.append(now)
                if ev in FAILURES:
                    seen.failures.append(now)

    def action(self, name: str, timeout: float = 10.0, **fields: str) -> dict[str, str]:
        if self._sock is None:
            raise StepFailed("no AMI session with Asterisk")
        aid = secrets.token_hex(6)
        text = f"Action: {name}\r\nActionID: {aid}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in fields.items())
        self._sock.sendall((text + "\r\n").encode())
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            with self._lock:
                if aid in self._replies:
                    return self._replies.pop(aid)
            time.sleep(0.01)
        raise StepFailed(f"Asterisk did not answer the AMI action {name} within {timeout:.0f} s")

    def command(self, cli: str) -> str:
        """A CLI command through the driver user (Command needs the command class, which
        tm4's own user does not have)."""
        return self.action("Command", Command=cli).get("Output", "")

    # -- the story's view ------------------------------------------------------------------
    @property
    def logins(self) -> int:
        return self.tm4_logins

    def source(self, address: str) -> SourceSeen:
        with self._lock:
            return self.sources.setdefault(address, SourceSeen())

    def dial_in(self, timeout: float = 60.0) -> dict[str, Any]:
        """Originate a Local channel into [tm4-dialin] whose other half types the keys.
        Returns when the AGI has ended (the `h` extension ran) with what Asterisk reported."""
        start = len(self.events)
        t = time.monotonic()
        reply = self.action("Originate", Channel=f"Local/s@{CALLER_CONTEXT}", Context="tm4-dialin",
                            Exten="s", Priority="1", CallerID='"lab caller" <5550100>', Async="true",
                            Timeout="10000")
        if reply.get("Response") != "Success":
            raise StepFailed(f"Originate refused: {reply.get('Message', reply)}")
        agi: list[dict[str, str]] = []
        while time.monotonic() - t < timeout:
            with self._lock:
                new = [e for _, e in self.events[start:]]
            agi = [e for e in new if e.get("Event") in ("AGIExecStart", "AGIExecEnd")]
            if any(e.get("Event") == "Hangup" and e.get("Context") == "tm4-dialin" for e in new):
                break
            time.sleep(0.1)
        else:
            raise StepFailed(f"the dial-in call did not end within {timeout:.0f} s")
        commands = [e.get("Command", "") for e in agi if e.get("Event") == "AGIExecStart"]
        return {"seconds": round(time.monotonic() - t, 2), "agi_commands": len(commands),
                "commands": commands}

    def close(self) -> None:
        self._closing = True
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
