"""Trunk discovery: Asterisk config files (golden results), the AMI path (simulator), the plan."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
from ami_discover_sim import BANNER, AmiDiscoverSim, SimEndpoint
from click.testing import CliRunner

from tm4.asterisk.confparse import read_conf
from tm4.asterisk.discover import apply, discover_files, parse_host, plan
from tm4.asterisk.discover_ami import DiscoveryError, discover_ami
from tm4.cli import cli
from tm4.core.config import parse_config
from tm4.core.errors import ValidationError
from tm4.core.model import Origin
from tm4.ops.engine import Core

FIX = Path(__file__).parent.parent / "fixtures" / "discover"
GOLDEN = Path(__file__).parent.parent / "golden" / "discover"


def check_golden(name: str, data: object) -> None:
    path = GOLDEN / name
    text = json.dumps(data, indent=2, sort_keys=True) + "\n"
    if os.environ.get("UPDATE_GOLDEN") == "1":
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert text == path.read_text(), f"{name} differs from the golden file (UPDATE_GOLDEN=1 rewrites it)"


@pytest.mark.parametrize("case", ["asterisk22", "pjsip", "chan_sip", "broken", "netns"])
def test_files_golden(case: str) -> None:
    check_golden(f"{case}.json", discover_files(FIX / case).to_json())


def test_what_the_pjsip_golden_file_pins() -> None:
    """The golden files are data; these are the promises behind them."""
    d = {t.name: t for t in discover_files(FIX / "pjsip").trunks}
    assert "1001" not in d  # a phone is not a trunk
    assert d["voipms"].services == ["sip-udp"]  # transport-udp
    assert d["telnyx"].services == ["sip-tls"]  # transport-tls, sips: contact
    assert d["office-gw"].services == ["sip-tcp"]
    assert d["callcentric"].services == ["sip-tcp"]  # from server_uri's \;transport=tcp
    assert d["itsp-nt"].services == ["sip-udp"]  # no transport: UDP, with a note
    assert "198.51.100.0/24" in d["voipms"].sources  # dotted mask -> prefix
    assert "203.0.113.5" in d["voipms"].sources  # :port dropped
    assert "2001:db8:8::1" in d["telnyx"].sources  # [v6] unbracketed
    assert "203.0.113.41" in d["office-gw"].sources  # an unescaped ;... is a comment, as in Asterisk
    assert "sip.wizard.example.com" in d["wiz-trunk"].sources  # pjsip_wizard.conf
    assert all("192.0.2.99" not in t.sources for t in d.values())  # negated match
    assert "pjsip-custom" not in json.dumps(discover_files(FIX / "pjsip").to_json())


def test_what_the_chan_sip_golden_file_pins() -> None:
    d = {(t.tech, t.name): t for t in discover_files(FIX / "chan_sip").trunks}
    assert d[("sip", "gw")].services == ["sip-tcp", "sip-udp"]  # transport=tcp,udp
    assert "gateway.example.org" in d[("sip", "gw")].sources  # register gw?...
    assert d[("sip", "198.51.100.120")].services == ["sip-tcp"]  # register tcp://
    assert d[("sip", "tls-peer")].services == ["sip-tls"]
    assert d[("iax", "iaxtrunk")].services == ["iax"]
    assert ("sip", "200") not in d and ("iax", "iaxfriend") not in d  # host=dynamic


def test_broken_files_do_not_stop_discovery() -> None:
    disc = discover_files(FIX / "broken")
    assert [t.name for t in disc.trunks] == ["good", "odd", "bin"]
    notes = "\n".join(disc.notes)
    for expected in ("loop", "missing.conf: not found", "unreadable section header", "not contiguous",
                     "names no endpoint", "carrier-pigeon", "unreadable register line", "port 5160"):
        assert expected in notes


@pytest.mark.parametrize("text, source, transport", [
    ("sip:user@sip.example.com:5060;transport=tcp", "sip.example.com", "tcp"),
    ("sips:sip.example.com", "sip.example.com", "tls"),
    ("SIP:203.0.113.7", "203.0.113.7", ""),
    ("[2001:db8::7]:5060", "2001:db8::7", ""),
    ("2001:db8::/ffff:ffff::", "2001:db8::/32", ""),
    ("2001:db8:7::/48", "2001:db8:7::/48", ""),
    ("203.0.113.0/255.255.255.0", "203.0.113.0/24", ""),
    ("203.0.113.7/255.255.255.255", "203.0.113.7", ""),
    ("203.0.113.7/24", "203.0.113.0/24", ""),  # Asterisk applies the mask
    ("sip:proxy.example.net;lr", "proxy.example.net", ""),
    ("Provider.Example.COM.", "provider.example.com", ""),
])
def test_parse_host(text: str, source: str, transport: str) -> None:
    h = parse_host(text)
    assert (h.source, h.transport) == (source, transport)


@pytest.mark.parametrize("text, msg", [
    ("dynamic", "dynamic"), ("!192.0.2.1", "negated"), ("0.0.0.0/0", "whole internet"),
    ("192.0.2.0/255.0.255.0", "contiguous"), ("host/24", "needs an address"), ("", "empty"),
    ("sip:@", "no host"), ("224.0.0.1", "multicast"),
])
def test_parse_host_refuses(text: str, msg: str) -> None:
    with pytest.raises(ValidationError, match=msg):
        parse_host(text)


def test_conf_reader_follows_asterisk(tmp_path: Path) -> None:
    (tmp_path / "a.conf").write_text(
        "[base](!)\ntype = endpoint\ncontext = one\n"
        "[mid](!,base)\ncontext = two\n"
        "[leaf](mid)\nallow = ulaw ; comment\npassword = se\\;cret\n"
        ";-- block\ncontext = never --;\n"
        "[leaf](+)\nextra => yes\n"
        "[inc]\n#include b.conf\nafter = include\n"
    )
    (tmp_path / "b.conf").write_text("from_include = 1\n[b-section]\nx = y\n")
    conf = read_conf(tmp_path / "a.conf")
    by = {s.name: s for s in conf.sections}
    leaf = by["leaf"]
    assert leaf.get("type") == "endpoint" and leaf.get("context") == "two"
    assert leaf.get("allow") == "ulaw" and leaf.get("password") == "se;cret" and leaf.get("extra") == "yes"
    assert by["base"].is_template and not leaf.is_template
    assert by["inc"].get("from_include") == "1"  # an include continues the current section
    assert by["b-section"].get("after") == "include"  # ...and its last section stays current
    assert conf.notes == []


# -- AMI ---------------------------------------------------------------------------------

SIM_ENDPOINTS = [
    SimEndpoint("1001", transport="transport-udp"),  # a phone
    SimEndpoint("voipms", transport="transport-udp", protocol="udp",
                identifies=[("voipms-identify",
                             "192.0.2.50/255.255.255.255,198.51.100.0/255.255.255.0,!192.0.2.99/255.255.255.255")]),
    SimEndpoint("telnyx", transport="transport-tls", protocol="tls", aor_contacts="sips:sip.telnyx.example",
                identifies=[("telnyx-identify", "2001:db8:7::/ffff:ffff:ffff:0:0:0:0:0"),
                            ("telnyx-identify2", "2001:db8:8::1/ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff")]),
    SimEndpoint("itsp-nt", identifies=[("itsp-nt-identify", "198.51.100.77/255.255.255.255")]),
    SimEndpoint("office-gw", transport="transport-tcp", protocol="tcp",
                aor_contacts="sip:203.0.113.40:5060,sip:[2001:db8:40::1]:5060"),
]


def test_ami_golden_and_phones_are_not_trunks() -> None:
    with AmiDiscoverSim(SIM_ENDPOINTS) as sim:
        disc = discover_ami("127.0.0.1", sim.port, "tm4", "tm4secret", timeout=5)
    check_golden("ami.json", disc.to_json())
    d = {t.name: t for t in disc.trunks}
    assert set(d) == {"voipms", "telnyx", "itsp-nt", "office-gw"}
    assert d["voipms"].sources == ["192.0.2.50", "198.51.100.0/24"] and d["voipms"].services == ["sip-udp"]
    assert d["telnyx"].sources == ["2001:db8:7::/48", "2001:db8:8::1", "sip.telnyx.example"]
    assert d["telnyx"].services == ["sip-tls"] and d["office-gw"].services == ["sip-tcp"]
    assert any("negated" in n for n in disc.notes) and any("itsp-nt" in n for n in disc.notes)
    actions = [a["action"] for a in sim.actions]
    assert actions[:2] == ["Login", "PJSIPShowEndpoints"] and actions[-1] == "Logoff"
    assert sorted(a["endpoint"] for a in sim.actions if a["action"] == "PJSIPShowEndpoint") == \
        sorted(e.name for e in SIM_ENDPOINTS)
    assert sim.actions[0]["events"] == "off"


def test_ami_and_files_agree() -> None:
    """The same trunks described in pjsip.conf and answered over AMI give the same entries."""
    endpoints = [
        SimEndpoint("udp-trunk", transport="transport-udp", identifies=[("udp-trunk", "192.0.2.50/255.255.255.255")]),
        SimEndpoint("tls-trunk", transport="transport-tls", protocol="tls",
                    identifies=[("tls-trunk", "198.51.100.60/255.255.255.255")]),
    ]
    with AmiDiscoverSim(endpoints, noise=True) as sim:
        over_ami = discover_ami("127.0.0.1", sim.port, "tm4", "tm4secret", timeout=5)
    from_files = [t for t in discover_files(FIX / "netns").trunks if t.tech == "pjsip"]
    assert [(t.entry_name, t.sources, t.services) for t in over_ami.trunks] == \
        [(t.entry_name, t.sources, t.services) for t in from_files]


def test_ami_failures_are_typed_errors() -> None:
    with AmiDiscoverSim(SIM_ENDPOINTS) as sim, pytest.raises(DiscoveryError, match="Authentication failed"):
        discover_ami("127.0.0.1", sim.port, "tm4", "wrong", timeout=5)
    with AmiDiscoverSim(SIM_ENDPOINTS, drop_after_list=True) as sim, \
            pytest.raises(DiscoveryError, match="closed"):
        discover_ami("127.0.0.1", sim.port, "tm4", "tm4secret", timeout=5)
    with AmiDiscoverSim([]) as sim, pytest.raises(DiscoveryError, match="No endpoints found"):
        discover_ami("127.0.0.1", sim.port, "tm4", "tm4secret", timeout=5)
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    with pytest.raises(DiscoveryError, match="cannot reach"):
        discover_ami("127.0.0.1", port, "tm4", "tm4secret", timeout=2)


def _exchange(raw: bytes) -> tuple[list[bytes], bytes]:
    """Split a capture into the client's actions and the server's bytes."""
    client: list[bytes] = []
    server = b""
    for block in raw.split(b"\r\n\r\n"):
        if not block:
            continue
        if block.startswith(BANNER.rstrip()):
            server += BANNER
            block = block[len(BANNER):]
        if block.startswith(b"Action:"):
            client.append(block + b"\r\n\r\n")
        elif block:
            server += block + b"\r\n\r\n"
    return client, server


@pytest.mark.parametrize("capture, first_only", [("ami_login_ok.raw", False), ("ami_failed_logins.raw", True)])
def test_simulator_login_is_byte_faithful(capture: str, first_only: bool) -> None:
    raw = (FIX / "ami" / capture).read_bytes()
    if first_only:
        raw = raw.split(BANNER)[1]
        raw = BANNER + raw
    actions, expected = _exchange(raw)
    with AmiDiscoverSim([], secret="tm4secret", read="system") as sim:  # that user read no security
        c = socket.create_connection(("127.0.0.1", sim.port), timeout=3)
        for a in actions:
            c.sendall(a)
        got = b""
        while len(got) < len(expected):
            chunk = c.recv(4096)
            if not chunk:
                break
            got += chunk
        c.close()
    assert got == expected


# -- plan and apply -------------------------------------------------------------------------

@pytest.fixture
def core(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Core:
    # a namespace that does not exist: kernel calls fail, the store is the truth
    monkeypatch.setenv("TM4_NFT_SUBPROCESS", "1")
    return Core(parse_config({"state_dir": str(tmp_path), "firewall": {"netns": "tm4-test-none"}}), protect=[])


def test_apply_then_rerun_updates(core: Core, tmp_path: Path) -> None:
    conf = tmp_path / "ast"
    conf.mkdir()
    pj = (FIX / "netns" / "pjsip.conf").read_text()
    (conf / "pjsip.conf").write_text(pj)
    (conf / "iax.conf").write_text((FIX / "netns" / "iax.conf").read_text())
    core.allow("trunk-pjsip-tls-trunk", ["192.0.2.200"], ["ssh"], origin=Origin.ADMIN)  # the admin's, same name
    ch = {c.entry: c.action for c in apply(core, discover_files(conf), actor="test")}
    assert ch == {"trunk-iax-iax-trunk": "add", "trunk-pjsip-udp-trunk": "add",
                  "trunk-pjsip-tls-trunk": "conflict"}
    assert core.get_entry("trunk-pjsip-tls-trunk").services == ("ssh",)  # left alone
    e = core.get_entry("trunk-pjsip-udp-trunk")
    assert e.origin == Origin.TRUNK and e.services == ("sip-udp",) and [s.text for s in e.sources] == ["192.0.2.50"]
    assert {c.action for c in plan(core, discover_files(conf))} == {"keep", "conflict"}
    (conf / "pjsip.conf").write_text(pj.replace("192.0.2.50", "192.0.2.51"))
    (conf / "iax.conf").write_text("[general]\n")
    ch = {c.entry: c.action for c in plan(core, discover_files(conf), prune=False)}
    assert ch["trunk-pjsip-udp-trunk"] == "update" and "trunk-iax-iax-trunk" not in ch
    ch = {c.entry: c.action for c in apply(core, discover_files(conf))}
    assert ch["trunk-pjsip-udp-trunk"] == "update" and ch["trunk-iax-iax-trunk"] == "remove"
    assert [s.text for s in core.get_entry("trunk-pjsip-udp-trunk").sources] == ["192.0.2.51"]
    assert core.store.get_entry("trunk-iax-iax-trunk") is None
    audit = [(r.action, r.subject) for r in core.store.audit_log()]
    assert ("replace", "trunk-pjsip-udp-trunk") in audit and ("revoke", "trunk-iax-iax-trunk") in audit


def test_cli_dry_run_by_default_and_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TM4_NFT_SUBPROCESS", "1")
    cfg = tmp_path / "tm4.toml"
    cfg.write_text(f'state_dir = "{tmp_path}/state"\n[firewall]\nnetns = "tm4-test-none"\n'
                   f'[asterisk]\nconfig_dir = "{FIX / "pjsip"}"\n')
    r = CliRunner().invoke(cli, ["--config", str(cfg), "discover"])
    assert r.exit_code == 0, r.output
    assert "trunk-pjsip-voipms" in r.output and "dry run" in r.output
    r = CliRunner().invoke(cli, ["--config", str(cfg), "list", "--json"])
    assert json.loads(r.output) == []
    r = CliRunner().invoke(cli, ["--config", str(cfg), "discover", "--apply", "--json"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["applied"] and {c["action"] for c in out["changes"]} == {"add"}
    listed = json.loads(CliRunner().invoke(cli, ["--config", str(cfg), "list", "--json"]).output)
    assert {e["name"] for e in listed} == {t["entry"] for t in out["trunks"]}
    assert all(e["origin"] == "trunk" for e in listed)


def test_cli_ami(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TM4_NFT_SUBPROCESS", "1")
    with AmiDiscoverSim(SIM_ENDPOINTS, secret="s3cret") as sim:
        cfg = tmp_path / "tm4.toml"
        cfg.write_text(f'state_dir = "{tmp_path}/state"\n[firewall]\nnetns = "tm4-test-none"\n'
                       f'[ami]\nport = {sim.port}\nsecret = "s3cret"\n')
        r = CliRunner().invoke(cli, ["--config", str(cfg), "discover", "--ami", "--json"])
    assert r.exit_code == 0, r.output
    assert {t["trunk"] for t in json.loads(r.output)["trunks"]} == {"voipms", "telnyx", "itsp-nt", "office-gw"}
