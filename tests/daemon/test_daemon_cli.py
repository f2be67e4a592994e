"""The tm4d-related verbs: install-service, init, disable/enable, daemon status."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner
from daemon_support import Tm4d, wait_until
from netlab import Lab

from tm4.cli import cli
from tm4.core.config import load_config

PJSIP = """\
[global]
type=global

[transport-udp]
type=transport
protocol=udp
bind=0.0.0.0:5080

[transport-tcp]
type = transport
protocol = tcp
bind = 0.0.0.0 ; default port

[transport-tls]
type=transport
protocol=tls
bind=[::]:5071

[1001]
type=endpoint
"""
RTP = "[general]\nrtpstart=12000\nrtpend=12999 ; narrow\n"


def run(*args: str, cfg: Path | None = None, input: str | None = None) -> object:
    argv = (["--config", str(cfg)] if cfg else []) + list(args)
    return CliRunner().invoke(cli, argv, input=input)


def test_install_service_puts_everything_in_place(tmp_path: Path) -> None:
    root = tmp_path / "root"
    cfg = tmp_path / "conf.toml"  # does not exist: defaults
    r = run("install-service", "--root", str(root), "--tm4d", "/opt/tm4/bin/tm4d", cfg=cfg)
    assert r.exit_code == 0, r.output  # type: ignore[attr-defined]
    units = root / "etc/systemd/system"
    d = (units / "tm4d.service").read_text()
    assert f"ExecStart=/opt/tm4/bin/tm4d --config {cfg}" in d
    assert "ExecStart=/opt/tm4/bin/tm4d --boot" in (units / "tm4-boot.service").read_text()
    assert "ProtectHome=yes" in d
    written = root / str(cfg).lstrip("/")
    assert oct(written.stat().st_mode & 0o777) == "0o600"
    assert written.read_text().startswith("# tm4 configuration")
    load_config(written)  # loads
    state = root / "var/lib/tm4"
    assert state.is_dir() and oct(state.stat().st_mode & 0o777) == "0o750"
    # a second run keeps the admin's config
    written.write_text('state_dir = "/srv/tm4"\n')
    r = run("install-service", "--root", str(root), "--tm4d", "/opt/tm4/bin/tm4d", cfg=cfg)
    assert "kept" in r.output and written.read_text() == 'state_dir = "/srv/tm4"\n'  # type: ignore[attr-defined]


def test_init_detects_and_writes(lab: Lab, tmp_path: Path) -> None:
    ast = tmp_path / "asterisk"
    ast.mkdir()
    (ast / "pjsip.conf").write_text(PJSIP)
    (ast / "rtp.conf").write_text(RTP)
    cfg = tmp_path / "tm4.toml"
    env = {k: v for k, v in os.environ.items() if k != "TM4_NO_SSH_PROTECT"}
    env["SSH_CONNECTION"] = "203.0.113.50 50522 203.0.113.1 22"
    env["TM4_CONFIG"] = str(cfg)
    cfg.write_text(f'state_dir = "{tmp_path / "state"}"\n')
    base = ["ip", "netns", "exec", lab.pbx.ns, sys.executable, "-m", "tm4.cli", "init", "--asterisk-dir", str(ast)]
    p = subprocess.run(base + ["--json"], capture_output=True, text=True, env=env, check=True)
    det = json.loads(p.stdout[: p.stdout.index("\n}\n") + 3])
    assert set(det["addresses"]) == {"192.0.2.1", "198.51.100.1", "203.0.113.1", "2001:db8::1"}
    assert "192.0.2.0/24" in det["lan"]
    assert det["ssh_clients"] == ["203.0.113.50"]
    assert det["sip"] == {"sip-udp": "5080", "sip-tcp": "5060", "sip-tls": "5071"}
    assert det["rtp"] == "12000-12999"
    assert det["config"] == {"firewall": {"rtp": "12000-12999"}, "services.sip-udp": {"ports": "5080"},
                             "services.sip-tls": {"ports": "5071"}}
    # a LAN that was not detected cannot be trusted by mistake
    p = subprocess.run(base + ["--write", "--trust-lan", "10.0.0.0/8"], capture_output=True, text=True, env=env)
    assert p.returncode == 1 and "not one of the detected LAN networks" in p.stderr
    p = subprocess.run(base + ["--write", "--overwrite", "--trust-lan", "192.0.2.0/24"], capture_output=True,
                       text=True, env=env)
    assert p.returncode == 0, p.stderr
    assert "granted ssh to 203.0.113.50" in p.stdout
    c = load_config(cfg)
    assert c.firewall.rtp == "12000-12999" and c.services["sip-udp"].ports == ((5080, 5080),)
    assert c.state_dir == tmp_path / "state"  # the admin's own settings are kept
    assert oct(cfg.stat().st_mode & 0o777) == "0o600" and (tmp_path / "tm4.toml.bak").exists()
    from tm4.core.store import Store

    st = Store(tmp_path / "state" / "tm4.db")
    e = {x.name: x for x in st.entries()}
    assert [s.text for s in e["admin-ssh"].sources] == ["203.0.113.50"] and e["admin-ssh"].services == ("ssh",)
    assert e["lan-1"].services == ("all",)
    assert not any(n.startswith("lan-") and n != "lan-1" for n in e)  # the other LANs were only offered


@pytest.fixture
def tm4d(lab: Lab, tmp_path: Path) -> Iterator[Tm4d]:
    d = Tm4d(tmp_path, lab.pbx.ns)
    d.write_config(f'lock_file = "{tmp_path / "locked"}"\n')
    try:
        yield d
    finally:
        d.close()


def test_disable_is_refused_while_locked_and_honoured_by_the_daemon(tm4d: Tm4d, tmp_path: Path) -> None:
    tm4d.start()
    cfg = tm4d.config_path
    (tmp_path / "locked").write_text("")
    r = run("disable", "--yes", cfg=cfg)
    assert r.exit_code == 1 and "locked on" in str(r.exception)  # type: ignore[attr-defined]
    assert "table inet tm4" in tm4d.nft("list", "tables")
    (tmp_path / "locked").unlink()
    r = run("disable", "--yes", cfg=cfg)
    assert r.exit_code == 0, r.output  # type: ignore[attr-defined]
    assert "table inet tm4" not in tm4d.nft("list", "tables")
    time.sleep(3)  # the drift check does not put it back
    assert "table inet tm4" not in tm4d.nft("list", "tables")
    assert tm4d.call("status")["disabled"] is True
    r = run("enable", cfg=cfg)
    assert r.exit_code == 0, r.output  # type: ignore[attr-defined]
    assert "table inet tm4" in tm4d.nft("list", "tables")
    acts = [a.action for a in tm4d.core().store.audit_log(10)]
    assert "disable" in acts and "enable" in acts
    r = run("daemon", "status", cfg=cfg)
    assert r.exit_code == 0 and "drift repairs: 0" in r.output  # type: ignore[attr-defined]
    tm4d.stop()  # without tm4d the same verbs act directly (root)
    assert "table inet tm4" in tm4d.nft("list", "tables")  # stopping tm4d leaves the rules
    netns_cfg = tmp_path / "direct.toml"
    netns_cfg.write_text(cfg.read_text() + f'[firewall]\nnetns = "{tm4d.ns}"\n')
    r = run("disable", "--yes", cfg=netns_cfg)
    assert r.exit_code == 0, r.output  # type: ignore[attr-defined]
    assert "table inet tm4" not in tm4d.nft("list", "tables")
    r = run("enable", cfg=netns_cfg)
    assert r.exit_code == 0, r.output  # type: ignore[attr-defined]
    assert "table inet tm4" in tm4d.nft("list", "tables")
    # and tm4d starting again while disabled would not load the rules
    run("disable", "--yes", cfg=netns_cfg)
    tm4d.start()
    assert wait_until(lambda: "apply_skipped" in tm4d.log(), 3) is not None
    assert "table inet tm4" not in tm4d.nft("list", "tables")


def test_units_keep_a_home_install_readable() -> None:
    from tm4.daemon.units import protect_home_for, render_units

    assert protect_home_for("/usr/local/bin/tm4d", "/usr") == "yes"
    assert protect_home_for("/root/tm4/.venv/bin/tm4d", "/root/tm4/.venv") == "read-only"
    assert "ProtectHome=read-only" in render_units(protect_home="read-only")["tm4d.service"]
