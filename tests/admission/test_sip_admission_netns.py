"""SIP admission with real datagrams across real nftables rules, in network namespaces.

Each probe comes from a fresh socket (a new source port), so what lets it through is
the admission set, never conntrack remembering an earlier datagram of the same flow.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from netlab import Echo, Host, Lab
from sipadmit_support import invite, register

from tm4.admission import sip
from tm4.core.config import parse_config
from tm4.ops.engine import Core

SECRET = "xq356jq.dyndns.org"
PBX4, PBX6 = "192.0.2.1", "2001:db8::1"
SIP = 5060


def make_core(lab: Lab, tmp: Path, **cfg: Any) -> Core:
    data = {"state_dir": str(tmp), "firewall": {"netns": lab.pbx.ns}, **cfg}
    core = Core(parse_config(data), protect=[])
    core.apply()
    return core


def admission(lab: Lab, tmp: Path, domains: list[str] | None = None, **sa: Any) -> Core:
    return make_core(lab, tmp, sip_admission={"domains": [SECRET] if domains is None else domains, **sa})


def sends(host: Host, dst: str, payload: bytes) -> bool:
    """One datagram from a new source port; True if the PBX's echo server got it (and answered)."""
    return host.udp_probe(dst, SIP, payload=payload, timeout=0.4)


def admitted(core: Core, domain: str = SECRET, version: int = 4) -> list[str]:
    elems = core.backend.set_elements(sip.admit_set(version, domain)) or []  # type: ignore[attr-defined]
    return [e["elem"]["val"] if isinstance(e, dict) else e for e in elems]


def expires_in(core: Core, domain: str = SECRET) -> list[float]:
    out = core.backend.runner.run(  # type: ignore[attr-defined]
        f"list set inet tm4 {sip.admit_set(4, domain)}", json_out=True)
    sets = [o["set"] for o in json.loads(out)["nftables"] if "set" in o]
    return [e["elem"]["expires"] for e in sets[0].get("elem", [])]


@pytest.fixture
def pbx(lab: Lab) -> Iterator[Echo]:
    echo = Echo(lab.pbx, udp=[SIP])
    yield echo
    echo.close()


@pytest.fixture
def stranger(lab: Lab) -> Host:
    return lab.client("stranger", ["192.0.2.10/24", "2001:db8::10/64"])


def test_a_register_to_the_secret_admits_and_the_invite_then_reaches_the_pbx(
        lab: Lab, pbx: Echo, stranger: Host, tmp_path: Path) -> None:
    core = admission(lab, tmp_path)
    assert not sends(stranger, PBX4, invite(f"1001@{SECRET}"))  # not yet admitted
    assert sends(stranger, PBX4, register(f"{SECRET}:5060"))  # the admitting REGISTER is accepted
    assert admitted(core) == [stranger.v4]
    assert sends(stranger, PBX4, invite(f"1001@{PBX4}"))  # then any SIP, new flows included
    assert sends(stranger, PBX4, b"OPTIONS sip:100@192.0.2.1 SIP/2.0\r\n\r\n")
    other = lab.client("other", ["192.0.2.11/24"])
    assert not sends(other, PBX4, invite(f"1001@{SECRET}"))  # admission is per source


@pytest.mark.parametrize("uri", [
    PBX4, f"{PBX4}:5060",  # the server's address: what scanners use
    "pbx.example.org", "xq356jq.dyndns.com",  # another name
    f"{SECRET}.evil.example", f"{SECRET}x", "x" + SECRET,  # a name the secret is a prefix/suffix of
    SECRET.upper(),  # neither as configured nor in lower case
])
def test_registers_that_do_not_admit(lab: Lab, pbx: Echo, stranger: Host, tmp_path: Path, uri: str) -> None:
    core = admission(lab, tmp_path)
    assert not sends(stranger, PBX4, register(uri))
    assert not sends(stranger, PBX4, invite(f"1001@{PBX4}"))
    assert admitted(core) == []


def test_the_name_in_a_header_only_or_behind_leading_bytes_does_not_admit(
        lab: Lab, pbx: Echo, stranger: Host, tmp_path: Path) -> None:
    core = admission(lab, tmp_path)
    assert not sends(stranger, PBX4, register(PBX4, header_host=SECRET))  # To/From/Contact name it
    assert not sends(stranger, PBX4, b"\r\n" + register(SECRET))  # not from byte 0
    assert not sends(stranger, PBX4, register(SECRET, method="OPTIONS"))
    assert admitted(core) == []


