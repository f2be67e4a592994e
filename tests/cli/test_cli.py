"""The CLI through click's CliRunner: verbs, --json shapes, one-line errors and exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from tm4.cli import cli


@pytest.fixture
def run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    cfg = tmp_path / "tm4.toml"
    # a namespace that does not exist: kernel calls fail, so these tests stay store-only
    cfg.write_text(f'state_dir = "{tmp_path}/state"\n[firewall]\nnetns = "tm4-cli-test-none"\n')
    monkeypatch.setenv("TM4_NFT_SUBPROCESS", "1")
    runner = CliRunner()

    def invoke(*args: str, input: str | None = None):  # type: ignore[no-untyped-def]
        return runner.invoke(cli, ["--config", str(cfg), *args], input=input)
    return invoke


def test_add_list_show_del_round_trip(run) -> None:  # type: ignore[no-untyped-def]
    r = run("add", "office", "192.0.2.0/24", "2001:db8::/48", "-s", "sip-udp", "-s", "ssh", "--note", "HQ")
    assert r.exit_code == 0, r.output
    r = run("list", "--json")
    data = json.loads(r.output)
    assert data[0]["name"] == "office"
    assert data[0]["sources"] == ["192.0.2.0/24", "2001:db8::/48"]
    assert data[0]["addresses"] == ["192.0.2.0/24", "2001:db8::/48"]
    assert data[0]["services"] == ["sip-udp", "ssh"]
    assert data[0]["origin"] == "admin" and data[0]["expires"] is None
    assert "HQ" in run("show", "office").output
    assert run("del", "office").exit_code == 0
    assert json.loads(run("list", "--json").output) == []


def test_ttl_sets_expiry(run) -> None:  # type: ignore[no-untyped-def]
    run("add", "bob", "192.0.2.9", "-s", "ssh", "--ttl", "2h")
    assert json.loads(run("list", "--json").output)[0]["expires"].endswith("Z")


def test_errors_are_one_line_and_non_zero(run, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    cfg = tmp_path / "tm4.toml"
    p = subprocess.run([sys.executable, "-m", "tm4.cli", "--config", str(cfg), "add", "x", "0.0.0.0/0",
                        "-s", "ssh"], capture_output=True, text=True)
    assert p.returncode == 1
    assert p.stderr.count("\n") == 1 and p.stderr.startswith("tm4: ") and "whole internet" in p.stderr
    r = run("add", "x", "0.0.0.0/0", "-s", "ssh")
    assert r.exit_code != 0
    r = run("add", "x", "192.0.2.1", "-s", "telnet")
    assert r.exit_code != 0
    r = run("del", "nobody")
    assert r.exit_code != 0


def test_no_service_without_terminal_is_an_error(run) -> None:  # type: ignore[no-untyped-def]
    r = run("add", "x", "192.0.2.1")
    assert r.exit_code != 0
    assert "--service" in str(r.exception) or "--service" in r.output


def test_duplicate_needs_replace(run) -> None:  # type: ignore[no-untyped-def]
    assert run("add", "a", "192.0.2.1", "-s", "1").exit_code == 0
    assert run("add", "a", "192.0.2.2", "-s", "1").exit_code != 0
    assert run("add", "a", "192.0.2.2", "-s", "1", "--replace").exit_code == 0


def test_block_bans_json_and_whitelist_protection(run) -> None:  # type: ignore[no-untyped-def]
    assert run("block", "203.0.113.9", "--ttl", "1h", "--reason", "scanner").exit_code == 0
    bans = json.loads(run("bans", "--json").output)
    assert bans[0]["address"] == "203.0.113.9" and bans[0]["reason"] == "scanner" and bans[0]["expires"]
    run("add", "office", "192.0.2.0/24", "-s", "1")
    assert run("block", "192.0.2.5").exit_code != 0
    assert run("unblock", "203.0.113.9").exit_code == 0
    assert json.loads(run("bans", "--json").output) == []


def test_grant_lifts_ban(run) -> None:  # type: ignore[no-untyped-def]
    run("block", "198.51.100.7")
    run("add", "roamer", "198.51.100.7", "-s", "sip-udp")
    assert json.loads(run("bans", "--json").output) == []
    actions = [r["action"] for r in json.loads(run("log", "--json").output)]
    assert actions == ["block", "unblock", "allow"]


def test_tm3_verbs(run) -> None:  # type: ignore[no-untyped-def]
    assert run("add-ip", "Home", "198.51.100.20", "1", "3", "8").exit_code == 0
    assert run("add-fqdn", "dyn", "home.example.com", "4").exit_code == 0
    data = {e["name"]: e for e in json.loads(run("list", "--json").output)}
    assert data["home"]["services"] == ["iax", "sip-udp", "ssh"]
    assert data["dyn"]["services"] == ["http", "https"] and data["dyn"]["addresses"] == []
    assert run("add-fqdn", "bad", "*.example.com", "1").exit_code != 0
    assert run("del-acct", "home").exit_code == 0


def test_plan_without_table(run) -> None:  # type: ignore[no-untyped-def]
    run("add", "a", "192.0.2.1", "-s", "ssh")
    out = run("plan").output
    assert "+ table inet tm4" in out and "+ wl4_ssh 192.0.2.1" in out


def test_broken_config_is_one_clear_error(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text("state_dir = \n")
    r = CliRunner().invoke(cli, ["--config", str(cfg), "list"])
    assert r.exit_code != 0 and "not valid TOML" in str(r.exception)
