"""The lab's machine room: four network namespaces on one bridge — pbx (tm4d for real,
with Asterisk's side simulated), phone, attacker, dns — the processes run in them,
the probes that look through the firewall, and the clean-up. Traffic never leaves the
namespaces (addresses from 192.0.2.0/24, 198.51.100.0/24, 203.0.113.0/24).
"""

from __future__ import annotations

import contextlib
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
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tm4.firewall.netns import in_netns, tcp_connects
from tm4.lab.timeline import StepFailed

PBX = {"192.0.2.1/24", "198.51.100.1/24", "203.0.113.1/24"}
PHONE = "198.51.100.10"
TRAVELLER = "198.51.100.77"
HOME_OLD, HOME_NEW = "198.51.100.20", "198.51.100.21"
ATTACKER, FLOODER = "203.0.113.66", "203.0.113.67"
DNS = "192.0.2.53"
DDNS_NAME = "home.tm4-lab.test"


def sh(*argv: str, check: bool = True, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), check=check, capture_output=True, text=True, **kw)


class Lab:
    """The namespaces, what runs in them, and how to look through the firewall."""

    def __init__(self, keep: bool = False):
        self.keep = keep
        self.tag = f"tm4lab{os.getpid() % 100000}"
        self.ns: dict[str, str] = {}
        self.procs: list[subprocess.Popen[Any]] = []
        self.closers: list[Callable[[], None]] = []
        self.tmp = Path(tempfile.mkdtemp(prefix="tm4lab-"))
        os.chmod(self.tmp, 0o755)  # dnsmasq reads its hosts file after dropping root
        self.socket = self.tmp / "tm4.sock"
        self.config = self.tmp / "tm4.toml"
        self.ami_secret = secrets.token_hex(12)
        self.registrar: Any = None
        self.ami: Any = None
        self.tm4d: subprocess.Popen[Any] | None = None
        self.dnsmasq: subprocess.Popen[Any] | None = None
        self.asterisk_dir = self.tmp / "asterisk"  # a real Asterisk's astetcdir when the lab runs one

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
        return tcp_connects(self.ns["phone"], dst, port, src, timeout)

    def sip_options(self, src: str, role: str = "attacker", timeout: float = 0.3) -> bool:
        """Does an OPTIONS from `src` get an answer from the PBX?"""
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
        from tm4.ops.control import request

        return request(self.socket, op, args, timeout=30)

    def banned(self, address: str) -> bool:
        return any(b["address"] == address for b in self.call("bans"))

    # -- parts ---------------------------------------------------------------------------
    def write_config(self) -> None:
        self.asterisk_dir.mkdir(exist_ok=True)
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
config_dir = "{self.asterisk_dir}"
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
        from tm4.ops.control import DaemonNotRunning

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
