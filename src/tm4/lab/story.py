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

import importlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from typing import Any

from tm4.core.errors import Tm4Error
from tm4.lab import sip_dtmf
from tm4.lab.asterisk import RealAsterisk
from tm4.lab.namespaces import (
    ATTACKER,
    DDNS_NAME,
    DNS,
    FLOODER,
    HOME_NEW,
    HOME_OLD,
    PBX,
    PHONE,
    TRAVELLER,
    Lab,
)
from tm4.lab.sim.agi import agi_call
from tm4.lab.sim.ami import AmiServer
from tm4.lab.sim.sip import SipPhone, SipRegistrar, register_scenario
from tm4.lab.timeline import Step, StepFailed, Timeline

SIP_USERS = {"1001": "secret1001", "1002": "secret1002"}
PASSCODE = "246813"
DIALIN_ADDRESS = "198*51*100*77"  # TRAVELLER as typed on a keypad
ROAMING = "198.51.100.78"  # alice's next address: she calls from it, menu option 1
SIPP_SCENARIO = register_scenario("REGISTER flood with a made-up user")


class LabError(Tm4Error):
    """The lab could not be built (not root, a tool missing, ...)."""


def available(module: str) -> str:
    """'' if the module imports, else why not."""
    try:
        importlib.import_module(module)
    except Exception as exc:  # missing, or a half-written module that does not import
        return f"{module}: {type(exc).__name__}: {exc}"
    return ""


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


def run_lab(say: Callable[[str], None] = print, *, keep: bool = False, asterisk: str | None = None,
            asterisk_modules: str | None = None) -> list[Step]:
    problems = check_host()
    if problems:
        raise LabError("; ".join(problems))
    timeline = Timeline(say)
    lab = Lab(keep)
    old_term = signal.signal(signal.SIGTERM, _as_interrupt)
    try:
        _scenario(lab, timeline, asterisk, asterisk_modules)
    finally:
        signal.signal(signal.SIGTERM, old_term)
        say(f"  +{timeline.now():7.3f}s  cleaning up: tm4d, dnsmasq, simulators, {len(lab.ns)} namespaces"
            + (f" (files kept in {lab.tmp})" if keep else ""))
        lab.close()
    return timeline.steps


