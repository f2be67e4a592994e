"""tm4 discover: Asterisk's trunks as entries that reach only their own protocol."""

from __future__ import annotations

import click

from tm4.asterisk import discover as disc_mod
from tm4.cli.common import Ctx, echo_json, json_option, pass_ctx


@click.command("discover")
@click.option("--dir", "config_dir", default=None, metavar="DIR",
              help="Asterisk's configuration directory (default: [asterisk] config_dir)")
@click.option("--ami", "use_ami", is_flag=True,
              help="ask the running Asterisk over AMI ([ami] in tm4.toml) instead of reading files")
@click.option("--apply", "do_apply", is_flag=True, help="store the entries (origin trunk); default: only show")
@click.option("--no-prune", is_flag=True, help="keep trunk entries whose trunk has disappeared")
@json_option
@pass_ctx
def discover(ctx: Ctx, config_dir: str | None, use_ami: bool, do_apply: bool, no_prune: bool,
             as_json: bool) -> None:
    """Find SIP/IAX trunks in Asterisk and propose one entry per trunk, for its protocol only."""
    cfg = ctx.config
    if use_ami:
        from tm4.asterisk.discover_ami import discover_ami

        found = discover_ami(cfg.ami.host, cfg.ami.port, cfg.ami.username, cfg.ami.secret)
    else:
        found = disc_mod.discover_files(config_dir or cfg.asterisk.config_dir, cfg.services)
    prune = not no_prune
    if do_apply:
        changes = disc_mod.apply(ctx.core, found, prune=prune, actor=ctx.actor)
    else:
        changes = disc_mod.plan(ctx.core, found, prune=prune)
    if as_json:
        echo_json({**found.to_json(), "changes": [c.to_json() for c in changes], "applied": do_apply})
        return
    if not found.trunks:
        click.echo("no trunks with a fixed address found")
    for t in found.trunks:
        click.echo(f"{t.entry_name:32} {','.join(t.services):16} {', '.join(t.sources)}")
    if found.notes:
        click.echo("\nnotes:")
        for n in found.notes:
            click.echo(f"  {n}")
    if changes:
        click.echo("")
    for c in changes:
        if c.action == "keep":
            continue
        why = f"  ({c.why})" if c.why else ""
        click.echo(f"{c.action:8} {c.entry}{why}")
    if not do_apply and any(c.action in ("add", "update", "remove") for c in changes):
        click.echo("\ndry run: nothing stored; run again with --apply")
    if any(any(not s[0].isdigit() and ":" not in s for s in c.sources)
           for c in changes if c.action in ("add", "update")):
        click.echo("DNS names open once tm4d's refresher has resolved them")


def register(cli: click.Group) -> None:
    cli.add_command(discover)
