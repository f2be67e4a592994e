"""`tm4 install` / `tm4 uninstall`: put on this PBX what the installed tm4 package ships
(AGI launcher, prompts, dialplan, systemd units, config skeleton), or take it away."""

from __future__ import annotations

import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import click

from tm4.cli.common import Ctx, echo_json, json_option, pass_ctx
from tm4.core.config import config_path

UNITS = ["tm4-boot.service", "tm4d.service"]
root_option = click.option("--root", "root", default="/", show_default=True,
                           type=click.Path(file_okay=False),
                           help="lay out under this directory (packaging, tests)")


def register(cli: click.Group) -> None:
    cli.add_command(install_cmd)
    cli.add_command(uninstall_cmd)


def _beside_python(name: str) -> str:
    """The venv's own program (not whichever one PATH finds first)."""
    here = Path(sys.executable).parent / name
    if here.exists():
        return str(here)
    return shutil.which(name) or f"/usr/local/bin/{name}"


def _systemd(root: str, no_enable: bool) -> bool:
    return root == "/" and not no_enable and Path("/run/systemd/system").is_dir()


def _show(res: dict[str, list[str]], root: str) -> None:
    """One line per file, the prompts counted per directory; paths as laid out (under --root)."""
    from tm4.daemon.deploy import under

    def where(path: str) -> str:
        return path if root == "/" else str(under(root, path))

    for word, key in (("wrote", "written"), ("removed", "removed"), ("kept", "kept"),
                      ("removed directory", "dirs_removed")):
        sounds: dict[str, int] = {}
        for path in res[key]:
            if path.endswith((".wav", ".gsm")):
                parent = where(str(Path(path).parent))
                sounds[parent] = sounds.get(parent, 0) + 1
            else:
                click.echo(f"{word} {where(path)}")
        for parent, n in sounds.items():
            click.echo(f"{word} {n} prompt file(s) in {parent}/")
    if res["unchanged"]:
        click.echo(f"{len(res['unchanged'])} file(s) already current")


@click.command("install")
@root_option
@click.option("--asterisk", "asterisk_conf", default=None, metavar="PATH",
              help="Asterisk's asterisk.conf, or the directory holding it (default: "
                   "[asterisk] config_dir); its astetcdir, astagidir, astdatadir are used")
@click.option("--python", "python", default=None, metavar="PATH",
              help="the interpreter the AGI launcher names (default: this tm4's, "
                   f"{sys.executable})")
@click.option("--tm4d", "tm4d", default=None, metavar="PATH", help="tm4d for the systemd units "
              "(default: the one beside this tm4's python)")
@click.option("--no-enable", is_flag=True, help="do not enable the systemd units")
@json_option
@pass_ctx
def install_cmd(ctx: Ctx, root: str, asterisk_conf: str | None, python: str | None, tm4d: str | None,
                no_enable: bool, as_json: bool) -> None:
    """Put tm4 on this PBX: AGI launcher, prompts, dialplan, systemd units, config skeleton.

    Run it from the venv tm4 is installed in (the launcher and the units name that
    venv's python and tm4d). Again after an upgrade or a change of [daemon] socket."""
    from tm4.asterisk.dirs import asterisk_dirs
    from tm4.daemon.deploy import Host, install, plan, unreachable_dir

    cfg = ctx.config
    cfg_file = str(config_path(ctx.config_path))
    if asterisk_conf:
        dirs = asterisk_dirs(asterisk_conf)
    else:  # asterisk.conf is read under --root; the paths in it (or the default) are the host's
        rooted = Path(root) / cfg.asterisk.config_dir.lstrip("/")
        dirs = asterisk_dirs(None, rooted)
        if dirs.etc == rooted:
            dirs = replace(dirs, etc=Path(cfg.asterisk.config_dir))
    host = Host(python=python or sys.executable, tm4d=tm4d or _beside_python("tm4d"),
                config_path=cfg_file, config=cfg, dirs=dirs, tm4=_beside_python("tm4"))
    res = install(plan(host), root, cfg.state_dir)
    blocked = unreachable_dir(host.python)
    if blocked:
        res.warnings.append(f"{blocked} is closed to other users: Asterisk (not root) cannot run "
                            f"{host.python}; install tm4 into a venv it can reach, e.g. /opt/tm4")
    if str(dirs.etc) != cfg.asterisk.config_dir:
        res.warnings.append(f"Asterisk's configs are in {dirs.etc}: set [asterisk] config_dir = "
                            f"\"{dirs.etc}\" in {cfg_file} so tm4d writes the ACL there")
    enabled = False
    if _systemd(root, no_enable):
        for argv in (["systemctl", "daemon-reload"], ["systemctl", "enable", *UNITS]):
            subprocess.run(argv, check=True)
        enabled = True
    if as_json:
        echo_json({**res.to_json(), "asterisk": dirs.to_json(), "python": host.python,
                   "tm4d": host.tm4d, "enabled": enabled})
        return
    _show(res.to_json(), root)  # type: ignore[arg-type]
    source = (f"from {dirs.config_file}" if dirs.config_file.is_file()
              else f"no {dirs.config_file}: Asterisk's defaults")
    click.echo(f"Asterisk: etc {dirs.etc}, agi-bin {dirs.agi}, sounds {dirs.sounds} ({source})")
    for w in res.warnings:
        click.echo(f"warning: {w}")
    click.echo("enabled tm4-boot.service and tm4d.service" if enabled else
               "to start: systemctl daemon-reload && systemctl enable --now tm4-boot.service tm4d.service")
    click.echo(f"next: tm4 init, tm4 asterisk install, and `#include {dirs.etc}/extensions_tm4.conf` "
               "in extensions.conf (see the README, Wiring tm4 into Asterisk)")


@click.command("uninstall")
@root_option
@click.option("--no-disable", is_flag=True, help="leave the systemd units' state alone")
@json_option
@pass_ctx
def uninstall_cmd(ctx: Ctx, root: str, no_disable: bool, as_json: bool) -> None:
    """Remove what `tm4 install` put on this PBX; a file changed since, the config and the
    state stay. The firewall rules stay in force until `tm4 disable` or a reboot."""
    from tm4.daemon.deploy import uninstall

    cfg = ctx.config
    if _systemd(root, no_disable):
        subprocess.run(["systemctl", "disable", "--now", *UNITS], check=False)
    res = uninstall(root, cfg.state_dir)
    if _systemd(root, no_disable):
        subprocess.run(["systemctl", "daemon-reload"], check=False)
    if as_json:
        echo_json(res.to_json())
        return
    _show(res.to_json(), root)  # type: ignore[arg-type]
    if res.kept:
        click.echo("kept files were changed after install (or are the admin's): remove them by hand")