def _as_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _scenario(lab: Lab, tl: Timeline, asterisk: str | None, asterisk_modules: str | None) -> None:  # noqa: C901 — one readable story
    say = tl.say
    say(f"tm4 lab: namespaces {lab.tag}{{pbx,phone,attacker,dns}}, files in {lab.tmp}")
    with tl.step("setup") as box:
        lab.build()
        box["detail"] = (f"4 namespaces on one bridge; pbx {', '.join(sorted(a.split('/')[0] for a in PBX))},"
                         f" phone {PHONE}, attacker {ATTACKER}/{FLOODER}, dns {DNS}")
    real: RealAsterisk | None = None
    with tl.step("asterisk") as box:
        if asterisk:
            real = RealAsterisk(lab.ns["pbx"], lab.tmp, asterisk, moddir=asterisk_modules,
                                tm4_user="tm4", tm4_secret=lab.ami_secret, socket_path=str(lab.socket),
                                fastagi="127.0.0.1:4573", users=SIP_USERS,
                                keys=[PASSCODE + "#", DIALIN_ADDRESS + "#", "1"])
            real.write()
            lab.closers.append(real.close)
            lab.asterisk_dir = real.root / "etc"
            booted = real.start()
            lab.ami = lab.registrar = real
            box["figures"] = {"boot_s": round(booted, 2)}
            box["detail"] = (f"real Asterisk ({asterisk}) in pbx, fully booted in {booted:.2f} s: chan_pjsip on"
                             " udp+tcp/5060, AMI 127.0.0.1:5038 with tm4's manager user, [tm4] ACL, the"
                             " [tm4-dialin] context and AGI launcher as tm4 install lays them out")
        else:
            lab.ami = AmiServer(lab.ns["pbx"], "tm4", lab.ami_secret)
            lab.closers.append(lab.ami.close)
            lab.registrar = SipRegistrar(lab.ns["pbx"], lab.ami.emit, SIP_USERS, "203.0.113.1")
            lab.closers.append(lab.registrar.close)
            box["detail"] = "simulated Asterisk 22 in pbx: AMI 127.0.0.1:5038, SIP registrar udp+tcp/5060"
    dns_missing = available("tm4.dns.refresher") or ("" if shutil.which("dnsmasq") else "dnsmasq (Debian dnsmasq-base)")
    with tl.step("dns", [dns_missing]) as box:
        if not box.get("skip"):
            lab.start_dns()
            box["detail"] = f"dnsmasq in dns answers {DDNS_NAME} = {HOME_OLD} (TTL 1 s)"
    dialin_missing = available("tm4.dialin.fastagi") or available("tm4.dialin.ops") or available("tm4.dialin.passcodes")
    lab.write_config()
    with tl.step("tm4d") as box:
        if not dialin_missing:
            from tm4.core.config import load_config
            from tm4.core.store import Store
            from tm4.dialin.passcodes import PasscodeBook

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
    with tl.step("whitelist") as box:
        lab.call("allow", name="office", sources=[PHONE], services=["sip-udp", "sip-tcp"], note="lab phone")
        text = "office phone " + PHONE
        if not dns_missing:
            lab.call("allow", name="home", sources=[DDNS_NAME], services=["sip-tcp"], note="lab DDNS")
            text += f", home = {DDNS_NAME}"
        comps = lab.call("status")["components"]
        box["detail"] = f"{text}; components: " + ", ".join(f"{k} {v['state']}" for k, v in comps.items())
    if real is not None:
        with tl.step("acl") as box:
            took = _wait(lambda: PHONE in real.command("acl show tm4"), 10, 0.05)
            if took is None:
                raise StepFailed(f"Asterisk's [tm4] ACL never showed {PHONE}: {real.command('acl show tm4')[-300:]}")
            box["figures"] = {"acl_loaded_s": round(took, 3)}
            box["detail"] = (f"Asterisk loaded tm4's [tm4] ACL with the office phone {took * 1000:.0f} ms after"
                             " the grant (tm4d wrote acl_tm4.conf and reloaded it over AMI)")
    phone = SipPhone(lab.ns["phone"], PHONE, "198.51.100.1", "1001", SIP_USERS["1001"])
    lab.closers.append(phone.close)
    with tl.step("phone") as box:
        code = phone.register()
        if code != 200:
            raise StepFailed(f"the phone's REGISTER got {code}")
        if not lab.sip_options(ATTACKER):
            raise StepFailed("SIP is public in this lab, yet the attacker got no answer")
        box["detail"] = "phone 1001 registers (200 OK); SIP is public, so the attacker is answered too"
    guard_missing = available("tm4.guard.runtime") or available("tm4.asterisk.ami")
    from tm4.core.config import load_config

    threshold = load_config(lab.config).guard.failures
    with tl.step("guard", [guard_missing]) as box:
        if not box.get("skip"):
            if not lab.wait_guard():
                raise StepFailed(f"the guard did not log in to AMI: {lab.call('status')['components']['guard']}")
            box["detail"] = "the guard is logged in to AMI and listening for security events"
    have_svcrack = shutil.which("svcrack")
    with tl.step("svcrack", [guard_missing, "" if have_svcrack else "svcrack (Debian sipvicious)"]) as box:
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
    with tl.step("sipp", [guard_missing, "" if have_sipp else "sipp (Debian sip-tester)"]) as box:
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
    with tl.step("phone-ok") as box:
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
    with tl.step("dial-in", [dialin_missing]) as box:
        if not box.get("skip"):
            if lab.tcp_ok(TRAVELLER):
                raise StepFailed(f"{TRAVELLER} reaches sip-tcp before any grant")
            if real is not None:
                done = real.dial_in()
                if _wait(lambda: lab.tcp_ok(TRAVELLER, timeout=0.2), 3) is None:
                    raise StepFailed(f"{TRAVELLER} still blocked after the real call: {done}")
                entry = lab.call("entry", name="dialin-alice")
                box["figures"] = {"call_s": done["seconds"], "agi_commands": done["agi_commands"]}
                box["detail"] = (f"a real call into [tm4-dialin] (a Local channel typing the passcode, "
                                 f"{DIALIN_ADDRESS}#, 1 with SendDTMF; FastAGI served by tm4d) let {TRAVELLER}"
                                 f" in: entry {entry['name']} until {entry['expires']}; {done['agi_commands']}"
                                 f" AGI commands, {done['seconds']:.1f} s to hang-up")
            else:
                call = agi_call(lab.ns["pbx"], [PASSCODE + "#", DIALIN_ADDRESS + "#", "1#"])
                t = time.monotonic()
                ok = _wait(lambda: lab.tcp_ok(TRAVELLER, timeout=0.2), 3)
                if ok is None:
                    raise StepFailed(f"{TRAVELLER} still blocked after the call ({len(call.commands)} AGI commands)")
                entry = lab.call("entry", name="dialin-alice")
                box["figures"] = {"call_s": round(call.seconds, 3), "agi_commands": len(call.commands),
                                  "first_connect_ms": round((time.monotonic() - t) * 1000, 1),
                                  "said": call.said}
                heard = " / ".join(call.said)
                box["detail"] = (f"a FastAGI call (passcode, {DIALIN_ADDRESS}#, 1) let {TRAVELLER} in: entry "
                                 f"{entry['name']} until {entry['expires']}; the call took {call.seconds:.2f} s"
                                 f" (caller heard: {heard}); the first TCP connect after it succeeded")
    if real is not None:  # a simulated Asterisk takes no SIP calls: no such step
        with tl.step("dial-in-sip", [dialin_missing, sip_dtmf.available()]) as box:
            if not box.get("skip"):
                # alice roams again: her softphone calls the anonymous endpoint from a new address
                subprocess.run(["ip", "-n", lab.ns["phone"], "addr", "add", f"{ROAMING}/24", "dev", "eth0"], check=True)
                if lab.tcp_ok(ROAMING):
                    raise StepFailed(f"{ROAMING} reaches sip-tcp before any grant")
                keys = [(PASSCODE[0], 3.0), *[(k, 0.4) for k in PASSCODE[1:]], ("#", 0.4), ("1", 2.0), ("1", 2.0)]
                start = len(real.events)
                call = sip_dtmf.call_with_keys(lab.ns["phone"], ROAMING, "198.51.100.1", keys, lab.tmp)
                new = [e for _, e in real.events[start:]]
                typed = "".join(e.get("Digit", "") for e in new
                                if e.get("Event") == "DTMFEnd" and e.get("Direction") == "Received")
                menu = any("tm4/menu" in e.get("Command", "") for e in new if e.get("Event") == "AGIExecStart")
                if _wait(lambda: lab.tcp_ok(ROAMING, timeout=0.2), 3) is None:
                    raise StepFailed(f"{ROAMING} still blocked after its call (SIPp exit {call.returncode}, Asterisk got "
                                     f"keys {typed!r}, menu offered: {menu}): {call.output[-300:]}")
                if not menu:
                    raise StepFailed("the call from the anonymous endpoint was not offered menu option 1")
                if lab.tcp_ok(TRAVELLER):
                    raise StepFailed(f"{TRAVELLER}, alice's previous dial-in address, is still open")
                box["figures"] = {"call_s": call.seconds, "keys": typed}
                box["detail"] = (f"a real SIP call from {ROAMING} to the anonymous endpoint (SIPp, RFC 2833 keys "
                                 f"{typed}: passcode, menu 1 = this address, confirm) let {ROAMING} in and closed "
                                 f"{TRAVELLER}; {call.seconds:.1f} s to hang-up")
    with tl.step("ddns", [dns_missing]) as box:
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
    with tl.step("drift") as box:
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
        tl.record("tm4d", "failed", f"tm4d died: {lab.tm4d_log()[-400:]}")