@pytest.mark.parametrize("uri", [SECRET, f"{SECRET}:5060", f"{SECRET};transport=udp", f"{SECRET}>"])
def test_every_terminator_admits(lab: Lab, pbx: Echo, stranger: Host, tmp_path: Path, uri: str) -> None:
    core = admission(lab, tmp_path)
    assert sends(stranger, PBX4, register(uri))
    assert admitted(core) == [stranger.v4]


def test_a_datagram_ending_with_the_name_admits(lab: Lab, pbx: Echo, stranger: Host, tmp_path: Path) -> None:
    core = admission(lab, tmp_path)
    assert not sends(stranger, PBX4, f"REGISTER sip:{SECRET[:-1]}".encode())
    assert sends(stranger, PBX4, f"REGISTER sip:{SECRET}".encode())
    assert admitted(core) == [stranger.v4]


def test_the_name_as_configured_and_in_lower_case(lab: Lab, pbx: Echo, stranger: Host, tmp_path: Path) -> None:
    core = admission(lab, tmp_path, ["Xq356JQ.DynDNS.org"])
    assert not sends(stranger, PBX4, register("XQ356JQ.DYNDNS.ORG"))
    assert sends(stranger, PBX4, register("Xq356JQ.DynDNS.org"))
    v6 = lab.client("v6", ["2001:db8::20/64"])
    assert sends(v6, PBX6, register("xq356jq.dyndns.org"))
    assert admitted(core, "xq356jq.dyndns.org") == [stranger.v4]
    assert admitted(core, "xq356jq.dyndns.org", 6) == ["2001:db8::20"]


def test_ipv6(lab: Lab, pbx: Echo, stranger: Host, tmp_path: Path) -> None:
    core = admission(lab, tmp_path)
    assert not sends(stranger, PBX6, invite(f"1001@{SECRET}"))
    assert not sends(stranger, PBX6, register(f"[{PBX6}]"))
    assert sends(stranger, PBX6, register(SECRET))
    assert admitted(core, version=6) == [stranger.v6]
    assert admitted(core, version=4) == []
    assert sends(stranger, PBX6, invite(f"1001@[{PBX6}]"))
    assert not sends(stranger, PBX4, invite(f"1001@{PBX4}"))  # its IPv4 address was not admitted


def test_admission_expires_and_every_register_refreshes_it(
        lab: Lab, pbx: Echo, stranger: Host, tmp_path: Path) -> None:
    core = admission(lab, tmp_path, ttl="3s")
    assert sends(stranger, PBX4, register(SECRET))
    time.sleep(2.0)
    before = min(expires_in(core))  # nft shows whole seconds, rounded down: 0 or 1 here
    assert sends(stranger, PBX4, register(SECRET))  # refreshed: 3 s from now
    assert before <= 1 and min(expires_in(core)) >= 2
    time.sleep(1.5)
    assert sends(stranger, PBX4, invite(f"1001@{PBX4}"))  # 3.5 s after the first: still in
    time.sleep(3.0)
    assert admitted(core) == []
    assert not sends(stranger, PBX4, invite(f"1001@{PBX4}"))


def test_a_refresh_on_an_established_flow_still_counts(
        lab: Lab, pbx: Echo, stranger: Host, tmp_path: Path) -> None:
    """A phone re-registers on the same socket: conntrack would accept it anyway, but
    its admission must be refreshed too (the rules sit ahead of conntrack)."""
    import socket

    core = admission(lab, tmp_path, ttl="3s")
    s = stranger.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        assert stranger.udp_probe(PBX4, SIP, sock=s, payload=register(SECRET))
        time.sleep(2.0)
        before = min(expires_in(core))  # whole seconds, rounded down: 0 or 1 here
        assert stranger.udp_probe(PBX4, SIP, sock=s, payload=register(SECRET))
        assert before <= 1 and min(expires_in(core)) >= 2
    finally:
        s.close()


def test_a_banned_source_is_not_admitted_and_a_ban_ends_admission(
        lab: Lab, pbx: Echo, stranger: Host, tmp_path: Path) -> None:
    core = admission(lab, tmp_path)
    mallory = lab.client("mallory", ["192.0.2.66/24"])
    core.block("192.0.2.66", reason="guard: 5 failed attempts")
    assert not sends(mallory, PBX4, register(SECRET))
    assert admitted(core) == []
    assert sends(stranger, PBX4, register(SECRET))
    core.block(stranger.v4, reason="guard: admitted, then guessed passwords")
    assert not sends(stranger, PBX4, invite(f"1001@{PBX4}"))  # the ban wins over admission
    assert not sends(stranger, PBX4, register(SECRET))


