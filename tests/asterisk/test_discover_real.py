"""`tm4 discover --ami` on the real Asterisk 22 answers (real2/ami/pjsip_show*, replayed byte
for byte): every trunk found, each on its own protocol only, the registered phone left out,
and the passwords those answers carry in clear never logged, printed or stored."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import pytest
from ami_discover_sim import AmiDiscoverSim, SimEndpoint
from ami_replay_sim import ReplaySim
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tm4.asterisk.discover_ami import (
    DiscoveryError,
    EndpointInfo,
    Registration,
    discover_ami,
    discovery_from_endpoints,
    fetch_endpoints,
)
from tm4.cli import cli

PASSWORDS = ("secret1001", "provasecret")  # AuthDetail Password: in the captured answers


@pytest.mark.parametrize("capture", ["pjsip_show", "pjsip_show_prequalify"])
def test_all_three_trunks_each_on_its_own_protocol(capture: str) -> None:
    with ReplaySim([capture], described_endpoints_only=True) as sim:
        raw = b"".join(a for _, a in sim.answers.values())
        assert all(p.encode() in raw for p in PASSWORDS)  # the test would see a leak
        disc = discover_ami("127.0.0.1", sim.port, sim.username, sim.secret, timeout=5)
    got = {t.name: (t.sources, t.services) for t in disc.trunks}
    assert got == {
        "prov-a": (["198.51.100.200"], ["sip-udp"]),  # identify 198.51.100.200/255.255.255.255 + registration
        "prov-b": (["198.51.100.201"], ["sip-udp"]),  # a static contact only
        "prov-c": (["sip.example.test"], ["sip-udp"]),  # a host name
    }
    prov_a = next(t for t in disc.trunks if t.name == "prov-a")
    assert any("IdentifyDetail" in f for f in prov_a.found)
    assert any("OutboundRegistrationDetail" in f for f in prov_a.found)
    assert not sim.uncaptured
    sent = [a["action"] for a in sim.actions]
    assert "PJSIPShowRegistrationsOutbound" in sent and "PJSIPShowIdentifies" not in sent
    assert set(sent) <= set(sim.allowed())  # only what the tm4 user may send


def test_passwords_are_never_logged_printed_or_stored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("TM4_NFT_SUBPROCESS", "1")
    caplog.set_level(logging.DEBUG)
    state = tmp_path / "state"
    with ReplaySim(["pjsip_show"], described_endpoints_only=True) as sim:
        cfg = tmp_path / "tm4.toml"
        cfg.write_text(f'state_dir = "{state}"\n[firewall]\nnetns = "tm4-test-none"\n'
                       f'[ami]\nport = {sim.port}\nsecret = "{sim.secret}"\n')
        runner = CliRunner()
        outputs = [runner.invoke(cli, ["--config", str(cfg), "discover", "--ami"] + extra)
                   for extra in ([], ["--json"], ["--apply", "--json"])]
    for r in outputs:
        assert r.exit_code == 0, r.output
    assert {t["trunk"] for t in json.loads(outputs[2].output)["trunks"]} == {"prov-a", "prov-b", "prov-c"}
    listed = json.loads(CliRunner().invoke(cli, ["--config", str(cfg), "list", "--json"]).output)
    assert {e["name"] for e in listed} == {"trunk-pjsip-prov-a", "trunk-pjsip-prov-b", "trunk-pjsip-prov-c"}
    seen = "".join(r.output for r in outputs) + caplog.text
    stored = b"".join(p.read_bytes() for p in state.rglob("*") if p.is_file())
    for pw in PASSWORDS:
        assert pw not in seen and pw.encode() not in stored


def test_the_discovery_simulator_renders_real_shapes() -> None:
    """The simulator tests use for made-up trunks puts values into the captured messages:
    its registered-registration and static-contact answers find what the real ones do."""
    eps = [SimEndpoint("prov-a", transport="transport-udp", aor_contacts="sip:198.51.100.200:5060",
                       identifies=[("prov-a", "198.51.100.200/255.255.255.255")],
                       registration="sip:198.51.100.200"),
           SimEndpoint("prov-b", transport="transport-udp", aor_contacts="sip:198.51.100.201:5060"),
           SimEndpoint("prov-c", transport="transport-udp", aor_contacts="sip:sip.example.test"),
           SimEndpoint("1002", aor_contacts="")]
    with AmiDiscoverSim(eps) as sim:
        made_up = discover_ami("127.0.0.1", sim.port, "tm4", "tm4secret", timeout=5)
    with ReplaySim(["pjsip_show"], described_endpoints_only=True) as sim:
        real = discover_ami("127.0.0.1", sim.port, sim.username, sim.secret, timeout=5)
    assert made_up.to_json() == real.to_json()


# -- hostile answers -------------------------------------------------------------------------

_text = st.text(alphabet=st.characters(blacklist_categories=["Cs"]), max_size=80)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(_text, _text, _text, _text), max_size=6))
def test_any_values_give_trunks_with_valid_sources_or_notes(items: list[tuple[str, str, str, str]]) -> None:
    from tm4.asterisk.discover import parse_host

    eps = [EndpointInfo(f"ep{i}", matches=[(m, "AMI")], contacts=[(c, "AMI")], protocols=[p])
           for i, (m, c, p, _) in enumerate(items)]
    regs = [Registration(f"ep{i}", r) for i, (_, _, _, r) in enumerate(items)]
    disc = discovery_from_endpoints(eps, regs)
    for t in disc.trunks:
        assert t.sources and t.services
        for s in t.sources:
            assert parse_host(s).source == s  # every source is one tm4 can store


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=600), st.sampled_from([b"", b"\r\n\r\n", b"\n", b"\r"]))
def test_a_hostile_stream_ends_in_a_typed_error_or_an_answer(junk: bytes, tail: bytes) -> None:
    async def main() -> None:
        async def serve(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            w.write(b"Asterisk Call Manager/11.0.0\r\n")
            await r.readuntil(b"\r\n\r\n")
            w.write(b"Response: Success\r\nActionID: tm4-discover-1\r\nMessage: Authentication accepted\r\n\r\n")
            await r.readuntil(b"\r\n\r\n")
            w.write(b"Response: Success\r\nActionID: tm4-discover-2\r\nEventList: start\r\n\r\n" + junk + tail)
            await w.drain()
            w.close()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            eps, regs, notes = await fetch_endpoints("127.0.0.1", port, "tm4", "x", timeout=0.5)
        except DiscoveryError as exc:
            assert "\n" not in str(exc)  # one line for the admin
        else:  # an answer: only what the junk really described, every name a plain string
            assert all(isinstance(e.name, str) and e.name for e in eps)
            assert all(isinstance(n, str) for n in notes) and isinstance(regs, list)
        finally:
            server.close()
            await server.wait_closed()

    asyncio.run(main())
