"""Port knocking with real packets across real nftables rules, in network namespaces."""

from __future__ import annotations

import json
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from netlab import Echo, Host, Lab

from tm4.core.config import parse_config
from tm4.core.model import Origin
from tm4.knock import sequence as knock
from tm4.ops.engine import Core

SIP = 5060  # sip-tcp and sip-udp: what the knock grants in these tests
SSH = 22  # not granted


def make_core(lab: Lab, tmp: Path, **knock_cfg: Any) -> Core:
    cfg = {"enabled": True, "services": ["sip-udp", "sip-tcp"], "step_timeout": "5s", **knock_cfg}
    config = parse_config({"state_dir": str(tmp), "firewall": {"netns": lab.pbx.ns}, "knock": cfg})
    core = Core(config, protect=[])
    core.apply()
    return core


def send_knock(host: Host, dst: str, port: int, proto: str = "tcp", src: str | None = None) -> None:
    """One knock: a lone SYN (the socket is dropped before any retransmission) or one datagram."""
    fam = socket.AF_INET6 if ":" in dst else socket.AF_INET
    if proto == "udp":
        s = host.socket(fam, socket.SOCK_DGRAM)
        if src:
            s.bind((src, 0))
        s.sendto(b"knock", (dst, port))
    else:
        s = host.socket(fam, socket.SOCK_STREAM)
        if src:
            s.bind((src, 0))
        s.setblocking(False)
        s.connect_ex((dst, port))
    time.sleep(0.03)
    s.close()


def knock_all(host: Host, dst: str, ports: tuple[int, ...] | list[int], proto: str = "tcp",
              src: str | None = None) -> None:
    for p in ports:
        send_knock(host, dst, p, proto, src)


def reaches_sip(host: Host, dst: str, src: str | None = None) -> bool:
    return host.tcp_probe(dst, SIP, src=src, timeout=0.3)


@pytest.fixture
def servers(lab: Lab) -> Iterator[Echo]:
    echo = Echo(lab.pbx, udp=[SIP], tcp=[SIP, SSH])
    yield echo
    echo.close()


def seq_of(core: Core) -> tuple[int, ...]:
    seq = knock.current(core.config, core.store)
    assert seq is not None
    return seq.ports


def test_right_sequence_opens_granted_services_only(lab: Lab, servers: Echo, tmp_path: Path) -> None:
    core = make_core(lab, tmp_path)
    alice = lab.client("alice", ["192.0.2.10/24", "2001:db8::10/64"])
    pbx4, pbx6 = "192.0.2.1", "2001:db8::1"
    assert not reaches_sip(alice, pbx4)
    assert not alice.udp_probe(pbx4, SIP, timeout=0.3)
    knock_all(alice, pbx4, seq_of(core))
    assert reaches_sip(alice, pbx4)
    assert alice.udp_probe(pbx4, SIP, timeout=0.5)
    assert not alice.tcp_probe(pbx4, SSH, timeout=0.3)  # ssh was not granted
    # IPv6 has its own stages: the v4 knock opened nothing for v6
    assert not reaches_sip(alice, pbx6)
    knock_all(alice, pbx6, seq_of(core))
    assert reaches_sip(alice, pbx6)


def test_wrong_order_gives_nothing(lab: Lab, servers: Echo, tmp_path: Path) -> None:
    core = make_core(lab, tmp_path)
    bob = lab.client("bob", ["192.0.2.11/24"])
    p1, p2, p3 = seq_of(core)
    for order in ((p2, p1, p3), (p1, p3, p2), (p3, p2, p1), (p2, p3)):
        knock_all(bob, "192.0.2.1", order)
        assert not reaches_sip(bob, "192.0.2.1"), order
    knock_all(bob, "192.0.2.1", (p1, p2, p3))  # the right one still works afterwards
    assert reaches_sip(bob, "192.0.2.1")


def test_stray_port_in_between_resets(lab: Lab, servers: Echo, tmp_path: Path) -> None:
    core = make_core(lab, tmp_path)
    carol = lab.client("carol", ["192.0.2.12/24"])
    p1, p2, p3 = seq_of(core)
    stray = next(p for p in range(40000, 40100) if p not in (p1, p2, p3))
    knock_all(carol, "192.0.2.1", (p1, stray, p2, p3))
    assert not reaches_sip(carol, "192.0.2.1")
    knock_all(carol, "192.0.2.1", (p1, p2, stray, p3))
    assert not reaches_sip(carol, "192.0.2.1")
    # a knock on the previous port again (a retransmitted SYN) keeps the stage
    knock_all(carol, "192.0.2.1", (p1, p2, p2, p3))
    assert reaches_sip(carol, "192.0.2.1")


def test_too_slow_gives_nothing(lab: Lab, servers: Echo, tmp_path: Path) -> None:
    core = make_core(lab, tmp_path, step_timeout="1s")
    dave = lab.client("dave", ["192.0.2.13/24"])
    p1, p2, p3 = seq_of(core)
    knock_all(dave, "192.0.2.1", (p1, p2))
    time.sleep(1.4)
    send_knock(dave, "192.0.2.1", p3)
    assert not reaches_sip(dave, "192.0.2.1")
    knock_all(dave, "192.0.2.1", (p1, p2, p3))  # the same knocks in time work
    assert reaches_sip(dave, "192.0.2.1")


