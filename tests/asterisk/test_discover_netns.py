"""Discovered trunks in the kernel: each trunk's address reaches its own protocol and nothing else."""

from __future__ import annotations

import shutil
from pathlib import Path

from netlab import Echo, Host, Lab

from tm4.asterisk.discover import apply, discover_files
from tm4.core.config import parse_config
from tm4.ops.engine import Core

FIX = Path(__file__).parent.parent / "fixtures" / "discover" / "netns"


def reach(host: Host, dst: str) -> dict[str, bool]:
    """Which signalling services this host can open a new flow to."""
    return {
        "sip-udp": host.udp_probe(dst, 5060, timeout=0.2),
        "sip-tcp": host.tcp_probe(dst, 5060, timeout=0.2),
        "sip-tls": host.tcp_probe(dst, 5061, timeout=0.2),
        "iax": host.udp_probe(dst, 4569, timeout=0.2),
    }


def only(service: str) -> dict[str, bool]:
    return {s: s == service for s in ("sip-udp", "sip-tcp", "sip-tls", "iax")}


def test_each_trunk_reaches_only_its_protocol(lab: Lab, tmp_path: Path) -> None:
    conf = tmp_path / "asterisk"
    shutil.copytree(FIX, conf)
    core = Core(parse_config({"state_dir": str(tmp_path / "state"), "firewall": {"netns": lab.pbx.ns}}),
                protect=[])
    core.apply()
    echo = Echo(lab.pbx, udp=[5060, 4569], tcp=[5060, 5061])
    try:
        udp_trunk = lab.client("udptrunk", ["192.0.2.50/24", "192.0.2.51/24"])
        tls_trunk = lab.client("tlstrunk", ["198.51.100.60/24"])
        iax_trunk = lab.client("iaxtrunk", ["203.0.113.70/24"])
        stranger = lab.client("stranger", ["192.0.2.99/24"])
        nothing = only("")
        assert reach(udp_trunk, "192.0.2.1") == nothing  # before discovery: closed

        changes = apply(core, discover_files(conf), actor="test")
        assert {c.action for c in changes} == {"add"}
        assert reach(udp_trunk, "192.0.2.1") == only("sip-udp")
        assert reach(tls_trunk, "198.51.100.1") == only("sip-tls")
        assert reach(iax_trunk, "203.0.113.1") == only("iax")
        assert reach(stranger, "192.0.2.1") == nothing
        core.apply()  # a full re-apply renders the same
        assert reach(tls_trunk, "198.51.100.1") == only("sip-tls")

        # the provider moves: re-running updates the entry, the old address is closed at once
        pj = conf / "pjsip.conf"
        pj.write_text(pj.read_text().replace("192.0.2.50", "192.0.2.51"))
        (conf / "iax.conf").unlink()
        changes = {c.entry: c.action for c in apply(core, discover_files(conf), actor="test")}
        assert changes == {"trunk-pjsip-udp-trunk": "update", "trunk-pjsip-tls-trunk": "keep",
                           "trunk-iax-iax-trunk": "remove"}
        assert reach(udp_trunk, "192.0.2.1") == nothing  # from 192.0.2.50 (its first address)
        assert udp_trunk.udp_probe("192.0.2.1", 5060, src="192.0.2.51", timeout=0.2)
        assert not udp_trunk.tcp_probe("192.0.2.1", 5060, src="192.0.2.51", timeout=0.2)
        assert reach(iax_trunk, "203.0.113.1") == nothing
    finally:
        echo.close()
