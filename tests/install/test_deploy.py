"""`tm4 install` / `tm4 uninstall` from the checkout's venv: what is rendered for the host,
what a second install changes, what uninstall keeps; hostile values at every boundary
(config values that reach a #! line, the dialplan or a unit; asterisk.conf)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import FIXTURES
from hypothesis import given, settings
from hypothesis import strategies as st

from tm4.asterisk.dirs import asterisk_dirs
from tm4.cli import cli
from tm4.core.config import parse_config
from tm4.core.errors import ConfigError
from tm4.daemon import deploy
from tm4.daemon.shipped import AGI_SCRIPT, DIALPLAN, prompts, shipped_text
from tm4.daemon.units import render_units

REAL2_CONF = FIXTURES / "asterisk-22" / "real2" / "etc" / "asterisk.conf"
REPO = Path(__file__).resolve().parents[2]


def host(tmp: Path, toml: dict[str, object] | None = None, python: str = "/opt/tm4/bin/python") -> deploy.Host:
    cfg = parse_config({"state_dir": str(tmp / "state"), **(toml or {})})
    return deploy.Host(python=python, tm4d="/opt/tm4/bin/tm4d", config_path="/etc/tm4/tm4.toml",
                       config=cfg, dirs=asterisk_dirs(REAL2_CONF), tm4="/opt/tm4/bin/tm4")


def files_under(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not p.is_symlink()}


# -- what is rendered -------------------------------------------------------------------

def test_the_plan_for_a_host(tmp_path: Path) -> None:
    h = host(tmp_path, {"daemon": {"socket": "/run/pbx/ctl.sock", "fastagi": "[::]:4600"}})
    pieces = {p.path: p for p in deploy.plan(h)}
    agi = pieces["/var/lib/asterisk/agi-bin/tm4-dialin.agi"]
    assert agi.mode == 0o755 and agi.data.decode().startswith("#!/opt/tm4/bin/python -I\n")
    assert 'SOCKET = "/run/pbx/ctl.sock"\n' in agi.data.decode()
    compile(agi.data, "tm4-dialin.agi", "exec")
    plan = pieces["/etc/asterisk/extensions_tm4.conf"].data.decode()
    assert " same => n,AGI(tm4-dialin.agi,/run/pbx/ctl.sock)\n" in plan
    assert " same => n,AGI(agi://[::1]:4600/tm4-dialin)" in plan
    assert "/run/tm4/tm4.sock" not in plan and "127.0.0.1:4573" not in plan
    assert len(plan.splitlines()) == len(shipped_text(DIALPLAN).splitlines())
    unit = pieces["/etc/systemd/system/tm4d.service"].data.decode()
    assert "ExecStart=/opt/tm4/bin/tm4d --config /etc/tm4/tm4.toml\n" in unit
    assert f"ReadWritePaths={tmp_path}/state -/etc/asterisk -/etc/tm4 -/run/pbx\n" in unit
    assert pieces["/etc/tm4/tm4.toml"].if_absent and pieces["/etc/tm4/tm4.toml"].mode == 0o600
    assert pieces["/usr/local/bin/tm4"].target == "/opt/tm4/bin/tm4"
    names = sorted(Path(p).name for p, x in pieces.items() if x.what == "prompt")
    assert names == sorted(n for n, _ in prompts()) == sorted(p.name for p in (REPO / "sounds/en").iterdir()
                                                              if p.suffix in (".wav", ".gsm"))
    assert all(p.startswith("/var/lib/asterisk/sounds/en/tm4/") for p, x in pieces.items() if x.what == "prompt")


def test_fastagi_off_goes_straight_to_classic(tmp_path: Path) -> None:
    plan = {p.path: p for p in deploy.plan(host(tmp_path, {"daemon": {"fastagi": ""}}))}
    text = plan["/etc/asterisk/extensions_tm4.conf"].data.decode()
    assert "AGI(agi://" not in text and " same => n,Goto(classic,1)" in text
    assert " same => n,AGI(tm4-dialin.agi,/run/tm4/tm4.sock)\n" in text


def test_shipped_files_rendered_with_the_defaults_are_the_shipped_files() -> None:
    """The files in the repository are the templates, one copy each: rendering them for the
    defaults changes nothing but the #! line."""
    assert deploy.render_dialplan(shipped_text(DIALPLAN), "/run/tm4/tm4.sock", "127.0.0.1:4573") == \
        (REPO / "dialplan/extensions_tm4.conf").read_text()
    launcher = deploy.render_launcher(shipped_text(AGI_SCRIPT), "/usr/bin/python3", "/run/tm4/tm4.sock")
    shipped = (REPO / "agi-bin/tm4-dialin.agi").read_text()
    assert launcher.split("\n", 1)[1] == shipped.split("\n", 1)[1]
    for name, text in render_units().items():
        assert (REPO / "systemd" / name).read_text() == text


