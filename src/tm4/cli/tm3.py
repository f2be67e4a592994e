"""tm4 import tm3 DIR: bring Travelin' Man 3 accounts over (dry run unless --apply)."""

from __future__ import annotations

import click

from tm4.cli.common import Ctx, echo_json, json_option, pass_ctx
from tm4.sources import tm3import


@click.command("tm3")
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--rules", "rules_file", default=None, metavar="FILE",
              help="the iptables rules file the accounts went into (default: iptables, rules.v4, "
                   "rules.v6 or iptables.rules in DIR)")
@click.option("--apply", "do_apply", is_flag=True, help="store the entries; default: only show them")
@click.option("--replace", is_flag=True, help="overwrite entries that already exist with the same name")
@json_option
@pass_ctx
def tm3(ctx: Ctx, directory: str, rules_file: str | None, do_apply: bool, replace: bool, as_json: bool) -> None:
    """Import Travelin' Man 3 account files (*.iptables) and its rules file."""
    imp = tm3import.read_tm3(directory, ctx.config.services, ctx.config.rtp_range(), rules_file)
    results = tm3import.apply_import(ctx.core, imp, replace=replace, actor=ctx.actor) if do_apply else []
    if as_json:
        echo_json({**imp.to_json(), "applied": do_apply,
                   "results": [{"name": n, "result": r} for n, r in results]})
        return
    click.echo(f"read {len(imp.files)} file(s): {', '.join(imp.files) or '-'}")
    for e in imp.entries:
        click.echo(f"  {e.name:28} {','.join(e.sources):34} {','.join(e.services):24} {e.origin}")
    if imp.problems:
        click.echo(f"\ncould not map {len(imp.problems)} line(s), or parts of them:")
        for p in imp.problems:
            click.echo(f"  {p.where}: {p.reason}" + (f"\n      {p.text}" if p.text else ""))
    if imp.skipped:
        click.echo(f"\n{len(imp.skipped)} line(s) need nothing in tm4 (loopback, established, RTP, duplicates)")
    if do_apply:
        click.echo("")
        for name, result in results:
            click.echo(f"  {name}: {result}")
    elif imp.entries:
        click.echo("\ndry run: nothing stored; run again with --apply")


def register(cli: click.Group) -> None:
    group = cli.commands.get("import")
    if not isinstance(group, click.Group):
        group = click.Group("import", help="Bring entries over from other firewalls.")
        cli.add_command(group)
    group.add_command(tm3)
