"""The guard across a real Asterisk restart (issue 11 item 3), marked `asterisk`.

A real Asterisk 22 (TM4_ASTERISK) and a real tm4d run in the PBX namespace; tm4d's guard is
logged in to AMI with tm4's least-privilege user and reads Asterisk's security log. The
driver user sends `core restart now` while an attacker namespace sends wrong-password
REGISTERs the whole time. Then:

- the guard logs in again at most 1 s after Asterisk accepts logins (a poller logs in as the
  driver every 20 ms to find that moment);
- every failure Asterisk answered is counted exactly once, whether the guard saw it live or
  recovered it from the security log: with `failures = F`, after N answered failures the
  source is not banned after F - 1 in all, and is banned by the F-th;
- `tm4 daemon status --json` shows the gap and what was caught up.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import subprocess
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

import pytest
from conftest import need_root_tools, real_asterisk
from daemon_support import Tm4d, wait_until
from netlab import Lab

from tm4.firewall.netns import in_netns
from tm4.lab.asterisk import DRIVER, RealAsterisk
from tm4.lab.sim.sip import SipPhone

pytestmark = pytest.mark.asterisk

PBX = "203.0.113.1"
ATTACKER = "203.0.113.50"
FAILURES = 400  # high enough that the attack through the restart stays below it


def ami_login_ok(ns: str, secret: str) -> bool:
    """One Login as the driver; True when Asterisk accepted it (then Logoff)."""
    try:
        s = in_netns(ns, lambda: socket.create_connection(("127.0.0.1", 5038), timeout=0.25))
    except OSError:
        return False
    with s:
        try:
            s.settimeout(0.25)  # Asterisk greets at once (a restarting one may never greet)
            buf = b""
            while b"\r\n" not in buf:
                chunk = s.recv(4096)
                if not chunk:
                    return False
                buf += chunk
            s.sendall(f"Action: Login\r\nUsername: {DRIVER}\r\nSecret: {secret}\r\nEvents: off\r\n\r\n".encode())
            while b"\r\n\r\n" not in buf.split(b"\r\n", 1)[1]:
                chunk = s.recv(4096)
                if not chunk:
                    return False
                buf += chunk
            ok = b"Response: Success" in buf
            if ok:
                with contextlib.suppress(OSError):
                    s.sendall(b"Action: Logoff\r\n\r\n")
            return ok
        except OSError:
            return False


def daemon_status(d: Tm4d) -> dict:
    out = subprocess.run([sys.executable, "-m", "tm4.cli", "--config", str(d.config_path), "daemon", "status",
                          "--json"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def guard_state(d: Tm4d) -> dict:
    return d.call("status")["components"]["guard"]


def iso(t: str) -> float:
    return datetime.fromisoformat(t.replace("Z", "+00:00")).timestamp()


def test_guard_across_a_real_asterisk_restart(tmp_path: Path) -> None:
    binary = real_asterisk()
    need_root_tools("ip", "nft")
    lab = Lab("rr")
    real: RealAsterisk | None = None
    d: Tm4d | None = None
    try:
        attacker = lab.client("attacker", [f"{ATTACKER}/24"])
        secret = secrets.token_hex(12)
        d = Tm4d(tmp_path, lab.pbx.ns)
        real = RealAsterisk(lab.pbx.ns, tmp_path, binary, moddir=None, tm4_user="tm4", tm4_secret=secret,
                            socket_path=str(d.socket), fastagi="127.0.0.1:4573",
                            users={"1001": "correct-horse-1001"}, keys=[])
        real.write()
        real.start()
        seclog = real.root / "log" / "security"
        d.write_config(f"""
