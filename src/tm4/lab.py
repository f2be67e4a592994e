"""`tm4 lab`: tm4 at work on one machine, in network namespaces, with measured times.

Namespaces: pbx (tm4d for real, with Asterisk's side simulated: AMI, a SIP
registrar, FastAGI calls), phone (a whitelisted office phone; the addresses a
traveller and a DDNS home use), attacker (svcrack and SIPp from Debian's
sipvicious and sip-tester), dns (dnsmasq serving the DDNS name). The lab shows:
the attacker banned in milliseconds while the phone keeps working, a dial-in
call letting a new address in, a DDNS change followed, and a flushed table put
back. Everything is torn down afterwards, also on Ctrl-C. Traffic never leaves
the namespaces (addresses from 192.0.2.0/24, 198.51.100.0/24, 203.0.113.0/24).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import Tm4Error

PBX = {"192.0.2.1/24", "198.51.100.1/24", "203.0.113.1/24"}
PHONE = "198.51.100.10"
TRAVELLER = "198.51.100.77"
HOME_OLD, HOME_NEW = "198.51.100.20", "198.51.100.21"
ATTACKER, FLOODER = "203.0.113.66", "203.0.113.67"
DNS = "192.0.2.53"
DDNS_NAME = "home.tm4-lab.test"
SIP_USERS = {"1001": "secret1001", "1002": "secret1002"}
PASSCODE = "246813"

SIPP_SCENARIO = """<?xml version="1.0" encoding="ISO-8859-1" ?>
<!DOCTYPE scenario SYSTEM "sipp.dtd">
<scenario name="REGISTER flood with a made-up user">
  <send retrans="500">
    <![CDATA[
REGISTER sip:[remote_ip]:[remote_port] SIP/2.0
Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
From: <sip:[service]@[remote_ip]>;tag=[pid]SIPpTag[call_number]
To: <sip:[service]@[remote_ip]>
Call-ID: [call_id]
CSeq: 1 REGISTER
Contact: <sip:[service]@[local_ip]:[local_port]>
Max-Forwards: 70
Expires: 60
User-Agent: sipp-lab
Content-Length: 0

    ]]>
  </send>
  <recv response="401" auth="true"/>
  <send retrans="500">
    <![CDATA[
REGISTER sip:[remote_ip]:[remote_port] SIP/2.0
Via: SIP/2.0/[transport] [local_ip]:[local_port];branch=[branch]
From: <sip:[service]@[remote_ip]>;tag=[pid]SIPpTag[call_number]
To: <sip:[service]@[remote_ip]>
Call-ID: [call_id]
CSeq: 2 REGISTER
Contact: <sip:[service]@[local_ip]:[local_port]>
[authentication]
Max-Forwards: 70
Expires: 60
User-Agent: sipp-lab
Content-Length: 0

    ]]>
  </send>
  <recv response="401"/>