def test_whitelist_only_and_knock_only_setups_are_unaffected(
        lab: Lab, pbx: Echo, stranger: Host, tmp_path: Path) -> None:
    core = make_core(lab, tmp_path / "a", knock={"enabled": True, "services": ["sip-udp"]})
    core.allow("office", ["192.0.2.20"], ["sip-udp"])
    office = lab.client("office", ["192.0.2.20/24"])
    listing = core.backend.listing() or ""  # type: ignore[attr-defined]
    assert "sip_register" not in listing and "sipadmit" not in listing
    assert sends(office, PBX4, register(PBX4))
    assert not sends(stranger, PBX4, register(SECRET))
    # with admission on, the whitelist is unchanged and a whitelisted REGISTER to any name passes
    core2 = admission(lab, tmp_path / "b")
    core2.allow("office", ["192.0.2.20"], ["sip-udp"])
    assert sends(office, PBX4, register(PBX4))
    assert sends(office, PBX4, invite(f"1001@{PBX4}"))
    assert admitted(core2) == []


def test_apply_carries_admitted_sources_over_and_removing_a_domain_ends_its_admission(
        lab: Lab, pbx: Echo, stranger: Host, tmp_path: Path) -> None:
    core = admission(lab, tmp_path, [SECRET, "second.example.net"], ttl="1h")
    other = lab.client("other", ["192.0.2.11/24"])
    assert sends(stranger, PBX4, register(SECRET))
    assert sends(other, PBX4, register("second.example.net"))
    before = expires_in(core)
    core.apply()
    assert admitted(core) == [stranger.v4] and admitted(core, "second.example.net") == [other.v4]
    assert expires_in(core)[0] <= before[0]  # carried with its time left, not renewed
    assert sends(stranger, PBX4, invite(f"1001@{PBX4}"))
    # the config loses "second.example.net": one transaction, its sources are out at once
    core2 = admission(lab, tmp_path, [SECRET], ttl="1h")
    assert admitted(core2) == [stranger.v4]
    assert core2.backend.set_elements(sip.admit_set(4, "second.example.net")) is None  # type: ignore[attr-defined]
    assert sends(stranger, PBX4, invite(f"1001@{PBX4}"))
    assert not sends(other, PBX4, invite(f"1001@{PBX4}"))
    assert not sends(other, PBX4, register("second.example.net"))


def test_the_guard_still_bans_an_admitted_source(lab: Lab, pbx: Echo, stranger: Host, tmp_path: Path) -> None:
    """Admission is not trust: the guard's policy counts the admitted phone's failures
    like anyone's, and its ban (applied as the guard's runtime applies it) wins."""
    from amisim import address, render_event

    from tm4.asterisk.events import FrameParser, to_security_event
    from tm4.core.model import Origin
    from tm4.guard.policy import BanDecision, Guard

    def wrong_password(n: int):  # noqa: ANN202 - a SecurityEvent
        frame = FrameParser().feed(render_event(
            "ChallengeResponseFailed", Service="PJSIP", RemoteAddress=address(stranger.v4, 5060),
            SessionID=f"call-{n}", AccountID="1001", Challenge=f"1795236590/{n:032x}",
            Response=f"{n:08x}" * 4, ExpectedResponse=""))[0]
        return to_security_event(frame)

    core = admission(lab, tmp_path)
    assert sends(stranger, PBX4, register(SECRET))
    guard = Guard(core.config.guard)
    decisions = [d for i in range(core.config.guard.failures) for d in guard.observe(wrong_password(i), float(i))]
    ban = next(d for d in decisions if isinstance(d, BanDecision))
    core.block(ban.network, ttl=ban.ttl, reason=ban.reason, origin=Origin.GUARD,  # type: ignore[arg-type]
               actor=f"ami:{ban.event.value} x{ban.count}", offences=ban.offences)
    assert admitted(core) == [stranger.v4]  # still in its set, yet:
    assert not sends(stranger, PBX4, invite(f"1001@{PBX4}"))
    assert not sends(stranger, PBX4, register(SECRET))


def test_admitted_sources_are_not_drift(lab: Lab, pbx: Echo, stranger: Host, tmp_path: Path) -> None:
    from tm4.ops import drift

    core = admission(lab, tmp_path)
    assert not drift.check(core)
    assert sends(stranger, PBX4, register(SECRET))
    assert sends(stranger, PBX4, invite(f"1001@{PBX4}"))
    report = drift.check(core)
    assert not report, report.summary()
