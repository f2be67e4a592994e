"""Asterisk's directories from asterisk.conf (the real one from Asterisk 22's capture host,
the sample's template form, hostile values), and `tm4 asterisk install --asterisk PATH`."""

from __future__ import annotations

import shutil
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from ami_acl_sim import AmiAclSim
from click.testing import CliRunner
from conftest import FIXTURES
from hypothesis import given, settings
from hypothesis import strategies as st
from netlab import Lab

from tm4.asterisk.dirs import asterisk_dirs
from tm4.cli import cli
from tm4.core.errors import ConfigError

REAL2_CONF = FIXTURES / "asterisk-22" / "real2" / "etc" / "asterisk.conf"
ETC = FIXTURES / "asterisk" / "etc"


def test_the_real_asterisk_conf() -> None:
    d = asterisk_dirs(REAL2_CONF)
    assert (str(d.etc), str(d.agi), str(d.data)) == ("/etc/asterisk", "/var/lib/asterisk/agi-bin",
                                                     "/var/lib/asterisk")
    assert d.sounds == Path("/var/lib/asterisk/sounds") and d.notes == ()


def test_a_directory_names_astetcdir_and_holds_asterisk_conf(tmp_path: Path) -> None:
    d = asterisk_dirs(tmp_path)
    assert d.etc == tmp_path and str(d.agi) == "/var/lib/asterisk/agi-bin"
    assert any("not found" in n for n in d.notes)
    (tmp_path / "asterisk.conf").write_text(
        "[directories](!) ; the sample: a template, so not in force\nastagidir => /nowhere\n"
        "[directories]\nastetcdir => /opt/ast/etc ; comment\nastdatadir=/opt/ast/lib\n")
    d = asterisk_dirs(tmp_path)
    assert (str(d.etc), str(d.agi), str(d.data)) == ("/opt/ast/etc", "/var/lib/asterisk/agi-bin", "/opt/ast/lib")
    assert d.notes == ("asterisk.conf: no astagidir; Asterisk's default /var/lib/asterisk/agi-bin",)


def test_a_missing_path_or_a_relative_directory_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="neither"):
        asterisk_dirs(tmp_path / "nope.conf")
    (tmp_path / "asterisk.conf").write_text("[directories]\nastagidir => agi-bin\n")
    with pytest.raises(ConfigError, match="not an absolute"):
        asterisk_dirs(tmp_path / "asterisk.conf")
    (tmp_path / "asterisk.conf").write_text("[directories]\nastdatadir => /var/lib/../../etc\n")
    with pytest.raises(ConfigError, match=r"'\.\.'"):
        asterisk_dirs(tmp_path / "asterisk.conf")


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300))
def test_any_asterisk_conf_gives_directories_or_a_config_error(text: str) -> None:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        conf = Path(tmp) / "asterisk.conf"
        conf.write_text("[directories]\n" + text, encoding="utf-8")
        try:
            d = asterisk_dirs(conf)
        except ConfigError:
            return
        for p in (d.etc, d.agi, d.data):
            assert p.is_absolute() and ".." not in p.parts and "\n" not in str(p) and "\0" not in str(p)


# -- tm4 asterisk install --asterisk ------------------------------------------------------

@pytest.fixture
def sim(tmp_path: Path) -> Iterator[tuple[AmiAclSim, Path]]:
    etc = tmp_path / "opt-asterisk-etc"
    shutil.copytree(ETC, etc)
    s = AmiAclSim(config_dir=etc).start()
    try:
        yield s, etc
    finally:
        s.stop()


def test_asterisk_install_follows_astetcdir(sim: tuple[AmiAclSim, Path], lab: Lab, tmp_path: Path) -> None:
    server, etc = sim
    conf = tmp_path / "asterisk.conf"
    conf.write_text(REAL2_CONF.read_text().replace("astetcdir => /etc/asterisk", f"astetcdir => {etc}"))
    toml = tmp_path / "tm4.toml"
    toml.write_text(textwrap.dedent(f"""\
        state_dir = "{tmp_path / 'state'}"
        [firewall]
        netns = "{lab.pbx.ns}"
        [asterisk]
        config_dir = "{tmp_path / 'not-here'}"
        [ami]
        port = {server.port}
        """))
    r = CliRunner().invoke(cli, ["--config", str(toml), "asterisk", "install"])
    assert r.exit_code == 1 and "does not exist" in str(r.exception)  # the configured directory is wrong
    r = CliRunner().invoke(cli, ["--config", str(toml), "asterisk", "install", "--asterisk", str(conf)])
    assert r.exit_code == 0, r.output
    assert (etc / "acl_tm4.conf").is_file() and (etc / "acl.conf").read_text().endswith('#include "acl_tm4.conf"\n')
    assert f'set [asterisk] config_dir = "{etc}"' in r.output
    assert not (tmp_path / "not-here").exists()
