"""`tm4 sip-domain show`: what a phone needs, and a warning when a name does not lead here."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner
from dnsserver import DnsServer
from netlab import Lab

from tm4.cli import cli


def run(cfg: Path, *args: str) -> tuple[int, str]:
    r = CliRunner().invoke(cli, ["--config", str(cfg), "sip-domain", "show", *args])
    return r.exit_code, r.output


def test_show_prints_the_phone_settings_and_warns_about_names_not_pointing_here(
        lab: Lab, tmp_path: Path) -> None:
    with DnsServer(tmp_path / "dns") as dns:
        dns.set({"xq356jq.example.net": ["192.0.2.1", "2001:db8::1"], "elsewhere.example.com": ["203.0.113.5"]})
        cfg = tmp_path / "tm4.toml"
        cfg.write_text(
            f'state_dir = "{tmp_path}/state"\n[firewall]\nnetns = "{lab.pbx.ns}"\n'
            f'[dns]\nnameservers = ["{dns.nameserver}"]\n'
            '[sip_admission]\ndomains = ["Xq356jq.example.net", "elsewhere.example.com", "gone.example.com"]\n'
            'ttl = "2h"\n')
        code, out = run(cfg, "--json")
        assert code == 0, out
        data = json.loads(out)
        assert data["enabled"] and data["ttl"] == "2h" and data["services"] == ["sip-udp"]
        by = {d["domain"]: d for d in data["domains"]}
        assert list(by) == ["xq356jq.example.net", "elsewhere.example.com", "gone.example.com"]
        ok = by["xq356jq.example.net"]
        assert ok["registrar"] == "xq356jq.example.net" and ok["transport"] == "UDP" and ok["port"] == 5060
        assert ok["outbound_proxy"] in ("192.0.2.1", "[2001:db8::1]")  # the server's own address
        assert ok["points_here"] and ok["warnings"] == []
        assert sorted(ok["resolves_to"]) == ["192.0.2.1", "2001:db8::1"]
        assert not by["elsewhere.example.com"]["points_here"]
        assert "203.0.113.5, not to this server" in by["elsewhere.example.com"]["warnings"][0]
        assert "does not resolve" in by["gone.example.com"]["warnings"][0]

        code, text = run(cfg, "--host", "pbx.example.org")
        assert code == 0, text
        assert "SIP domain / registrar:  xq356jq.example.net" in text
        assert "Outbound proxy:          pbx.example.org" in text
        assert "Transport:               UDP" in text
        assert text.count("WARNING") == 2 and "in clear" in text


def test_show_says_off_without_domains(tmp_path: Path) -> None:
    cfg = tmp_path / "tm4.toml"
    cfg.write_text(f'state_dir = "{tmp_path}/state"\n')
    code, out = run(cfg)
    assert code == 0 and "OFF" in out
    code, out = run(cfg, "--json")
    assert json.loads(out)["enabled"] is False and json.loads(out)["domains"] == []
