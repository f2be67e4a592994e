"""Knock sequences, their rules and the CLI, without the kernel (see test_knock_netns.py for packets)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from fakes import RefusingKernel
from netlab import Lab

from tm4.cli import cli
from tm4.core.config import parse_config
from tm4.core.errors import ConfigError
from tm4.core.store import Store
from tm4.knock import sequence as knock
from tm4.ops.engine import Core


def cfg(tmp: Path, **k: Any) -> Any:
    return parse_config({"state_dir": str(tmp), "knock": {"enabled": True, **k}})


@pytest.mark.parametrize("bad, msg", [
    ({"length": 2}, "3 to 16"),
    ({"ports": [31001, 31002]}, "3 to 16"),
    ({"protocol": "sctp"}, "tcp' or 'udp"),
    ({"range": "100-2000"}, "above 1023"),
    ({"range": "20000-30000,40000-50000"}, "one range"),
    ({"ports": [31001, 5060, 31003]}, "5060"),
    ({"ports": [31001, 31001, 31003]}, "twice"),
    ({"ports": [31001, 15000, 31003]}, "15000"),  # inside the RTP range
    ({"range": "5060-5061"}, "fewer than 3"),
    ({"services": ["nope"]}, "unknown service"),
    ({"step_timeout": "soon"}, "not a duration"),
])
def test_bad_settings_are_refused(tmp_path: Path, bad: dict[str, Any], msg: str) -> None:
    with pytest.raises(ConfigError, match=msg):
        knock.settings(cfg(tmp_path, **bad))


def test_generated_ports_avoid_services_and_rtp(tmp_path: Path) -> None:
    config = parse_config({
        "state_dir": str(tmp_path),
        "services": {"custom": {"proto": "udp", "ports": "20003-20005"}},
        "knock": {"range": "19995-20012", "length": 5},
    })
    s = knock.settings(config)
    allowed = set(range(20001, 20013)) - {20003, 20004, 20005}
    seen: set[int] = set()
    for _ in range(200):
        seq = knock.generate(config, s)
        assert len(seq.ports) == 5 and len(set(seq.ports)) == 5
        assert set(seq.ports) <= allowed, seq.ports
        seen |= set(seq.ports)
    assert seen == allowed  # random over the whole free range, not a fixed pick


def test_sequence_is_stored_stable_and_renewed_when_it_stops_fitting(tmp_path: Path) -> None:
    store = Store(tmp_path / "tm4.db")
    c3 = cfg(tmp_path)
    first = knock.current(c3, store)
    assert first is not None and knock.current(c3, store) == first
    assert knock.current(cfg(tmp_path), Store(tmp_path / "tm4.db")) == first  # persisted
    c4 = cfg(tmp_path, length=4)
    renewed = knock.current(c4, store)
    assert renewed is not None and len(renewed.ports) == 4 and renewed.generation != first.generation
    audit = [r for r in store.audit_log() if r.action == "knock-new"]
    assert len(audit) == 2 and "config asks for 4" in audit[-1].detail["reason"]
    # a service moved onto one of the ports: a new sequence, not a clash
    clash = parse_config({"state_dir": str(tmp_path), "knock": {"enabled": True, "length": 4},
                          "services": {"custom": {"proto": "tcp", "ports": str(renewed.ports[1])}}})
    again = knock.current(clash, store)
    assert again is not None and renewed.ports[1] not in again.ports


def test_fixed_ports_from_config_win(tmp_path: Path) -> None:
    c = cfg(tmp_path, ports=[31001, 31002, 31003, 31004], protocol="udp")
    seq = knock.current(c, Store(tmp_path / "tm4.db"))
    assert seq is not None and seq.ports == (31001, 31002, 31003, 31004) and seq.protocol == "udp"


def test_rendered_stages(tmp_path: Path) -> None:
    c = cfg(tmp_path, ports=[31001, 31002, 31003, 31004], services=["sip-udp", "iax"])
    s = knock.settings(c)
    seq = knock.current(c, Store(tmp_path / "tm4.db"))
    assert seq is not None
    rs = knock.render_knock(c, s, seq)
    g = seq.generation
    assert sorted(rs.sets) == sorted(
        [f"knock{v}_{g}_{i}" for v in (4, 6) for i in (1, 2, 3)] + ["knocked4", "knocked6"])
    assert all(st.dynamic and "timeout" in st.flags for st in rs.sets.values())
    assert rs.sets["knocked4"].timeout == "3600s" and rs.sets[f"knock4_{g}_1"].timeout == "10s"
    assert rs.chains["knock4"] == [
        f"tcp dport 31004 ip saddr @knock4_{g}_3 delete @knock4_{g}_3 {{ ip saddr }}"
        " update @knocked4 { ip saddr } counter return",
        f"tcp dport 31003 ip saddr @knock4_{g}_2 delete @knock4_{g}_2 {{ ip saddr }}"
        f" update @knock4_{g}_3 {{ ip saddr }} return",
        f"tcp dport 31002 ip saddr @knock4_{g}_1 delete @knock4_{g}_1 {{ ip saddr }}"
        f" update @knock4_{g}_2 {{ ip saddr }} return",
        f"tcp dport 31002 ip saddr @knock4_{g}_2 return",
        f"tcp dport 31003 ip saddr @knock4_{g}_3 return",
        f"tcp dport 31001 delete @knock4_{g}_2 {{ ip saddr }} delete @knock4_{g}_3 {{ ip saddr }}"
        f" update @knock4_{g}_1 {{ ip saddr }} return",
        f"ip saddr @knock4_{g}_1 delete @knock4_{g}_1 {{ ip saddr }} return",
        f"ip saddr @knock4_{g}_2 delete @knock4_{g}_2 {{ ip saddr }} return",
        f"ip saddr @knock4_{g}_3 delete @knock4_{g}_3 {{ ip saddr }} return",
    ]
    assert rs.input_rules == [
        "ip saddr @knocked4 udp dport 4569 accept",
        "ip saddr @knocked4 udp dport 5060 accept",
        "ip6 saddr @knocked6 udp dport 4569 accept",
        "ip6 saddr @knocked6 udp dport 5060 accept",
        "meta nfproto ipv4 tcp flags & (fin | syn | rst | ack) == syn jump knock4",
        "meta nfproto ipv6 tcp flags & (fin | syn | rst | ack) == syn jump knock6",
    ]


def test_knock_off_adds_nothing_and_core_places_it_before_public_services(tmp_path: Path) -> None:
    store = Store(tmp_path / "tm4.db")
    assert knock.ruleset_extra(parse_config({"state_dir": str(tmp_path)}), store) is None
    c = parse_config({"state_dir": str(tmp_path), "knock": {"enabled": True},
                      "firewall": {"public_services": ["ssh"]}})
    rs = Core(c, store=store, protect=[]).render()
    rules = rs.input_rules
    jump = rules.index("meta nfproto ipv4 tcp flags & (fin | syn | rst | ack) == syn jump knock4")
    assert rules.index("ip saddr @wl4_all accept") < jump < rules.index("tcp dport 22 accept")


def test_iptables_backend_is_refused(tmp_path: Path) -> None:
    c = parse_config({"state_dir": str(tmp_path), "knock": {"enabled": True},
                      "firewall": {"backend": "iptables"}})
    with pytest.raises(ConfigError, match="nft"):
        knock.ruleset_extra(c, Store(tmp_path / "tm4.db"))


def write_config(tmp: Path, extra: str = "") -> Path:
    p = tmp / "tm4.toml"
    p.write_text(f'state_dir = "{tmp / "state"}"\n{extra}')
    return p


def test_show_json_has_the_documented_shape(tmp_path: Path) -> None:
    conf = write_config(tmp_path, '[knock]\nenabled = true\nports = [31001, 31002, 31003]\n'
                                  'ttl = "90m"\nservices = ["sip-udp", "sip-tls"]\n')
    res = CliRunner().invoke(cli, ["--config", str(conf), "knock", "show", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output) == {
        "protocol": "tcp", "ports": [31001, 31002, 31003], "ttl": "1h30m",
        "services": ["sip-tls", "sip-udp"],
    }


def test_show_text_gives_commands_and_app_note(tmp_path: Path) -> None:
    conf = write_config(tmp_path, '[knock]\nenabled = true\nprotocol = "udp"\nports = [31001, 31002, 31003]\n'
                                  '[dialin]\nexternal_address = "pbx.example.com"\n')
    res = CliRunner().invoke(cli, ["--config", str(conf), "knock", "show"])
    assert res.exit_code == 0, res.output
    assert "knock -v -u pbx.example.com 31001 31002 31003" in res.output
    assert "nmap -sU -Pn" in res.output
    assert "DroidKnocker" in res.output and "PortKnock" in res.output


def test_show_warns_when_knocking_is_off(tmp_path: Path) -> None:
    res = CliRunner().invoke(cli, ["--config", str(write_config(tmp_path)), "knock", "show"])
    assert res.exit_code == 0 and "OFF" in res.output


def test_rotate_refuses_fixed_ports(tmp_path: Path) -> None:
    conf = write_config(tmp_path, '[knock]\nenabled = true\nports = [31001, 31002, 31003]\n')
    res = CliRunner().invoke(cli, ["--config", str(conf), "knock", "rotate"])
    assert res.exit_code != 0 and "knock.ports" in str(res.exception)


def test_rotate_cli_applies_to_the_kernel(lab: Lab, tmp_path: Path) -> None:
    conf = write_config(tmp_path, f'[firewall]\nnetns = "{lab.pbx.ns}"\n[knock]\nenabled = true\n')
    config = parse_config({"state_dir": str(tmp_path / "state"), "firewall": {"netns": lab.pbx.ns},
                           "knock": {"enabled": True}})
    core = Core(config, protect=[])
    core.apply()
    old = knock.current(config, core.store)
    assert old is not None
    res = CliRunner().invoke(cli, ["--config", str(conf), "knock", "rotate", "--json"])
    assert res.exit_code == 0, res.output
    new = json.loads(res.output)["ports"]
    assert new != list(old.ports)
    listing = core.backend.listing() or ""
    assert f"tcp dport {new[-1]} " in listing and f"tcp dport {old.ports[-1]} " not in listing
    assert f"knock4_{old.generation}_1" not in listing





def test_rotate_is_all_or_nothing(tmp_path: Path) -> None:
    from tm4.core.errors import ApplyError

    config = cfg(tmp_path)
    core = Core(config, backend=RefusingKernel(), store=Store(tmp_path / "tm4.db"), protect=[])
    before = knock.current(config, core.store)
    with pytest.raises(ApplyError):
        knock.rotate(core, actor="test")
    assert knock.current(config, core.store) == before  # the old sequence is still the one in force
    assert not [r for r in core.store.audit_log() if r.action == "knock-rotate"]