[firewall]
public_services = ["sip-udp"]
rate_packets = 1000000
[ami]
host = "127.0.0.1"
port = 5038
username = "tm4"
secret = "{secret}"
[guard]
failures = {FAILURES}
challenges = 100000
window = "10m"
security_log = "{seclog}"
[asterisk]
config_dir = "{real.root / 'etc'}"
""")
        d.start()
        assert wait_until(lambda: guard_state(d).get("ami", {}).get("logged_in"), 15), guard_state(d)
        phone = SipPhone(attacker.ns, ATTACKER, PBX, "1001", "correct-horse-1001")
        answered: list[float] = []  # wall times of wrong-password attempts Asterisk answered

        def attempt() -> bool:
            code = phone.register(password="wrong-password")
            if code is not None:
                answered.append(time.time())
            return code is not None

        for _ in range(3):
            assert attempt(), "Asterisk did not answer the attacker before the restart"

        # -- the restart, watched by a driver-login poller ----------------------------------
        accepted: list[float] = []
        stop = threading.Event()
        restart_at = time.time()

        def poll() -> None:
            time.sleep(0.05)  # the command first
            while not stop.is_set():
                if ami_login_ok(lab.pbx.ns, real.driver_secret):  # type: ignore[union-attr]
                    accepted.append(time.time())
                    return
                time.sleep(0.02)

        def attack() -> None:  # wrong passwords as fast as Asterisk answers, through the restart
            while not stop.is_set():
                attempt()
                time.sleep(0.02)

        assert real._sock is not None
        real._sock.sendall(b"Action: Command\r\nCommand: core restart now\r\n\r\n")
        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        attacker_thread = threading.Thread(target=attack, daemon=True)
        attacker_thread.start()
        before = guard_state(d)["ami"]["logins"]
        logged_in_again: float | None = None
        end = time.monotonic() + 60
        while time.monotonic() < end:
            if logged_in_again is None:
                st = guard_state(d)
                if st["ami"]["logins"] > before and st["ami"]["logged_in"]:
                    logged_in_again = iso(st["ami"]["logged_in_since"])
            elif time.time() > logged_in_again + 1.0:
                break
            time.sleep(0.02)
        stop.set()
        attacker_thread.join(5)
        poller.join(5)
        assert accepted, "Asterisk never accepted the driver's login after the restart"
        assert logged_in_again is not None, f"the guard never logged in again: {guard_state(d)}"
        late = logged_in_again - accepted[0]
        # -- the gap, caught up ---------------------------------------------------------------
        assert wait_until(lambda: (guard_state(d).get("gaps") or [{}])[-1].get("recovered") is not None, 10), \
            guard_state(d)
        status = daemon_status(d)
        guard = status["components"]["guard"] if "components" in status else status["guard"]
        gap = guard["gaps"][-1]
        away = [t for t in answered if iso(gap["from"]) <= t <= iso(gap["to"])]
        n = len(answered)
        print(f"\nrestart: logins accepted {accepted[0] - restart_at:.3f} s after the command; guard logged in"
              f" {late * 1000:+.0f} ms after that; gap {gap['seconds']} s, recovered {gap['recovered']} event(s)"
              f" from the security log; {n} wrong-password attempts answered, {len(away)} of them in the gap")
        print(json.dumps(guard, indent=1)[:3000])
        assert late <= 1.0, f"the guard logged in {late:.2f} s after Asterisk accepted logins"
        assert gap["error"] is None and gap["seconds"] > 0
        assert away, "no wrong password reached Asterisk while the guard was away: nothing was caught up"
        assert guard["state"] == "running"
        assert n < FAILURES - 1
        # -- each answered failure counted exactly once -------------------------------------
        core = d.core()

        def banned() -> bool:
            return any(b.address == ATTACKER for b in core.bans())

        assert not banned(), f"banned after {n} < {FAILURES} failures: some were counted twice"
        misses = 0
        while len(answered) < FAILURES - 1:
            misses += not attempt()
            assert misses < 5, "Asterisk stopped answering the attacker"
        time.sleep(0.5)
        assert not banned(), f"banned after {FAILURES - 1} failures: some were counted twice"
        while not attempt():
            misses += 1
            assert misses < 5, "Asterisk stopped answering the attacker"
        took = wait_until(banned, 3.0)
        assert took is not None, (f"not banned at the {FAILURES}th failure: the guard lost "
                                  f"some of the {n} made through the restart")
        print(f"banned exactly at the {FAILURES}th failure ({took * 1000:.0f} ms after it)")
    finally:
        if d is not None:
            if os.environ.get("TM4_KEEP"):
                print(d.log()[-3000:])
            d.close()
        if real is not None:
            real.close()
        lab.close()
