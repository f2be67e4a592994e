"""The curated providers list, and the entries `tm4 providers enable` makes from it."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import date, datetime
from pathlib import Path
from typing import Any

import pytest
from cli_support import store_only_cli
from click.testing import Result
from netlab import Echo, Lab

from tm4.cli.providers import verified_text
from tm4.core.config import parse_config
from tm4.core.errors import NotFoundError, ValidationError
from tm4.core.model import Origin
from tm4.ops.engine import Core
from tm4.sources import providers as prov


def test_bundled_list_is_sourced_and_valid() -> None:
    plist = prov.load_providers()
    assert plist.version >= 2 and plist.warnings == ()
    assert len(plist.providers) >= 10
    assert {p.name for p in plist.providers} >= {"telnyx", "twilio", "vonage", "didww"}
    for p in plist.providers:
        assert p.networks and set(p.protocols) <= set(prov.SIGNALLING)
        assert p.verified, f"{p.name}: say how the networks were checked"
        assert isinstance(p.verified_on, date), f"{p.name}: say when the networks were checked"
        for n in p.networks:
            assert n.source.startswith("https://"), (p.name, n.network)
            assert not n.network.is_private, (p.name, n.network)  # real providers, not test nets
            assert n.network.num_addresses <= 256, (p.name, n.network)  # signalling hosts, not whole clouds
    every = [n.network for p in plist.providers for n in p.networks]
    assert len(every) == len(set(every)), "a network listed twice"


@pytest.mark.parametrize("value", ["2026-12-05", datetime(2026, 12, 5, 1, 2), 20261205])
def test_verified_on_must_be_a_toml_date(value: object) -> None:
    with pytest.raises(ValidationError, match="verified_on"):
        prov.parse_providers(provider_data(verified_on=value))
    assert prov.parse_providers(provider_data(verified_on=date(2026, 1, 2))).providers[0].age_days(
        date(2026, 1, 12)) == 10
    assert prov.parse_providers(provider_data()).providers[0].age_days(date(2026, 1, 12)) is None


def test_verified_text_says_when_and_warns_when_old() -> None:
    [p] = prov.parse_providers(provider_data(verified_on=date(2025, 1, 1), verified="compared by hand")).providers
    assert verified_text(p, date(2025, 1, 1)) == "2025-01-01 (today): compared by hand"
    assert verified_text(p, date(2025, 1, 31)) == "2025-01-01 (30 days ago): compared by hand"
    assert "over a year old" in verified_text(p, date(2026, 1, 2))
    [q] = prov.parse_providers(provider_data()).providers
    assert verified_text(q, date(2025, 1, 1)) == "date unknown"


def provider_data(**over: Any) -> dict[str, Any]:
    p = {"name": "lab", "title": "Lab ITSP", "protocols": ["sip-udp"], "source": "https://lab.example/ips",
         "networks": [{"network": "203.0.113.0/28"}, {"network": "2001:db8:5::/48", "note": "v6"}]}
    p.update(over)
    return {"version": 3, "provider": [p]}


def test_a_network_without_source_is_left_out() -> None:
    data = provider_data(source="", networks=[
        {"network": "203.0.113.0/28", "source": "https://lab.example/a"},
        {"network": "203.0.113.16/28"},
    ])
    plist = prov.parse_providers(data)
    assert [prov.net_text(n.network) for n in plist.providers[0].networks] == ["203.0.113.0/28"]
    assert plist.providers[0].source == "https://lab.example/a"
    assert plist.warnings == ("lab: 203.0.113.16/28 has no source page; left out",)
    nothing = prov.parse_providers(provider_data(source="", networks=[{"network": "203.0.113.0/28"}]))
    assert nothing.providers == () and "provider left out" in nothing.warnings[-1]


@pytest.mark.parametrize("over, msg", [
    ({"protocols": ["ssh"]}, "protocols"),
    ({"protocols": []}, "protocols"),
    ({"name": "Bad Name"}, "bad name"),
    ({"source": "http://insecure.example"}, "https"),
    ({"networks": [{"network": "0.0.0.0/0"}]}, "whole internet"),
    ({"networks": [{"network": "127.0.0.0/8"}]}, "loopback"),
    ({"networks": ["203.0.113.0/28"]}, "each network"),
])
def test_bad_provider_files_are_refused(over: dict[str, Any], msg: str) -> None:
    with pytest.raises(ValidationError, match=msg):
        prov.parse_providers(provider_data(**over))
    with pytest.raises(ValidationError, match="version"):
        prov.parse_providers({"provider": []})
    twice = provider_data()
    twice["provider"].append(dict(twice["provider"][0]))
    with pytest.raises(ValidationError, match="twice"):
        prov.parse_providers(twice)


def write_list(tmp: Path) -> Path:
    f = tmp / "providers.toml"
    f.write_text('version = 3\n[[provider]]\nname = "lab"\ntitle = "Lab ITSP"\nprotocols = ["sip-udp", "iax"]\n'
                 'source = "https://lab.example/ips"\n'
                 'networks = [{ network = "203.0.113.0/28" }, { network = "2001:db8:5::/48" }]\n')
    return f


@pytest.fixture
def run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., Result]:
    return store_only_cli(tmp_path, monkeypatch)


def test_list_json_shape(run) -> None:  # type: ignore[no-untyped-def]
    r = run("providers", "list", "--json")
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    assert isinstance(data, list) and len(data) >= 10
    for obj in data:
        assert {"name", "networks", "protocols", "source", "verified", "verified_on"} <= set(obj)
        assert all(isinstance(n, str) for n in obj["networks"]) and obj["source"].startswith("https://")
        assert date.fromisoformat(obj["verified_on"])
        assert [d["network"] for d in obj["network_details"]] == obj["networks"]
        for d in obj["network_details"]:
            assert d["source"].startswith("https://") and obj["sources"][d["network"]] == d["source"]
    text = run("providers", "list").output
    assert "twilio" in text and "verified: 20" in text


def test_enable_update_disable(run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    f = str(write_list(tmp_path))
    r = run("providers", "enable", "lab", "--file", f)
    assert r.exit_code == 0, r.output
    entries = json.loads(run("list", "--json").output)
    assert len(entries) == 1
    e = entries[0]
    assert e["name"] == "provider-lab" and e["origin"] == "provider"
    assert e["sources"] == ["203.0.113.0/28", "2001:db8:5::/48"] and e["services"] == ["iax", "sip-udp"]
    assert "v3" in e["note"] and "https://lab.example/ips" in e["note"]
    r = run("providers", "enable", "lab", "--file", f, "--service", "sip-udp")  # re-enable: updated
    assert r.exit_code == 0, r.output
    assert json.loads(run("list", "--json").output)[0]["services"] == ["sip-udp"]
    r = run("providers", "enable", "lab", "--file", f, "--service", "ssh")
    assert r.exit_code != 0 and "does not use ssh" in str(r.exception)
    r = run("providers", "enable", "nosuch", "--file", f)
    assert isinstance(r.exception, NotFoundError)
    assert run("providers", "disable", "lab").exit_code == 0
    assert json.loads(run("list", "--json").output) == []


def test_disable_leaves_other_entries_alone(run) -> None:  # type: ignore[no-untyped-def]
    assert run("add", "provider-lab", "192.0.2.7", "-s", "ssh").exit_code == 0
    r = run("providers", "disable", "lab")
    assert r.exit_code != 0 and "tm4 del" in str(r.exception)


def test_enabled_provider_reaches_only_its_signalling(lab: Lab, tmp_path: Path) -> None:
    core = Core(parse_config({"state_dir": str(tmp_path / "s"), "firewall": {"netns": lab.pbx.ns}}), protect=[])
    core.apply()
    echo = Echo(lab.pbx, udp=[5060, 4569], tcp=[5060, 22])
    try:
        gw = lab.client("itsp", ["203.0.113.5/24"])
        outside = lab.client("other", ["203.0.113.20/24"])
        assert not gw.udp_probe("203.0.113.1", 5060, timeout=0.2)
        [e] = prov.enable(core, prov.load_providers(write_list(tmp_path)), ["lab"], actor="test")
        assert e.origin == Origin.PROVIDER
        assert gw.udp_probe("203.0.113.1", 5060, timeout=0.3)
        assert gw.udp_probe("203.0.113.1", 4569, timeout=0.3)
        assert not gw.tcp_probe("203.0.113.1", 5060, timeout=0.2)
        assert not gw.tcp_probe("203.0.113.1", 22, timeout=0.2)
        assert not outside.udp_probe("203.0.113.1", 5060, timeout=0.2)  # outside the /28
    finally:
        echo.close()
