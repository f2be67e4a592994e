"""tm4 providers list | enable | disable: trusted SIP providers from the curated list."""

from __future__ import annotations

from datetime import date

import click

from tm4.cli.common import Ctx, echo_json, json_option, pass_ctx
from tm4.core.model import net_text
from tm4.sources import providers as prov

file_option = click.option("--file", "path", default=None, metavar="PATH",
                           help="another providers file in the same format (default: the bundled one)")


@click.group("providers")
def providers_group() -> None:
    """Well-known SIP providers' signalling networks (TM3's trusted providers)."""


@providers_group.command("list")
@json_option
@file_option
def list_(as_json: bool, path: str | None) -> None:
    """Show the providers tm4 knows, their networks and where each comes from."""
    plist = prov.load_providers(path)
    for w in plist.warnings:
        click.echo(f"tm4: {w}", err=True)
    if as_json:
        echo_json([p.to_json() for p in plist.providers])
        return
    click.echo(f"providers list version {plist.version}")
    today = date.today()
    for p in plist.providers:
        click.echo(f"\n{p.name}  ({p.title})  -> {', '.join(p.protocols)}")
        click.echo(f"  source: {p.source}")
        click.echo(f"  verified: {verified_text(p, today)}")
        for n in p.networks:
            extra = f"  [{n.source}]" if n.source != p.source else ""
            click.echo(f"  {net_text(n.network):20} {n.note}{extra}")


def verified_text(p: prov.Provider, today: date) -> str:
    """'2026-12-05 (3 days ago): how' -- when the list was last compared with its pages."""
    age = p.age_days(today)
    if age is None:
        when = "date unknown"
    else:
        when = f"{p.verified_on} ({'today' if age == 0 else f'{age} days ago'})"
        if age > 365:
            when += " -- over a year old, compare it with the source pages again"
    return f"{when}: {p.verified}" if p.verified else when


@providers_group.command("enable")
@click.argument("names", nargs=-1, required=True)
@click.option("--service", "-s", "services", multiple=True,
              help="only these of the provider's services (repeatable)")
@file_option
@pass_ctx
def enable(ctx: Ctx, names: tuple[str, ...], services: tuple[str, ...], path: str | None) -> None:
    """Whitelist providers' signalling networks, for SIP/IAX only (entries provider-NAME)."""
    plist = prov.load_providers(path)
    for e in prov.enable(ctx.core, plist, list(names), services=list(services) or None, actor=ctx.actor):
        click.echo(f"enabled {e.name}: {len(e.sources)} network(s) -> {', '.join(e.services)}")


@providers_group.command("disable")
@click.argument("names", nargs=-1, required=True)
@pass_ctx
def disable(ctx: Ctx, names: tuple[str, ...]) -> None:
    """Remove the entries `providers enable` made."""
    for e in prov.disable(ctx.core, list(names), actor=ctx.actor):
        click.echo(f"removed {e.name}")


def register(cli: click.Group) -> None:
    cli.add_command(providers_group)