@pytest.mark.parametrize("value,url", [("127.0.0.1:4573", "agi://127.0.0.1:4573/"),
                                       ("0.0.0.0:4573", "agi://127.0.0.1:4573/"),
                                       ("[::]:4573", "agi://[::1]:4573/"),
                                       ("[2001:db8::5]:99", "agi://[2001:db8::5]:99/")])
def test_fastagi_urls(value: str, url: str) -> None:
    assert deploy.fastagi_url(value) == url


@pytest.mark.parametrize("value", ["", "4573", "localhost:4573", "127.0.0.1:0", "127.0.0.1:70000",
                                   "127.0.0.1:45x", "1.2.3.4:5/x", "[::1]:", "[fe80::1%eth0]:4573"])
def test_fastagi_refused(value: str) -> None:
    with pytest.raises(ConfigError):
        deploy.fastagi_url(value)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=60), st.builds(lambda h, p: f"{h}:{p}", st.ip_addresses().map(str),
                                                    st.integers(-5, 70000))))
def test_any_fastagi_value_is_refused_or_a_loopback_or_literal_url(value: str) -> None:
    import ipaddress

    try:
        url = deploy.fastagi_url(value)
    except ConfigError:
        return
    hostport = url.removeprefix("agi://").removesuffix("/")
    host, _, port = hostport.rpartition(":")
    ip = ipaddress.ip_address(host.strip("[]"))
    assert 0 < int(port) < 65536 and not ip.is_unspecified
    assert (host.startswith("[")) == (ip.version == 6)
    assert set(url) <= set("agi:/[]0123456789abcdef.")  # nothing the dialplan would read as syntax


SAFE = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._/@+-")


@settings(max_examples=300, deadline=None)
@given(st.text(min_size=0, max_size=140))
def test_any_socket_path_is_refused_or_named_verbatim(socket: str) -> None:
    template = shipped_text(DIALPLAN)
    try:
        text = deploy.render_dialplan(template, socket, "127.0.0.1:4573")
    except ConfigError:
        assert not (socket.startswith("/") and set(socket) <= SAFE and len(socket) <= 107
                    and all(p not in ("", ".", "..") for p in socket[1:].split("/")))
        return
    assert set(socket) <= SAFE and socket.startswith("/")  # nothing Asterisk would split or expand
    assert f" same => n,AGI(tm4-dialin.agi,{socket})\n" in text
    assert len(text.splitlines()) == len(template.splitlines())
    launcher = deploy.render_launcher(shipped_text(AGI_SCRIPT), "/opt/tm4/bin/python", socket)
    ns: dict[str, object] = {}
    exec(compile(launcher.split("from tm4.dialin.agi")[0], "x", "exec"), ns)  # the SOCKET line parses
    assert launcher.count(f'SOCKET = "{socket}"\n') == 1


@settings(max_examples=300, deadline=None)
@given(st.text(min_size=0, max_size=260))
def test_any_python_path_is_refused_or_the_whole_shebang(python: str) -> None:
    try:
        text = deploy.render_launcher(shipped_text(AGI_SCRIPT), python, "/run/tm4/tm4.sock")
    except ConfigError:
        return
    first = text.split("\n", 1)[0]
    assert first == f"#!{python} -I" and len(first) < 256 and first.split() == [f"#!{python}", "-I"]
    compile(text, "tm4-dialin.agi", "exec")


@settings(max_examples=200, deadline=None)
@given(st.text(min_size=0, max_size=80))
def test_any_unit_path_is_refused_or_one_argument(path: str) -> None:
    try:
        units = render_units(tm4d=path, state_dir=path)
    except ConfigError:
        return
    d = units["tm4d.service"]
    assert f"ExecStart={path} --config /etc/tm4/tm4.toml\n" in d
    assert len(d.splitlines()) == len(render_units()["tm4d.service"].splitlines())
    assert not any(c in path for c in " \t\n%$;\\\"'")


