"""tm4d-related verbs: daemon run/status/reload, safe-mode, disable/enable, install-service, init."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import click

from tm4.cli.common import Ctx, echo_json, invoke, json_option, pass_ctx
from tm4.core.errors import Tm4Error


def _invoke(ctx: Ctx, op: str, args: dict[str, Any] | None = None) -> Any:
    """Through tm4d when it runs, else directly (root)."""
    args = dict(args or {})
    args.setdefault("actor", ctx.actor)
    return invoke(ctx.config.daemon.socket, op, args, lambda: ctx.core)


# -- tm4 daemon ----------------------------------------------------------------------

@click.group("daemon")
def daemon_group() -> None:
    """Run tm4d, or ask the running one how it is."""


@daemon_group.command("run")
@click.option("--boot", is_flag=True, help="load the stored rule set once and exit (what tm4-boot runs)")
@click.option("-v", "--verbose", is_flag=True)
@pass_ctx
def daemon_run(ctx: Ctx, boot: bool, verbose: bool) -> None:
    """Run tm4d in the foreground (systemd runs the `tm4d` program the same way)."""
    from tm4.daemon.main import main

    argv = (["--config", ctx.config_path] if ctx.config_path else []) + (["--boot"] if boot else [])
    sys.exit(main(argv + (["-v"] if verbose else [])))


@daemon_group.command("status")
@json_option
@pass_ctx
def daemon_status(ctx: Ctx, as_json: bool) -> None:
    """What tm4d hosts, and how each part is doing."""
    from tm4.ops.control import request

    st = request(ctx.config.daemon.socket, "status")
    if as_json:
        echo_json(st)
        return
    click.echo(f"tm4d pid {st['pid']}, up {st['uptime']:.0f}s, config {st['config']}")
    sm = st["safe_mode"]
    click.echo(f"safe mode: {'ON until ' + sm['until'] if sm['active'] else 'off'}")
    if st["disabled"]:
        click.echo("firewall: DISABLED (`tm4 enable`)")
    for name, c in st["components"].items():
        err = f" ({c['error']})" if c["error"] else ""
        click.echo(f"  {name:8} {c['state']}{err}")
        if c.get("summary"):  # the guard: its AMI session and the last gap
            click.echo(f"           {c['summary']}")
    d = st["drift"]
    last = d["last"]
    click.echo(f"drift repairs: {d['repairs']}" + (f", last {last['time']}: {last['found']}" if last else ""))
    for n in st["other_firewalls"]:
        click.echo(f"other firewall: {n['kind']} ({n['where']}): {n['note']}")


@daemon_group.command("reload")
@pass_ctx
def daemon_reload(ctx: Ctx) -> None:
    """Re-read the config (like SIGHUP); a broken file is reported and the running one kept."""
    from tm4.ops.control import request

    res = request(ctx.config.daemon.socket, "reload")
    if not res["reloaded"]:
        raise Tm4Error(f"config not reloaded (tm4d keeps the running one): {res['error']}")
    click.echo(f"reloaded; changed: {', '.join(res['changed']) or 'nothing'}")
    if res.get("needs_restart"):
        click.echo(f"restart tm4d for: {', '.join(res['needs_restart'])}")


# -- safe mode, disable, enable ----------------------------------------------------------

@click.group("safe-mode", invoke_without_command=True)
@json_option
@click.pass_context
def safe_mode(cctx: click.Context, as_json: bool) -> None:
    """Is ssh open to everyone after a short previous boot? (`off` ends it)"""
    if cctx.invoked_subcommand is not None:
        return
    ctx: Ctx = cctx.find_object(Ctx)  # type: ignore[assignment]
    st = _invoke(ctx, "safe_mode")
    if as_json:
        echo_json(st)
    else:
        click.echo(f"safe mode: ON until {st['until']}" if st["active"] else "safe mode: off")


@safe_mode.command("off")
@pass_ctx
def safe_mode_off(ctx: Ctx) -> None:
    """End safe mode now (and for the rest of this boot)."""
    res = _invoke(ctx, "safe_mode_off")
    click.echo("safe mode ended: ssh is back to the whitelist" if res["was_on"] else "safe mode was not on")


@click.command()
@click.option("--yes", is_flag=True, help="do not ask")
@pass_ctx
def disable(ctx: Ctx, yes: bool) -> None:
    """Open up deliberately: remove tm4's table and keep it out (refused while the lock file exists)."""
    lock = Path(ctx.config.daemon.lock_file)
    if lock.exists():
        raise Tm4Error(f"{lock} exists: this firewall is locked on; remove the file to allow `tm4 disable`")
    if not yes:
        click.confirm("This removes every tm4 rule: the PBX is then open to everyone. Continue?", abort=True)
    _invoke(ctx, "disable")
    click.echo("tm4 disabled: table inet tm4 removed. `tm4 enable` loads it again.")


@click.command()
@pass_ctx
def enable(ctx: Ctx) -> None:
    """Load tm4's rules again after `tm4 disable`."""
    res = _invoke(ctx, "enable")
    click.echo(f"tm4 enabled: rules applied at {res['last_apply']}")


# -- install-service ------------------------------------------------------------------

def _tm4d_path() -> str:
    found = shutil.which("tm4d")
    if found:
        return found
    here = Path(sys.executable).parent / "tm4d"
    return str(here) if here.exists() else "/usr/local/bin/tm4d"


@click.command("install-service")
@click.option("--root", "root", default="/", type=click.Path(file_okay=False), show_default=True,
              help="install under this directory (packaging, tests)")
