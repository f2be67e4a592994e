"""The CLI goes through tm4d's socket when it runs, and acts directly when it does not:
same verbs, same results."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner
from daemon_support import Tm4d

from tm4.cli import cli


def run(cfg: Path, *args: str) -> str:
    r = CliRunner().invoke(cli, ["--config", str(cfg), *args])
    assert r.exit_code == 0, (r.output, r.exception)
    return r.output


def test_verbs_go_through_the_daemon_and_fall_back_to_direct(tm4d: Tm4d, tmp_path: Path) -> None:
    tm4d.start()
    cfg = tm4d.config_path  # no firewall.netns: only tm4d (inside the namespace) can reach its kernel
    run(cfg, "add", "phone", "192.0.2.10", "-s", "sip-udp", "--ttl", "2h")
    assert "192.0.2.10" in tm4d.nft("list", "set", "inet", "tm4", "wl4_sip_udp")
    run(cfg, "block", "203.0.113.9", "--reason", "scanner")
    assert "203.0.113.9" in tm4d.nft("list", "set", "inet", "tm4", "ban4")
    via_daemon = json.loads(run(cfg, "list", "--json"))
    bans_daemon = json.loads(run(cfg, "bans", "--json"))
    log = json.loads(run(cfg, "log", "--json"))
    assert [r["action"] for r in log][-2:] == ["allow", "block"]
    run(cfg, "apply")
    assert json.loads(run(cfg, "log", "--json"))[-1]["action"] == "apply"
    assert all(r["actor"].startswith("uid=0") for r in log[-2:])
    tm4d.stop()
    direct = tmp_path / "direct.toml"
    direct.write_text(cfg.read_text() + f'[firewall]\nnetns = "{tm4d.ns}"\n')
    assert json.loads(run(direct, "list", "--json")) == via_daemon
    assert json.loads(run(direct, "bans", "--json")) == bans_daemon
    run(direct, "unblock", "203.0.113.9")
    assert "203.0.113.9" not in tm4d.nft("list", "set", "inet", "tm4", "ban4")
    run(direct, "del", "phone")
    assert "192.0.2.10" not in tm4d.nft("list", "set", "inet", "tm4", "wl4_sip_udp")
