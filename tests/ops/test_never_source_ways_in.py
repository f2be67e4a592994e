"""Every way a ban or entry is made meets the one never-a-source rule before the store:
the guard (AMI events naming multicast/broadcast sources), the control socket's
operations, a TM3 import. Afterwards every reader still works."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
from amisim import address, render_event
from cli_support import store_only_cli
from fakes import MemoryKernel
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tm4.asterisk.events import FrameParser, to_security_event
from tm4.core.config import parse_config
from tm4.core.errors import NeverSourceError
from tm4.core.model import NEVER_SOURCE
from tm4.guard.policy import BanDecision
from tm4.guard.runtime import GuardRuntime
from tm4.ops.engine import Core
from tm4.ops.root import run_local
from tm4.sources.tm3import import read_tm3

OWN = ipaddress.ip_address("192.0.2.1")


def guard(tmp: Path) -> GuardRuntime:
    cfg = parse_config({"state_dir": str(tmp / "state")})
    return GuardRuntime(Core(cfg, backend=MemoryKernel(), protect=[]), own={OWN})  # type: ignore[arg-type]


def failures(rt: GuardRuntime, ip: str, n: int = 6) -> list[str]:
    """n failed authentications from `ip`; the errors of the bans the guard tried."""
    start = len(rt.applied)
    for i in range(n):
        raw = render_event("ChallengeResponseFailed", RemoteAddress=address(ip, 5060),
                           LocalAddress=address("192.0.2.1", 5060), SessionID=f"{ip}-{i}",
                           AccountID="1001", Challenge=f"1/{i}", Response=f"r{i}", ExpectedResponse="")
        ev = to_security_event(FrameParser().feed(raw)[0])
        if ev is not None:
            rt.handle(ev, i * 0.01)
    return [a.error for a in list(rt.applied)[start:] if isinstance(a.decision, BanDecision)]


@pytest.mark.parametrize("ip", ["224.0.0.1", "239.255.255.250", "255.255.255.255", "ff02::1", "0.0.0.0"])
def test_the_guard_never_stores_a_ban_of_what_cannot_be_a_source(tmp_path: Path, ip: str) -> None:
    rt = guard(tmp_path)
    errors = failures(rt, ip)
    # two defences: the guard drops such sources itself (guard.runtime), and a ban it did
    # decide would be refused by Core.block (typed, named)
    assert all("never be the source" in e for e in errors)
    assert rt.core.bans() == [] and rt.core.store.quarantined() == []
    assert rt.core.backend.addresses() == set()  # type: ignore[attr-defined]
    assert failures(rt, "203.0.113.9") == [""]  # a real attacker is still banned
    assert [b.address for b in rt.core.bans()] == ["203.0.113.9"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rng=st.sampled_from([r for r, _ in NEVER_SOURCE]), n=st.integers(0, 2**128 - 1))
def test_any_never_source_address_from_any_way_in_is_refused(tmp_path_factory: pytest.TempPathFactory,
                                                              rng, n: int) -> None:  # type: ignore[no-untyped-def]
    core = Core(parse_config({"state_dir": str(tmp_path_factory.mktemp("s"))}), backend=MemoryKernel(),  # type: ignore[arg-type]
                protect=[])
    addr = str(rng[n % rng.num_addresses])
    for op, args in (("block", {"address": addr, "force": True}),
                     ("allow", {"name": "x", "sources": [addr], "services": ["ssh"], "force": True})):
        with pytest.raises(NeverSourceError, match="never be the source"):
            run_local(core, op, args)
    assert core.bans() == [] and core.entries() == []


def test_a_tm3_import_reports_a_multicast_account_and_imports_the_rest(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    d = tmp_path / "tm3"
    d.mkdir()
    (d / "mdns.iptables").write_text("# Travelin' Man 3 account: mdns\n"
                                     "-A INPUT -s 224.0.0.251 -p udp -m udp --dport 5060 -j ACCEPT\n")
    (d / "john.iptables").write_text("# Travelin' Man 3 account: john\n"
                                     "-A INPUT -s 203.0.113.7 -p udp -m udp --dport 5060 -j ACCEPT\n")
    cfg = parse_config({})
    imp = read_tm3(d, cfg.services, cfg.rtp_range())
    assert [e.name for e in imp.entries] == ["john"]
    assert any("224.0.0.251" in p.reason and "never be the source" in p.reason for p in imp.problems)
    run = store_only_cli(tmp_path, monkeypatch)
    r = run("import", "tm3", str(d), "--apply")
    assert r.exit_code == 0, r.output
    assert "john" in run("list").output and run("quarantine", "list").output.strip() == "quarantine is empty"