def test_partial_sequence_from_another_source_does_not_count(
        lab: Lab, servers: Echo, tmp_path: Path) -> None:
    core = make_core(lab, tmp_path)
    erin = lab.client("erin", ["192.0.2.14/24"])
    mallory = lab.client("mallory", ["198.51.100.66/24"])
    p1, p2, p3 = seq_of(core)
    knock_all(erin, "192.0.2.1", (p1, p2))
    send_knock(mallory, "198.51.100.1", p3)  # finishing someone else's sequence
    assert not reaches_sip(mallory, "198.51.100.1")
    # (no probe from erin here: a SYN to 5060 is a wrong port and would reset her)
    knock_all(mallory, "198.51.100.1", (p2, p3))  # starting in the middle
    assert not reaches_sip(mallory, "198.51.100.1")
    send_knock(erin, "192.0.2.1", p3)  # erin's own progress was untouched
    assert reaches_sip(erin, "192.0.2.1")
    assert not reaches_sip(mallory, "198.51.100.1")


def test_grant_times_out(lab: Lab, servers: Echo, tmp_path: Path) -> None:
    core = make_core(lab, tmp_path, ttl="2s")
    frank = lab.client("frank", ["192.0.2.15/24"])
    knock_all(frank, "192.0.2.1", seq_of(core))
    assert reaches_sip(frank, "192.0.2.1")
    time.sleep(2.3)
    assert not reaches_sip(frank, "192.0.2.1")


def test_udp_knocks(lab: Lab, servers: Echo, tmp_path: Path) -> None:
    core = make_core(lab, tmp_path, protocol="udp")
    gina = lab.client("gina", ["203.0.113.16/24"])
    ports = seq_of(core)
    knock_all(gina, "203.0.113.1", ports, proto="tcp")  # right ports, wrong protocol
    assert not reaches_sip(gina, "203.0.113.1")
    knock_all(gina, "203.0.113.1", ports, proto="udp")
    assert reaches_sip(gina, "203.0.113.1")


def test_progress_survives_a_full_apply(lab: Lab, servers: Echo, tmp_path: Path) -> None:
    core = make_core(lab, tmp_path)
    hank = lab.client("hank", ["192.0.2.17/24"])
    p1, p2, p3 = seq_of(core)
    knock_all(hank, "192.0.2.1", (p1, p2))
    core.apply()  # the kernel-filled stage is carried over
    send_knock(hank, "192.0.2.1", p3)
    assert reaches_sip(hank, "192.0.2.1")


def test_rotate_kills_the_old_sequence_at_once(lab: Lab, servers: Echo, tmp_path: Path) -> None:
    core = make_core(lab, tmp_path)
    ivy = lab.client("ivy", ["192.0.2.18/24"])
    jack = lab.client("jack", ["192.0.2.19/24"])
    old = seq_of(core)
    knock_all(jack, "192.0.2.1", old)  # jack finished before the rotation
    knock_all(ivy, "192.0.2.1", old[:2])  # ivy is half-way
    new = knock.rotate(core, actor="test").ports
    assert new != old and not set(new) & set(old)
    assert seq_of(core) == new
    send_knock(ivy, "192.0.2.1", old[2])
    assert not reaches_sip(ivy, "192.0.2.1")
    knock_all(ivy, "192.0.2.1", old)
    assert not reaches_sip(ivy, "192.0.2.1")
    knock_all(ivy, "192.0.2.1", new)
    assert reaches_sip(ivy, "192.0.2.1")
    assert reaches_sip(jack, "192.0.2.1")  # a grant already given runs its course
    rec = [r for r in core.store.audit_log() if r.action == "knock-rotate"]
    assert rec and rec[-1].actor == "test" and "ports" not in rec[-1].detail
    assert str(old[0]) not in json.dumps(rec[-1].detail) and str(new[0]) not in json.dumps(rec[-1].detail)
    newer = knock.rotate(core, actor="test", revoke=True).ports  # ...unless revoked
    assert not reaches_sip(jack, "192.0.2.1") and not reaches_sip(ivy, "192.0.2.1")
    knock_all(jack, "192.0.2.1", newer)
    assert reaches_sip(jack, "192.0.2.1")


def test_activation_makes_a_stored_entry_that_survives_apply(
        lab: Lab, servers: Echo, tmp_path: Path) -> None:
    core = make_core(lab, tmp_path, activate=True, ttl="1h")
    kate = lab.client("kate", ["192.0.2.20/24"])
    assert knock.activate_knocks(core) == []
    knock_all(kate, "192.0.2.1", seq_of(core))
    made = knock.activate_knocks(core)
    assert len(made) == 1
    e = made[0]
    assert re.fullmatch(r"knock-\d{8}-\d{6}", e.name)
    assert e.origin == Origin.KNOCK and e.expires is None
    assert [s.text for s in e.sources] == ["192.0.2.20"]
    assert set(e.services) == {"sip-udp", "sip-tcp"}
    assert knock.activate_knocks(core) == []  # the kernel element was handed over, not doubled
    assert core.backend.set_elements("knocked4") == []  # type: ignore[attr-defined]
    assert reaches_sip(kate, "192.0.2.1")  # now through the whitelist
    core.apply()
    assert reaches_sip(kate, "192.0.2.1")
    # a reboot: a new core on the same store loads the table from scratch
    core.backend.remove()
    fresh = Core(core.config, protect=[])
    fresh.apply()
    assert fresh.get_entry(e.name).origin == Origin.KNOCK
    assert reaches_sip(kate, "192.0.2.1")
    assert not kate.tcp_probe("192.0.2.1", SSH, timeout=0.3)


def test_activation_off_leaves_knocks_alone(lab: Lab, servers: Echo, tmp_path: Path) -> None:
    core = make_core(lab, tmp_path, activate=False)
    leo = lab.client("leo", ["192.0.2.21/24"])
    knock_all(leo, "192.0.2.1", seq_of(core))
    assert knock.activate_knocks(core) == []
    assert core.entries() == []
    assert len(core.backend.set_elements("knocked4") or []) == 1  # type: ignore[attr-defined]