# -- laying out and taking away -----------------------------------------------------------

def test_install_reinstall_uninstall(tmp_path: Path) -> None:
    root = tmp_path / "root"
    h = host(tmp_path)
    pieces = deploy.plan(h)
    # what an old `make install` left: a symlink into a checkout
    old_link = root / "var/lib/asterisk/agi-bin/tm4-dialin.agi"
    old_link.parent.mkdir(parents=True)
    old_link.symlink_to("/srv/checkout/agi-bin/tm4-dialin.agi")
    res = deploy.install(pieces, root, h.config.state_dir)
    assert not old_link.is_symlink() and old_link.read_text().startswith("#!/opt/tm4/bin/python -I")
    assert len(res.written) == len(pieces) and not res.warnings
    assert os.readlink(root / "usr/local/bin/tm4d") == "/opt/tm4/bin/tm4d"
    assert oct((root / "etc/tm4/tm4.toml").stat().st_mode & 0o777) == "0o600"
    assert oct((root / str(h.config.state_dir).lstrip("/")).stat().st_mode & 0o777) == "0o750"
    assert oct((root / "var/lib/asterisk/sounds/en/tm4").stat().st_mode & 0o777) == "0o755"
    manifest = json.loads((root / str(h.config.state_dir).lstrip("/") / "installed.json").read_text())
    assert set(manifest["files"]) == {p.path for p in pieces}

    # a second install with nothing changed writes nothing
    again = deploy.install(pieces, root, h.config.state_dir)
    assert again.written == [] and len(again.unchanged) == len(pieces) - 1 and again.kept == ["/etc/tm4/tm4.toml"]

    # the admin edits things; a new version no longer ships one prompt
    dialplan = root / "etc/asterisk/extensions_tm4.conf"
    dialplan.write_text(dialplan.read_text() + "; mine\n")
    (root / "etc/tm4/tm4.toml").write_text('[ami]\nsecret = "s3cret"\n')
    dropped = next(p for p in pieces if p.what == "prompt")
    fewer = [p for p in pieces if p is not dropped]
    res = deploy.install(fewer, root, h.config.state_dir)
    assert dropped.path in res.removed and not (root / dropped.path.lstrip("/")).exists()
    assert str(dialplan.relative_to(root).as_posix()) in " ".join(res.written)  # tm4's file: put back
    assert any("changed since it was installed" in w for w in res.warnings)
    assert (root / "etc/tm4/tm4.toml").read_text() == '[ami]\nsecret = "s3cret"\n'  # never replaced

    # the admin changes the dialplan again, links tm4 elsewhere: uninstall keeps both
    dialplan.write_text("; the admin's own now\n")
    (root / "usr/local/bin/tm4").unlink()
    (root / "usr/local/bin/tm4").symlink_to("/usr/bin/true")
    res = deploy.uninstall(root, h.config.state_dir)
    left = files_under(root)
    assert set(left) == {"etc/asterisk/extensions_tm4.conf", "etc/tm4/tm4.toml"}, sorted(left)
    assert os.readlink(root / "usr/local/bin/tm4") == "/usr/bin/true"
    assert set(res.kept) == {"/etc/asterisk/extensions_tm4.conf", "/usr/local/bin/tm4"}  # the config: not ours since
    assert not (root / "var/lib/asterisk/sounds").exists()  # created by install, empty again
    assert (root / "var/lib/asterisk/agi-bin").is_dir()  # was there before: stays
    with pytest.raises(deploy.NotInstalled):
        deploy.uninstall(root, h.config.state_dir)


def test_uninstall_keeps_the_store_and_a_real_file_in_the_links_place(tmp_path: Path) -> None:
    root = tmp_path / "root"
    h = host(tmp_path)
    (root / "usr/local/bin").mkdir(parents=True)
    (root / "usr/local/bin/tm4").write_text("#!/bin/sh\n# the admin's own tm4\n")
    res = deploy.install(deploy.plan(h), root, h.config.state_dir)
    assert res.warnings == ["/usr/local/bin/tm4 exists and is not a link; left alone"]
    state = root / str(h.config.state_dir).lstrip("/")
    (state / "tm4.db").write_bytes(b"the store")
    deploy.uninstall(root, h.config.state_dir)
    assert files_under(root) == {"usr/local/bin/tm4": b"#!/bin/sh\n# the admin's own tm4\n",
                                 f"{state.relative_to(root)}/tm4.db": b"the store"}