@click.option("--tm4d", "tm4d", default=None, help="path of the tm4d program (default: found on PATH)")
@click.option("--no-enable", is_flag=True, help="do not enable the units")
@pass_ctx
def install_service(ctx: Ctx, root: str, tm4d: str | None, no_enable: bool) -> None:
    """Put the systemd units, /etc/tm4/tm4.toml (commented) and the state directory in place."""
    from tm4.daemon.deploy import install, service_pieces, under
    from tm4.daemon.units import protect_home_for

    cfg_path = str(ctx.config_path or "/etc/tm4/tm4.toml")
    state = ctx.config.state_dir
    program = tm4d or _tm4d_path()
    pieces = service_pieces(program, cfg_path, ctx.config, ctx.config.asterisk.config_dir,
                            protect_home_for(program, sys.prefix, cfg_path, str(state)))
    res = install(pieces, root, state, partial=True)  # the systemd part of `tm4 install`
    for path in res.written + res.unchanged:
        click.echo(f"wrote {under(root, path)}")
    for path in res.kept:
        click.echo(f"kept {under(root, path)} (exists)")
    click.echo(f"state directory {under(root, state)}")
    systemd_up = Path("/run/systemd/system").is_dir()
    if root != "/" or no_enable or not systemd_up:
        click.echo("to start: systemctl daemon-reload && systemctl enable --now tm4-boot.service tm4d.service")
        return
    for argv in (["systemctl", "daemon-reload"],
                 ["systemctl", "enable", "tm4-boot.service", "tm4d.service"]):
        subprocess.run(argv, check=True)
    click.echo("enabled tm4-boot.service and tm4d.service; start with: systemctl start tm4d")


# -- init -------------------------------------------------------------------------------

@click.command()
@click.option("--write/--dry-run", "write", default=False, help="write the config (default: show it)")
@click.option("--overwrite", is_flag=True, help="replace an existing config (a .bak is kept)")
@click.option("--trust-lan", "trust", multiple=True, metavar="NET",
              help="whitelist this detected LAN network for all services (repeatable)")
@click.option("--asterisk-dir", default=None, help="where Asterisk's configs are (default [asterisk] config_dir)")
@click.option("--skeleton", is_flag=True, help="print the commented default config (etc/tm4.toml.example) and exit")
@json_option
@pass_ctx
def init(ctx: Ctx, write: bool, overwrite: bool, trust: tuple[str, ...], asterisk_dir: str | None,
         skeleton: bool, as_json: bool) -> None:
    """First-run setup: detect addresses, your SSH client, LANs and Asterisk's ports; write the config."""
    from tm4.daemon.initsetup import (
        config_skeleton,
        detect,
        merge_values,
        plan_config,
        write_config,
    )

    if skeleton:
        click.echo(config_skeleton(), nl=False)
        return

    det = detect(Path(asterisk_dir or ctx.config.asterisk.config_dir))
    values = plan_config(det)
    text = config_skeleton(merge_values(ctx.config.raw, values))
    if as_json:
        echo_json({**det.to_json(), "config": values})
    else:
        click.echo(f"server addresses: {', '.join(det.addresses) or 'none found'}")
        click.echo(f"your SSH client:  {', '.join(det.ssh_clients) or 'not over SSH'}"
                   + (" (will be granted ssh)" if det.ssh_clients else ""))
        for net in det.lan:
            mark = "trusted" if net in trust else f"offered: add with --trust-lan {net}"
            click.echo(f"LAN network:      {net} ({mark})")
        if det.lan:
            click.echo("  (private ranges are NOT trusted automatically: cloud providers route them"
                       " between customers)")
        for itf in det.interfaces:
            click.echo(f"interface:        {itf['name']} ({itf['kind']}; offered, not trusted: "
                       f"add [interfaces] {itf['name']} = \"local\" or \"trusted\" to tm4.toml)")
        for svc, ports in det.sip.items():
            click.echo(f"Asterisk {svc}:  port(s) {ports}")
        if det.rtp:
            click.echo(f"Asterisk RTP:     {det.rtp}")
        for n in det.notes:
            click.echo(f"note: {n}")
    unknown = [t for t in trust if t not in det.lan]
    if unknown:
        raise Tm4Error(f"--trust-lan {unknown[0]} is not one of the detected LAN networks")
    cfg_path = Path(ctx.config_path or os.environ.get("TM4_CONFIG") or "/etc/tm4/tm4.toml")
    if not write:
        if not as_json:
            click.echo(f"\n--- {cfg_path} (dry run; `tm4 init --write` writes it) ---")
            click.echo(text, nl=False)
        return
    write_config(cfg_path, text, overwrite=overwrite)
    click.echo(f"wrote {cfg_path}")
    from tm4.core.config import load_config
    from tm4.ops.engine import Core

    core = Core(load_config(cfg_path), protect=[])
    for i, addr in enumerate(det.ssh_clients):
        name = "admin-ssh" if i == 0 else f"admin-ssh-{i + 1}"
        core.allow(name, [addr], ["ssh"], note="tm4 init: the SSH client that ran it", actor=ctx.actor,
                   replace=True)
        click.echo(f"granted ssh to {addr} (entry {name})")
    for i, net in enumerate(trust):
        core.allow(f"lan-{i + 1}", [net], ["all"], note="tm4 init --trust-lan", actor=ctx.actor, replace=True)
        click.echo(f"trusted LAN {net} (entry lan-{i + 1})")
    click.echo("next: `tm4 apply` (or start tm4d), then `tm4 status`")


def register(cli: click.Group) -> None:
    for cmd in (daemon_group, safe_mode, disable, enable, install_service, init):
        cli.add_command(cmd)
