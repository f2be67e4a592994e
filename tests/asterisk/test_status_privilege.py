"""`tm4 asterisk status` sends nothing tm4's least-privilege manager user may not send.

Asterisk is the replay of the real answers to that very user (real2/ami/pjsip_show and
command_denied: read=system,security, write=system); its ListCommands answer is the list
of what the user may send. A Command from this user would be refused with an
Error-severity RequestNotAllowed security event, as command_denied shows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from ami_replay_sim import ReplaySim
from click.testing import CliRunner

from tm4.cli import cli


def test_status_sends_only_what_the_user_may_and_says_what_it_cannot_check(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TM4_NFT_SUBPROCESS", "1")
    etc = tmp_path / "asterisk"
    etc.mkdir()
    (etc / "acl.conf").write_text('#include "acl_tm4.conf"\n')
    with ReplaySim(["pjsip_show", "command_denied"]) as sim:
        allowed = sim.allowed()
        assert "Command" not in allowed and "Reload" in allowed  # as Asterisk listed them for tm4
        denied = sim.answers[(("action", "command"), ("command", "acl show tm4"))][1]
        assert b"Message: Permission denied" in denied and b"Event: RequestNotAllowed" in denied
        cfg = tmp_path / "tm4.toml"
        cfg.write_text(f'state_dir = "{tmp_path}/state"\n[firewall]\nnetns = "tm4-test-none"\n'
                       f'[asterisk]\nconfig_dir = "{etc}"\n'
                       f'[ami]\nport = {sim.port}\nsecret = "{sim.secret}"\n')
        runner = CliRunner()
        assert runner.invoke(cli, ["--config", str(cfg), "asterisk", "sync"]).exit_code == 0
        text = runner.invoke(cli, ["--config", str(cfg), "asterisk", "status"])
        js = runner.invoke(cli, ["--config", str(cfg), "asterisk", "status", "--json"])
    sent = [a["action"] for a in sim.actions]
    assert sent and not sim.uncaptured
    assert all(a in allowed for a in sent), sent  # nothing outside the user's privileges
    assert "Command" not in sent
    st = json.loads(js.output)
    assert st["ami"] == "ok" and st["asterisk_current"] is None
    assert "may not send Command (that needs write=command)" in st["asterisk_note"]
    assert "asterisk -rx 'acl show tm4'" in text.output  # what the admin can check by hand