</scenario>
"""


class LabError(Tm4Error):
    """The lab could not be built (not root, a tool missing, ...)."""


@dataclass
class Step:
    name: str
    status: str  # ok, failed, skipped
    at: float  # seconds since the lab started
    detail: str
    figures: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status, "at": round(self.at, 3), "detail": self.detail,
                "figures": self.figures}


def sh(*argv: str, check: bool = True, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), check=check, capture_output=True, text=True, **kw)


def available(module: str) -> str:
    """'' if the module imports, else why not."""
    try:
        importlib.import_module(module)
    except Exception as exc:  # missing, or a half-written module that does not import
        return f"{module}: {type(exc).__name__}: {exc}"
    return ""


class Lab:
    def __init__(self, say: Callable[[str], None] = print, keep: bool = False):
        self.say = say
        self.keep = keep
        self.t0 = time.monotonic()
        self.tag = f"tm4lab{os.getpid() % 100000}"
        self.ns: dict[str, str] = {}
        self.procs: list[subprocess.Popen[Any]] = []
        self.closers: list[Callable[[], None]] = []
        self.steps: list[Step] = []
        self.tmp = Path(tempfile.mkdtemp(prefix="tm4lab-"))
        os.chmod(self.tmp, 0o755)  # dnsmasq reads its hosts file after dropping root
        self.socket = self.tmp / "tm4.sock"
        self.config = self.tmp / "tm4.toml"
        self.ami_secret = secrets.token_hex(12)
        self.registrar: Any = None
        self.ami: Any = None
        self.tm4d: subprocess.Popen[Any] | None = None
        self.dnsmasq: subprocess.Popen[Any] | None = None

    # -- the timeline ---------------------------------------------------------------
    def now(self) -> float:
        return time.monotonic() - self.t0

    def record(self, name: str, status: str, detail: str, **figures: Any) -> Step:
        st = Step(name, status, self.now(), detail, figures)
        self.steps.append(st)
        mark = {"ok": " ok ", "failed": "FAIL", "skipped": "skip"}[status]
        self.say(f"  +{st.at:7.3f}s  [{mark}] {name:10} {detail}")
        return st

    @contextlib.contextmanager
    def step(self, name: str, needs: list[str] | None = None) -> Iterator[dict[str, Any]]:
        """A step: yields a dict to fill with 'detail' and figures; an exception fails it."""
        missing = [n for n in (needs or []) if n]
        if missing:
            self.record(name, "skipped", f"component missing: {'; '.join(missing)}")
            yield {"skip": True}
            return
        box: dict[str, Any] = {}
        try:
            yield box
        except StepFailed as exc:
            self.record(name, "failed", str(exc), **box.get("figures", {}))
            return
        except Exception as exc:  # a step that breaks is reported; the lab goes on and cleans up
            self.record(name, "failed", f"{type(exc).__name__}: {exc}", **box.get("figures", {}))
            return
        self.record(name, "ok", box.get("detail", ""), **box.get("figures", {}))

    # -- namespaces ------------------------------------------------------------------
    def netns(self, role: str) -> str:
        name = f"{self.tag}{role}"
        sh("ip", "netns", "add", name)
        self.ns[role] = name
        sh("ip", "-n", name, "link", "set", "lo", "up")
        for k in ("all", "default"):
            sh("ip", "netns", "exec", name, "sysctl", "-qw", f"net.ipv6.conf.{k}.accept_dad=0")
        return name

    def build(self) -> None:
        pbx = self.netns("pbx")
        sh("ip", "-n", pbx, "link", "add", "br0", "type", "bridge")
        sh("ip", "-n", pbx, "link", "set", "br0", "up")
        for a in sorted(PBX):
            sh("ip", "-n", pbx, "addr", "add", a, "dev", "br0")
        clients = {"phone": [f"{PHONE}/24", f"{TRAVELLER}/24", f"{HOME_OLD}/24", f"{HOME_NEW}/24"],
                   "attacker": [f"{ATTACKER}/24", f"{FLOODER}/24"], "dns": [f"{DNS}/24"]}
        for i, (role, addrs) in enumerate(clients.items()):
            ns = self.netns(role)
            peer = f"v{i}{self.tag[-6:]}"[:15]
            sh("ip", "link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", peer, "netns", pbx)
            sh("ip", "-n", pbx, "link", "set", peer, "master", "br0")
            sh("ip", "-n", pbx, "link", "set", peer, "up")
            for a in addrs:
                sh("ip", "-n", ns, "addr", "add", a, "dev", "eth0")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")

    def nft(self, *args: str, check: bool = True) -> str:
        return sh("ip", "netns", "exec", self.ns["pbx"], "nft", *args, check=check).stdout

    def spawn(self, role: str, argv: list[str], log: str, **kw: Any) -> subprocess.Popen[Any]:
        out = open(self.tmp / log, "ab")  # noqa: SIM115 — the child owns it
        p = subprocess.Popen(["ip", "netns", "exec", self.ns[role], *argv], stdout=out,
                             stderr=subprocess.STDOUT, start_new_session=True, **kw)
        out.close()
        self.procs.append(p)
        return p

    # -- probes ------------------------------------------------------------------------
    def tcp_ok(self, src: str, dst: str = "198.51.100.1", port: int = 5060, timeout: float = 0.3) -> bool:
        from .labsim import in_netns

        s = in_netns(self.ns["phone"], lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM))
        with s:
            s.bind((src, 0))
            s.settimeout(timeout)
            try:
                s.connect((dst, port))
                return True
            except OSError:
                return False

    def sip_options(self, src: str, role: str = "attacker", timeout: float = 0.3) -> bool:
        """Does an OPTIONS from `src` get an answer from the PBX?"""
        from .labsim import in_netns

        s = in_netns(self.ns[role], lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
        with s:
            s.bind((src, 0))
            s.settimeout(timeout)
            port = s.getsockname()[1]
            msg = (f"OPTIONS sip:203.0.113.1 SIP/2.0\r\nVia: SIP/2.0/UDP {src}:{port};branch=z9hG4bK-{os.urandom(3).hex()}"
                   f"\r\nFrom: <sip:probe@{src}>;tag=1\r\nTo: <sip:203.0.113.1>\r\nCall-ID: {os.urandom(6).hex()}\r\n"
                   f"CSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n")
            s.sendto(msg.encode(), ("203.0.113.1", 5060))
            try:
                s.recvfrom(4096)
                return True
            except OSError:
                return False

    def call(self, op: str, **args: Any) -> Any:
        from .control import request

        return request(self.socket, op, args, timeout=30)

    def banned(self, address: str) -> bool:
        return any(b["address"] == address for b in self.call("bans"))

    # -- parts ---------------------------------------------------------------------------
    def write_config(self) -> None:
        (self.tmp / "asterisk").mkdir()
        self.config.write_text(f"""\