def test_a_broken_manifest_is_reported_not_guessed(tmp_path: Path) -> None:
    h = host(tmp_path)
    m = tmp_path / "root" / str(h.config.state_dir).lstrip("/") / "installed.json"
    m.parent.mkdir(parents=True)
    m.write_text("[1, 2]")
    with pytest.raises(deploy.Tm4Error, match="not tm4's install manifest"):
        deploy.uninstall(tmp_path / "root", h.config.state_dir)


def test_cli_install_reads_asterisk_conf_under_the_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    etc = root / "etc/asterisk"
    etc.mkdir(parents=True)
    (etc / "asterisk.conf").write_text("[directories]\nastetcdir => /etc/asterisk\n"
                                       "astagidir => /usr/share/asterisk/agi-bin\nastdatadir => /srv/ast\n")
    toml = tmp_path / "tm4.toml"
    toml.write_text(f'state_dir = "{tmp_path / "state"}"\n[daemon]\nsocket = "/run/x/tm4.sock"\n')
    r = CliRunner().invoke(cli, ["--config", str(toml), "install", "--root", str(root), "--json",
                                 "--python", "/opt/tm4/bin/python", "--tm4d", "/opt/tm4/bin/tm4d"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output)
    assert out["asterisk"]["astagidir"] == "/usr/share/asterisk/agi-bin" and out["enabled"] is False
    launcher = root / "usr/share/asterisk/agi-bin/tm4-dialin.agi"
    assert launcher.read_text().startswith("#!/opt/tm4/bin/python -I\n")
    assert (root / "srv/ast/sounds/en/tm4/enter-passcode.wav").is_file()
    assert "AGI(tm4-dialin.agi,/run/x/tm4.sock)" in (etc / "extensions_tm4.conf").read_text()
    assert f"ExecStart=/opt/tm4/bin/tm4d --config {toml}" in (root / "etc/systemd/system/tm4d.service").read_text()
    r = CliRunner().invoke(cli, ["--config", str(toml), "uninstall", "--root", str(root), "--json"])
    assert r.exit_code == 0, r.output
    assert files_under(root) == {"etc/asterisk/asterisk.conf": (etc / "asterisk.conf").read_bytes()}


def test_the_interpreter_must_be_reachable_by_asterisk() -> None:
    base = Path(tempfile.mkdtemp(prefix="tm4reach", dir="/tmp"))
    try:
        base.chmod(0o755)
        closed = base / "closed"
        (closed / "bin").mkdir(parents=True)
        closed.chmod(0o700)
        (closed / "bin" / "python").write_text("")
        assert deploy.unreachable_dir(str(closed / "bin" / "python")) == str(closed)
        (base / "link").symlink_to(closed / "bin" / "python")  # links are followed
        assert deploy.unreachable_dir(str(base / "link")) == str(closed)
        closed.chmod(0o755)
        assert deploy.unreachable_dir(str(base / "link")) is None
    finally:
        shutil.rmtree(base)


def test_install_service_after_install_keeps_the_rest(tmp_path: Path) -> None:
    """`tm4 install-service` is the systemd part of `tm4 install`: run after it, it leaves the
    launcher, prompts and dialplan installed and recorded, so uninstall still takes them."""
    root = tmp_path / "root"
    toml = tmp_path / "tm4.toml"
    toml.write_text(f'state_dir = "{tmp_path / "state"}"\n')
    base = ["--config", str(toml)]
    r = CliRunner().invoke(cli, [*base, "install", "--root", str(root), "--python", "/opt/tm4/bin/python",
                                 "--tm4d", "/opt/tm4/bin/tm4d"])
    assert r.exit_code == 0, r.output
    before = files_under(root)
    r = CliRunner().invoke(cli, [*base, "install-service", "--root", str(root), "--tm4d", "/srv/tm4/bin/tm4d"])
    assert r.exit_code == 0, r.output
    after = files_under(root)
    assert "ExecStart=/srv/tm4/bin/tm4d " in after["etc/systemd/system/tm4d.service"].decode()
    changed = {k for k in before if before[k] != after.get(k)}
    assert {Path(k).name for k in changed} == {"tm4d.service", "tm4-boot.service", "installed.json"}
    r = CliRunner().invoke(cli, [*base, "uninstall", "--root", str(root)])
    assert r.exit_code == 0, r.output
    assert files_under(root) == {}
