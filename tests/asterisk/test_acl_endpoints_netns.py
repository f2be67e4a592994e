"""Endpoint ACLs end to end, in network namespaces: real nftables, real SIPp REGISTERs
against the chan_pjsip simulator, the AMI simulator (built from the real captures)
loading acl.conf as Asterisk does, and tm4d's AclFollower keeping them in step.

Alice's endpoint 1001 follows her: her dial-in grant from home opens 1001 from home;
a thief with her password is refused by the endpoint ACL (401 + FailedACL, as the
capture shows) although the firewall lets SIP in (public_services); her next grant
from a hotel moves 1001 there and closes home -- kernel, ACL file and Asterisk within
one second."""

from __future__ import annotations

import ipaddress
import shutil
import time
from pathlib import Path
from typing import Any

from ami_acl_sim import AmiAclSim, User
from amisim import LoopThread
from conftest import need_root_tools
from dialin_support import add_passcode
from netlab import Lab, wait_for
from sipsim import SipResponder, sipp_argv

from tm4.asterisk.acl import (
    ACL_FILE,
    write_ties,
)
from tm4.asterisk.ties import (
    endpoint_acl_name,
    tied_endpoints,
)
from tm4.core.config import parse_config
from tm4.daemon.acl import AclFollower
from tm4.dialin.ops import DIALIN_OPS
from tm4.lab.sim.sip import register_scenario
from tm4.ops.engine import Core

REAL2 = Path(__file__).parent.parent / "fixtures" / "audit" / "real2"
PBX = "203.0.113.1"
HOME, HOTEL, THIEF = "203.0.113.7", "198.51.100.9", "192.0.2.66"
CODE = "48213977"
# REGISTER, the digest retry, and nothing but 200 OK will do (SIPp exits 1 otherwise)
MUST_REGISTER = register_scenario("REGISTER that must succeed").replace(
    '  <recv response="401"/>\n</scenario>', '  <recv response="200"/>\n</scenario>')
# tm4's AMI user as `tm4 asterisk install` left it in the real2 configuration
SECRET = next(ln.split("=", 1)[1].strip() for ln in (REAL2 / "manager_tm4.conf").read_text().splitlines()
              if ln.startswith("secret"))


def apply_ha(rules: list[tuple[str, str, str]] | None, src: str) -> bool:
    """ast_apply_ha on the rules the simulated Asterisk loaded: allow unless the LAST
    matching rule denies; a named ACL Asterisk cannot find denies (acl.c: is_invalid)."""
    if rules is None:
        return False
    addr = ipaddress.ip_address(src)
    verdict = True
    for sense, net, mask in rules:
        n = ipaddress.ip_address(net)
        if n.version != addr.version:
            continue
        m = int(ipaddress.ip_address(mask))
        if int(addr) & m == int(n) & m:
            verdict = sense == "allow"
    return verdict


def register(host: Any, src: str, tmp: Path, port: int) -> int:
    """One SIPp REGISTER as 1001 with the right password; SIPp's exit code (0: 200 OK)."""
    scenario = tmp / "register.xml"
    scenario.write_text(MUST_REGISTER)
    p = host.run(*sipp_argv(scenario, f"{PBX}:5060", user="1001", password="secret1001", local_ip=src,
                            local_port=port, rate=1, calls=1, timeout="3s"), check=False)
    return p.returncode


def test_dialin_grant_moves_the_endpoint_acl_kernel_file_and_asterisk(lab: Lab, tmp_path: Path) -> None:
    need_root_tools("sipp")
    home = lab.client("home", [f"{HOME}/24"])
    hotel = lab.client("hotel", [f"{HOTEL}/24"])
    thief = lab.client("thief", [f"{THIEF}/24"])
    etc = tmp_path / "etc"
    shutil.copytree(REAL2, etc)
    (etc / ACL_FILE).write_text("")  # installed: tm4 keeps it from now on
    sim = AmiAclSim(config_dir=etc, users={"tm4": User(SECRET)}).start()
    lt = LoopThread()
    responder: SipResponder | None = None
    try:
        cfg = parse_config({
            "state_dir": str(tmp_path / "state"),
            "firewall": {"netns": lab.pbx.ns, "public_services": ["sip-udp"]},
            "ami": {"port": sim.port, "secret": SECRET},
            "asterisk": {"config_dir": str(etc)},
            "dialin": {"discover": [], "external_address": "198.51.100.1"},
            "daemon": {"socket": str(tmp_path / "no-tm4d.sock")},
        })
        core = Core(cfg, protect=[])
        core.apply()
        add_passcode(core, "alice", CODE, endpoints=["1001"])
        write_ties(core, ["1001"])
        sim.reload_acl()  # Asterisk started with tm4's files in place
        uses = {ep: endpoint_acl_name(ep) for ep in tied_endpoints(cfg)}
        assert uses == {"1001": "tm4-1001"}
        responder = SipResponder(lab.pbx.socket, emit=None, local_ip=PBX, ipv6=False)
        responder.endpoint_acl = lambda user, src: user not in uses or apply_ha(sim.acls.get(uses[user]), src)

        follower = AclFollower()
        lt.spawn(follower.run(core))

        def grant(address: str) -> float:
            """The dial-in grant as tm4d runs it, then the wake tm4d's dispatch gives the
            follower; seconds until the simulated Asterisk has the new ACL loaded."""
            def both() -> None:
                tok = DIALIN_OPS["dialin.verify"](core, {"passcode": CODE, "callerid": "5551234"})["token"]
                DIALIN_OPS["dialin.grant"](core, {"token": tok, "address": address, "callerid": "5551234"})
                follower.wake("dialin.grant")
            t0 = time.monotonic()
            lt.call(both)
            assert wait_for(lambda: apply_ha(sim.acls.get("tm4-1001"), address), 3.0), (follower.state, sim.reloads, (etc / ACL_FILE).read_text()[-300:])
            return time.monotonic() - t0

        def kernel() -> str:
            return lab.pbx.run("nft", "list", "ruleset").stdout

        # Before any grant, 1001 is closed to everyone, alice included.
        assert register(home, HOME, tmp_path, 5081) != 0
        failed_acl = responder.events["FailedACL"]
        assert failed_acl >= 2  # the REGISTER and its retry with credentials

        took_home = grant(HOME)
        assert took_home < 1.0, took_home
        assert HOME in kernel()
        assert register(home, HOME, tmp_path, 5082) == 0
        assert register(thief, THIEF, tmp_path, 5083) != 0  # right password, wrong place
        assert responder.events["FailedACL"] >= failed_acl + 2

        took_hotel = grant(HOTEL)
        assert took_hotel < 1.0, took_hotel
        assert not apply_ha(sim.acls["tm4-1001"], HOME)  # closed at home in the same step
        text = (etc / ACL_FILE).read_text()
        assert HOTEL in text and HOME not in text
        k = kernel()
        assert HOTEL in k and HOME not in k
        assert register(hotel, HOTEL, tmp_path, 5084) == 0
        assert register(home, HOME, tmp_path, 5085) != 0
        assert "acl" in sim.reloads
        print(f"\nACL in Asterisk after a grant: home {took_home * 1000:.0f} ms, hotel {took_hotel * 1000:.0f} ms")
    finally:
        lt.close()
        sim.stop()
        if responder is not None:
            responder.close()
