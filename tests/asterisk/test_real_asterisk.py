"""tm4 against a real Asterisk 22 (marked `asterisk`: TM4_ASTERISK names the binary; without
it these skip, even in CI). Asterisk and tm4d run in the PBX namespace of a test lab, wired
by tm4.lab.asterisk.RealAsterisk the way the README tells an admin to; phones and attackers
are client namespaces sending real SIP.

- Endpoint ACLs (issue 14): `tm4 add alice ... --endpoint 1001` + `tm4 asterisk install
  --endpoint-acl 1001` → chan_pjsip lets 1001 register only from alice's address (others get
  FailedACL); when alice moves, tm4d rewrites acl_tm4.conf and sends `Module: acl`, and
  chan_pjsip follows without any res_pjsip reload.
- `tm4 asterisk status` with tm4's least-privilege manager user raises no RequestNotAllowed.
- Dial-in with FastAGI down: the dialplan falls back to the classic AGI launcher, Asterisk
  execs it, the grant happens.
"""

from __future__ import annotations

import grp
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import need_root_tools, real_asterisk
from daemon_support import Tm4d, wait_until
from dialin_support import add_passcode
from install_support import AsteriskUser
from netlab import Host, Lab

from tm4.daemon.deploy import AGI_NAME, render_launcher
from tm4.daemon.shipped import AGI_SCRIPT, shipped_text
from tm4.firewall.netns import in_netns
from tm4.lab import sip_dtmf
from tm4.lab.asterisk import RealAsterisk
from tm4.lab.sim.sip import SipPhone
from tm4.lab.sip_dtmf import call_with_keys

pytestmark = pytest.mark.asterisk

PBX = "203.0.113.1"
HOME, HOTEL = "203.0.113.7", "198.51.100.9"
PASSWORD = "correct-horse-1001"


