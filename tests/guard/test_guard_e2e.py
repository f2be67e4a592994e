"""End to end in network namespaces: real SIP attacks, real nftables, the guard on AMI.

Attackers (SIPp wrong-password floods over IPv4 and IPv6, sipvicious' svcrack)
send REGISTERs to a PBX namespace where a test registrar answers like
Asterisk and raises the AMI security events for the packets it actually got;
the guard reads them from the AMI simulator and bans through the core. After
the threshold the attackers' packets stop arriving, while a whitelisted phone,
sending wrong passwords at the same time (so events name it too), keeps
getting through.
"""

from __future__ import annotations

import ipaddress
import json
import subprocess
import time
from pathlib import Path

from amisim import AmiSimulator, LoopThread
from conftest import need_root_tools
from netlab import Lab, wait_for
from sipsim import REGISTER_SCENARIO, SipResponder, sipp_argv

from tm4.core.config import parse_config
from tm4.core.store import Store
from tm4.guard.policy import BanDecision
from tm4.guard.runtime import GuardRuntime
from tm4.ops.engine import Core

PBX4, PBX6 = "192.0.2.1", "2001:db8::1"
PHONE = "198.51.100.20"
ATT4, CRACK, ATT6 = "203.0.113.66", "203.0.113.67", "2001:db8::66"


def kernel_set(lab: Lab, name: str) -> list[str]:
    out = lab.pbx.run("nft", "-j", "list", "set", "inet", "tm4", name, check=False).stdout
    elems: list[str] = []
    for obj in json.loads(out or "{}").get("nftables", []):
        for e in obj.get("set", {}).get("elem", []):
            v = e["elem"]["val"] if isinstance(e, dict) and "elem" in e else e
            if isinstance(v, dict) and "prefix" in v:
                v = f"{v['prefix']['addr']}/{v['prefix']['len']}"
            elif isinstance(v, dict) and "range" in v:
                v = "-".join(v["range"])
            elems.append(str(v))
    return elems


