"""Endpoint ACLs: how long rendering acl_tm4.conf takes with many endpoints, and how long
from a dial-in grant to the moved endpoint ACL being loaded in (simulated) Asterisk.

The second figure runs tm4d's AclFollower against the AMI simulator built from the real
Asterisk 22 captures (it re-reads acl.conf on `Module: acl`, as Asterisk does); each
grant moves alice's endpoint 1001 to a new address, so each also closes the old one.
Target (issue 14): <= 1 s from the grant to Asterisk. No root needed.
"""

from __future__ import annotations

import ipaddress
import shutil
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from ami_acl_sim import AmiAclSim, User  # noqa: E402
from amisim import LoopThread  # noqa: E402
from dialin_support import add_passcode, make_core  # noqa: E402

from tm4.asterisk.acl import ACL_FILE, render_acl, write_ties  # noqa: E402
from tm4.core.model import Entry, Source, utcnow  # noqa: E402
from tm4.daemon.acl import AclFollower  # noqa: E402
from tm4.dialin.ops import DIALIN_OPS  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
REAL2 = REPO / "tests" / "fixtures" / "audit" / "real2"
TARGET_S = 1.0
GRANTS = 30
CODE = "48213977"


def render_figure(n_entries: int = 10_000, per_endpoint: int = 5) -> float:
    now = utcnow()
    base = int(ipaddress.IPv4Address("10.0.0.0"))
    entries = [Entry(f"e{i}", (Source.parse(str(ipaddress.IPv4Address(base + i))),), ("sip-udp",),
                     created=now, expires=now + timedelta(days=1), endpoints=(f"{2000 + i // per_endpoint}",))
               for i in range(n_entries)]
    t0 = time.perf_counter()
    text = render_acl(entries, now)
    took = time.perf_counter() - t0
    print(f"render: {n_entries} entries, {n_entries // per_endpoint} endpoint ACLs, "
          f"{len(text) // 1024} KiB in {took * 1000:.0f} ms")
    return took


def grant_figures() -> list[float]:
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        etc = tmp / "etc"
        shutil.copytree(REAL2, etc)
        (etc / ACL_FILE).write_text("")
        secret = next(ln.split("=", 1)[1].strip() for ln in (etc / "manager_tm4.conf").read_text().splitlines()
                      if ln.startswith("secret"))
        sim = AmiAclSim(config_dir=etc, users={"tm4": User(secret)}).start()
        core = make_core(tmp, {"discover": []})
        core.config.asterisk.config_dir = str(etc)
        core.config.ami.port = sim.port
        core.config.ami.secret = secret
        add_passcode(core, "alice", CODE, endpoints=["1001"])
        write_ties(core, ["1001"])
        lt = LoopThread()
        follower = AclFollower()
        lt.spawn(follower.run(core))
        out = []
        try:
            for i in range(GRANTS):
                addr = f"198.51.100.{10 + i}"

                def grant(address: str = addr) -> None:
                    tok = DIALIN_OPS["dialin.verify"](core, {"passcode": CODE, "callerid": "5551234"})["token"]
                    DIALIN_OPS["dialin.grant"](core, {"token": tok, "address": address, "callerid": "5551234"})
                    follower.wake("dialin.grant")

                t0 = time.perf_counter()
                lt.call(grant)
                while not any(r[1] == addr for r in sim.acls.get("tm4-1001", []) if r[0] == "allow"):
                    if time.perf_counter() - t0 > 5:
                        raise SystemExit(f"grant {i}: ACL not loaded after 5 s ({follower.state})")
                    time.sleep(0.001)
                out.append(time.perf_counter() - t0)
                assert len([r for r in sim.acls["tm4-1001"] if r[0] == "allow"]) == 1  # the old one closed
        finally:
            lt.close()
            sim.stop()
        return out


def main() -> None:
    render_figure()
    t = sorted(grant_figures())
    p50, p99 = statistics.median(t), t[int(len(t) * 0.99) - 1]
    print(f"grant -> endpoint ACL loaded in Asterisk ({GRANTS} grants): p50 {p50 * 1000:.0f} ms, "
          f"max {t[-1] * 1000:.0f} ms, p99 {p99 * 1000:.0f} ms (target <= {TARGET_S * 1000:.0f} ms)")


if __name__ == "__main__":
    main()
