"""`tm4 apply --confirm N` rolls kernel AND store back unless confirmed, even if the shell dies."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from netlab import Lab, wait_for


def tm4(cfg: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, TM4_NO_SSH_PROTECT="1")
    return subprocess.run([sys.executable, "-m", "tm4.cli", "--config", str(cfg), *args],
                          capture_output=True, text=True, check=check, env=env)


def setup(lab: Lab, tmp_path: Path) -> Path:
    cfg = tmp_path / "tm4.toml"
    cfg.write_text(f'state_dir = "{tmp_path}/state"\n[firewall]\nnetns = "{lab.pbx.ns}"\n')
    tm4(cfg, "add", "office", "192.0.2.0/24", "-s", "sip-udp")
    tm4(cfg, "apply")
    return cfg


def test_unconfirmed_apply_rolls_back_kernel_and_store(lab: Lab, tmp_path: Path) -> None:
    cfg = setup(lab, tmp_path)
    before = lab.pbx.run("nft", "list", "table", "inet", "tm4").stdout
    # the risky change is a config change (ssh opened to all) applied under --confirm
    cfg.write_text(cfg.read_text().replace("[firewall]", '[firewall]\npublic_services = ["ssh"]'))
    started = time.monotonic()
    tm4(cfg, "apply", "--confirm", "5")
    assert "tcp dport 22 accept" in lab.pbx.run("nft", "list", "chain", "inet", "tm4", "input").stdout
    assert "waiting" in tm4(cfg, "status").stdout
    assert wait_for(lambda: lab.pbx.run("nft", "list", "table", "inet", "tm4").stdout == before, timeout=12)
    assert time.monotonic() - started >= 4.5
    log = json.loads(tm4(cfg, "log", "--json").stdout)
    assert log[-1]["action"] == "rollback"
    assert "waiting" not in tm4(cfg, "status").stdout


def test_changes_after_an_unconfirmed_apply_are_rolled_back_from_the_store(lab: Lab, tmp_path: Path) -> None:
    cfg = setup(lab, tmp_path)
    tm4(cfg, "apply", "--confirm", "5")
    tm4(cfg, "add", "later", "203.0.113.0/24", "-s", "ssh")
    assert "203.0.113.0/24" in lab.pbx.run("nft", "list", "set", "inet", "tm4", "wl4n_ssh").stdout
    assert wait_for(lambda: "later" not in tm4(cfg, "list").stdout, timeout=12)
    assert "203.0.113.0/24" not in lab.pbx.run("nft", "list", "set", "inet", "tm4", "wl4n_ssh").stdout


def test_confirm_keeps_the_change(lab: Lab, tmp_path: Path) -> None:
    cfg = setup(lab, tmp_path)
    tm4(cfg, "apply", "--confirm", "5")
    tm4(cfg, "add", "kept", "203.0.113.0/24", "-s", "ssh")
    tm4(cfg, "confirm")
    time.sleep(6)
    assert "kept" in tm4(cfg, "list").stdout
    assert "203.0.113.0/24" in lab.pbx.run("nft", "list", "set", "inet", "tm4", "wl4n_ssh").stdout
    assert tm4(cfg, "confirm", check=False).returncode == 1


def test_rollback_survives_the_session_that_started_it(lab: Lab, tmp_path: Path) -> None:
    cfg = setup(lab, tmp_path)
    # start the apply from a shell in its own session, then kill that whole session
    sh = subprocess.Popen(
        ["sh", "-c", f"{sys.executable} -m tm4.cli --config {cfg} apply --confirm 5 && "
                     f"{sys.executable} -m tm4.cli --config {cfg} add late 203.0.113.0/24 -s ssh && sleep 60"],
        start_new_session=True, env=dict(os.environ, TM4_NO_SSH_PROTECT="1"),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    assert wait_for(lambda: "late" in tm4(cfg, "list").stdout, timeout=10)
    os.killpg(sh.pid, 9)
    sh.wait()
    assert wait_for(lambda: "late" not in tm4(cfg, "list").stdout, timeout=12)