def test_attackers_are_dropped_in_the_kernel_and_the_whitelisted_phone_keeps_working(
        lab: Lab, tmp_path: Path) -> None:
    need_root_tools("sipp", "svcrack")
    att = lab.client("att", [f"{ATT4}/24", f"{ATT6}/64"])
    cracker = lab.client("crack", [f"{CRACK}/24"])  # svcrack sends from the primary address
    phone = lab.client("phone", [f"{PHONE}/24"])
    lt = LoopThread()
    procs: list[subprocess.Popen[str]] = []
    responder: SipResponder | None = None
    rt: GuardRuntime | None = None
    try:
        sim = AmiSimulator(local_address=PBX4)
        lt.run(sim.start())
        cfg = parse_config({
            "state_dir": str(tmp_path / "state"),
            "firewall": {"netns": lab.pbx.ns, "public_services": ["sip-udp"],
                         # responsive mode has its own test: keep its meters out of the way here
                         "rate_packets": 100_000, "rate_flows": 100_000},
            "ami": {"port": sim.port, "secret": "tm4secret"},
        })
        core = Core(cfg, protect=[])
        core.allow("phone", [PHONE], ["sip-udp"])
        core.apply()
        rt = GuardRuntime(core, client_options={"ping_interval": 1.0, "ping_timeout": 1.0})
        lt.spawn(rt.run())
        assert wait_for(lambda: rt.client is not None and rt.client.connected, 5)
        responder = SipResponder(lab.pbx.socket, emit=lambda b: lt.soon(sim.emit, b), local_ip=PBX4)
        responder.record_arrivals = True

        scenario = tmp_path / "register.xml"
        scenario.write_text(REGISTER_SCENARIO)
        quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
        # The phone: wrong password on purpose, 10 attempts/s, all along.
        procs.append(phone.popen(*sipp_argv(scenario, f"{PBX4}:5060", user="1001", password="typo",
                                            local_ip=PHONE, local_port=5080, rate=10, calls=100), **quiet))
        time.sleep(0.5)
        # The attackers.
        procs.append(att.popen(*sipp_argv(scenario, f"{PBX4}:5060", user="1001", password="guess",
                                          local_ip=ATT4, local_port=5070, rate=100, calls=1000), **quiet))
        procs.append(att.popen(*sipp_argv(scenario, f"[{PBX6}]:5060", user="1002", password="guess",
                                          local_ip=ATT6, local_port=5072, rate=100, calls=1000), **quiet))
        words = tmp_path / "words.txt"
        words.write_text("\n".join(f"pass{i:03d}" for i in range(60)) + "\n")
        procs.append(cracker.popen("svcrack", "-u", "1001", "-d", str(words), "-P", "5090",
                                   "-p", "5060", PBX4, **quiet))

        def bans() -> dict[str, BanDecision]:
            return {a.decision.address: a.decision for a in list(rt.applied)
                    if isinstance(a.decision, BanDecision)}

        assert wait_for(lambda: len(bans()) >= 3, 15), (
            f"bans so far: {sorted(bans())}; registrar saw {dict(responder.received)}, "
            f"failures {({k: len(v) for k, v in responder.failures.items()})}")
        time.sleep(1.5)  # the phone goes on sending; the attackers would too if not dropped
        phone_before = responder.count(PHONE)
        time.sleep(1.0)
        phone_after = responder.count(PHONE)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
        if rt is not None:
            lt.run(rt.close())
        lt.close()
        if responder is not None:
            responder.close()

    done = {a.decision.address: a for a in rt.applied if isinstance(a.decision, BanDecision)}
    assert not [a for a in rt.applied if a.error]
    v6 = next(n for n in done if ":" in n)
    assert set(done) == {ATT4, CRACK, v6}, sorted(done)
    # IPv6: banned by prefix, narrowed so that it does not cover the PBX's own 2001:db8::1.
    net6 = ipaddress.ip_network(v6)
    assert ipaddress.ip_address(ATT6) in net6 and ipaddress.ip_address(PBX6) not in net6
    assert 64 < net6.prefixlen < 128

    # After its ban took effect, no packet of any attacker reached the registrar.
    for src, addr in ((ATT4, ATT4), (CRACK, CRACK), (ATT6, v6)):
        t_ban = done[addr].done
        late = [t for t in responder.arrivals.get(src, []) if t > t_ban + 0.005]
        assert late == [], f"{src}: {len(late)} packets arrived after the ban"
        fails = [t for t in responder.failures[src] if t <= t_ban]
        assert 5 <= len(fails) <= 10, (src, len(fails))  # banned at the 5th failed attempt (+ in flight)
    # svcrack used one Call-ID (or two) for all its guesses: SessionID did not collapse them.
    assert len(responder.failed_sessions[CRACK]) <= 2
    assert done[CRACK].decision.count == 5

    # The whitelisted phone: failures named it, it was never banned, and it still gets through.
    assert len(responder.failures[PHONE]) >= 10
    assert PHONE not in done
    assert phone_after - phone_before >= 10

    # The kernel holds the bans; the store and the audit log say why.
    assert ATT4 in kernel_set(lab, "ban4") and CRACK in kernel_set(lab, "ban4")
    assert str(net6) in kernel_set(lab, "ban6n")
    store = Store(tmp_path / "state" / "tm4.db")
    ban = next(b for b in store.bans() if b.address == ATT4)
    assert ban.origin == "guard" and "ChallengeResponseFailed" in ban.reason
    assert "5 failed attempts" in ban.reason and ban.expires is not None
    (rec,) = [r for r in store.audit_log(subject=ATT4) if r.action == "block"]
    assert rec.origin == "guard" and rec.actor == "ami:ChallengeResponseFailed x5"
    assert "ChallengeResponseFailed" in rec.detail["reason"]
