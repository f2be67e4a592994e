"""tm4 blocklist add | list | del | refresh: named lists of addresses to drop."""

from __future__ import annotations

import click

from tm4.cli.common import Ctx, echo_json, json_option, pass_ctx
from tm4.core.durations import parse_duration
from tm4.core.errors import ValidationError
from tm4.core.model import format_time
from tm4.sources import blocklists as bl_mod


def _check_refresh(ctx: click.Context, param: click.Parameter, value: str) -> str | None:
    if value in ("never", "off", "0"):
        return None
    try:
        parse_duration(value)
    except ValidationError as exc:
        raise click.BadParameter(str(exc)) from None
    return value


@click.group("blocklist")
def blocklist_group() -> None:
    """Lists of attackers' addresses to drop (a file or an http(s) URL, refreshed by tm4d)."""


@blocklist_group.command("add")
@click.argument("name")
@click.argument("source")
@click.option("--refresh", default=bl_mod.DEFAULT_REFRESH, callback=_check_refresh, show_default=True,
              help="how often tm4d fetches it again (e.g. 6h, 1d; 'never')")
@pass_ctx
def add(ctx: Ctx, name: str, source: str, refresh: str | None) -> None:
    """Fetch SOURCE now and drop every address on it (whitelisted ones excepted)."""
    bl, res = bl_mod.add(ctx.core, name, source, refresh=refresh, actor=ctx.actor)
    click.echo(f"added blocklist {bl.name}: {res.message}")
    for line in bl_mod.whitelist_overlaps(ctx.core, bl):
        click.echo(f"  whitelisted, not dropped: {line}")


@blocklist_group.command("list")
@json_option
@pass_ctx
def list_(ctx: Ctx, as_json: bool) -> None:
    """The lists, their sources, sizes, last fetch and errors."""
    items = [(b, bl_mod.whitelist_overlaps(ctx.core, b)) for b in bl_mod.lists(ctx.core.store)]
    if as_json:
        echo_json([b.to_json(o) for b, o in items])
        return
    if not items:
        click.echo("no blocklists")
    for b, overlaps in items:
        click.echo(f"{b.name}  {len(b.nets)} networks  refresh {b.refresh or 'never'}  "
                   f"fetched {format_time(b.fetched) or 'never'}")
        click.echo(f"  source: {b.source}")
        if b.error:
            click.echo(f"  last error: {b.error}")
        for line in overlaps:
            click.echo(f"  whitelisted, not dropped: {line}")


@blocklist_group.command("del")
@click.argument("names", nargs=-1, required=True)
@pass_ctx
def delete(ctx: Ctx, names: tuple[str, ...]) -> None:
    """Remove lists; their addresses are no longer dropped."""
    for n in names:
        bl_mod.delete(ctx.core, n, actor=ctx.actor)
        click.echo(f"removed blocklist {n}")


@blocklist_group.command("refresh")
@click.argument("names", nargs=-1)
@json_option
@pass_ctx
def refresh(ctx: Ctx, names: tuple[str, ...], as_json: bool) -> None:
    """Fetch lists again now (all when no NAME); a failed fetch keeps the last copy."""
    results = bl_mod.refresh(ctx.core, list(names), actor=ctx.actor)
    if as_json:
        echo_json([{"name": r.name, "changed": r.changed, "message": r.message, "error": r.error}
                   for r in results])
        return
    for r in results:
        click.echo(f"{r.name}: {r.message}" + (f" -- {r.error}" if r.error else ""))


def register(cli: click.Group) -> None:
    cli.add_command(blocklist_group)
