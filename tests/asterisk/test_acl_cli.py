"""`tm4 asterisk install|status|render|sync` end to end: real files in a copy of the
captured Asterisk config, the AMI simulator as Asterisk, and a stand-in `asterisk`
binary whose `-rx "manager reload"` asks the simulator to reload its users (as the
real one does through Asterisk's control socket)."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import textwrap
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from ami_acl_sim import AmiAclSim
from click.testing import CliRunner
from netlab import Lab

from tm4.asterisk.acl import desired_rules, parse_acl_show, render_acl
from tm4.asterisk.amiuser import MANAGER_FILE, include_secret
from tm4.asterisk.conffile import read_conf
from tm4.cli import cli
from tm4.core.config import load_config
from tm4.ops.engine import Core

ETC = Path(__file__).parent.parent / "fixtures" / "asterisk" / "etc"

FAKE_ASTERISK = textwrap.dedent('''\
    #!{python}
    """Stand-in for `asterisk -rx CMD`: logs its argv, forwards CMD to the AMI simulator."""
    import os, socket, sys
    with open(os.environ["TM4_FAKE_ASTERISK_LOG"], "a") as f:
        f.write(" ".join(sys.argv[1:]) + "\\n")
    s = socket.create_connection(("127.0.0.1", int(os.environ["TM4_FAKE_ASTERISK_AMI"])))
    f = s.makefile("rb")
    f.readline()
    def send(*lines):
        s.sendall(("".join(l + "\\r\\n" for l in lines) + "\\r\\n").encode())
        while f.readline() not in (b"\\r\\n", b""):
            pass
    send("Action: Login", "ActionID: 1", "Username: observer", "Secret: observersecret", "Events: off")
    send("Action: Command", "ActionID: 2", "Command: " + sys.argv[2])
    send("Action: Logoff", "ActionID: 3")
''')


class Setup:
    def __init__(self, tmp_path: Path, lab: Lab, monkeypatch: pytest.MonkeyPatch):
        self.etc = tmp_path / "asterisk"
        shutil.copytree(ETC, self.etc)
        mgr = self.etc / "manager.conf"
        mgr.write_text(mgr.read_text().replace("[tm4]", "[legacy]"))  # tm4 must create its own user
        self.sim = AmiAclSim(config_dir=self.etc).start()
        bindir = tmp_path / "bin"
        bindir.mkdir()
        fake = bindir / "asterisk"
        fake.write_text(FAKE_ASTERISK.format(python=sys.executable))
        fake.chmod(0o755)
        self.rx_log = tmp_path / "rx.log"
        monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
        monkeypatch.setenv("TM4_FAKE_ASTERISK_LOG", str(self.rx_log))
        monkeypatch.setenv("TM4_FAKE_ASTERISK_AMI", str(self.sim.port))
        self.toml = tmp_path / "tm4.toml"
        self.toml.write_text(textwrap.dedent(f"""\
            state_dir = "{tmp_path / 'state'}"

            [firewall]
            netns = "{lab.pbx.ns}"

            [asterisk]
            config_dir = "{self.etc}"

            [ami]
            port = {self.sim.port}
            """))
        self.toml.chmod(0o644)

    def core(self) -> Core:
        return Core(load_config(self.toml), protect=[])

    def tm4(self, *args: str) -> Any:
        return CliRunner().invoke(cli, ["--config", str(self.toml), *args], catch_exceptions=False)

    def files(self) -> dict[str, bytes]:
        return {p.name: p.read_bytes() for p in sorted(self.etc.iterdir())}


@pytest.fixture
def setup(tmp_path: Path, lab: Lab, monkeypatch: pytest.MonkeyPatch) -> Iterator[Setup]:
    s = Setup(tmp_path, lab, monkeypatch)
    yield s
    s.sim.stop()


def test_install_end_to_end_and_idempotent(setup: Setup) -> None:
    core = setup.core()
    core.allow("office", ["192.0.2.10", "2001:db8::10"], ["sip-udp"])
    core.allow("web", ["198.51.100.5"], ["https"])
    original_acl = (setup.etc / "acl.conf").read_bytes()

    r = setup.tm4("asterisk", "install")
    assert r.exit_code == 0, r.output
    out = r.output
    assert "#include added to" in out and "manager user:  created" in out
    assert 'reloaded with asterisk -rx "manager reload"' in out
    assert "AMI login:     ok as 'tm4' (Asterisk Call Manager/11.0.0)" in out
    assert "ACL reload:    done" in out and "acl = tm4" in out and "type = acl" in out
    # files
    acl_conf = (setup.etc / "acl.conf").read_bytes()
    assert acl_conf.startswith(original_acl) and acl_conf.endswith(b'#include "acl_tm4.conf"\n')
    assert [p.read_bytes() for p in setup.etc.glob("acl.conf.tm4-*.bak")] == [original_acl]
    assert (setup.etc / "acl_tm4.conf").read_text() == render_acl(core.entries(), core.clock())
    assert read_conf(setup.etc / "manager.conf")[1].includes_file(MANAGER_FILE, setup.etc)
    secret = tomllib.loads(setup.toml.read_text())["ami"]["secret"]
    assert secret == include_secret(setup.etc, "tm4")
    assert stat.S_IMODE(setup.toml.stat().st_mode) == 0o600
    # logger.conf gets the security channel the guard catches up from, and is reloaded
    assert setup.rx_log.read_text() == "-rx logger reload\n-rx manager reload\n"
    assert "added `security => security` for the guard's catch-up; logger reloaded" in out
    assert read_conf(setup.etc / "logger.conf")[1].values("logfiles", "security") == ["security"]
    # Asterisk (the simulator) now has tm4's user, least privilege, and the ACL
    user = setup.sim.users["tm4"]
    assert (user.secret, user.read, user.write) == (secret, {"system", "security"}, {"system"})
    want = desired_rules(core.entries(), core.clock())
    assert [(s, str(n)) for s, n in want][2:] == [("permit", "192.0.2.10/32"), ("permit", "2001:db8::10/128")]
    shown = setup.sim._acl_show("tm4")
    assert parse_acl_show(shown.split("\n")) == want
    assert setup.sim.reloads == ["manager", "acl"]

    # a second run changes nothing
    before = setup.files()
    r = setup.tm4("asterisk", "install")
    assert r.exit_code == 0, r.output
    assert "#include already present" in r.output and "manager user:  present" in r.output
    assert "ACL reload:    not needed" in r.output
    assert setup.files() == before and setup.sim.reloads == ["manager", "acl"]
    assert setup.rx_log.read_text() == "-rx logger reload\n-rx manager reload\n"
    assert "logger.conf" not in r.output

    # status: everything in step; Asterisk's own view needs write=command, which tm4 lacks
    r = setup.tm4("asterisk", "status", "--json")
    st = json.loads(r.output)
    assert r.exit_code == 0 and st["ok"] and st["include"] and st["current"] and st["ami"] == "ok"
    assert st["asterisk_current"] is None and "write=command" in st["asterisk_note"]

    # a whitelist change: render shows it, sync writes and reloads, status agrees
    setup.core().allow("trunk", ["198.51.100.0/28"], ["iax"])
    r = setup.tm4("asterisk", "render")
    assert "permit = 198.51.100.0/255.255.255.240 ; trunk" in r.output
    r = setup.tm4("asterisk", "status")
    assert r.exit_code == 1 and "NOT current" in r.output
    r = setup.tm4("asterisk", "sync")
    assert r.exit_code == 0 and r.output.strip() == "written; reloaded"
    assert setup.sim.reloads == ["manager", "acl", "acl"]
    assert setup.tm4("asterisk", "status").exit_code == 0


def test_install_refuses_an_acl_conf_it_cannot_parse(setup: Setup) -> None:
    (setup.etc / "acl.conf").write_text("[lab_acl]\npermit 127.0.0.1 please\n")
    before = setup.files()
    toml_before = setup.toml.read_bytes()
    env = {**os.environ, "TM4_CONFIG": str(setup.toml)}
    p = subprocess.run([sys.executable, "-m", "tm4.cli", "asterisk", "install"], env=env,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 1
    assert "cannot understand 'permit 127.0.0.1 please'" in p.stderr
    assert setup.files() == before and setup.toml.read_bytes() == toml_before
    assert setup.sim.reloads == []


def test_install_refuses_an_acl_conf_defining_tm4(setup: Setup) -> None:
    (setup.etc / "acl.conf").write_text("[tm4]\npermit = 192.0.2.1\n")
    before = setup.files()
    with pytest.raises(Exception, match=r"already defines \[tm4\]"):
        setup.tm4("asterisk", "install")
    assert setup.files() == before
