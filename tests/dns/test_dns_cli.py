"""`tm4 refresh [NAME]`: resolves now, shows what changed, keeps stale names, and
keeps the installed Asterisk ACL in step."""

from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

import pytest
from ami_acl_sim import AmiAclSim
from click.testing import CliRunner
from dnsserver import DnsServer
from netlab import Lab

from tm4.asterisk.acl import ACL_FILE
from tm4.cli import cli
from tm4.core.config import load_config
from tm4.core.errors import NotFoundError
from tm4.ops.engine import Core

ETC = Path(__file__).parent.parent / "fixtures" / "asterisk" / "etc"


def test_refresh_command(tmp_path: Path, lab: Lab) -> None:
    etc = tmp_path / "asterisk"
    shutil.copytree(ETC, etc)
    (etc / "acl.conf").write_text((etc / "acl.conf").read_text() + f'#include "{ACL_FILE}"\n')
    (etc / ACL_FILE).write_text("")  # installed
    with DnsServer(tmp_path / "dns", ttl=1) as dns, \
            AmiAclSim(config_dir=etc) as sim:  # manager.conf's own tm4 user
        toml = tmp_path / "tm4.toml"
        toml.write_text(textwrap.dedent(f"""\
            state_dir = "{tmp_path / 'state'}"
            [firewall]
            netns = "{lab.pbx.ns}"
            [asterisk]
            config_dir = "{etc}"
            [ami]
            port = {sim.port}
            secret = "tm4secret"
            [dns]
            nameservers = ["{dns.nameserver}"]
            timeout = "1s"
            """))
        core = Core(load_config(toml), protect=[])
        core.allow("office", ["office.example.com"], ["sip-udp"])
        core.allow("lit", ["198.51.100.3"], ["sip-udp"])
        dns.set({"office.example.com": ["192.0.2.10"]})

        def tm4(*args: str) -> str:
            r = CliRunner().invoke(cli, ["--config", str(toml), *args], catch_exceptions=False)
            assert r.exit_code == 0, r.output
            return r.output

        assert tm4("refresh") == "office  office.example.com  changed: - -> 192.0.2.10 (ttl 1s)\n"
        acl = (etc / ACL_FILE).read_text()
        assert "permit = 192.0.2.10/255.255.255.255 ; office" in acl
        assert sim.reloads == ["acl"]
        assert ("allow", "192.0.2.10", "255.255.255.255") in sim.acls["tm4"]

        [row] = json.loads(tm4("refresh", "office", "--json"))
        assert row["status"] == "unchanged" and row["after"] == ["192.0.2.10"] and row["ttl"] == 1
        assert row["changed"] is False and row["stale_since"] is None
        assert sim.reloads == ["acl"]  # nothing changed: no reload

        dns.stop()
        out = tm4("refresh")
        assert out.startswith("office  office.example.com  failed: A: ") and "keeping 192.0.2.10, stale since" in out
        assert sim.reloads == ["acl"] and (etc / ACL_FILE).read_text() == acl
        assert Core(load_config(toml), protect=[]).get_entry("office").to_json()["stale"] is True

        with pytest.raises(NotFoundError):
            CliRunner().invoke(cli, ["--config", str(toml), "refresh", "nosuch"], catch_exceptions=False)