class Pbx:
    """A real Asterisk and a real tm4d in one lab's PBX namespace, client namespaces around."""

    def __init__(self, tmp: Path, *, keys: list[str] | None = None, fastagi: str = "127.0.0.1:4573",
                 extra: str = "", ast_tmp: Path | None = None, run_as: tuple[str, str] | None = None,
                 group: str = "tm4test-nogroup") -> None:
        self.binary = real_asterisk()
        need_root_tools("ip", "nft")
        self.lab = Lab("ra")
        self.tmp = tmp
        self.secret = secrets.token_hex(12)
        self.d = Tm4d(tmp, self.lab.pbx.ns, group=group)
        self.real = RealAsterisk(self.lab.pbx.ns, ast_tmp or tmp, self.binary, moddir=None, tm4_user="tm4",
                                 tm4_secret=self.secret, socket_path=str(self.d.socket), fastagi=fastagi,
                                 users={"1001": PASSWORD, "1002": "correct-horse-1002"}, keys=keys or [],
                                 run_as=run_as)
        self.hosts: dict[str, Host] = {}
        self.extra = extra
        self.fastagi = fastagi

    def start(self, write: bool = True) -> Pbx:
        if write:
            self.real.write()
        self.boot_s = self.real.start()
        etc = self.real.root / "etc"
        base = self.d.base.replace('fastagi = ""', f'fastagi = "{self.fastagi}"')
        self.d.write_config(raw=base + f"""
[firewall]
public_services = ["sip-udp"]
rate_packets = 1000000
[ami]
host = "127.0.0.1"
port = 5038
username = "tm4"
secret = "{self.secret}"
[guard]
failures = 1000
challenges = 100000
security_log = "{self.real.root / 'log' / 'security'}"
[asterisk]
config_dir = "{etc}"
{self.extra}""")
        self.d.start()
        return self

    def client(self, name: str, addr: str) -> Host:
        h = self.lab.client(name, [f"{addr}/24"])
        self.hosts[addr] = h
        return h

    def tm4(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        # On the PBX, as an admin would (AMI listens on the PBX's loopback).
        out = subprocess.run(["ip", "netns", "exec", self.lab.pbx.ns, sys.executable, "-m", "tm4.cli",
                              "--config", str(self.d.config_path), *args],
                             capture_output=True, text=True, timeout=60)
        if check:
            assert out.returncode == 0, f"tm4 {' '.join(args)}: {out.stdout}{out.stderr}"
        return out

    def events(self, since: int = 0, name: str | None = None) -> list[dict[str, str]]:
        with self.real._lock:
            evs = [e for _, e in self.real.events[since:]]
        return [e for e in evs if name is None or e.get("Event") == name]

    def mark(self) -> int:
        with self.real._lock:
            return len(self.real.events)

    def close(self) -> None:
        if os.environ.get("TM4_KEEP"):
            print(self.d.log()[-4000:])
            print(self.real.log()[-3000:])
        self.d.close()
        self.real.close()
        self.lab.close()


@pytest.fixture
def pbx(tmp_path: Path) -> Iterator[Pbx]:
    p = Pbx(tmp_path)
    try:
        yield p
    finally:
        p.close()


def remote_of(ev: dict[str, str]) -> str:
    parts = ev.get("RemoteAddress", "").split("/")
    return parts[2] if len(parts) >= 4 else ""


def failed_acl_from(p: Pbx, since: int, addr: str) -> list[dict[str, str]]:
    return [e for e in p.events(since, "FailedACL") if remote_of(e) == addr]


# -- endpoint ACLs (issue 14) -------------------------------------------------------------------

def test_chan_pjsip_honours_the_endpoint_acl_and_follows_alice_without_a_pjsip_reload(pbx: Pbx) -> None:
    p = pbx.start()
    home, hotel = p.client("home", HOME), p.client("hotel", HOTEL)
    phone_home = SipPhone(home.ns, HOME, PBX, "1001", PASSWORD)
    phone_hotel = SipPhone(hotel.ns, HOTEL, PBX, "1001", PASSWORD)
    # Before any endpoint ACL: 1001's password works from anywhere.
    assert phone_hotel.register() == 200
    p.tm4("add", "alice", HOME, "-s", "sip-udp", "--endpoint", "1001")
    out = p.tm4("asterisk", "install", "--asterisk", str(p.real.root / "etc"), "--endpoint-acl", "1001", "--json")
    report = json.loads(out.stdout)
    ties = (p.real.root / "etc" / "pjsip_tm4_endpoints.conf").read_text()
    assert "[1001](+type=endpoint)" in ties and "acl = tm4-1001" in ties
    assert "1001" not in ties.split("[1001]")[0].split("\n")[-1]  # 1002 and anonymous untied
    assert "[1002]" not in ties and "[anonymous]" not in ties
    shown = wait_until(lambda: HOME in p.real.command("acl show tm4-1001"), 10)
    assert shown is not None, p.real.command("acl show tm4-1001")
    endpoint = p.real.command("pjsip show endpoint 1001")
    print(f"\ninstall: {json.dumps(report)[:600]}\npjsip show endpoint 1001 (acl lines): "
          + " | ".join(ln.strip() for ln in endpoint.splitlines() if "acl" in ln.lower()))

    # Honoured: home registers, the hotel (right password, wrong place) is refused with FailedACL.
    assert phone_home.register() == 200
    m = p.mark()
    refused = phone_hotel.register()
    assert refused != 200, "chan_pjsip let 1001 register from outside its endpoint ACL"
    assert wait_until(lambda: failed_acl_from(p, m, HOTEL), 3), p.events(m)
    acl_ev = failed_acl_from(p, m, HOTEL)[0]
    assert acl_ev.get("AccountID") == "1001" and acl_ev.get("Service") == "PJSIP"
    print(f"before the move: home 200, hotel {refused} + FailedACL ({acl_ev.get('ACLName', '-')})")

    # alice moves to the hotel: tm4d rewrites acl_tm4.conf and sends Module: acl, nothing else.
    m = p.mark()
    t0 = time.monotonic()
    p.tm4("add", "alice", HOTEL, "-s", "sip-udp", "--endpoint", "1001", "--replace")
    cli_s = time.monotonic() - t0
    follows = wait_until(lambda: phone_hotel.register() == 200, 10, 0.02)
    assert follows is not None, (f"1001 never registered from the hotel after the move: "
                                 f"{p.real.command('acl show tm4-1001')}")
    m2 = p.mark()
    home_code = phone_home.register()
    assert home_code != 200, "1001 still registers from alice's old address"
    assert wait_until(lambda: failed_acl_from(p, m2, HOME), 3), p.events(m2)
    reloads = [e.get("Module", "?") for e in p.events(m, "Reload")]
    pjsip_reloads = [r for r in reloads if "pjsip" in r.lower()]
    print(f"after the move: tm4 add took {cli_s * 1000:.0f} ms; 1001 registered from the hotel "
          f"{follows * 1000:.0f} ms after it returned ({(cli_s + follows) * 1000:.0f} ms after the command); "
          f"home {home_code} + FailedACL; Reload events: {reloads}")
    assert reloads and all(r.lower() in ("acl", "acl.so") for r in reloads), reloads
    assert not pjsip_reloads
    assert cli_s + follows <= 1.5


# -- tm4 asterisk status with the least-privilege user (issue 11 item 5) --------------------------

def ami_as(p: Pbx, user: str, secret: str, action: str) -> str:
    """Log in as `user` on the PBX's AMI, send one raw action, return what came back."""
    s = in_netns(p.lab.pbx.ns, lambda: socket.create_connection(("127.0.0.1", 5038), timeout=3))
    with s:
        s.sendall(f"Action: Login\r\nUsername: {user}\r\nSecret: {secret}\r\nEvents: off\r\n\r\n".encode()
                  + action.encode() + b"Action: Logoff\r\n\r\n")
        buf = b""
        end = time.monotonic() + 5
        while b"Goodbye" not in buf and time.monotonic() < end:
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    return buf.decode(errors="replace")


def test_asterisk_status_raises_no_request_not_allowed(pbx: Pbx) -> None:
    p = pbx.start()
    p.tm4("add", "alice", HOME, "-s", "sip-udp", "--endpoint", "1001")
    p.tm4("asterisk", "install", "--asterisk", str(p.real.root / "etc"), "--endpoint-acl", "1001")
    # The watcher works: a Command from tm4's user is what raises RequestNotAllowed.
    m = p.mark()
    answer = ami_as(p, "tm4", p.secret, "Action: Command\r\nCommand: acl show tm4\r\n\r\n")
    assert "Permission denied" in answer
    assert wait_until(lambda: [e for e in p.events(m, "RequestNotAllowed") if e.get("AccountID") == "tm4"], 3)
    m = p.mark()
    text = p.tm4("asterisk", "status")
    js = json.loads(p.tm4("asterisk", "status", "--json").stdout)
    time.sleep(0.5)  # events of the last action reach the driver
    logins = [e for e in p.events(m, "SuccessfulAuth") if e.get("AccountID") == "tm4" and e.get("Service") == "AMI"]
    errors = [e for e in p.events(m) if e.get("Severity") == "Error" and e.get("AccountID") == "tm4"]
    not_allowed = p.events(m, "RequestNotAllowed")
    print(f"\ntm4 asterisk status: {len(logins)} AMI login(s) as tm4, {len(not_allowed)} RequestNotAllowed,"
          f" {len(errors)} Error-severity event(s) for tm4\n{text.stdout}")
    assert logins, "tm4 asterisk status never logged in to the real Asterisk"
    assert not not_allowed and not errors, not_allowed or errors
    log = (p.real.root / "log" / "security").read_text(errors="replace")
    assert log.count('SecurityEvent="RequestNotAllowed"') == 1  # only the watcher's own check
    assert js  # and it still reports: file, include, what it cannot check without more privilege


# -- dial-in with FastAGI down: the classic AGI fallback (issue 11) -----------------------------

CODE = "48213977"
TRAVELLER = "198.51.100.77"
TYPED = "198*51*100*77"  # TRAVELLER on a keypad


def fallback_call(p: Pbx) -> None:
    """Alice's passcode, the traveller's address and 1, typed by a real call; FastAGI is down."""
    add_passcode(p.d.core(), "alice", CODE)
    traveller = p.client("traveller", TRAVELLER)
    assert not traveller.tcp_probe(PBX, 5060), "sip-tcp open to the traveller before any grant"
    listening = subprocess.run(["ip", "netns", "exec", p.lab.pbx.ns, "ss", "-Htln", "sport", "= :4573"],
                               capture_output=True, text=True).stdout
    assert not listening.strip(), f"something listens on 4573: {listening}"
    m = p.mark()
    done = p.real.dial_in()
    agi = p.events(m, "AGIExecStart")
    entry = p.d.call("entry", name="dialin-alice")
    opened = wait_until(lambda: traveller.tcp_probe(PBX, 5060, timeout=0.2), 3)
    log = p.real.log()
    print(f"\nfallback call: {done}; entry {entry.get('name')} {entry.get('sources')} until "
          f"{entry.get('expires')}; sip-tcp open for the traveller {opened} s after the hang-up")
    assert "FastAGI failed" in log, "the dialplan never tried FastAGI (or it answered)"
    assert "tm4 dial-in: granted" in log, "the classic AGI launcher never granted"
    assert opened is not None, f"{TRAVELLER} still blocked after the call: {done}"
    assert TRAVELLER in json.dumps(entry)
    assert done["agi_commands"] > 0 and agi, "no AGI command ran: the launcher never spoke to Asterisk"


def down_fastagi(p: Pbx) -> Pbx:
    # tm4d serves no FastAGI; the dialplan still points at 127.0.0.1:4573, where nothing listens.
    p.real.fastagi = "127.0.0.1:4573"
    p.fastagi = ""
    return p


def test_fastagi_down_the_dialplan_falls_back_to_classic_agi_and_the_grant_happens(tmp_path: Path) -> None:
    p = down_fastagi(Pbx(tmp_path, keys=[CODE + "#", TYPED + "#", "1"]))
    try:
        p.start()
        fallback_call(p)
    finally:
        p.close()


def user_python(base: Path) -> str:
    """A venv of /usr/bin/python3 whose site-packages see this checkout and its dependencies."""
    venv = base / "venv"
    subprocess.run(["/usr/bin/python3", "-m", "venv", "--without-pip", str(venv)], check=True)
    here = Path(__file__).resolve().parents[2]
    deps = next((here / ".venv" / "lib").glob("python3*/site-packages"))
    site = next((venv / "lib").glob("python3*/site-packages"))
    (site / "tm4_checkout.pth").write_text(f"{here / 'src'}\n{deps}\n")
    return str(venv / "bin" / "python3")


def test_the_fallback_works_with_asterisk_as_a_non_root_user_of_the_socket_group(tmp_path: Path) -> None:
    """Asterisk -U/-G as a packaged one runs: the launcher it execs is that user, and reaches
    tm4d's control socket only through the group tm4d gives the socket ([daemon] asterisk_group)."""
    real_asterisk()  # skips before any user is made
    need_root_tools("useradd", "groupadd")
    user = AsteriskUser()  # named after this process: concurrent runs never collide
    base = Path(tempfile.mkdtemp(prefix="tm4ra", dir="/tmp"))  # pytest's tmp is root-only
    base.chmod(0o755)
    p: Pbx | None = None
    try:
        p = down_fastagi(Pbx(tmp_path, keys=[CODE + "#", TYPED + "#", "1"], ast_tmp=base,
                             run_as=(user.user, user.group), group=user.group))
        p.real.write()
        # This checkout's venv python lives under /root (0700 here): Asterisk's user could not
        # exec it. A venv of the system python that sees this checkout stands in for the
        # python an installed tm4 names (the wheel test in tests/install/ builds the real one).
        py = user_python(base)
        launcher = p.real.root / "agi-bin" / AGI_NAME
        launcher.write_text(render_launcher(shipped_text(AGI_SCRIPT), py, str(p.d.socket)))
        subprocess.run(["chown", "-R", f"{user.user}:{user.group}", str(p.real.root)], check=True)
        p.start(write=False)
        ps = subprocess.run(["ps", "-o", "user=", "-p", str(p.real.proc.pid)],  # type: ignore[union-attr]
                            capture_output=True, text=True).stdout.strip()
        sock = p.d.socket.stat()
        print(f"\nAsterisk runs as {ps}; tm4d's socket group {grp.getgrgid(sock.st_gid).gr_name} "
              f"mode {oct(sock.st_mode & 0o777)}")
        assert ps == user.user
        assert sock.st_gid == user.gid
        fallback_call(p)
    finally:
        if p is not None:
            p.close()
        user.close()
        shutil.rmtree(base, ignore_errors=True)


# -- dial-in over a real SIP call: menu option 1, the caller's own address ----------------------

CALLER = "198.51.100.20"
def test_a_real_sip_call_with_rfc2833_keys_lets_in_the_callers_own_address(pbx: Pbx) -> None:
    """Menu option 1: the call comes straight from the caller's device (the anonymous
    endpoint, [dialin] direct_endpoints), so tm4 offers the address the call comes from."""
    need_root_tools("sipp")
    if sip_dtmf.available():
        pytest.fail(f"needs {sip_dtmf.available()}")
    p = pbx.start()
    add_passcode(p.d.core(), "alice", CODE)
    phone = p.client("phone", CALLER)
    assert not phone.tcp_probe(PBX, 5060), "sip-tcp open to the caller before any grant"
    # passcode then #, menu 1 (this address), confirm 1; each key while the prompt before it plays
    keys = [(CODE[0], 3.0), *[(k, 0.4) for k in CODE[1:]], ("#", 0.4), ("1", 2.0), ("1", 2.0)]
    m = p.mark()
    run = call_with_keys(phone.ns, CALLER, PBX, keys, p.tmp)
    took = run.seconds
    agi = [e.get("Command", "") for e in p.events(m, "AGIExecStart")]
    dtmf = "".join(e.get("Digit", "") for e in p.events(m, "DTMFEnd") if e.get("Direction") == "Received")
    print(f"\nSIPp exit {run.returncode} after {took:.1f} s; Asterisk received keys {dtmf!r}; AGI: {agi}")
    opened = wait_until(lambda: phone.tcp_probe(PBX, 5060, timeout=0.2), 3)
    entry = p.d.call("entry", name="dialin-alice")
    assert dtmf == "".join(k for k, _ in keys), f"Asterisk lost keys: got {dtmf!r}"
    assert any("tm4/menu" in c for c in agi), f"no menu: the call was not seen as direct ({agi})"
    assert CALLER in json.dumps(entry), entry
    assert opened is not None, f"{CALLER} still blocked after its own grant"
    assert run.returncode == 0, run.output