# written by `tm4 lab`
state_dir = "{self.tmp / 'state'}"
[firewall]
public_services = ["sip-udp"]
[ami]
host = "127.0.0.1"
port = 5038
username = "tm4"
secret = "{self.ami_secret}"
[dialin]
external_address = "192.0.2.1"
[dns]
nameservers = ["{DNS}"]
refresh_min = "1s"
refresh_max = "10s"
timeout = "1s"
[asterisk]
config_dir = "{self.tmp / 'asterisk'}"
[daemon]
socket = "{self.socket}"
fastagi = "127.0.0.1:4573"
drift_interval = "1s"
safe_mode = false
""")
        self.config.chmod(0o600)

    def start_dns(self) -> None:
        hosts = self.tmp / "ddns.hosts"
        hosts.write_text(f"{HOME_OLD} {DDNS_NAME}\n")
        hosts.chmod(0o644)
        self.dnsmasq = self.spawn("dns", [
            "dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv", "--no-hosts",
            f"--addn-hosts={hosts}", f"--listen-address={DNS}", "--bind-interfaces", "--local-ttl=1",
            f"--pid-file={self.tmp / 'dnsmasq.pid'}", "--log-facility=-",
        ], "dnsmasq.log")
        for _ in range(100):
            if self.dns_answer() == HOME_OLD:
                return
            if self.dnsmasq.poll() is not None:
                raise StepFailed(f"dnsmasq exited: {(self.tmp / 'dnsmasq.log').read_text()[-300:]}")
            time.sleep(0.05)
        raise StepFailed("dnsmasq does not answer")

    def dns_answer(self) -> str:
        import dns.message
        import dns.query

        from .labsim import in_netns

        q = dns.message.make_query(DDNS_NAME, "A")
        try:
            r = in_netns(self.ns["pbx"], lambda: dns.query.udp(q, DNS, timeout=0.3))
        except Exception:
            return ""
        for rrset in r.answer:
            for item in rrset:
                return str(item)
        return ""

    def start_tm4d(self) -> float:
        env = dict(os.environ, PYTHONUNBUFFERED="1", TM4_NO_SSH_PROTECT="1")
        t = time.monotonic()
        self.tm4d = self.spawn("pbx", [sys.executable, "-m", "tm4.daemon", "--config", str(self.config)],
                               "tm4d.log", env=env)
        from .control import DaemonNotRunning

        while time.monotonic() - t < 20:
            if self.tm4d.poll() is not None:
                raise StepFailed(f"tm4d exited with {self.tm4d.returncode}: {self.tm4d_log()[-600:]}")
            with contextlib.suppress(DaemonNotRunning):
                self.call("ping")
                return time.monotonic() - t
            time.sleep(0.05)
        raise StepFailed("tm4d did not answer on its socket within 20 s")

    def tm4d_log(self) -> str:
        try:
            return (self.tmp / "tm4d.log").read_text(errors="replace")
        except OSError:
            return ""

    def wait_guard(self, timeout: float = 10.0) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.ami is not None and self.ami.logins and self.call("status")["components"]["guard"][
                    "state"] == "running":
                return True
            time.sleep(0.05)
        return False

    def attack(self, name: str, src: str, argv: list[str], threshold: int,
               phone: Any = None) -> dict[str, Any]:
        """Run an attack tool from `src`; measure threshold -> ban -> silence. With `phone`,
        the phone keeps registering all along, and its answers are counted."""
        seen = self.registrar.source(src)
        results: list[int | None] = []
        stop = threading.Event()

        def keep_registering() -> None:
            while not stop.is_set():
                results.append(phone.register())
                stop.wait(0.1)

        worker = threading.Thread(target=keep_registering, daemon=True)
        if phone is not None:
            worker.start()
        p = self.spawn("attacker", argv, f"{name}.log")
        t_start = time.monotonic()
        t_ban: float | None = None
        while time.monotonic() - t_start < 20:
            if self.banned(src):
                t_ban = time.monotonic()
                break
            if p.poll() is not None and len(seen.failures) >= threshold:
                time.sleep(0.5)
                if self.banned(src):
                    t_ban = time.monotonic()
                break
            time.sleep(0.005)
        time.sleep(1.0)  # let the tool go on trying for a second
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
        p.wait(5)
        stop.set()
        if phone is not None:
            worker.join(5)
        if t_ban is None:
            raise StepFailed(f"{src} was not banned ({len(seen.failures)} failures reached the PBX)")
        if len(seen.failures) < threshold:
            raise StepFailed(f"only {len(seen.failures)} failures reached the PBX")
        t_threshold = seen.failures[threshold - 1]
        after = sum(1 for t in seen.packets if t > t_ban + 0.002)
        answered = sum(1 for t in seen.failures if t > t_threshold)
        return {"threshold_to_ban_ms": round((t_ban - t_threshold) * 1000, 1),
                "attempts_to_threshold": threshold, "failures_after_threshold": answered,
                "packets_after_ban": after, "tool_ran_s": round(time.monotonic() - t_start, 2),
                "phone_registrations": len(results), "phone_ok": sum(1 for r in results if r == 200)}

    # -- clean-up ------------------------------------------------------------------------
    def close(self) -> None:
        for c in reversed(self.closers):
            with contextlib.suppress(Exception):
                c()
        for p in self.procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    if p is self.tm4d:
                        p.send_signal(signal.SIGTERM)  # tm4d stops cleanly (and leaves rules)
                        try:
                            p.wait(5)
                            continue
                        except subprocess.TimeoutExpired:
                            pass
                    os.killpg(p.pid, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    p.wait(5)
        for ns in reversed(list(self.ns.values())):
            sh("ip", "netns", "del", ns, check=False)
        self.ns.clear()
        if not self.keep:
            shutil.rmtree(self.tmp, ignore_errors=True)


class StepFailed(Exception):
    """A lab step did not show what it should."""


def _wait(pred: Callable[[], bool], timeout: float, interval: float = 0.02) -> float | None:
    t = time.monotonic()
    while time.monotonic() - t < timeout:
        if pred():
            return time.monotonic() - t
        time.sleep(interval)
    return None


def check_host() -> list[str]:
    problems = []
    if os.geteuid() != 0:
        problems.append("run it as root (it builds network namespaces and loads nftables rules)")
    for tool in ("ip", "nft"):
        if shutil.which(tool) is None:
            problems.append(f"{tool} is missing (Debian packages iproute2, nftables)")
    return problems


def run_lab(say: Callable[[str], None] = print, *, keep: bool = False, asterisk: str | None = None) -> list[Step]:
    problems = check_host()
    if problems:
        raise LabError("; ".join(problems))
    lab = Lab(say, keep)
    old_term = signal.signal(signal.SIGTERM, _as_interrupt)
    try:
        _scenario(lab, asterisk)
    finally:
        signal.signal(signal.SIGTERM, old_term)
        say(f"  +{lab.now():7.3f}s  cleaning up: tm4d, dnsmasq, simulators, {len(lab.ns)} namespaces"
            + (f" (files kept in {lab.tmp})" if keep else ""))
        lab.close()
    return lab.steps


def _as_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _scenario(lab: Lab, asterisk: str | None) -> None:  # noqa: C901 — one readable story
    say = lab.say
    real = asterisk or shutil.which("asterisk")
    say(f"tm4 lab: namespaces {lab.tag}{{pbx,phone,attacker,dns}}, files in {lab.tmp}")
    with lab.step("setup") as box:
        lab.build()
        box["detail"] = (f"4 namespaces on one bridge; pbx {', '.join(sorted(a.split('/')[0] for a in PBX))},"
                         f" phone {PHONE}, attacker {ATTACKER}/{FLOODER}, dns {DNS}")
    if real:
        lab.record("asterisk", "skipped", f"found {real}, but driving a real Asterisk is not implemented yet:"
                   " using the simulators")
    from .labsim import AmiServer, SipPhone, SipRegistrar, agi_call

    with lab.step("asterisk") as box:
        lab.ami = AmiServer(lab.ns["pbx"], "tm4", lab.ami_secret)
        lab.closers.append(lab.ami.close)
        lab.registrar = SipRegistrar(lab.ns["pbx"], lab.ami.emit, SIP_USERS, "203.0.113.1")
        lab.closers.append(lab.registrar.close)
        box["detail"] = "simulated Asterisk 22 in pbx: AMI 127.0.0.1:5038, SIP registrar udp+tcp/5060"
    dns_missing = available("tm4.dns") or ("" if shutil.which("dnsmasq") else "dnsmasq (Debian dnsmasq-base)")
    with lab.step("dns", [dns_missing]) as box:
        if not box.get("skip"):
            lab.start_dns()
            box["detail"] = f"dnsmasq in dns answers {DDNS_NAME} = {HOME_OLD} (TTL 1 s)"
    dialin_missing = available("tm4.fastagi") or available("tm4.dialin_ops") or available("tm4.passcodes")
    lab.write_config()
    with lab.step("tm4d") as box:
        if not dialin_missing:
            from .config import load_config
            from .passcodes import PasscodeBook
            from .store import Store

            cfg = load_config(lab.config)
            PasscodeBook.open(Store(cfg.store_path), cfg.state_dir).add("alice", PASSCODE)
        took = lab.start_tm4d()
        log = lab.tm4d_log()
        applied = next((ln for ln in log.splitlines() if "event=applied" in ln), "")
        ms = applied.rsplit("ms=", 1)[-1] if "ms=" in applied else "?"
        box["detail"] = f"started in pbx, rules applied in {ms} ms, socket answering after {took * 1000:.0f} ms"
        box["figures"] = {"start_ms": round(took * 1000), "apply_ms": ms}
    if lab.tm4d is None or lab.tm4d.poll() is not None:
        say(lab.tm4d_log()[-2000:])
        return
    with lab.step("whitelist") as box:
        lab.call("allow", name="office", sources=[PHONE], services=["sip-udp", "sip-tcp"], note="lab phone")
        text = "office phone " + PHONE
        if not dns_missing:
            lab.call("allow", name="home", sources=[DDNS_NAME], services=["sip-tcp"], note="lab DDNS")
            text += f", home = {DDNS_NAME}"
        comps = lab.call("status")["components"]
        box["detail"] = f"{text}; components: " + ", ".join(f"{k} {v['state']}" for k, v in comps.items())
    phone = SipPhone(lab.ns["phone"], PHONE, "198.51.100.1", "1001", SIP_USERS["1001"])
    lab.closers.append(phone.close)
    with lab.step("phone") as box:
        code = phone.register()
        if code != 200:
            raise StepFailed(f"the phone's REGISTER got {code}")
        if not lab.sip_options(ATTACKER):
            raise StepFailed("SIP is public in this lab, yet the attacker got no answer")
        box["detail"] = "phone 1001 registers (200 OK); SIP is public, so the attacker is answered too"
    guard_missing = available("tm4.guard_runtime") or available("tm4.asterisk.ami")
    from .config import load_config

    threshold = load_config(lab.config).guard.failures
    with lab.step("guard", [guard_missing]) as box:
        if not box.get("skip"):
            if not lab.wait_guard():
                raise StepFailed(f"the guard did not log in to AMI: {lab.call('status')['components']['guard']}")
            box["detail"] = "the guard is logged in to AMI and listening for security events"
    have_svcrack = shutil.which("svcrack")
    with lab.step("svcrack", [guard_missing, "" if have_svcrack else "svcrack (Debian sipvicious)"]) as box:
        if not box.get("skip"):
            words = lab.tmp / "passwords.txt"
            words.write_text("".join(f"guess{i}\n" for i in range(200)))
            f = lab.attack("svcrack", ATTACKER, ["svcrack", "-u", "1001", "-d", str(words), "-p", "5060",
                                                 "-b", ATTACKER, "203.0.113.1"], threshold)
            box["figures"] = f
            if lab.sip_options(ATTACKER):
                raise StepFailed(f"{ATTACKER} still gets answers after its ban")
            box["detail"] = (f"svcrack guessing 1001's password from {ATTACKER}: banned "
                             f"{f['threshold_to_ban_ms']} ms after the {threshold}th wrong password; "
                             f"{f['failures_after_threshold']} more guesses answered, "
                             f"{f['packets_after_ban']} packets reached the PBX after the ban")
    have_sipp = shutil.which("sipp")
    with lab.step("sipp", [guard_missing, "" if have_sipp else "sipp (Debian sip-tester)"]) as box:
        if not box.get("skip"):
            scen = lab.tmp / "flood.xml"
            scen.write_text(SIPP_SCENARIO)
            f = lab.attack("sipp", FLOODER, [
                "sipp", "203.0.113.1:5060", "-sf", str(scen), "-s", "admin", "-au", "admin", "-ap", "admin",
                "-i", FLOODER, "-p", "5070", "-r", "200", "-m", "2000", "-timeout", "15s", "-nostdin", "-nd",
                "-default_behaviors", "-all", "-trace_err", "-error_file", str(lab.tmp / "sipp.err"),
            ], threshold, phone=phone)
            box["figures"] = f
            if f["phone_ok"] != f["phone_registrations"]:
                raise StepFailed(f"the phone failed to register during the flood: {f}")
            box["detail"] = (f"SIPp REGISTER flood (200/s, unknown user) from {FLOODER}: banned "
                             f"{f['threshold_to_ban_ms']} ms after the threshold; "
                             f"{f['packets_after_ban']} packets reached the PBX after the ban; meanwhile the"
                             f" phone registered {f['phone_ok']}/{f['phone_registrations']} times")
    with lab.step("phone-ok") as box:
        codes = [phone.register() for _ in range(3)]
        wrong = [phone.register(password="not-the-password") for _ in range(threshold + 2)]
        time.sleep(0.3)
        after = phone.register()
        if any(c != 200 for c in codes) or after != 200:
            raise StepFailed(f"the phone stopped working: {codes} / {after}")
        if not guard_missing and lab.banned(PHONE):
            raise StepFailed("the whitelisted phone was banned")
        box["detail"] = (f"phone still registers (200 OK x{len(codes)}); even {len(wrong)} wrong passwords"
                         " from it ban nothing: the whitelist always wins")
    with lab.step("dial-in", [dialin_missing]) as box:
        if not box.get("skip"):
            if lab.tcp_ok(TRAVELLER):
                raise StepFailed(f"{TRAVELLER} reaches sip-tcp before any grant")
            call = agi_call(lab.ns["pbx"], [PASSCODE + "#", "198*51*100*77#", "1#"])
            t = time.monotonic()
            ok = _wait(lambda: lab.tcp_ok(TRAVELLER, timeout=0.2), 3)
            if ok is None:
                raise StepFailed(f"{TRAVELLER} still blocked after the call ({len(call.commands)} AGI commands)")
            entry = lab.call("entry", name="dialin-alice")
            box["figures"] = {"call_s": round(call.seconds, 3), "agi_commands": len(call.commands),
                              "first_connect_ms": round((time.monotonic() - t) * 1000, 1),
                              "said": call.said}
            heard = " / ".join(call.said)
            box["detail"] = (f"a FastAGI call (passcode, 198*51*100*77#, 1) let {TRAVELLER} in: entry "
                             f"{entry['name']} until {entry['expires']}; the call took {call.seconds:.2f} s"
                             f" (caller heard: {heard}); the first TCP connect after it succeeded")
    with lab.step("ddns", [dns_missing]) as box:
        if not box.get("skip"):
            if _wait(lambda: lab.tcp_ok(HOME_OLD), 10) is None:
                raise StepFailed(f"{HOME_OLD} ({DDNS_NAME}) never got in")
            if lab.tcp_ok(HOME_NEW):
                raise StepFailed(f"{HOME_NEW} gets in before the DNS change")
            (lab.tmp / "ddns.hosts").write_text(f"{HOME_NEW} {DDNS_NAME}\n")
            assert lab.dnsmasq is not None
            lab.dnsmasq.send_signal(signal.SIGHUP)
            took = _wait(lambda: lab.tcp_ok(HOME_NEW, timeout=0.2) and not lab.tcp_ok(HOME_OLD, timeout=0.1), 15)
            if took is None:
                raise StepFailed(f"the firewall did not follow {DDNS_NAME} to {HOME_NEW} within 15 s")
            box["figures"] = {"followed_s": round(took, 2)}
            box["detail"] = (f"{DDNS_NAME} moved {HOME_OLD} -> {HOME_NEW}: the firewall followed in "
                             f"{took:.2f} s (TTL 1 s); the old address is shut out")
    with lab.step("drift") as box:
        lab.nft("flush", "ruleset")
        took = _wait(lambda: "chain input" in lab.nft("list", "table", "inet", "tm4", check=False), 10)
        if took is None:
            raise StepFailed("the flushed table was not restored within 10 s")
        if lab.sip_options(ATTACKER) and not guard_missing:
            raise StepFailed("restored, but the ban is gone")
        box["figures"] = {"restored_s": round(took, 2)}
        box["detail"] = (f"`nft flush ruleset` (what `systemctl restart nftables` does): tm4d put the table "
                         f"back in {took:.2f} s" + ("" if guard_missing else ", bans included"))
    if lab.tm4d is not None and lab.tm4d.poll() is not None:
        lab.record("tm4d", "failed", f"tm4d died: {lab.tm4d_log()[-400:]}")


def summary(steps: list[Step]) -> tuple[str, int]:
    counts = {s: sum(1 for x in steps if x.status == s) for s in ("ok", "failed", "skipped")}
    text = f"{counts['ok']} ok, {counts['failed']} failed, {counts['skipped']} skipped"
    return text, (1 if counts["failed"] else 0)


def steps_json(steps: list[Step]) -> str:
    return json.dumps([s.to_json() for s in steps], indent=2)
