"""Real nftables rules in namespaces the test builds, and real packets across veth pairs."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import time
from datetime import timedelta
from pathlib import Path

import pytest
from conftest import need_root_tools
from netlab import Echo, Lab, sh, wait_for

from tm4.core.config import parse_config
from tm4.core.errors import ApplyError
from tm4.core.rules import Ruleset
from tm4.ops.engine import Core

PBX4, PBX6 = "192.0.2.1", "2001:db8::1"


@pytest.fixture
def net(lab: Lab, tmp_path: Path):  # type: ignore[no-untyped-def]
    phone = lab.client("phone", ["192.0.2.10/24", "2001:db8::10/64"])
    stranger = lab.client("strngr", ["203.0.113.66/24", "2001:db8::66/64"])
    echo = Echo(lab.pbx, udp=[5060, 10000], tcp=[22, 5060])
    core = Core(parse_config({"state_dir": str(tmp_path / "state"), "firewall": {"netns": lab.pbx.ns}}),
                protect=[])
    yield lab, phone, stranger, core
    echo.close()


def handles(lab: Lab) -> list[str]:
    out = lab.pbx.run("nft", "-a", "list", "table", "inet", "tm4").stdout
    return re.findall(r"# handle \d+", out)


def test_whitelisted_sip_udp_reaches_5060_but_not_ssh_and_strangers_only_rtp(net) -> None:  # type: ignore[no-untyped-def]
    lab, phone, stranger, core = net
    core.allow("phone", ["192.0.2.10", "2001:db8::10"], ["sip-udp"])
    core.apply()
    assert phone.udp_probe(PBX4, 5060)
    assert not phone.tcp_probe(PBX4, 22)
    assert not phone.tcp_probe(PBX4, 5060)  # sip-tcp was not granted
    assert phone.udp_probe(PBX6, 5060)
    assert not phone.tcp_probe(PBX6, 22)
    assert not stranger.udp_probe(PBX4, 5060)
    assert not stranger.tcp_probe(PBX4, 22)
    assert stranger.udp_probe(PBX4, 10000)  # RTP is open to all
    assert not stranger.udp_probe(PBX6, 5060)


def test_grant_and_ban_are_single_element_changes_not_rebuilds(net) -> None:  # type: ignore[no-untyped-def]
    lab, phone, stranger, core = net
    core.apply()
    before = handles(lab)
    assert not phone.tcp_probe(PBX4, 22)
    core.allow("phone-ssh", ["192.0.2.10"], ["ssh"])
    assert phone.tcp_probe(PBX4, 22)
    core.block("203.0.113.66", ttl=timedelta(hours=1))
    assert not stranger.udp_probe(PBX4, 10000)
    core.unblock("203.0.113.66")
    assert stranger.udp_probe(PBX4, 10000)
    core.revoke("phone-ssh")
    assert not phone.tcp_probe(PBX4, 22)
    assert handles(lab) == before  # same rule handles: the chain was never rebuilt


def test_ban_cuts_an_established_udp_flow(net) -> None:  # type: ignore[no-untyped-def]
    lab, phone, stranger, core = net
    core.apply()
    s = stranger.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        assert stranger.udp_probe(PBX4, 10000, sock=s)  # conntrack now calls this flow established
        assert stranger.udp_probe(PBX4, 10000, sock=s)
        core.block("203.0.113.66", reason="test")
        assert not stranger.udp_probe(PBX4, 10000, sock=s)
    finally:
        s.close()


def test_ipv6_ban_by_prefix(net) -> None:  # type: ignore[no-untyped-def]
    lab, phone, stranger, core = net
    core.apply()
    assert stranger.udp_probe(PBX6, 10000)
    core.block("2001:db8::/64")
    assert not stranger.udp_probe(PBX6, 10000)
    assert stranger.udp_probe(PBX4, 10000)  # the v4 side of the same host is a different source


def test_overlapping_entries_survive_each_others_removal(net) -> None:  # type: ignore[no-untyped-def]
    lab, phone, stranger, core = net
    core.allow("office", ["192.0.2.0/24"], ["ssh"])
    core.allow("dialin-bob", ["192.0.2.10"], ["ssh"], ttl=timedelta(hours=2))
    core.apply()
    assert phone.tcp_probe(PBX4, 22)
    core.revoke("office")
    assert phone.tcp_probe(PBX4, 22)  # the /32 still holds
    core.allow("office", ["192.0.2.0/24"], ["ssh"])
    core.revoke("dialin-bob")
    assert phone.tcp_probe(PBX4, 22)  # the /24 still holds
    core.revoke("office")
    assert not phone.tcp_probe(PBX4, 22)


def test_temporary_grant_expires_in_the_kernel_by_itself(net) -> None:  # type: ignore[no-untyped-def]
    lab, phone, stranger, core = net
    core.apply()
    core.allow("brief", ["192.0.2.10"], ["ssh"], ttl=timedelta(seconds=2))
    assert phone.tcp_probe(PBX4, 22)
    assert wait_for(lambda: not phone.tcp_probe(PBX4, 22, timeout=0.2), timeout=5)


def test_regrant_refreshes_the_kernel_timeout(net) -> None:  # type: ignore[no-untyped-def]
    lab, phone, stranger, core = net
    core.apply()
    core.allow("bob", ["192.0.2.10"], ["ssh"], ttl=timedelta(seconds=3))
    core.allow("bob", ["192.0.2.10"], ["ssh"], ttl=timedelta(hours=2), replace=True)
    time.sleep(3.5)
    assert phone.tcp_probe(PBX4, 22)
    listing = lab.pbx.run("nft", "list", "set", "inet", "tm4", "wl4_ssh").stdout
    assert "timeout 2h" in listing


def test_rejected_apply_leaves_old_table_byte_for_byte(net) -> None:  # type: ignore[no-untyped-def]
    lab, phone, stranger, core = net
    core.allow("phone", ["192.0.2.10"], ["sip-udp"])
    core.apply()
    before = lab.pbx.run("nft", "list", "table", "inet", "tm4").stdout
    bad = core.render()
    bad.input_rules.insert(3, "tcp dport 22 jump no_such_chain")
    with pytest.raises(ApplyError, match="nft refused"):
        core.apply(bad)
    assert lab.pbx.run("nft", "list", "table", "inet", "tm4").stdout == before
    assert phone.udp_probe(PBX4, 5060)


def test_sipp_call_from_whitelisted_phone_is_answered_stranger_gets_nothing(
        lab: Lab, tmp_path: Path) -> None:
    need_root_tools("sipp")
    phone = lab.client("phone", ["192.0.2.10/24"])
    stranger = lab.client("strngr", ["203.0.113.66/24"])
    core = Core(parse_config({"state_dir": str(tmp_path), "firewall": {"netns": lab.pbx.ns}}), protect=[])
    core.allow("phone", ["192.0.2.10"], ["sip-udp"])
    core.apply()
    # SIPp's UAS on the PBX answers INVITEs on the real SIP port
    uas = lab.pbx.popen("sipp", "-sn", "uas", "-i", PBX4, "-p", "5060", "-nostdin", "-timeout", "30s",
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.3)
        ok = phone.run("sipp", "-sn", "uac", "-m", "1", "-timeout", "5s", "-timeout_error", "-nostdin",
                       "-i", "192.0.2.10", "-p", "5070", f"{PBX4}:5060", check=False)
        assert ok.returncode == 0, ok.stdout[-800:]
        bad = stranger.run("sipp", "-sn", "uac", "-m", "1", "-timeout", "2s", "-timeout_error", "-nostdin",
                           "-i", "203.0.113.66", "-p", "5070", f"{PBX4}:5060", check=False)
        assert bad.returncode != 0
        core.allow("stranger", ["203.0.113.66"], ["sip-udp"])  # same call, now let in: it works
        good = stranger.run("sipp", "-sn", "uac", "-m", "1", "-timeout", "5s", "-timeout_error", "-nostdin",
                            "-i", "203.0.113.66", "-p", "5071", f"{PBX4}:5060", check=False)
        assert good.returncode == 0, good.stdout[-800:]
    finally:
        uas.kill()
        uas.wait()


def test_status_and_plan_see_drift_from_outside(net) -> None:  # type: ignore[no-untyped-def]
    from tm4.daemon.status import gather_status

    lab, phone, stranger, core = net
    core.allow("phone", ["192.0.2.10"], ["sip-udp"])
    core.apply()
    assert gather_status(core)["drift"] == ""
    lab.pbx.run("nft", "delete", "element", "inet", "tm4", "wl4_sip_udp", "{ 192.0.2.10 }")
    st = gather_status(core)
    assert "1 element(s) missing" in st["drift"]
    lab.pbx.run("nft", "insert", "rule", "inet", "tm4", "input", "tcp", "dport", "22", "accept")
    assert "changed from outside" in gather_status(core)["drift"]
    core.apply()
    assert gather_status(core)["drift"] == ""
    lab.pbx.run("nft", "flush", "ruleset")
    assert gather_status(core)["table_present"] is False


def test_table_is_one_transaction_even_with_many_elements(net) -> None:  # type: ignore[no-untyped-def]
    lab, phone, stranger, core = net
    rs: Ruleset = core.render()
    core.apply(rs)
    assert core.backend.present()
    assert shutil.which("nft")
    out = sh("ip", "netns", "exec", lab.pbx.ns, "nft", "list", "tables").stdout
    assert "table inet tm4" in out
