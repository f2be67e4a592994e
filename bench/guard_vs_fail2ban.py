"""Guard benchmark 3: tm4's guard and fail2ban side by side on a 1,000 REGISTER/s flood.

The same attack, run twice in fresh namespaces: SIPp (Debian's sip-tester) sends
wrong-password REGISTERs for 1001 from 203.0.113.66 at 500 calls/s, each call a
REGISTER and its digest retry (1,000 REGISTER/s). In the PBX namespace the test
registrar (tests/sipsim.py) answers like Asterisk 22 and, for every packet it
actually received,
  - run "tm4": raises the AMI security events; the guard (defaults: 5 failures)
    bans through tm4's nftables table;
  - run "fail2ban": writes Asterisk's `messages` log line (the captured format);
    Debian's fail2ban 1.0.2, unmodified filter.d/asterisk.conf, stock [asterisk]
    jail (maxretry 10, ports 5060,5061), nftables-multiport action, runs in the
    foreground in the PBX namespace with its own config dir and socket in a
    temporary directory.
Measured at the registrar: the threshold is the moment of the K-th failed
attempt (K = each tool's own); "time to block" runs from there to the last
attacker packet that got in; "through after threshold" counts attacker
REGISTERs (and answered password guesses) that still reached the registrar.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from amisim import AmiSimulator, LoopThread  # noqa: E402
from netlab import Lab, wait_for  # noqa: E402
from sipsim import REGISTER_SCENARIO, SipResponder, sipp_argv  # noqa: E402

from tm4.core.config import parse_config  # noqa: E402
from tm4.guard.runtime import GuardRuntime  # noqa: E402
from tm4.ops.engine import Core  # noqa: E402

ATT = "203.0.113.66"
PBX = "192.0.2.1"
CALLS_PER_S = 500  # x2 REGISTERs per call
DURATION = 6.0


@dataclass
class Result:
    name: str
    k: int
    first_packet: float
    threshold: float | None
    last_packet: float
    through: int
    guesses: int
    total: int
    end: float
    note: str = ""

    def row(self) -> str:
        if self.threshold is None:
            return f"{self.name:24} {self.k:>3}  threshold never reached ({self.note})"
        block = self.last_packet - self.threshold
        blocked = self.last_packet < self.end - 0.5
        return (f"{self.name:24} {self.k:>3} {self.threshold - self.first_packet:10.3f} s "
                f"{block * 1000 if blocked else float('inf'):12.1f} ms {self.through:13d} {self.guesses:13d} "
                f"{self.total:8d}{'' if blocked else '  (never blocked during the run)'}")


def attack(lab: Lab, responder: SipResponder, tmp: Path) -> float:
    att = next(h for h in lab.hosts if h.name == "att")
    scenario = tmp / "register.xml"
    scenario.write_text(REGISTER_SCENARIO)
    calls = int(CALLS_PER_S * DURATION)
    att.run(*sipp_argv(scenario, f"{PBX}:5060", user="1001", password="guess", local_ip=ATT,
                       local_port=5070, rate=CALLS_PER_S, calls=calls, timeout=f"{int(DURATION) + 3}s"),
            check=False, timeout=DURATION + 20)
    time.sleep(0.5)
    return time.monotonic()


def measure(name: str, k: int, responder: SipResponder, end: float, note: str = "") -> Result:
    arrivals = responder.arrivals.get(ATT, [])
    fails = responder.failures.get(ATT, [])
    thr = fails[k - 1] if len(fails) >= k else None
    return Result(name, k, arrivals[0] if arrivals else 0.0, thr, arrivals[-1] if arrivals else 0.0,
                  sum(1 for t in arrivals if thr is not None and t > thr),
                  sum(1 for t in fails if thr is not None and t > thr), len(arrivals), end, note)


def run_tm4(tmp: Path) -> Result:
    lab = Lab("ft")
    lt = LoopThread()
    rt = None
    responder = None
    try:
        lab.client("att", [f"{ATT}/24"])
        sim = AmiSimulator(local_address=PBX)
        lt.run(sim.start())
        cfg = parse_config({
            "state_dir": str(tmp / "tm4"),
            # meters off: this compares the guard with fail2ban (responsive mode alone would
            # clamp this flood after 50 packets)
            "firewall": {"netns": lab.pbx.ns, "public_services": ["sip-udp"],
                         "rate_packets": 1_000_000, "rate_flows": 1_000_000},
            "ami": {"port": sim.port, "secret": "tm4secret"},
        })
        core = Core(cfg, protect=[])
        core.apply()
        rt = GuardRuntime(core)
        lt.spawn(rt.run())
        assert wait_for(lambda: rt.client is not None and rt.client.connected, 5)
        responder = SipResponder(lab.pbx.socket, emit=lambda b: lt.soon(sim.emit, b), local_ip=PBX, ipv6=False)
        responder.record_arrivals = True
        end = attack(lab, responder, tmp)
        return measure("tm4 guard (AMI events)", cfg.guard.failures, responder, end)
    finally:
        if rt is not None:
            lt.run(rt.close())
        lt.close()
        if responder is not None:
            responder.close()
        lab.close()


def fail2ban_config(tmp: Path, logpath: Path) -> Path:
    etc = tmp / "etc-fail2ban"
    shutil.copytree("/etc/fail2ban", etc)
    (etc / "fail2ban.local").write_text(
        "[Definition]\nloglevel = INFO\n"
        f"logtarget = {tmp / 'fail2ban.log'}\nsocket = {tmp / 'f2b.sock'}\n"
        f"pidfile = {tmp / 'f2b.pid'}\ndbfile = :memory:\n"
    )
    (etc / "jail.local").write_text(
        "[DEFAULT]\nbanaction = nftables-multiport\nbanaction_allports = nftables-allports\n\n"
        "[sshd]\nenabled = false\n\n"
        f"[asterisk]\nenabled = true\nlogpath = {logpath}\n"
    )
    return etc


def run_fail2ban(tmp: Path) -> Result:
    lab = Lab("ff")
    responder = None
    f2b = None
    logpath = tmp / "messages"
    logpath.write_text("")
    etc = fail2ban_config(tmp, logpath)
    sock = tmp / "f2b.sock"
    try:
        lab.client("att", [f"{ATT}/24"])
        f2b = lab.pbx.popen("fail2ban-server", "-f", "-x", "-c", str(etc), "-s", str(sock),
                            "-p", str(tmp / "f2b.pid"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def jail_up() -> bool:
            r = subprocess.run(["fail2ban-client", "-s", str(sock), "status", "asterisk"],
                               capture_output=True, text=True, check=False)
            return r.returncode == 0

        assert wait_for(jail_up, 20, 0.2), "fail2ban did not start"
        version = subprocess.run(["fail2ban-server", "-V"], capture_output=True, text=True).stdout.split()[-1]
        responder = SipResponder(lab.pbx.socket, emit=None, local_ip=PBX, ipv6=False, log_path=logpath)
        responder.record_arrivals = True
        end = attack(lab, responder, tmp)
        banned = "203.0.113.66" in (tmp / "fail2ban.log").read_text()
        return measure(f"fail2ban {version} (log)", 10, responder, end,
                       "" if banned else "fail2ban logged no ban")
    finally:
        if f2b is not None:
            subprocess.run(["fail2ban-client", "-s", str(sock), "stop"], capture_output=True, check=False,
                           timeout=20)
            try:
                f2b.wait(10)
            except subprocess.TimeoutExpired:
                f2b.kill()
        if responder is not None:
            responder.close()
        lab.close()


def main() -> None:
    logging.getLogger("tm4").setLevel(logging.ERROR)
    tmp = Path(tempfile.mkdtemp(prefix="tm4-f2b-"))
    try:
        results = [run_tm4(tmp), run_fail2ban(tmp)]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"guard vs fail2ban: SIPp wrong-password flood, {CALLS_PER_S * 2} REGISTER/s for {DURATION:.0f} s, "
          "same registrar, fresh namespaces")
    print(f"guard vs fail2ban: {'':24} {'K':>3} {'threshold':>12} {'time to block':>15} "
          f"{'REGISTERs in':>13} {'guesses':>13} {'total in':>8}")
    print(f"guard vs fail2ban: {'':24} {'':>3} {'(after start)':>12} {'(after thresh.)':>15} "
          f"{'after thresh.':>13} {'after thresh.':>13} {'':>8}")
    for r in results:
        print(f"guard vs fail2ban: {r.row()}")


if __name__ == "__main__":
    main()
